"""Engine-level prefill→decode handoff: leases on the prefill side, imports on the decode side.

The transfer itself is simulated by copying block tensors; the network data plane has its own
tests. What is checked here: decoding from imported KV equals a plain run, only the blocks the
decode engine lacks are fetched, and leases and imports never leak blocks.
"""

from __future__ import annotations

import dataclasses

import pytest

from conftest import GREEDY, make_llm, random_prompts
from kvbaton import SamplingParams
from kvbaton.engine.engine import LLMEngine
from kvbaton.engine.leases import LeaseError, LeaseTable

PREFILL = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


def engines(**kw) -> tuple[LLMEngine, LLMEngine]:
    return make_llm(**kw).engine, make_llm(**kw).engine


def run_to_end(eng: LLMEngine, rid: str):
    last = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.request_id == rid:
                last = out
    return last


def prefill(eng: LLMEngine, prompt: list[int], ttl: float = 30.0, rid: str = "p"):
    eng.add_request(prompt, PREFILL, rid, lease_ttl_s=ttl)
    out = run_to_end(eng, rid)
    assert out is not None and out.finished and out.kv_lease is not None
    return out


def transfer(src: LLMEngine, dst: LLMEngine, lease_id: str, plan) -> None:
    """Stand-in for the data plane: copy the lease's blocks into the reserved ones."""
    src_ids = src.leases.begin_transfer(lease_id, plan.fetch_indexes)
    try:
        for s, d in zip(src_ids, plan.dst_block_ids):
            dst.runner.kv_cache[d].copy_(src.runner.kv_cache[s])
    finally:
        src.leases.end_transfer(lease_id)


def decode(p: LLMEngine, d: LLMEngine, prompt: list[int], params=GREEDY, rid: str = "d"):
    pout = prefill(p, prompt, rid=f"p-{rid}")
    lease = pout.kv_lease
    plan = d.reserve_import(prompt, lease.block_hashes, rid)
    assert plan is not None
    transfer(p, d, lease.lease_id, plan)
    assert p.release_lease(lease.lease_id)
    d.commit_import(rid, params, (pout.token_ids[0], None))
    return pout, plan, run_to_end(d, rid)


@pytest.mark.parametrize("length", [5, 16, 17, 40, 130])
def test_decode_from_imported_kv_equals_plain_run(plain_reference, length: int) -> None:
    p, d = engines()
    prompt = random_prompts(1, length, length, seed=length)[0]
    pout, plan, dout = decode(p, d, prompt)
    expected = plain_reference(prompt)
    assert pout.token_ids == expected[:1]
    assert dout.token_ids == expected
    assert plan.num_local_blocks == 0 and len(plan.fetch_indexes) == -(-length // 16)
    p.collect_leases()
    for eng in (p, d):
        eng.check_integrity()
        assert eng.pool.num_used_blocks == 0
    assert d.stats()["kv_blocks_imported"] == -(-length // 16)


def test_decode_side_reuses_its_own_prefix_and_fetches_only_the_rest(plain_reference) -> None:
    p, d = engines()
    shared = random_prompts(1, 64, 64, seed=1)[0]
    first = shared + random_prompts(1, 10, 10, seed=2)[0]
    second = shared + random_prompts(1, 21, 21, seed=3)[0]
    decode(p, d, first, rid="a")
    _, plan, out = decode(p, d, second, rid="b")
    assert plan.num_local_blocks == 4  # the 64 shared tokens were cached on the decode side
    assert plan.fetch_indexes == [4, 5]
    assert out.token_ids == plain_reference(second)
    assert out.num_cached_tokens == 64
    p.collect_leases()
    p.check_integrity()
    d.check_integrity()


def test_lease_pins_blocks_until_released_and_expiry_frees_them() -> None:
    now = [0.0]
    p = make_llm().engine
    p.leases = p.handoff.leases = LeaseTable(5.0, clock=lambda: now[0])
    prompt = random_prompts(1, 40, 40, seed=4)[0]
    out = prefill(p, prompt, ttl=5.0)
    assert p.pool.num_used_blocks == 3 and len(p.leases) == 1
    p.check_integrity()
    now[0] = 4.9
    assert p.collect_leases() == 0 and p.pool.num_used_blocks == 3
    now[0] = 5.0
    with pytest.raises(LeaseError):
        p.leases.begin_transfer(out.kv_lease.lease_id, [0])
    assert p.collect_leases() == 1
    assert p.pool.num_used_blocks == 0 and len(p.leases) == 0
    assert p.stats()["kv_leases_expired"] == 1
    p.check_integrity()
    # The full blocks stay findable after the lease ends: a repeat prompt hits them.
    p.add_request(prompt, PREFILL, "again")
    run_to_end(p, "again")
    assert p.pool.prefix_hits >= 32


def test_a_lease_being_read_is_not_freed_until_the_transfer_ends() -> None:
    now = [0.0]
    p = make_llm().engine
    p.leases = p.handoff.leases = LeaseTable(5.0, clock=lambda: now[0])
    out = prefill(p, random_prompts(1, 20, 20, seed=5)[0], ttl=5.0)
    lid = out.kv_lease.lease_id
    ids = p.leases.begin_transfer(lid, [0, 1])
    assert len(ids) == 2
    now[0] = 10.0
    assert p.collect_leases() == 0 and p.pool.num_used_blocks == 2
    p.leases.end_transfer(lid)
    assert p.collect_leases() == 1 and p.pool.num_used_blocks == 0
    assert p.release_lease(lid) is False  # already gone: idempotent


def test_bad_lease_indexes_and_unknown_leases_are_refused() -> None:
    p = make_llm().engine
    out = prefill(p, random_prompts(1, 20, 20, seed=6)[0])
    with pytest.raises(LeaseError, match="outside lease"):
        p.leases.begin_transfer(out.kv_lease.lease_id, [2])
    with pytest.raises(LeaseError, match="unknown lease"):
        p.leases.begin_transfer("nope", [0])
    assert p.release_lease(out.kv_lease.lease_id)
    with pytest.raises(LeaseError):
        p.leases.begin_transfer(out.kv_lease.lease_id, [0])


def test_cancelled_import_and_mismatched_handle_leave_the_pool_clean() -> None:
    p, d = engines()
    prompt = random_prompts(1, 50, 50, seed=7)[0]
    pout = prefill(p, prompt)
    plan = d.reserve_import(prompt, pout.kv_lease.block_hashes, "x")
    assert d.pool.num_used_blocks == 4
    d.check_integrity()
    assert d.cancel_import("x") and not d.cancel_import("x")
    assert d.pool.num_used_blocks == 0
    d.check_integrity()
    # Another tenant's salt, other tokens: the hashes do not describe this prompt here.
    with pytest.raises(ValueError, match="block_hashes do not match"):
        d.reserve_import(prompt, pout.kv_lease.block_hashes, "y", cache_salt="tenant-b")
    with pytest.raises(ValueError, match="block_hashes do not match"):
        d.reserve_import(prompt[::-1], pout.kv_lease.block_hashes, "z")
    assert d.pool.num_used_blocks == 0
    assert plan is not None


def test_import_is_refused_when_the_pool_is_full() -> None:
    p = make_llm().engine
    d = make_llm(num_kv_blocks=8).engine
    prompt = random_prompts(1, 60, 60, seed=8)[0]
    pout = prefill(p, prompt)
    busy = d.pool.allocate(5)  # other requests hold most of the cache right now
    assert d.reserve_import(prompt, pout.kv_lease.block_hashes, "big") is None
    d.pool.free(busy)
    d.check_integrity()
    assert d.reserve_import(prompt, pout.kv_lease.block_hashes, "big") is not None
    # A prompt that can never fit is a client error, not a wait.
    tiny = make_llm(num_kv_blocks=3).engine
    with pytest.raises(ValueError, match="KV blocks"):
        tiny.reserve_import(prompt, pout.kv_lease.block_hashes, "huge")


def test_recompute_fallback_continues_after_the_given_first_token(plain_reference) -> None:
    p, d = engines()
    prompt = random_prompts(1, 33, 33, seed=9)[0]
    pout = prefill(p, prompt)
    d.add_request(prompt, GREEDY, "r", first_token=(pout.token_ids[0], -0.5))
    out = run_to_end(d, "r")
    assert out.token_ids == plain_reference(prompt)
    params = dataclasses.replace(GREEDY, logprobs=0)
    d.add_request(prompt, params, "lp", first_token=(pout.token_ids[0], -0.5))
    out = run_to_end(d, "lp")
    assert out.logprobs[0] == -0.5 and len(out.logprobs) == len(out.token_ids)
    with pytest.raises(ValueError, match="first token id"):
        d.add_request(prompt, GREEDY, "bad", first_token=(10**9, None))


def test_abort_of_an_imported_request_frees_its_blocks() -> None:
    p, d = engines()
    prompt = random_prompts(1, 45, 45, seed=10)[0]
    pout = prefill(p, prompt)
    plan = d.reserve_import(prompt, pout.kv_lease.block_hashes, "a")
    transfer(p, d, pout.kv_lease.lease_id, plan)
    d.commit_import("a", GREEDY, (pout.token_ids[0], None))
    d.check_integrity()
    assert d.abort_request("a")
    assert d.pool.num_used_blocks == 0
    d.check_integrity()
