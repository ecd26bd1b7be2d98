"""The C fused ops (RMSNorm with residual, RoPE in place, SwiGLU) equal the PyTorch ops they
replace, in float32 and bfloat16, and the model gives the same answers with or without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import GREEDY, make_llm, random_prompts
from kvbaton.models import fused_ops
from kvbaton.models.config import ModelConfig
from kvbaton.models.llama import RMSNorm, RotaryEmbedding

pytestmark = pytest.mark.skipif(not fused_ops.available(torch.zeros(1)), reason="no C compiler: PyTorch ops only")
DTYPES = [torch.float32, torch.bfloat16]


def _assert_equal_to_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    # float32: to a few ulps (reduction order, rsqrt vs 1/sqrt). bfloat16: the rounding happens
    # at the same points, so nearly every element is bit-equal and the rest one bf16 ulp off.
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(got, want)
        assert (got == want).float().mean().item() > 0.98


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 64])  # 64: the rows are spread over threads
def test_rms_norm_equals_the_module_and_adds_the_residual_in_place(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=gen) + 0.5)
    norm = norm.to(dtype)
    x = torch.randn(rows, 96, generator=gen).to(dtype)
    r = torch.randn(rows, 96, generator=gen).to(dtype)
    _assert_equal_to_rounding(fused_ops.rms_norm(x, norm.weight.data, 1e-5), norm(x))
    total = x + r
    residual = r.clone()
    out = fused_ops.rms_norm(x, norm.weight.data, 1e-5, residual=residual)
    assert torch.equal(residual, total)  # the residual stream holds the sum, exactly as x + r
    _assert_equal_to_rounding(out, norm(total))


def _cfg() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=48, intermediate_size=64,
                       num_layers=1, num_heads=4, num_kv_heads=2, head_dim=12, max_position_embeddings=300,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [3, 40])
def test_rope_rotates_q_and_k_in_place_and_leaves_v(dtype, rows):
    cfg = _cfg()
    rot = RotaryEmbedding(cfg)
    gen = torch.Generator().manual_seed(rows)
    h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = torch.randn(rows, (h + 2 * hkv) * d, generator=gen).to(dtype)
    pos = torch.randint(0, 300, (rows,), generator=gen)
    q, k, v = qkv.clone().split([h * d, hkv * d, hkv * d], dim=-1)
    want_q, want_k = rot(pos, q.reshape(rows, h, d), k.reshape(rows, hkv, d))
    fused_ops.rope_(qkv, h + hkv, d, pos, rot.cos, rot.sin)
    got_q, got_k, got_v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
    _assert_equal_to_rounding(got_q.reshape(rows, h, d), want_q)
    _assert_equal_to_rounding(got_k.reshape(rows, hkv, d), want_k)
    assert torch.equal(got_v, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_swiglu(dtype):
    gate_up = torch.randn(7, 2 * 50, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = gate_up.split([50, 50], dim=-1)
    _assert_equal_to_rounding(fused_ops.silu_mul(gate_up), F.silu(gate) * up)


def test_bad_input_is_refused_with_a_reason():
    x = torch.randn(4, 32)
    with pytest.raises(ValueError, match="contiguous"):
        fused_ops.rms_norm(x.t(), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        fused_ops.rms_norm(x, torch.ones(32, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="int64 positions"):
        fused_ops.rope_(x, 2, 16, torch.zeros(4, dtype=torch.int32), torch.ones(8, 16), torch.ones(8, 16))
    assert not fused_ops.available(torch.zeros(1, dtype=torch.float16))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_gives_the_same_answers_with_and_without_the_fused_ops(dtype, monkeypatch):
    prompts = random_prompts(6, 1, 90, seed=12)
    llm = make_llm(dtype=dtype)
    model, runner = llm.engine.loaded.model, llm.engine.runner
    fused = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    ids = torch.tensor(prompts[0])
    pos = torch.arange(len(prompts[0]))

    def logits() -> torch.Tensor:
        # A prefill of one prompt into fresh blocks (its hidden states do not depend on the cache).
        from kvbaton.engine.attention import SeqSlice

        meta = runner.backend.prepare([SeqSlice(list(range(-(-len(prompts[0]) // 16))), 0, len(prompts[0]))])
        with torch.inference_mode():
            return model.compute_logits(model(ids, pos, runner.backend.bind(meta)))

    with_fused = logits()
    monkeypatch.setattr(fused_ops, "available", lambda x: False)
    without = logits()
    plain = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == "float32" else {"rtol": 0.05, "atol": 0.05}
    torch.testing.assert_close(with_fused, without, **tol)
    if dtype == "float32":  # bfloat16 greedy ties may break either way after a rounding
        assert fused == plain
    else:
        assert sum(a == b for a, b in zip(fused, plain)) >= len(prompts) - 1
