"""The router's happy paths against fake workers: disaggregated and local legs, direct
answers from the prefill leg, chat conversion, non-streaming assembly, block hashes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx

from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.router.policies import (
    POLICIES,
    PlacementPolicy,
    RoutingRequest,
    WorkerView,
    register_policy,
)
from router_fakes import BLOCK_SIZE, FINGERPRINT, FakeWorker, cluster, expected_text, tokenizer

LONG = "x" * 40  # 40 byte tokens: above the tests' disagg_min_tokens (8)
SHORT = "hi"


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=10)


def stream_events(url: str, path: str, body: dict[str, Any]) -> list[Any]:
    """Every SSE payload (parsed; '[DONE]' as the string)."""
    out: list[Any] = []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=10) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line[6:]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_disaggregated_flow_sends_prefill_then_decode_with_the_handle() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    with cluster(p, d) as r:
        resp = post(r.url, "/v1/completions", {"prompt": LONG, "max_tokens": 5, "temperature": 0, "seed": 7})
        assert resp.status_code == 200, resp.text
        body = resp.json()
    assert body["choices"][0]["text"] == expected_text(5)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == 40 and body["usage"]["completion_tokens"] == 5
    assert "kv_transfer_params" not in body
    ids = list(tokenizer().encode(LONG, add_special_tokens=False))
    (pre,) = p.prefills
    assert pre["prompt"] == ids and pre["max_tokens"] == 1 and pre["stream"] is False
    assert pre["kv_transfer_params"] == {"do_remote_decode": True}
    assert pre["temperature"] == 0 and pre["seed"] == 7
    (dec,) = d.decodes
    assert dec["prompt"] == ids and dec["max_tokens"] == 5 and dec["stream"] is True
    assert dec["kv_transfer_params"]["lease_id"] == p.leases[0]
    assert dec["stream_options"] == {"include_usage": True} and dec["seed"] == 7
    assert p.releases == []  # the decode worker consumed the lease


def test_short_prompt_skips_the_prefill_leg() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    with cluster(p, d) as r:
        resp = post(r.url, "/v1/completions", {"prompt": SHORT, "max_tokens": 3})
        assert resp.status_code == 200, resp.text
    assert p.prefills == []
    (dec,) = d.decodes
    assert "kv_transfer_params" not in dec
    assert resp.json()["choices"][0]["text"] == expected_text(3)


def test_min_tokens_zero_always_disaggregates_and_huge_never_does() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    with cluster(p, d, disagg_min_tokens=0) as r:
        assert post(r.url, "/v1/completions", {"prompt": SHORT, "max_tokens": 2}).status_code == 200
    assert len(p.prefills) == 1
    p2, d2 = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    with cluster(p2, d2, disagg_min_tokens=10_000) as r:
        assert post(r.url, "/v1/completions", {"prompt": LONG, "max_tokens": 2}).status_code == 200
    assert p2.prefills == [] and len(d2.decodes) == 1


def test_first_token_that_finishes_is_answered_from_the_prefill_leg() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    p.prefill_fault = "finish"
    with cluster(p, d) as r:
        events = stream_events(r.url, "/v1/completions", {"prompt": LONG, "max_tokens": 9,
                                                          "stream_options": {"include_usage": True}})
        one = post(r.url, "/v1/completions", {"prompt": LONG, "max_tokens": 1}).json()
    assert d.decodes == []
    assert events[0]["choices"][0]["text"] == expected_text(1)
    assert events[0]["choices"][0]["finish_reason"] == "stop"
    assert events[1]["usage"]["completion_tokens"] == 1 and events[-1] == "[DONE]"
    assert one["choices"][0]["finish_reason"] == "stop"
    # Both leases were released: no decode worker will fetch them.
    assert sorted(p.releases) == sorted(p.leases) and len(p.leases) == 2


def test_max_tokens_one_is_answered_from_the_prefill_leg() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    with cluster(p, d) as r:
        body = post(r.url, "/v1/completions", {"prompt": LONG, "max_tokens": 1}).json()
    assert d.decodes == [] and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"] == expected_text(1) and p.releases == p.leases


def test_completion_stream_relays_chunks_with_the_routers_id() -> None:
    d = FakeWorker("both", "d")
    with cluster(d) as r:
        events = stream_events(r.url, "/v1/completions", {
            "prompt": SHORT, "max_tokens": 3, "logprobs": 1, "return_token_ids": True,
            "stream_options": {"include_usage": True}})
    *chunks, usage, done = events
    assert done == "[DONE]"
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_text(3)
    assert {c["id"] for c in events[:-1]} == {events[0]["id"]} and events[0]["id"].startswith("cmpl-")
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[100], [101], [102]]
    assert chunks[0]["choices"][0]["logprobs"]["tokens"] == ["t0 "]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert "kv_transfer_params" not in usage


def test_chat_stream_is_converted_to_chat_chunks() -> None:
    d = FakeWorker("both", "d")
    with cluster(d) as r:
        events = stream_events(r.url, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
            "logprobs": True, "top_logprobs": 1, "stream_options": {"include_usage": True}})
    ids = tokenizer().apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                          add_generation_prompt=True)
    assert d.decodes[0]["prompt"] == list(tokenizer().encode(ids, add_special_tokens=False))
    assert d.decodes[0]["logprobs"] == 1
    role, *content, usage, done = events
    assert done == "[DONE]"
    assert role["object"] == "chat.completion.chunk" and role["usage"] is None
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == expected_text(3)
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, "length"]
    lp = content[0]["choices"][0]["logprobs"]["content"][0]
    assert lp["token"] == "t0 " and lp["logprob"] == -0.5
    assert [t["token"] for t in lp["top_logprobs"]] == ["t0 "]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert {e["id"] for e in events[:-1]} == {role["id"]} and role["id"].startswith("chatcmpl-")


def test_non_streaming_chat_and_completion_are_assembled_from_the_stream() -> None:
    d = FakeWorker("both", "d")
    with cluster(d) as r:
        chat = post(r.url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hey"}],
                                                     "max_tokens": 4, "logprobs": True}).json()
        comp = post(r.url, "/v1/completions", {"prompt": SHORT, "max_tokens": 4, "logprobs": 0,
                                               "return_token_ids": True}).json()
    assert all(b["stream"] is True for b in d.decodes)  # the router always streams from workers
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": expected_text(4)}
    assert chat["choices"][0]["finish_reason"] == "length"
    assert [c["token"] for c in chat["choices"][0]["logprobs"]["content"]] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert chat["usage"]["completion_tokens"] == 4
    assert comp["choices"][0]["text"] == expected_text(4)
    assert comp["choices"][0]["token_ids"] == [100, 101, 102, 103]
    assert comp["choices"][0]["logprobs"]["text_offset"] == [0, 3, 6, 9]


def test_chat_without_max_tokens_gets_the_default_capped_by_the_context() -> None:
    d = FakeWorker("both", "d", max_model_len=64)
    with cluster(d) as r:
        assert post(r.url, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "a"}]}).status_code == 200
    n_prompt = len(d.decodes[0]["prompt"])
    assert d.decodes[0]["max_tokens"] == 64 - n_prompt


class _Recording(PlacementPolicy):
    name = "test_recording"
    seen: list[RoutingRequest] = []

    def choose(self, request: RoutingRequest, candidates: Sequence[WorkerView], leg: str) -> WorkerView:
        self.seen.append(request)
        return candidates[0]


def test_routing_request_carries_token_ids_block_hashes_and_salt() -> None:
    if "test_recording" not in POLICIES:
        register_policy(_Recording)
    _Recording.seen.clear()
    d = FakeWorker("both", "d")
    with cluster(d, decode_policy="test_recording") as r:
        assert post(r.url, "/v1/completions", {"prompt": LONG[:10], "max_tokens": 2,
                                               "cache_salt": "tenant-a"}).status_code == 200
    (req,) = _Recording.seen
    ids = list(tokenizer().encode(LONG[:10], add_special_tokens=False))
    assert list(req.token_ids) == ids and req.cache_salt == "tenant-a" and req.max_tokens == 2
    assert req.block_size == BLOCK_SIZE
    assert list(req.block_hashes) == hash_block_chain(root_hash(FINGERPRINT, "tenant-a"), ids, BLOCK_SIZE)
    assert len(req.block_hashes) == 2
    assert d.decodes[0]["cache_salt"] == "tenant-a"
