"""The oneDNN-packed linear backend: same products as nn.Linear, every matmul of a model
packed, the engine's outputs unchanged, and a clear error where it cannot run; and the worker's
engine built on a thread of its own (so the main thread keeps no OpenMP team, which slowed
oneDNN's matmuls on the engine thread)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvbaton import LLM, SamplingParams
from kvbaton.engine.config import EngineConfig
from kvbaton.errors import ConfigError
from kvbaton.models.loader import load_model
from kvbaton.models.packed_linear import PackedLinear, onednn_supports, pack_linears

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(not onednn_supports(CPU, torch.float32), reason="torch built without oneDNN")
DTYPES = [torch.float32] + ([torch.bfloat16] if onednn_supports(CPU, torch.bfloat16) else [])


@needs_onednn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 4, 300])
def test_a_packed_linear_computes_what_nn_linear_does(dtype: torch.dtype, bias: bool, rows: int) -> None:
    torch.manual_seed(rows)
    lin = nn.Linear(96, 160, bias=bias).to(dtype)
    x = torch.randn(rows, 96).to(dtype)
    with torch.inference_mode():
        want = lin(x).float()
        got = PackedLinear(lin)(x).float()
    assert got.shape == (rows, 160)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * max(1.0, want.abs().max().item() if rows else 1.0), rtol=tol)


@needs_onednn
def test_pack_linears_packs_every_matmul_once_and_keeps_the_embedding() -> None:
    model = load_model("tiny-random", torch.float32, CPU, "auto", 0).model
    layers = model.config.num_layers
    embed = model.embed_tokens.weight.detach().clone()
    assert pack_linears(model) == 4 * layers + 1  # qkv, o, gate_up, down per layer; the LM head
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert pack_linears(model) == 0  # already packed: nothing left to pack
    assert torch.equal(model.embed_tokens.weight, embed)


@needs_onednn
def test_the_engine_gives_the_same_tokens_packed_or_not() -> None:
    prompts = [[5, 9, 2, 7] * 8, list(range(3, 60)), [11] * 19]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    runs = {}
    for backend in ("torch", "onednn"):
        llm = LLM("tiny-random", num_kv_blocks=64, linear_backend=backend)
        assert llm.engine.linear_backend == backend
        assert llm.engine.cost_meta()["linear_backend"] == backend
        packed = [m for m in llm.engine.loaded.model.modules() if isinstance(m, PackedLinear)]
        assert bool(packed) == (backend == "onednn")
        runs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert runs["onednn"] == runs["torch"]


def test_auto_packs_only_where_onednn_runs() -> None:
    llm = LLM("tiny-random", num_kv_blocks=8, dtype="float16")
    assert llm.engine.linear_backend == "torch"  # float16 is not packed on a CPU
    if onednn_supports(CPU, torch.float32):
        assert LLM("tiny-random", num_kv_blocks=8).engine.linear_backend == "onednn"


def test_a_linear_backend_that_cannot_run_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError) as e:
        EngineConfig(linear_backend="mkl")
    assert e.value.field == "linear_backend" and "mkl" in str(e.value)
    with pytest.raises(ConfigError) as e:
        LLM("tiny-random", num_kv_blocks=8, dtype="float16", linear_backend="onednn")
    assert e.value.field == "linear_backend" and "float16" in str(e.value)


def test_the_worker_builds_its_engine_on_a_thread_that_exits_and_raises_its_errors_here() -> None:
    import threading

    from kvbaton.engine.engine import LLMEngine, build_engine_on_own_thread

    eng = build_engine_on_own_thread(EngineConfig(model="tiny-random", num_kv_blocks=8))
    assert isinstance(eng, LLMEngine)
    assert not [t for t in threading.enumerate() if t.name == "kvbaton-engine-build"]
    with pytest.raises(ConfigError) as e:  # raised on the caller's thread, as LLMEngine would
        build_engine_on_own_thread(EngineConfig(model="tiny-random", num_kv_blocks=8, dtype="float16",
                                                linear_backend="onednn"))
    assert e.value.field == "linear_backend"


@needs_onednn
def test_the_backend_reported_is_read_from_the_model() -> None:
    from kvbaton.engine.engine import LLMEngine

    first = LLMEngine(EngineConfig(model="tiny-random", num_kv_blocks=8, linear_backend="onednn"))
    # The same loaded model handed to another engine stays packed, whatever that one asks for.
    again = LLMEngine(EngineConfig(model="tiny-random", num_kv_blocks=8, linear_backend="torch"), loaded=first.loaded)
    assert again.linear_backend == "onednn"
