"""The CUDA path: same engine invariants on a GPU; skipped where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

from conftest import GREEDY, make_llm, random_prompts
from kvbaton import SamplingParams

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


def _clean(llm) -> None:
    assert llm.engine.pool.num_used_blocks == 0
    llm.engine.check_integrity()


def test_cuda_fp32_matches_cpu():
    prompts = random_prompts(6, 5, 120, seed=31)
    cpu = make_llm(dtype="float32").generate(prompts, GREEDY)
    gpu_llm = make_llm(dtype="float32", device="cuda")
    gpu = gpu_llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]
    _clean(gpu_llm)


def test_cuda_chunked_cached_preempted_equal_plain():
    prompts = random_prompts(8, 20, 90, seed=32)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    plain = make_llm(dtype="float32", device="cuda", enable_prefix_caching=False)
    ref = [plain.generate([p], params)[0].token_ids for p in prompts]
    tight = make_llm(dtype="float32", device="cuda", num_kv_blocks=16, max_num_batched_tokens=24)
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == ref
    again = tight.generate(prompts[:2], params)
    assert [o.token_ids for o in again] == ref[:2]
    _clean(tight)


def test_cuda_bf16_runs_and_seeded_sampling_is_reproducible():
    llm = make_llm(device="cuda")  # dtype auto -> bfloat16 on CUDA
    assert llm.engine.runner.kv_cache.dtype == torch.bfloat16
    prompts = random_prompts(4, 10, 40, seed=33)
    p = SamplingParams(max_tokens=16, temperature=0.9, seed=5, ignore_eos=True)
    a = [o.token_ids for o in llm.generate(prompts, p)]
    b = [o.token_ids for o in llm.generate(prompts, p)]
    assert a == b and all(len(t) == 16 for t in a)
    _clean(llm)


def test_cuda_disaggregated_handoff_over_the_data_plane_equals_plain():
    """Prefill on one CUDA engine, fetch its leased blocks over the TCP data plane (through
    pinned staging) into another CUDA engine, decode there: same tokens as a plain run."""
    from kvbaton.kv.transfer.tcp import TransferClient
    from kvbaton.kv.transfer.tcp_server import TransferServer
    from kvbaton.worker.kv_connector import _LeaseSource

    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    p = make_llm(dtype="float32", device="cuda").engine
    d = make_llm(dtype="float32", device="cuda").engine
    plain = make_llm(dtype="float32", device="cuda", enable_prefix_caching=False)
    server = TransferServer(p.runner.kv_cache, p.kv_spec, p.model_fingerprint, _LeaseSource(p.leases)).start()
    client = TransferClient(d.kv_spec, d.model_fingerprint)
    try:
        for i, prompt in enumerate(random_prompts(4, 10, 300, seed=34)):
            p.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True),
                          f"p{i}", lease_ttl_s=30)
            pout = [o for o in iter_until_done(p) if o.request_id == f"p{i}"][-1]
            plan = d.reserve_import(prompt, pout.kv_lease.block_hashes, f"d{i}")
            host, port = server.address
            client.fetch(host, port, pout.kv_lease.lease_id, plan.fetch_indexes, d.runner.kv_cache,
                         plan.dst_block_ids)
            assert client.release(host, port, pout.kv_lease.lease_id)
            d.commit_import(f"d{i}", params, (pout.token_ids[0], None))
            dout = [o for o in iter_until_done(d) if o.request_id == f"d{i}"][-1]
            assert dout.token_ids == plain.generate([prompt], params)[0].token_ids
        p.collect_leases()
        for eng in (p, d):
            assert eng.pool.num_used_blocks == 0
            eng.check_integrity()
    finally:
        client.close()
        server.stop()


def iter_until_done(eng):
    while eng.has_unfinished_requests():
        yield from eng.step()
