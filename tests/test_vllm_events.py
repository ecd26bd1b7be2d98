"""vLLM's KV events as a real `vllm serve` (vLLM CPU 0.32) published them, recorded by
benchmarks/vllm_capture.py into tests/data/vllm/ (64-bit int hashes, vLLM's default, and raw
hash bytes): both encodings decode, and re-keyed they are exactly the blocks the router hashes
for the same prompts (salted chains apart, evictions applied, the reset clearing all), which
is what makes kv_aware work over vLLM workers. Also vLLM's /metrics as recorded."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kvbaton.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.kv.index import KVIndex
from kvbaton.kv.vllm_events import (
    VLLMBlockKeys,
    VLLMCleared,
    VLLMEventBatch,
    VLLMRemoved,
    VLLMStored,
    decode_vllm_batch,
)
from kvbaton.router.vllm_worker import parse_vllm_metrics

DATA = Path(__file__).parent / "data" / "vllm"
FP = "router-fingerprint"


def recording(name: str) -> dict[str, Any]:
    return json.loads((DATA / f"events_{name}.json").read_text())


def payloads(rec: dict[str, Any]) -> list[tuple[int, bytes]]:
    return [(b["seq"], base64.b64decode(b["payload_b64"])) for b in rec["live"]]


def chain(rec: dict[str, Any], prompt: list[int], salt: str | None = None) -> list[bytes]:
    return hash_block_chain(root_hash(FP, salt), prompt, rec["block_size"])


def apply_all(rec: dict[str, Any], upto: int | None = None) -> tuple[KVIndex, VLLMBlockKeys]:
    index, keys = KVIndex(), VLLMBlockKeys(FP, rec["block_size"])
    for seq, payload in payloads(rec)[:upto]:
        index.apply("w", seq, keys.translate(seq, decode_vllm_batch(payload)))
    return index, keys


@pytest.fixture(params=["int", "bytes"])
def rec(request: pytest.FixtureRequest) -> dict[str, Any]:
    return recording(request.param)


def test_recorded_batches_decode_in_vllm_s_current_encoding(rec: dict[str, Any]) -> None:
    want = int if rec["hashes"] == "int" else bytes
    kinds: set[type] = set()
    for _, payload in payloads(rec):
        batch = decode_vllm_batch(payload)
        for ev in batch.events:
            kinds.add(type(ev))
            if isinstance(ev, VLLMStored):
                assert all(isinstance(h, want) for h in ev.block_hashes)
                assert len(ev.token_ids) == len(ev.block_hashes) * ev.block_size == len(ev.block_hashes) * 32
                assert ev.medium == "GPU" and ev.group_idx == 0 and ev.kv_cache_spec_kind == "full_attention"
    assert kinds == {VLLMStored, VLLMRemoved, VLLMCleared}  # the capture made each kind appear


def test_the_router_s_hashes_of_the_recorded_prompts_find_their_blocks(rec: dict[str, Any]) -> None:
    last = len(rec["live"]) - 1  # the final batch carries the reset
    index, keys = apply_all(rec, upto=last)
    reqs = rec["requests"]
    plain, extended, salted, streamed = reqs[0]["prompt"], reqs[1]["prompt"], reqs[2]["prompt"], reqs[3]["prompt"]
    assert reqs[2]["fields"] == {"cache_salt": "tenant-a"}
    assert salted == plain
    bs = rec["block_size"]
    # The later prompts evicted some of these; whatever the index holds is a prefix of the
    # router's chain, and what it holds of the newest prompt is the whole prompt.
    for prompt, salt in ((plain, None), (extended, None), (salted, "tenant-a"), (streamed, None)):
        hashes = chain(rec, prompt, salt)
        held = index.longest_prefix(hashes).of("w")
        # Every block of it was stored once (some evicted since): vLLM's hashes of them,
        # re-keyed, are the router's chain.
        assert [keys.key_of(h) for h in _vllm_chain(rec, prompt, salt)] == hashes
        assert held <= len(hashes)
    newest = reqs[-2]["prompt"]  # the last prompt before the reset
    assert index.longest_prefix(chain(rec, newest)).of("w") == len(newest) // bs
    # The salted chain is another chain: its hashes never equal the unsalted ones.
    assert not set(chain(rec, salted, "tenant-a")) & set(chain(rec, plain))
    # Evictions were applied: the index never holds more blocks than vLLM's cache has.
    num_blocks = parse_vllm_metrics(rec["metrics_after"]).num_blocks
    assert num_blocks is not None and 0 < index.block_count("w") <= num_blocks
    assert not keys.skipped


def _vllm_chain(rec: dict[str, Any], prompt: list[int], salt: str | None) -> list[Any]:
    """vLLM's own hashes of the prompt's blocks, read back from the recorded stores: follow
    parent links from the chain's first block (parent None, this salt, these tokens)."""
    bs = rec["block_size"]
    stores = [ev for _, p in payloads(rec) for ev in decode_vllm_batch(p).events if isinstance(ev, VLLMStored)]
    out: list[Any] = []
    parent = None
    for b in range(len(prompt) // bs):
        block = prompt[b * bs:(b + 1) * bs]
        found = None
        for ev in stores:
            for i, h in enumerate(ev.block_hashes):
                p = ev.parent_block_hash if i == 0 else ev.block_hashes[i - 1]
                extra = (ev.extra_keys or [None] * len(ev.block_hashes))[i]
                tokens = ev.token_ids[i * bs:(i + 1) * bs]
                if p == parent and tokens == block and (b > 0 or extra == ([salt] if salt else None)):
                    found = h
        if found is None:
            break
        out.append(found)
        parent = found
    return out


def test_the_reset_clears_everything_and_seq_0_counts_as_a_clear(rec: dict[str, Any]) -> None:
    index, keys = apply_all(rec)
    seq, payload = payloads(rec)[-1]
    translated = keys.translate(seq, decode_vllm_batch(payload))
    assert isinstance(translated.events[0], AllBlocksCleared)
    # After the reset only the prompt sent after it is cached.
    assert index.block_count("w") == len(rec["requests"][-1]["prompt"]) // rec["block_size"]
    first = keys.translate(0, decode_vllm_batch(payloads(rec)[0][1]))
    assert isinstance(first.events[0], AllBlocksCleared) and isinstance(first.events[1], BlockStored)


def test_removed_blocks_map_to_the_keys_they_were_stored_under(rec: dict[str, Any]) -> None:
    keys = VLLMBlockKeys(FP, rec["block_size"])
    stored: set[bytes] = set()
    removed = 0
    for seq, payload in payloads(rec):
        for ev in keys.translate(seq, decode_vllm_batch(payload)).events:
            if isinstance(ev, BlockStored):
                stored.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                assert set(ev.block_hashes) <= stored
                removed += len(ev.block_hashes)
    assert removed > 0


def _as_array(ev: dict[str, Any]) -> list[Any]:
    """An event in vLLM's older positional encoding (array_like structs, tag first)."""
    if ev["type"] == "BlockStored":
        return ["BlockStored", ev["block_hashes"], ev["parent_block_hash"], ev["token_ids"], ev["block_size"],
                ev.get("lora_id"), ev.get("medium")]
    if ev["type"] == "BlockRemoved":
        return ["BlockRemoved", ev["block_hashes"], ev.get("medium")]
    return ["AllBlocksCleared"]


def test_the_older_positional_encoding_decodes_to_the_same_events(rec: dict[str, Any]) -> None:
    for _, payload in payloads(rec):
        raw = msgspec.msgpack.decode(payload)
        old = msgspec.msgpack.encode([raw[0], [_as_array(e) for e in raw[1]], raw[2]])
        new_events, old_events = decode_vllm_batch(payload).events, decode_vllm_batch(old).events
        assert len(new_events) == len(old_events)
        for n, o in zip(new_events, old_events, strict=True):
            assert type(n) is type(o)
            if isinstance(n, VLLMStored) and isinstance(o, VLLMStored):
                assert (n.block_hashes, n.parent_block_hash, n.token_ids, n.block_size, n.medium) == (
                    o.block_hashes, o.parent_block_hash, o.token_ids, o.block_size, o.medium)
            elif isinstance(n, VLLMRemoved) and isinstance(o, VLLMRemoved):
                assert (n.block_hashes, n.medium) == (o.block_hashes, o.medium)


def _stored(**kw: Any) -> VLLMStored:
    base: dict[str, Any] = dict(block_hashes=[11, 12], parent_block_hash=None, token_ids=list(range(8)),
                                block_size=4)
    return VLLMStored(**{**base, **kw})


@pytest.mark.parametrize(("event", "reason"), [
    (_stored(lora_name="adapter"), "LoRA adapter"),
    (_stored(lora_id=3), "LoRA adapter"),
    (_stored(group_idx=1), "another KV cache group"),
    (_stored(kv_cache_spec_kind="sliding_window"), "another KV cache group"),
    (_stored(block_size=8, token_ids=list(range(16))), "block size 8, the router's is 4"),
    (_stored(parent_block_hash=999), "parent block never seen"),
    (_stored(extra_keys=[[["mm-hash", 0]], None]), "multimodal or embedding extra keys"),
    (_stored(token_ids=list(range(7))), "token_ids do not cover the blocks"),
])
def test_blocks_that_cannot_be_keyed_are_left_out_and_counted(event: VLLMStored, reason: str) -> None:
    keys = VLLMBlockKeys(FP, 4)
    out = keys.translate(5, VLLMEventBatch(0.0, [event]))
    assert out.events == [] and keys.skipped == {reason: len(event.block_hashes)}


def test_a_later_block_with_extra_keys_ends_the_keyed_run() -> None:
    keys = VLLMBlockKeys(FP, 4)
    out = keys.translate(1, VLLMEventBatch(0.0, [_stored(extra_keys=[None, [["mm", 4]]])]))
    assert len(out.events) == 1 and isinstance(out.events[0], BlockStored)
    assert out.events[0].block_hashes == hash_block_chain(root_hash(FP), list(range(8)), 4)[:1]
    assert keys.skipped == {"multimodal or embedding extra keys": 1}


@pytest.mark.parametrize("payload", [
    msgspec.msgpack.encode({"ts": 1}),
    msgspec.msgpack.encode([1.0, "events", 0]),
    msgspec.msgpack.encode(["now", [], 0]),
    msgspec.msgpack.encode([1.0, [{"type": "BlockMoved", "block_hashes": [1]}], 0]),
    msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": ["x"], "parent_block_hash": None,
                                   "token_ids": [1], "block_size": 1}], 0]),
    msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved"}], 0]),
    msgspec.msgpack.encode([1.0, [42], 0]),
    b"\xc1",
])
def test_malformed_payloads_raise_decode_errors(payload: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_vllm_batch(payload)


def test_recorded_metrics_agree_with_the_recorded_usage(rec: dict[str, Any]) -> None:
    m = parse_vllm_metrics(rec["metrics_after"])
    assert m.block_size == rec["block_size"] and m.prefix_caching is True
    assert (m.running, m.waiting) == (0, 0) and m.kv_usage is not None
    assert m.start_time is not None and m.start_time > 1e9
    before_reset = rec["requests"][:-1]  # the metrics were read before the last request
    assert m.prefix_hits == sum(r["usage"]["prompt_tokens_details"]["cached_tokens"]
                                for r in before_reset if r["usage"])
    assert m.prefix_queries == sum(len(r["prompt"]) for r in before_reset)
    load = m.load()
    assert load is not None and load["num_requests_running"] == 0


def test_metrics_that_are_not_prometheus_text_are_an_error() -> None:
    with pytest.raises(ValueError, match="not Prometheus text"):
        parse_vllm_metrics("vllm:num_requests_running{engine=\"0\" 1.0\n")
    assert parse_vllm_metrics("# nothing here\n").block_size is None
