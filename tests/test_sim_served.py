"""What serving adds to a step: the engine's step trace records each step as scheduled and timed,
`kvbaton profile --from-steps` fits a profile (or a host's contention on top of a grid profile) to
such traces, and the simulator steps each token once and slows steps by the contention it is
given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kvbaton.bench.load import LoadConfig
from kvbaton.bench.workloads import Session, Turn, load_tokenizer
from kvbaton.cli import main
from kvbaton.engine.config import EngineConfig
from kvbaton.engine.engine import LLMEngine
from kvbaton.engine.step_trace import TRACE_KIND
from kvbaton.sampling_params import SamplingParams
from kvbaton.sim.cluster import SimConfig
from kvbaton.sim.cost import CostModelError, HostContention, LinearCostModel, StepShape, load_profile
from kvbaton.sim.profile import fit_host_contention, profile_from_steps, profile_of
from kvbaton.sim.run import simulate

COST = LinearCostModel({"steps": 0.004, "seqs": 0.0005, "tokens": 0.0002, "prefill_attn": 2e-8, "decode_ctx": 1e-6},
                       kv_bytes_per_token=46080)


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer("tiny-random")


def test_one_request_takes_one_step_per_token_at_the_cost_models_price(tok: Any) -> None:
    """A prefill step, then one decode step per further token: the simulated TPOT is exactly the
    cost model's decode step (the request samples in every step, as in the engine)."""
    res = simulate(SimConfig(colocated=1), COST, [Session("s", (Turn("word " * 40, 6),))], tok, LoadConfig())
    (w,) = res.cluster.workers
    rec = res.records[0]
    assert rec.ok and rec.output_tokens == 6 and w.steps == 6
    p = rec.prompt_tokens
    decode_costs = [COST.step_time(StepShape(((1, p + i),))) for i in range(5)]
    assert rec.itls_s == pytest.approx(decode_costs, rel=1e-9)


def test_the_step_trace_records_each_step_as_scheduled(tmp_path: Path) -> None:
    path = tmp_path / "steps" / "w.jsonl"
    eng = LLMEngine(EngineConfig(model="tiny-random", num_kv_blocks=64, step_trace_path=str(path)))
    eng.add_request(list(range(10, 50)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "a")
    while eng.has_unfinished_requests():
        eng.step()
    eng.step()  # idle: nothing is recorded
    eng.close()
    head, *steps = [json.loads(line) for line in path.read_text().splitlines()]
    assert head["kind"] == TRACE_KIND and head["model"] == "tiny-random" and head["kv_bytes_per_token"] > 0
    assert [s["parts"] for s in steps] == [[[40, 0]], [[1, 40]], [[1, 41]], [[1, 42]]]
    assert all(s["dt"] > 0 for s in steps)
    assert steps[0]["gap"] is None  # the engine was idle before it
    assert all(s["gap"] is not None and s["gap"] >= 0 for s in steps[1:])  # back-to-back steps: the loop's cost
    assert all(b["t"] >= a["t"] + a["dt"] for a, b in zip(steps, steps[1:]))


def _header(**over: Any) -> dict[str, Any]:
    return {"kind": TRACE_KIND, "model": "m", "device": "cpu", "dtype": "float32", "threads": 1, "host_cores": 2,
            "block_size": 16, "num_kv_blocks": 512, "max_num_batched_tokens": 512, "kv_bytes_per_token": 46080,
            **over}


def _write(path: Path, steps: list[dict[str, Any]], **over: Any) -> Path:
    path.write_text("\n".join(json.dumps(x) for x in [_header(**over), *steps]) + "\n")
    return path


def _served_workers(hc: HostContention) -> list[list[dict[str, Any]]]:
    """Two workers' steps as a host with contention ``hc`` would serve them: worker 0 alone for a
    while (prefills, then decodes), then both at once (worker 1 starts with the same pattern)."""
    shapes = [((256, 0),), ((128, 256),), ((1, 300),) * 3, ((1, 400),) * 2 + ((64, 0),), ((512, 0),), ((1, 200),)]
    workers: list[list[dict[str, Any]]] = [[], []]
    t = [0.0, 40.0]
    for rnd in range(80):
        for w in (0, 1):
            if w == 1 and rnd < 20:
                continue
            parts = shapes[rnd % len(shapes)]
            k = 1.0 if rnd >= 20 else 0.0
            dt = hc.served(COST.step_time(StepShape(parts)), sum(1 for n, _ in parts if n == 1), k)
            workers[w].append({"t": t[w], "dt": dt, "gap": 0.001, "parts": [list(p) for p in parts]})
            t[w] += dt + 0.001
        if rnd == 19:  # from here on both run side by side
            t[1] = t[0]
    return workers


def test_fit_host_contention_recovers_the_contention_it_was_made_with() -> None:
    true = HostContention(cores=4, threads=1, slowdown=1.1, per_busy_worker=0.2, stream_step_s=0.003)
    hc, fit = fit_host_contention(COST, _served_workers(true), 4, 1)
    assert hc.slowdown == pytest.approx(1.1, rel=0.02)
    assert hc.per_busy_worker == pytest.approx(0.2, rel=0.1)
    assert hc.stream_step_s == pytest.approx(0.003, rel=0.1)
    assert fit["prefill_alone"] > 0 and fit["prefill_beside"] > 0 and fit["decode_only"] > 0


def test_time_sharing_of_the_cores_is_arithmetic() -> None:
    hc = HostContention(cores=2, threads=1)
    assert hc.served(0.1, 0, 0) == pytest.approx(0.1) and hc.served(0.1, 0, 1) == pytest.approx(0.1)
    assert hc.served(0.1, 0, 3) == pytest.approx(0.2)  # four one-thread workers on two cores


def test_profile_from_steps_with_a_base_and_the_simulator_uses_its_contention(tmp_path: Path, tok: Any,
                                                                              capsys: pytest.CaptureFixture[str]
                                                                              ) -> None:
    true = HostContention(cores=2, threads=1, slowdown=1.2, per_busy_worker=0.1, stream_step_s=0.002)
    traces = [_write(tmp_path / f"w{i}.jsonl", steps) for i, steps in enumerate(_served_workers(true))]
    base = tmp_path / "grid.json"
    grid = profile_of([{"kind": "x", "parts": [[n, 0]], "seconds": COST.step_time(StepShape(((n, 0),)))}
                       for n in (1, 16, 64, 256, 512, 1024)], {k: v for k, v in _header().items() if k != "kind"})
    grid["coefficients"] = dict(COST.coefficients)
    base.write_text(json.dumps(grid))
    out = tmp_path / "served.json"
    assert main(["profile", "--from-steps", *map(str, traces), "--base", str(base), "--out", str(out)]) == 0
    assert "host contention" in capsys.readouterr().out
    model = load_profile(out)
    assert model.coefficients == COST.coefficients  # the base's step costs stay
    assert model.host_contention is not None and model.host_contention.slowdown == pytest.approx(1.2, rel=0.02)
    assert json.loads(out.read_text())["step_overhead_ms"] == pytest.approx(1.0)
    ss = [Session(f"s{i}", (Turn("word " * 60, 8),)) for i in range(8)]
    lc = LoadConfig(max_concurrency=4)
    cfg = SimConfig(colocated=2, disagg_min_tokens=1 << 30)
    alone = simulate(cfg, model, ss, tok, lc)
    shared = simulate(SimConfig(colocated=2, disagg_min_tokens=1 << 30, host_contention=model.host_contention),
                      model, ss, tok, lc)
    busy = [sum(w.busy_s for w in r.cluster.workers) for r in (alone, shared)]
    assert busy[1] > 1.2 * busy[0]  # every step is at least `slowdown` slower, decodes more


def test_profile_from_steps_without_a_base_fits_the_served_steps(tmp_path: Path) -> None:
    steps = [{"t": float(i), "dt": COST.step_time(StepShape(tuple(map(tuple, parts)))), "gap": None, "parts": parts}
             for i, parts in enumerate([[[n, c]] for n in (16, 64, 256, 512) for c in (0, 512)]
                                       + [[[1, c]] * b for b in (1, 4, 16) for c in (128, 1024)])]
    prof = profile_from_steps([_write(tmp_path / "w.jsonl", steps)])
    assert prof["source"] == "step-trace" and prof["fit"]["median_rel_error"] < 1e-6
    assert prof["coefficients"]["tokens"] == pytest.approx(COST.coefficients["tokens"], rel=1e-6)


@pytest.mark.parametrize("lines, why", [
    (['{"t": 0, "dt": 0.1, "gap": null, "parts": [[1, 0]]}'], "before any header"),
    ([json.dumps(_header()), "nope"], "not JSON"),
    ([json.dumps(_header()), '{"t": 0, "dt": -1, "gap": null, "parts": [[1, 0]]}'], '"dt"'),
    ([json.dumps(_header()), '{"t": 0, "dt": 0.1, "gap": null, "parts": [[0, 5]]}'], '"parts"'),
    ([json.dumps(_header()), json.dumps(_header(threads=4))], "differs"),
])
def test_malformed_step_traces_are_clear_errors(tmp_path: Path, lines: list[str], why: str) -> None:
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(CostModelError) as e:
        profile_from_steps([p])
    assert why in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("argv, flag", [
    (["profile", "--base", "x.json"], "--base"),
    (["profile", "--from-steps", "/nonexistent.jsonl"], "--from-steps"),
])
def test_bad_profile_flags_are_usage_errors_naming_the_flag(argv: list[str], flag: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err
