"""Attention backends agree with each other and with dense causal attention."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import GREEDY, make_llm, random_prompts
from kvbaton.engine import cpu_kernel
from kvbaton.engine.attention import (
    ATTENTION_BACKENDS,
    CPUPagedBackend,
    SeqSlice,
    create_attention_backend,
)

L, HKV, H, D, BS = 2, 2, 6, 16, 4


def _dense_reference(q, k, v, start):
    """Causal attention of the last queries over the whole sequence, aligned to the end."""
    n, ctx = q.shape[0], k.shape[0]
    mask = torch.arange(ctx)[None, :] <= (torch.arange(start, start + n)[:, None])
    o = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
    )
    return o.transpose(0, 1)


@pytest.mark.parametrize("backend", sorted(ATTENTION_BACKENDS))
def test_backend_matches_dense_attention_over_scattered_blocks(backend):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    num_blocks = 64
    cache = torch.zeros(num_blocks, L, 2, BS, HKV, D)
    try:
        be = create_attention_backend(backend, cache, BS)
    except RuntimeError as e:
        pytest.skip(str(e))
    free = list(range(num_blocks))
    rng.shuffle(free)
    # (context already cached, tokens computed now): decodes, a fresh prompt, a later chunk.
    shapes = [(9, 1), (0, 1), (30, 1), (0, 7), (13, 6), (3, 1)]
    seqs, full_k, full_v = [], [], []
    for cached, new in shapes:
        total = cached + new
        blocks = [free.pop() for _ in range(-(-total // BS))]
        k = torch.randn(total, HKV, D, generator=gen)
        v = torch.randn(total, HKV, D, generator=gen)
        for p in range(cached):  # what earlier steps wrote
            cache[blocks[p // BS], 0, 0, p % BS] = k[p]
            cache[blocks[p // BS], 0, 1, p % BS] = v[p]
        seqs.append(SeqSlice(blocks, cached, new))
        full_k.append(k)
        full_v.append(v)
    q = torch.randn(sum(n for _, n in shapes), H, D, generator=gen)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes)])
    out = be.forward(0, q, new_k, new_v, be.prepare(seqs))
    t = 0
    for (cached, new), k, v in zip(shapes, full_k, full_v):
        ref = _dense_reference(q[t : t + new], k, v, cached)
        torch.testing.assert_close(out[t : t + new], ref, rtol=1e-5, atol=1e-5)
        t += new


def test_auto_picks_kernel_for_fp32_and_bf16_cpu_and_sdpa_otherwise():
    # The kernel is there exactly when it builds here (a C compiler, KVBATON_DISABLE_C_KERNEL unset).
    expected = "cpu_paged" if cpu_kernel.load() is not None else "sdpa"
    for dtype in (torch.float32, torch.bfloat16):
        assert create_attention_backend("auto", torch.zeros(2, L, 2, BS, HKV, D, dtype=dtype), BS).name == expected
    fp16 = create_attention_backend("auto", torch.zeros(2, L, 2, BS, HKV, D, dtype=torch.float16), BS)
    assert fp16.name == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        create_attention_backend("nope", torch.zeros(2, L, 2, BS, HKV, D), BS)


def test_kernel_builds_wherever_a_c_compiler_exists():
    if os.environ.get("KVBATON_DISABLE_C_KERNEL"):
        pytest.skip("KVBATON_DISABLE_C_KERNEL is set")
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler: SDPA is the only CPU backend here")
    assert cpu_kernel.load() is not None


PROBE = """
import torch
from kvbaton.engine import cpu_kernel
from kvbaton.engine.attention import create_attention_backend
print(cpu_kernel.load() is None, create_attention_backend("auto", torch.zeros(2, 2, 2, 4, 2, 16), 4).name)
"""


def test_disable_env_var_makes_auto_fall_back_to_sdpa():
    # load() caches its first answer for the process, so the variable is tried in a fresh one.
    if cpu_kernel.load() is None:
        pytest.skip("the kernel does not build here: disabling it could change nothing")
    env = {**os.environ, "KVBATON_DISABLE_C_KERNEL": "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["True", "sdpa"]


def test_engine_outputs_equal_across_backends():
    prompts = random_prompts(10, 1, 120, seed=41)
    outs = {}
    for name in sorted(ATTENTION_BACKENDS):
        try:
            llm = make_llm(attention_backend=name, max_num_batched_tokens=40)
        except RuntimeError as e:
            pytest.skip(str(e))
        outs[name] = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert len(set(map(str, outs.values()))) == 1


def _fused_projection(rows: int, head_dim: int, gen: torch.Generator, dtype: torch.dtype = torch.float32):
    """q, k, v as the model hands them over: views of one fused q|k|v projection, whose rows
    are wider than each (the kernel reads and writes them in place, strided)."""
    qkv = torch.randn(rows, (H + 2 * HKV) * head_dim, generator=gen).to(dtype)
    q, k, v = qkv.split([H * head_dim, HKV * head_dim, HKV * head_dim], dim=-1)
    return q.view(rows, H, head_dim), k.view(rows, HKV, head_dim), v.view(rows, HKV, head_dim)


@pytest.mark.parametrize("head_dim", [16, 64, 128])  # the kernel specialises 64 and 128
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_decodes_what_sdpa_does_on_any_thread_count(head_dim, threads):
    gen = torch.Generator().manual_seed(head_dim)
    cache = torch.randn(40, L, 2, BS, HKV, head_dim, generator=gen)
    try:
        kernel = CPUPagedBackend(cache.clone(), BS)
    except RuntimeError as e:
        pytest.skip(str(e))
    sdpa = create_attention_backend("sdpa", cache.clone(), BS)
    order = torch.randperm(40, generator=gen).tolist()
    lens = [1, 7, 16, 33, 5]  # tokens already cached; each sequence decodes one more
    seqs = []
    for n in lens:
        seqs.append(SeqSlice([order.pop() for _ in range(-(-(n + 1) // BS))], n, 1))
    q, k, v = _fused_projection(len(lens), head_dim, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernel.forward(1, q, k, v, kernel.prepare(seqs))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, sdpa.forward(1, q, k, v, sdpa.prepare(seqs)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [16, 64])
def test_bf16_kernel_equals_the_fp32_kernel_on_the_same_values(head_dim):
    # A bfloat16 is the top half of a float32: the kernel widens the cache as it reads it and
    # computes in float32, so over the same values it must give the float32 kernel's answer
    # up to the output's rounding to bfloat16 (a mis-strided or mis-widened read would not).
    gen = torch.Generator().manual_seed(7 + head_dim)
    cache16 = torch.randn(40, L, 2, BS, HKV, head_dim, generator=gen).to(torch.bfloat16)
    try:
        k16 = CPUPagedBackend(cache16.clone(), BS)
    except RuntimeError as e:
        pytest.skip(str(e))
    k32 = CPUPagedBackend(cache16.float(), BS)
    order = torch.randperm(40, generator=gen).tolist()
    seqs = [SeqSlice([order.pop() for _ in range(-(-(n + 1) // BS))], n, 1) for n in (2, 9, 31, 4)]
    q, k, v = _fused_projection(len(seqs), head_dim, gen, torch.bfloat16)
    got = k16.forward(0, q, k, v, k16.prepare(seqs))
    want = k32.forward(0, q.float(), k.float(), v.float(), k32.prepare(seqs))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16), rtol=0, atol=0)
    # ... and it is attention: the dense reference on the widened values agrees.
    ref = create_attention_backend("sdpa", cache16.float(), BS)
    torch.testing.assert_close(got.float(), ref.forward(0, q.float(), k.float(), v.float(), ref.prepare(seqs)),
                               rtol=1e-2, atol=1e-2)
    # The new K/V rows were stored where SDPA's index_put stores them, bit for bit.
    torch.testing.assert_close(k16.kv_cache, ref.kv_cache.to(torch.bfloat16), rtol=0, atol=0)


def test_kernel_refuses_tensors_it_cannot_read():
    cache = torch.zeros(8, L, 2, BS, HKV, D)
    try:
        be = CPUPagedBackend(cache, BS)
    except RuntimeError as e:
        pytest.skip(str(e))
    seqs = [SeqSlice([0, 1], 3, 1)]
    q, k, v = torch.randn(1, H, D), torch.randn(1, HKV, D), torch.randn(1, HKV, D)
    with pytest.raises(ValueError, match="cache's dtype"):
        be.forward(0, q.to(torch.bfloat16), k, v, be.prepare(seqs))
    with pytest.raises(ValueError, match="dense rows"):
        be.forward(0, torch.randn(1, D, H).transpose(1, 2), k, v, be.prepare(seqs))
    with pytest.raises(ValueError, match="cache's dtype and head shape"):
        be.forward(0, q, k.to(torch.bfloat16), v, be.prepare(seqs))


def test_auto_falls_back_to_sdpa_without_the_kernel(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "load", lambda: None)  # as when no C compiler exists
    cache = torch.zeros(2, L, 2, BS, HKV, D)
    with pytest.raises(RuntimeError, match="could not be built"):
        CPUPagedBackend(cache, BS)
    assert create_attention_backend("auto", cache, BS).name == "sdpa"
