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
