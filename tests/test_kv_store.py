"""The tiered KV store through the engine: offload -> evict -> reload gives the plain run's
tokens, every failure outcome recomputes and leaks nothing, the disk survives a restart,
pins, the reuse filter, and the events tiers publish."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import GREEDY, make_llm, random_prompts
from kvbaton import LLM
from kvbaton.kv.events import BlockRemoved, BlockStored
from kvbaton.kv.store.base import TierError
from kvbaton.kv.store.disk import DiskTier
from kvbaton.kv.store.host import HostTier

HOST = 8 << 20  # bytes: thousands of tiny-random blocks
SMALL_POOL = 24  # device blocks: a few prompts' worth, so rounds evict each other's prefixes
PROMPTS = random_prompts(10, 70, 130, seed=11)


def tiered(**kwargs: Any) -> LLM:
    kwargs.setdefault("num_kv_blocks", SMALL_POOL)
    kwargs.setdefault("max_num_seqs", 2)
    return make_llm(**kwargs)


def run_rounds(llm: LLM, rounds: int = 3) -> list[list[list[int]]]:
    out = []
    for _ in range(rounds):
        out.append([o.token_ids for o in llm.generate(PROMPTS, GREEDY)])
        llm.engine.check_integrity()
    return out


def tier_stats(llm: LLM, name: str) -> dict[str, Any]:
    return llm.engine.stats()["kv_tiers"][name]


@pytest.fixture(scope="module")
def reference(plain_reference) -> list[list[int]]:
    return [plain_reference(p) for p in PROMPTS]


@pytest.mark.parametrize("mode", ["write-back", "write-through"])
def test_host_tier_reload_equals_plain_run_and_counts_hits(mode: str, reference) -> None:
    llm = tiered(kv_host_cache_bytes=HOST, kv_offload_mode=mode)
    rounds = run_rounds(llm)
    assert all(r == reference for r in rounds)
    host = tier_stats(llm, "host")
    # The device holds ~2 prompts; later rounds get the rest back from the host tier.
    assert host["hit_tokens"] > 0 and host["loads"] > 0 and host["stores"] > 0
    assert llm.engine.pool.prefix_hits >= host["hit_tokens"]


def test_without_tiers_later_rounds_recompute(reference) -> None:
    llm = tiered()
    assert llm.engine.offload is None
    first, *later = run_rounds(llm)
    assert first == reference and all(r == reference for r in later)


def test_host_and_disk_tiers_reload_equals_plain_run(tmp_path: Path, reference) -> None:
    llm = tiered(kv_host_cache_bytes=HOST, kv_disk_cache_dir=str(tmp_path), kv_disk_cache_bytes=HOST)
    assert all(r == reference for r in run_rounds(llm))
    llm.engine.offload.io.drain(10)
    llm.engine.offload.step_begin()  # reap the disk writes
    assert tier_stats(llm, "disk")["stores"] > 0  # every block the host stored went on to disk


def test_disk_only_tier_reloads_and_a_restart_finds_its_blocks(tmp_path: Path, reference) -> None:
    llm = tiered(kv_disk_cache_dir=str(tmp_path), kv_disk_cache_bytes=HOST)
    assert all(r == reference for r in run_rounds(llm, 2))
    assert tier_stats(llm, "disk")["hit_tokens"] > 0
    llm.engine.close()
    again = tiered(kv_disk_cache_dir=str(tmp_path), kv_disk_cache_bytes=HOST)
    outs = again.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert sum(o.num_cached_tokens for o in outs) > 0  # the first round of a fresh worker hits
    again.engine.check_integrity()


def test_a_corrupt_block_file_is_never_loaded(tmp_path: Path, reference) -> None:
    llm = tiered(kv_disk_cache_dir=str(tmp_path), kv_disk_cache_bytes=HOST)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    llm.engine.close()
    files = sorted(tmp_path.rglob("*.kvb"))
    assert files
    for f in files:  # flip one payload byte of every block: headers stay valid
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    again = tiered(kv_disk_cache_dir=str(tmp_path), kv_disk_cache_bytes=HOST)
    outs = again.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference
    disk = tier_stats(again, "disk")
    assert disk["failed_loads"] > 0 and disk["hit_tokens"] == 0
    again.engine.check_integrity()
    again.engine.close()
    # The corrupt files were deleted and the recomputed blocks written again: a third start
    # loads them all cleanly.
    third = tiered(kv_disk_cache_dir=str(tmp_path), kv_disk_cache_bytes=HOST)
    assert [o.token_ids for o in third.generate(PROMPTS, GREEDY)] == reference
    assert tier_stats(third, "disk")["failed_loads"] == 0 and tier_stats(third, "disk")["hit_tokens"] > 0


def test_a_failing_load_recomputes_and_frees_its_blocks(monkeypatch, reference) -> None:
    llm = tiered(kv_host_cache_bytes=HOST)
    run_rounds(llm, 1)

    def broken(self, plan, rows, row_ids):
        raise TierError("simulated read failure")

    monkeypatch.setattr(HostTier, "read", broken)
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    assert tier_stats(llm, "host")["failed_loads"] > 0
    llm.engine.check_integrity()
    assert llm.engine.pool.num_used_blocks == 0


class Gate:
    """A host-tier read that blocks until released (a slow medium)."""

    def __init__(self, monkeypatch) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real = HostTier.read

        def slow(tier, plan, rows, row_ids):
            self.entered.set()
            assert self.release.wait(30)
            return real(tier, plan, rows, row_ids)

        monkeypatch.setattr(HostTier, "read", slow)


def test_a_load_that_times_out_recomputes_and_its_blocks_come_back_when_it_ends(monkeypatch, reference) -> None:
    llm = tiered(kv_host_cache_bytes=HOST, kv_load_timeout_s=0.2)
    run_rounds(llm, 1)
    gate = Gate(monkeypatch)
    eng = llm.engine
    outs = {}
    rids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o.token_ids
    assert gate.entered.is_set()
    assert [outs[r] for r in rids] == reference
    held = eng.offload.block_refs()
    assert held  # the timed-out load still owns its blocks: the copy may still write them
    eng.check_integrity()
    gate.release.set()
    eng.offload.io.drain(10)
    eng.offload.step_begin()
    assert eng.offload.block_refs() == {}
    eng.check_integrity()
    assert eng.pool.num_used_blocks == 0


def test_aborting_a_request_while_its_prefix_loads_leaks_nothing(monkeypatch) -> None:
    llm = tiered(kv_host_cache_bytes=HOST)
    run_rounds(llm, 1)
    gate = Gate(monkeypatch)
    eng = llm.engine
    rid = eng.add_request(PROMPTS[0], GREEDY)
    for _ in range(50):
        eng.step()
        if gate.entered.is_set():
            break
    assert gate.entered.is_set()
    assert eng.abort_request(rid)
    eng.check_integrity()
    assert eng.offload.block_refs()  # held until the copy stops
    gate.release.set()
    eng.offload.io.drain(10)
    eng.offload.step_begin()
    eng.check_integrity()
    assert eng.offload.block_refs() == {} and eng.pool.num_used_blocks == 0


def test_reuse_filter_offloads_a_block_only_once_it_was_used_twice() -> None:
    llm = tiered(kv_host_cache_bytes=HOST, kv_offload_min_hits=2, num_kv_blocks=64)
    eng = llm.engine
    llm.generate(PROMPTS[:1], GREEDY)
    eng.pool.reset_prefix_cache()  # everything evictable goes: nothing seen twice was offloaded
    llm.generate(PROMPTS[1:2], GREEDY)
    assert tier_stats(llm, "host")["blocks_used"] == 0
    llm.generate(PROMPTS[:1], GREEDY)  # the second sighting
    for _ in range(3):  # readahead offloads evictable blocks within a step or two
        llm.generate(PROMPTS[2:3], GREEDY)
    assert tier_stats(llm, "host")["blocks_used"] > 0


def test_pinned_blocks_survive_host_pressure_until_unpinned() -> None:
    block_bytes = make_llm(num_kv_blocks=4).engine.kv_spec.bytes_per_block
    llm = tiered(kv_host_cache_bytes=12 * block_bytes)  # a host tier of 12 blocks
    eng = llm.engine
    llm.generate(PROMPTS[:1], GREEDY)
    hashes = eng.root_hash(None)
    from kvbaton.kv.hashing import hash_block_chain

    chain = hash_block_chain(hashes, PROMPTS[0], eng.config.block_size)
    pinned = eng.offload.pin(chain, PROMPTS[0], ttl_s=60)
    assert pinned == len(chain)
    host = eng.offload.tier("host")
    llm.generate(PROMPTS[1:], GREEDY)  # far more than 12 blocks pass through the host tier
    assert all(host.dir.is_ready(h) for h in chain)
    assert eng.offload.unpin(chain) == len(chain)
    llm.generate(PROMPTS[1:], GREEDY)
    assert not all(host.dir.is_ready(h) for h in chain)
    eng.check_integrity()


def test_tiers_publish_stored_and_removed_with_their_medium() -> None:
    events: list[Any] = []
    llm = tiered(kv_host_cache_bytes=40 * make_llm(num_kv_blocks=4).engine.kv_spec.bytes_per_block)
    llm.engine.pool.event_sink = events.append
    run_rounds(llm, 2)
    stored = {e.medium for e in events if isinstance(e, BlockStored)}
    removed = {e.medium for e in events if isinstance(e, BlockRemoved)}
    assert stored == {"CPU", "CPU_TIER"}  # the CPU device pool, then the host tier
    assert "CPU_TIER" in removed  # 40 blocks: the host tier evicted too
    snap: list[Any] = []
    llm.engine.pool.event_sink = snap.append
    sent = llm.engine.publish_snapshot()
    assert sent == len([e for e in snap if isinstance(e, BlockStored)])
    assert {e.medium for e in snap if isinstance(e, BlockStored)} == {"CPU", "CPU_TIER"}


def test_disk_tier_on_an_unwritable_path_is_off_with_one_warning_and_serving_goes_on(
    tmp_path: Path, caplog, reference
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with caplog.at_level("WARNING"):
        llm = tiered(kv_disk_cache_dir=str(not_a_dir / "kv"), kv_disk_cache_bytes=HOST)
        assert all(r == reference for r in run_rounds(llm, 2))
    disk = llm.engine.offload.tier("disk")
    assert isinstance(disk, DiskTier) and not disk.enabled
    assert tier_stats(llm, "disk")["enabled"] is False
    assert len([r for r in caplog.records if "disk" in r.getMessage().lower()]) == 1


@pytest.mark.slow
def test_smollm2_offload_evict_reload_equals_plain_run() -> None:
    from kvbaton import SamplingParams

    params = SamplingParams(max_tokens=8, temperature=0)
    prompts = [f"Question {i}: describe the history of the number {i * 37} in three sentences. " * 6
               for i in range(3)]
    plain = LLM("smollm2-135m", enable_prefix_caching=False, max_num_batched_tokens=2048)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    for mode in ("write-back", "write-through"):
        # 12 device blocks hold one prompt (~8 blocks) at a time: every later round reloads.
        llm = LLM("smollm2-135m", num_kv_blocks=12, max_num_seqs=1, kv_host_cache_bytes=256 << 20,
                  kv_offload_mode=mode)
        for _ in range(2):
            assert [o.token_ids for o in llm.generate(prompts, params)] == want
        assert llm.engine.stats()["kv_tiers"]["host"]["hit_tokens"] > 0
        llm.engine.check_integrity()
