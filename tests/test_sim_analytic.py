"""The analytic (roofline) cost model and its hardware table: behaviour, not timings."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from kvbaton.sim.analytic import (
    BUILTIN_MODELS,
    AnalyticCostModel,
    Efficiency,
    ModelShape,
    analytic_cost_model,
    calibrate,
    load_points,
    memory_fits,
)
from kvbaton.sim.cost import CostModelError, StepShape, load_cost_model
from kvbaton.sim.hardware import ACCELERATORS, hardware, known_hardware, probe_cpu

NO_OVERHEAD = Efficiency(mfu=0.5, mbu=0.6, step_overhead_s=0.0, seq_overhead_s=0.0)


def decode(batch: int, ctx: int = 1024) -> StepShape:
    return StepShape(tuple((1, ctx) for _ in range(batch)))


def prefill(tokens: int, ctx: int = 0) -> StepShape:
    return StepShape(((tokens, ctx),))


def shape(name: str, **overrides: object) -> ModelShape:
    return ModelShape.from_config({**BUILTIN_MODELS[name], **overrides}, name=name)


@pytest.fixture(scope="module")
def h200_8b() -> AnalyticCostModel:
    return analytic_cost_model("h200:llama-3.1-8b")


# --- the roofline ----------------------------------------------------------------------------


def test_builtin_param_counts_match_the_model_cards():
    assert shape("llama-3.1-8b").total_params == pytest.approx(8.03e9, rel=0.01)
    assert shape("llama-3.1-70b").total_params == pytest.approx(70.6e9, rel=0.01)
    assert shape("llama-3.2-1b").total_params == pytest.approx(1.24e9, rel=0.01)
    assert shape("qwen3-32b").total_params == pytest.approx(32.8e9, rel=0.01)
    assert shape("smollm2-135m").total_params == pytest.approx(134.5e6, rel=0.01)


def test_decode_is_memory_bound_and_prefill_compute_bound(h200_8b):
    one = h200_8b.roofline(decode(1))
    big = h200_8b.roofline(prefill(4096))
    assert one.bound == "memory"
    assert big.bound == "compute"
    # 4096 tokens in one prefill cost far less than 4096 single-token decode steps
    ratio = big.time_s / one.time_s
    assert 2 < ratio < 4096 / 20


def test_decode_step_time_grows_sublinearly_until_the_compute_roof(h200_8b):
    times = {b: h200_8b.step_time(decode(b, ctx=128)) for b in (1, 2, 4, 8, 16, 32, 64, 2048, 4096)}
    for b in (1, 2, 4, 8, 16, 32):
        assert times[b] < times[2 * b] < 2 * times[b]
    assert times[64] < 4 * times[1]  # batching decode is nearly free while memory-bound
    assert h200_8b.roofline(decode(4096, ctx=128)).bound == "compute"
    assert times[4096] / times[2048] == pytest.approx(2.0, rel=0.05)  # past the roof: linear


def test_doubling_bandwidth_halves_a_memory_bound_step():
    hw = hardware("h200")
    fast = dataclasses.replace(hw, mem_bw_bytes_s=2 * hw.mem_bw_bytes_s)
    s = shape("llama-3.1-8b")
    slow_t = AnalyticCostModel(s, hw, NO_OVERHEAD).step_time(decode(8))
    fast_t = AnalyticCostModel(s, fast, NO_OVERHEAD).step_time(decode(8))
    assert fast_t == pytest.approx(slow_t / 2, rel=1e-9)
    # and leaves a compute-bound one alone
    assert (AnalyticCostModel(s, fast, NO_OVERHEAD).step_time(prefill(8192))
            == pytest.approx(AnalyticCostModel(s, hw, NO_OVERHEAD).step_time(prefill(8192))))


def test_gqa_holds_less_kv_than_mha():
    gqa = shape("llama-3.1-8b")
    mha = shape("llama-3.1-8b", num_key_value_heads=32)
    assert gqa.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2 == 131072
    assert mha.kv_bytes_per_token() == 4 * gqa.kv_bytes_per_token()
    hw = hardware("h200")
    assert (AnalyticCostModel(gqa, hw).step_time(decode(64, ctx=8192))
            < AnalyticCostModel(mha, hw).step_time(decode(64, ctx=8192)))


def test_context_costs_attention_and_kv_reads(h200_8b):
    assert h200_8b.step_time(decode(32, ctx=8192)) > h200_8b.step_time(decode(32, ctx=128))
    assert h200_8b.step_time(prefill(512, ctx=8192)) > h200_8b.step_time(prefill(512))


MIXTRAL = {"model_type": "mixtral", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000, "num_local_experts": 8,
           "num_experts_per_tok": 2}


def test_moe_active_params_are_fewer_than_total():
    s = ModelShape.from_config(MIXTRAL, name="mixtral")
    assert s.is_moe and s.num_moe_layers == 32
    assert s.total_params == pytest.approx(46.7e9, rel=0.01)  # Mixtral 8x7B: 46.7B total
    assert s.active_params == pytest.approx(12.9e9, rel=0.01)  # 12.9B active
    m = AnalyticCostModel(s, hardware("h200"), NO_OVERHEAD)
    # one decode token touches 2 experts, a big batch all 8: more weight bytes read
    assert s.experts_touched(1) == 2
    assert s.experts_touched(4096) == pytest.approx(8)
    assert m.step_bytes(decode(1, ctx=0)) < m.step_bytes(decode(64, ctx=0)) < s.weight_bytes * 1.01


def test_moe_with_shared_experts_and_dense_layers():
    cfg = {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
           "intermediate_size": 10944, "vocab_size": 102400, "n_routed_experts": 64, "num_experts_per_tok": 6,
           "moe_intermediate_size": 1408, "n_shared_experts": 2, "first_k_dense_replace": 1}
    s = ModelShape.from_config(cfg, name="deepseek-v2-lite-ish")
    assert s.num_moe_layers == 23
    assert s.shared_expert_intermediate_size == 2 * 1408
    assert s.active_params < s.total_params / 4


def test_mla_kv_bytes():
    cfg = {"hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
           "intermediate_size": 18432, "vocab_size": 129280, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
           "qk_nope_head_dim": 128, "v_head_dim": 128, "q_lora_rank": 1536, "n_routed_experts": 256,
           "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "n_shared_experts": 1,
           "first_k_dense_replace": 3}
    s = ModelShape.from_config(cfg, name="deepseek-v3")
    assert s.kv_bytes_per_token() == 61 * (512 + 64) * 2
    assert s.total_params == pytest.approx(671e9, rel=0.02)  # without the MTP module
    assert s.active_params == pytest.approx(37e9, rel=0.05)


def test_cost_model_interface(h200_8b):
    assert h200_8b.kv_bytes_per_token() == 131072
    d = h200_8b.describe()
    json.dumps(d)  # serializable for the result JSON
    assert d["name"] == "analytic:h200:llama-3.1-8b"
    assert d["hardware"]["name"] == "h200"
    assert d["max_kv_tokens"] > 100_000
    assert h200_8b.kv_transfer_s(1000) == pytest.approx(1000 * 131072 / 50e9)
    # the same shape always costs the same
    assert h200_8b.step_time(decode(3)) == h200_8b.step_time(decode(3))


# --- specs, hardware, configs ------------------------------------------------------------------


def test_spec_forms():
    assert load_cost_model("analytic:h100:llama-3.1-8b").name == "analytic:h100:llama-3.1-8b"
    assert load_cost_model("analytic:H200").name == "analytic:h200:smollm2-135m"  # default model
    assert analytic_cost_model("B200:Qwen3-32B").shape.head_dim == 128
    for name in ACCELERATORS:
        assert analytic_cost_model(name).step_time(decode(1)) > 0


def test_every_accelerator_number_is_sourced_and_positive():
    for hw in ACCELERATORS.values():
        assert hw.source
        for v in (hw.flops, hw.mem_bw_bytes_s, hw.mem_bytes, hw.link_bytes_s):
            assert v > 0 and math.isfinite(v)
    assert hardware("h100").link_bytes_s == 50e9  # 400 Gbit/s


def test_unknown_hardware_lists_the_known_names():
    with pytest.raises(CostModelError) as e:
        hardware("tpu-v5")
    for name in known_hardware():
        assert name in str(e.value)
    with pytest.raises(CostModelError, match="h200"):
        load_cost_model("analytic:mi300x:llama-3.1-8b")
    with pytest.raises(CostModelError, match="HARDWARE"):
        load_cost_model("analytic:")


def test_70b_in_bf16_does_not_fit_one_l4():
    with pytest.raises(CostModelError, match=r"llama-3\.1-70b needs 141\.\d GB of weights.*l4 has 24 GB"):
        analytic_cost_model("l4:llama-3.1-70b")
    assert memory_fits(shape("llama-3.1-70b"), hardware("b200")) > 0
    assert memory_fits(shape("llama-3.1-8b"), hardware("l4")) == pytest.approx(21.6e9 - 16.06e9, rel=0.01)


def test_config_from_file_and_directory(tmp_path):
    cfg = dict(BUILTIN_MODELS["llama-3.2-1b"], model_type="llama")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    by_dir = analytic_cost_model(f"h100:{tmp_path / 'm'}")
    by_file = analytic_cost_model(f"h100:{tmp_path / 'm' / 'config.json'}")
    assert by_dir.shape.name == by_file.shape.name == "m"
    assert by_dir.shape.total_params == shape("llama-3.2-1b").total_params
    # head_dim from hidden / heads
    assert by_dir.shape.head_dim == 64


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"hidden_size": 4096}), "missing 'num_hidden_layers'"),
    (json.dumps({**BUILTIN_MODELS["llama-3.1-8b"], "hidden_size": "4096"}), "'hidden_size' must be a positive"),
    (json.dumps({**BUILTIN_MODELS["llama-3.1-8b"], "num_key_value_heads": 5}), "must divide"),
    (json.dumps({**MIXTRAL, "num_experts_per_tok": None}), "missing 'num_experts_per_tok'"),
])
def test_malformed_config_errors(tmp_path, content, message):
    p = tmp_path / "config.json"
    p.write_text(content)
    with pytest.raises(CostModelError, match=message):
        analytic_cost_model(f"h100:{p}")


def test_missing_model_errors(tmp_path):
    with pytest.raises(CostModelError, match="unknown model 'gpt-5'.*smollm2-135m"):
        analytic_cost_model("h100:gpt-5")
    with pytest.raises(CostModelError, match="has no config.json"):
        analytic_cost_model(f"h100:{tmp_path}")
    with pytest.raises(CostModelError, match="expected a JSON object"):
        ModelShape.from_config([1, 2])


# --- calibration -------------------------------------------------------------------------------


def _grid() -> list[StepShape]:
    steps = [decode(b, ctx) for b in (1, 4, 16, 64, 256) for ctx in (128, 2048)]
    steps += [prefill(n, ctx) for n in (256, 1024, 4096) for ctx in (0, 2048)]
    steps += [StepShape(((512, 0), *[(1, 512)] * 31))]  # mixed prefill + decode
    return steps


def test_calibrate_recovers_known_efficiency():
    truth = Efficiency(mfu=0.37, mbu=0.71, step_overhead_s=2.5e-3, seq_overhead_s=4e-5)
    base = AnalyticCostModel(shape("llama-3.1-8b"), hardware("h100"))  # starts at the defaults
    gen = AnalyticCostModel(base.shape, base.hw, truth)
    points = [(s, gen.step_time(s)) for s in _grid()]
    fitted = calibrate(base, points)
    e = fitted.efficiency
    assert e.mfu == pytest.approx(truth.mfu, rel=0.05)
    assert e.mbu == pytest.approx(truth.mbu, rel=0.05)
    assert e.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=0.05)
    assert e.seq_overhead_s == pytest.approx(truth.seq_overhead_s, rel=0.05)
    assert fitted.describe()["calibration"]["max_rel_error"] < 0.01


def test_calibrate_on_cpu_model_with_noise():
    import random

    hw = dataclasses.replace(hardware("a100"), name="cpu", flops=150e9, mem_bw_bytes_s=30e9, mem_bytes=24e9)
    s = ModelShape.from_config(BUILTIN_MODELS["smollm2-135m"], name="smollm2-135m", dtype_bytes=4)
    truth = Efficiency(mfu=0.8, mbu=0.45, step_overhead_s=6e-3, seq_overhead_s=2e-4)
    gen = AnalyticCostModel(s, hw, truth)
    rng = random.Random(0)
    points = [(st, gen.step_time(st) * (1 + rng.uniform(-0.01, 0.01))) for st in _grid()]
    e = calibrate(AnalyticCostModel(s, hw), points).efficiency
    assert e.mfu == pytest.approx(truth.mfu, rel=0.05)
    assert e.mbu == pytest.approx(truth.mbu, rel=0.05)


def test_calibrate_keeps_an_unconstrained_factor_near_its_prior():
    # Only decode points: nothing binds the compute roof, so mfu stays where it was.
    base = AnalyticCostModel(shape("llama-3.1-8b"), hardware("h200"))
    truth = Efficiency(mfu=0.5, mbu=0.8, step_overhead_s=1e-3, seq_overhead_s=0.0)
    gen = AnalyticCostModel(base.shape, base.hw, truth)
    points = [(decode(b, 1024), gen.step_time(decode(b, 1024))) for b in (1, 2, 4, 8, 16)]
    e = calibrate(base, points).efficiency
    assert e.mbu == pytest.approx(0.8, rel=0.05)
    assert e.mfu == pytest.approx(base.efficiency.mfu, rel=0.05)


def test_calibrate_rejects_bad_points(h200_8b):
    with pytest.raises(CostModelError, match="at least 2"):
        calibrate(h200_8b, [(decode(1), 0.01)])
    with pytest.raises(CostModelError, match="positive"):
        calibrate(h200_8b, [(decode(1), 0.01), (decode(2), -1.0)])


def test_load_points(tmp_path):
    p = tmp_path / "profile.json"
    p.write_text(json.dumps({"kind": "kvbaton-profile", "points": [
        {"parts": [[1, 100], [1, 200]], "seconds": 0.02},
        {"parts": [[512, 0]], "step_s": 0.1},
        [[[1, 5]], 0.01],
    ]}))
    pts = load_points(p)
    assert pts[0] == (StepShape(((1, 100), (1, 200))), 0.02)
    assert pts[1][1] == 0.1 and pts[2][0].parts == ((1, 5),)
    with pytest.raises(CostModelError, match=r"points\[0\]"):
        load_points({"points": [{"parts": [[0, 1]], "seconds": 1.0}]})
    with pytest.raises(CostModelError, match="no \"points\""):
        load_points({"kind": "kvbaton-profile"})


# --- this machine --------------------------------------------------------------------------------


def test_cpu_probe_returns_positive_finite_numbers():
    hw = probe_cpu(1)
    for v in (hw.flops, hw.mem_bw_bytes_s, hw.mem_bytes, hw.link_bytes_s):
        assert v > 0 and math.isfinite(v)
    assert hw.name == "cpu" and hw.is_cpu
    assert probe_cpu(1) is hw  # cached per process
    assert hardware("CPU", threads=1) is hw
    m = AnalyticCostModel(ModelShape.from_config(BUILTIN_MODELS["smollm2-135m"], name="smollm2-135m",
                                                 dtype_bytes=4), hw)
    assert m.step_time(decode(4)) > 0
