"""The simulator: deterministic, driven by the real scheduler, pool and router policies (a policy
registered once steers the served cluster and the simulated one alike), cost models fitted and
loaded with clear errors, transfers costed by the link, and bad input refused."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvbaton.bench.load import LoadConfig
from kvbaton.bench.workloads import Session, Turn, load_tokenizer, make_workload
from kvbaton.cli import main
from kvbaton.router.config import RouterConfig
from kvbaton.router.policies import POLICIES, PlacementPolicy, RoutingRequest, WorkerView, register_policy
from kvbaton.router.server import RouterThread
from kvbaton.sim.cluster import SimConfig, SimEngine
from kvbaton.sim.cost import CostModelError, LinearCostModel, StepShape, fit_linear, load_profile
from kvbaton.sim.run import result_json, simulate
from worker_support import engine_debug, running_worker

COST = LinearCostModel({"steps": 0.004, "seqs": 0.0005, "tokens": 0.0002, "prefill_attn": 2e-8, "decode_ctx": 1e-6},
                       kv_bytes_per_token=46080)


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer("tiny-random")


def sessions(tok: Any, name: str = "shared-prefix", n: int = 24, **opts: Any) -> list[Session]:
    return make_workload(name, tokenizer=tok, seed=3, num_sessions=n, **opts).sessions()


def sim(tok: Any, cfg: SimConfig, ss: Sequence[Session] | None = None, cost: LinearCostModel = COST,
        **load: Any) -> dict[str, Any]:
    ss = sessions(tok) if ss is None else ss
    lc = LoadConfig(**{"max_concurrency": 4, **load})
    return result_json(simulate(cfg, cost, ss, tok, lc), lc, "shared-prefix", {}, 3, len(ss))


def test_the_same_seed_gives_the_same_result(tok: Any) -> None:
    cfg = SimConfig(colocated=2, decode_policy="kv_aware", prefill_policy="kv_aware")
    a, b = sim(tok, cfg, request_rate=4.0), sim(tok, cfg, request_rate=4.0)
    for key in ("ttfts", "itls", "e2els", "input_lens", "prefix_cache_hit_rate", "duration"):
        assert a[key] == b[key], key
    assert a["completed"] == 24 and a["failed"] == 0
    c = sim(tok, cfg, request_rate=4.0, seed=1)  # other arrivals
    assert c["ttfts"] != a["ttfts"]


def test_prompt_ids_the_workload_gives_simulate_as_the_tokenized_text(tok: Any) -> None:
    """The random workload hands its prompts' ids along (counted once, not tokenized again):
    the run is the one the simulator gets by tokenizing the texts itself."""
    ss = sessions(tok, "random", n=12, input_len=40, output_len=6)
    assert any(s.turns[0].user_ids is not None for s in ss)
    bare = [dataclasses.replace(s, turns=tuple(dataclasses.replace(t, user_ids=None) for t in s.turns)) for s in ss]
    cfg = SimConfig(colocated=2)
    a, b = sim(tok, cfg, ss, request_rate=6.0), sim(tok, cfg, bare, request_rate=6.0)
    for key in ("ttfts", "itls", "input_lens", "prefix_cache_hit_rate", "duration"):
        assert a[key] == b[key], key


def test_kv_aware_beats_round_robin_on_shared_prefixes_as_it_does_when_served(tok: Any) -> None:
    # More prefixes than workers: kv_aware spreads them instead of piling a group on one worker.
    ss = sessions(tok, n=32, num_prefixes=8)
    base = {"colocated": 4, "disagg_min_tokens": 1 << 30, "engine": SimEngine(num_kv_blocks=256)}
    # Prompts cost what they cost on a CPU (prefill dominates), where reuse pays for the load
    # kv_aware concentrates.
    cpu = LinearCostModel({**COST.coefficients, "tokens": 0.002}, kv_bytes_per_token=46080)
    rr = sim(tok, SimConfig(decode_policy="round_robin", **base), ss, cost=cpu)
    kv = sim(tok, SimConfig(decode_policy="kv_aware", **base), ss, cost=cpu)
    assert kv["prefix_cache_hit_rate"] > rr["prefix_cache_hit_rate"]
    assert kv["mean_ttft_ms"] < rr["mean_ttft_ms"]


class _LastWorker(PlacementPolicy):
    """A test policy: always the last candidate."""

    name = "test_last_worker"

    def choose(self, request: RoutingRequest, candidates: Sequence[WorkerView], leg: str) -> WorkerView:
        return candidates[-1]


@pytest.fixture
def last_worker_policy() -> Any:
    register_policy(_LastWorker)
    yield _LastWorker.name
    POLICIES.pop(_LastWorker.name, None)


def test_a_policy_steers_the_served_and_the_simulated_cluster_alike(tok: Any, last_worker_policy: str) -> None:
    # Simulated: every request lands on the last worker.
    cfg = SimConfig(colocated=3, decode_policy=last_worker_policy, disagg_min_tokens=1 << 30)
    res = simulate(cfg, COST, sessions(tok, n=6), tok, LoadConfig(max_concurrency=2))
    steps = [w.steps for w in res.cluster.workers]
    assert steps[-1] > 0 and steps[:-1] == [0, 0]
    # Served, through the real router: the same.
    with running_worker() as w1, running_worker() as w2:
        rc = RouterConfig(workers=(w1.url, w2.url), model="tiny-random", port=0, decode_policy=last_worker_policy,
                          disagg_min_tokens=1 << 30, health_interval_s=0.5)
        with RouterThread(rc) as router:
            for i in range(3):
                r = httpx.post(f"{router.url}/v1/completions", timeout=60,
                               json={"prompt": [5, 6, 7 + i], "max_tokens": 2, "temperature": 0})
                assert r.status_code == 200
        served = [engine_debug(u)["stats"]["prefix_cache_queries"] for u in (w1.url, w2.url)]
    assert served[0] == 0 and served[1] > 0


def test_disaggregated_requests_pay_for_the_transfer_on_the_link(tok: Any) -> None:
    ss = sessions(tok, "random", n=8, input_len=256, output_len=8)
    fast = sim(tok, SimConfig(prefill=1, decode=1, colocated=0, link_bytes_s=100e9), ss)
    slow = sim(tok, SimConfig(prefill=1, decode=1, colocated=0, link_bytes_s=10e6), ss)
    assert fast["sim"]["transfers"] == slow["sim"]["transfers"] == 8
    assert slow["sim"]["transfer_bytes"] == fast["sim"]["transfer_bytes"] > 0
    # 256 tokens x 46080 B at 10 MB/s is ~1.2 s a request, on top of the same steps.
    assert slow["mean_ttft_ms"] > fast["mean_ttft_ms"] + 500
    # The decode steps cost alike (batches differ a little: requests reach the decoder later).
    assert slow["mean_tpot_ms"] == pytest.approx(fast["mean_tpot_ms"], rel=0.15)


def test_only_a_prefill_only_leg_leaves_its_blocks_under_a_lease(tok: Any) -> None:
    ss = sessions(tok, "random", n=8, input_len=256, output_len=8)
    lc = LoadConfig(max_concurrency=4)
    whole = simulate(SimConfig(colocated=2, disagg_min_tokens=1 << 30), COST, ss, tok, lc).cluster
    assert [w.leases.num_created for w in whole.workers] == [0, 0]
    for cfg in (SimConfig(colocated=2), SimConfig(prefill=1, decode=1, colocated=0)):
        c = simulate(cfg, COST, ss, tok, lc).cluster
        created = sum(w.leases.num_created for w in c.workers)
        assert created == c.transfers > 0  # one lease per handed-over prompt...
        assert sum(w.leases.num_released for w in c.workers) == created  # ...released by its decoder
        assert c.leased == {}


def test_the_router_index_follows_every_simulated_pool(tok: Any) -> None:
    """Each simulated worker's KV events reach the router's index, as a served worker's do:
    at the end the index holds exactly the blocks each pool can find (and the pools' event
    buffers are empty: nothing piles up unseen)."""
    c = simulate(SimConfig(colocated=2, engine=SimEngine(num_kv_blocks=96)), COST,
                 sessions(tok, n=16, prefix_len=256, question_len=64, output_len=16), tok,
                 LoadConfig(max_concurrency=4)).cluster
    for w in c.workers:
        assert w.pool.cached_hashes()  # something was cached (and some of it evicted: 96 blocks)
        assert c.feed.index.block_count(w.url) == len(w.pool.cached_hashes())
        assert all((w.url, w.pool.medium) in c.feed.index.holders(h) for h in w.pool.cached_hashes())
        assert not w._events


def test_a_small_pool_preempts_and_still_balances_its_blocks(tok: Any) -> None:
    ss = sessions(tok, "random", n=12, input_len=200, output_len=64)
    res = simulate(SimConfig(colocated=1, engine=SimEngine(num_kv_blocks=40)), COST, ss, tok,
                   LoadConfig(max_concurrency=8))
    assert sum(w.scheduler.num_preemptions for w in res.cluster.workers) > 0
    assert all(r.ok for r in res.records)  # the integrity check ran in simulate


def test_a_request_no_pool_can_hold_fails_instead_of_hanging(tok: Any) -> None:
    big = Session("big", (Turn("word " * 400, 8),))
    res = simulate(SimConfig(colocated=1, engine=SimEngine(num_kv_blocks=8)), COST, [big], tok)
    # Refused up front, with the engine's own 400 message.
    assert len(res.records) == 1 and not res.records[0].ok and "KV blocks" in (res.records[0].error or "")


def test_the_routers_timeout_fails_what_waits_too_long_after_a_retry_elsewhere(tok: Any) -> None:
    ss = sessions(tok, "random", n=12, input_len=200, output_len=8)
    slow = LinearCostModel({**COST.coefficients, "tokens": 0.01}, kv_bytes_per_token=46080)  # ~2 s a prompt
    load = LoadConfig(max_concurrency=12)
    cfg = SimConfig(colocated=2, disagg_min_tokens=1 << 30, request_timeout_s=3.0, max_retries=1)
    res = simulate(cfg, slow, ss, tok, load)  # its block accounting is checked whole at the end
    failed = [r for r in res.records if not r.ok]
    assert failed and all("504" in (r.error or "") and "timed out" in (r.error or "") for r in failed)
    assert res.cluster.timeouts > len(failed)  # a first timeout is retried on the other worker
    ok = [r for r in res.records if r.ok]
    assert ok and all(r.ttft_s is not None and r.ttft_s < 2 * 3.0 for r in ok)
    patient = simulate(dataclasses.replace(cfg, request_timeout_s=600.0), slow, ss, tok, load)
    assert all(r.ok for r in patient.records) and patient.cluster.timeouts == 0


def test_a_costlier_model_gives_slower_requests(tok: Any) -> None:
    cfg = SimConfig(colocated=1)
    slow = LinearCostModel({k: 2 * v for k, v in COST.coefficients.items()}, kv_bytes_per_token=46080)
    a, b = sim(tok, cfg), sim(tok, cfg, cost=slow)
    assert b["mean_ttft_ms"] > a["mean_ttft_ms"] and b["mean_tpot_ms"] > a["mean_tpot_ms"]


def test_multi_turn_sessions_reuse_their_history(tok: Any) -> None:
    ss = sessions(tok, "multi-turn", n=6, turns=3)
    out = sim(tok, SimConfig(colocated=1, disagg_min_tokens=1 << 30), ss)
    assert out["completed"] == 18
    assert out["prefix_cache_hit_rate"] > 0.3  # later turns find the earlier prompt and answer


# ---- cost models ---------------------------------------------------------------------------


def test_fit_linear_recovers_the_coefficients_it_was_made_with() -> None:
    true = {"steps": 0.003, "seqs": 0.0004, "tokens": 0.0001, "prefill_attn": 3e-8, "decode_ctx": 2e-6}
    model = LinearCostModel(true)
    shapes = [StepShape(((p, c),)) for p in (16, 64, 256, 1024) for c in (0, 512, 2048)]
    shapes += [StepShape(tuple((1, ctx) for _ in range(b))) for b in (1, 4, 16, 64) for ctx in (128, 1024)]
    fitted = fit_linear([(s, model.step_time(s)) for s in shapes])
    for k, v in true.items():
        assert fitted[k] == pytest.approx(v, rel=1e-6)


def test_fit_linear_never_gives_a_negative_cost() -> None:
    pts = [(StepShape(((n, 0),)), 0.01 + 0.0001 * n - 1e-9 * n * n) for n in (1, 8, 64, 512, 2048, 4096)]
    assert all(v >= 0 for v in fit_linear(pts).values())


@pytest.mark.parametrize("content, why", [
    ("not json", "not JSON"), ("[]", "not a kvbaton profile"),
    ('{"kind": "kvbaton-profile", "version": 99}', "version"),
    ('{"kind": "kvbaton-profile", "version": 1}', "coefficients"),
    ('{"kind": "kvbaton-profile", "version": 1, "coefficients": {"warp": 1}}', "unknown cost features"),
    ('{"kind": "kvbaton-profile", "version": 1, "coefficients": {"steps": "x"}}', "finite number"),
])
def test_malformed_profiles_are_clear_errors(tmp_path: Path, content: str, why: str) -> None:
    p = tmp_path / "p.json"
    p.write_text(content)
    with pytest.raises(CostModelError) as e:
        load_profile(p)
    assert why in str(e.value)


def test_kvbaton_profile_then_sim_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prof = tmp_path / "prof.json"
    assert main(["profile", "--model", "tiny-random", "--quick", "--repeats", "1", "--out", str(prof)]) == 0
    data = json.loads(prof.read_text())
    assert data["points"] and all(v >= 0 for v in data["coefficients"].values())
    model = load_profile(prof)
    assert model.kv_bytes_per_token() == data["kv_bytes_per_token"] > 0
    out = tmp_path / "sim.json"
    assert main(["sim", "--cost-model", str(prof), "--colocated", "2", "--workload", "random", "--num-prompts", "6",
                 "--tokenizer", "tiny-random", "--input-len", "64", "--output-len", "4", "--no-progress",
                 "--result-file", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["backend"] == "kvbaton-sim" and res["completed"] == 6 and res["sim"]["speed"] > 0
    assert "simulated" in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["sim", "--cost-model", "/nonexistent.json"], "--cost-model"),
    (["sim", "--cost-model", "analytic:warp-drive"], "--cost-model"),
    (["sim", "--cost-model", "x.json", "--num-kv-blocks", "0"], "--num-kv-blocks"),
    (["sim", "--cost-model", "x.json", "--link-gbps", "-1"], "--link-gbps"),
    (["sim", "--cost-model", "analytic:h100", "--max-retries", "-1"], "--max-retries"),
])
def test_bad_sim_flags_are_usage_errors_naming_the_flag(argv: list[str], flag: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


# ---- kvbaton plan ----------------------------------------------------------------------------


def test_plan_search_finds_the_rate_where_the_slo_breaks(tok: Any) -> None:
    from kvbaton.sim.plan import Layout, layouts, search

    assert [str(x) for x in layouts(3)] == ["3 colocated", "1P2D", "2P1D"]
    ss = sessions(tok, "random", n=30, input_len=128, output_len=16)
    base = SimConfig(disagg_min_tokens=1 << 30)
    one = search(Layout(colocated=1), base, COST, ss, tok, {"ttft": 200.0}, 0.9, min_rate=1.0)
    two = search(Layout(colocated=2), base, COST, ss, tok, {"ttft": 200.0}, 0.9, min_rate=1.0)
    assert one.best is not None and one.best.attainment >= 0.9
    # Past the answer the SLO fails: some probe above it missed.
    assert any(p.rate > one.goodput and p.attainment < 0.9 for p in one.probes)
    assert two.goodput > one.goodput  # twice the workers carry more


def test_plan_cli_ranks_layouts_and_says_when_no_slo_is_met(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prof = tmp_path / "p.json"
    prof.write_text(json.dumps({"kind": "kvbaton-profile", "version": 1, "kv_bytes_per_token": 512,
                                "coefficients": COST.coefficients}))
    common = ["plan", "--cost-model", str(prof), "--workload", "random", "--num-prompts", "20", "--tokenizer",
              "tiny-random", "--input-len", "64", "--output-len", "8", "--no-progress"]
    plot = tmp_path / "pareto.png"
    assert main([*common, "--workers", "2", "--slo", "ttft=500", "--plot-file", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "2 colocated" in out and "1P1D" in out and "best:" in out and plot.stat().st_size > 0
    assert main([*common, "--workers", "2", "--slo", "ttft=0.001"]) == 1
    assert "no configuration meets the SLO; the closest is" in capsys.readouterr().out
    assert main([*common, "--target-rate", "5", "--max-workers", "3", "--slo", "ttft=500"]) == 0
    assert "smallest cluster for 5 sessions/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*common, "--slo", "ttft=500"])  # neither --workers nor --target-rate
    assert "--workers" in capsys.readouterr().err


def test_bench_table_puts_a_simulated_run_beside_another(tmp_path: Path, tok: Any,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    files = []
    for n in (1, 2):
        lc = LoadConfig(max_concurrency=4)
        res = result_json(simulate(SimConfig(colocated=n), COST, sessions(tok, n=8), tok, lc), lc, "x", {}, 0, 8)
        files.append(tmp_path / f"s{n}.json")
        files[-1].write_text(json.dumps(res))
    assert main(["bench", "table", f"one={files[0]}", f"two={files[1]}"]) == 0
    out = capsys.readouterr().out
    assert "one" in out and "two" in out and "mean_ttft_ms" in out and "1.00x" in out
    with pytest.raises(SystemExit):
        main(["bench", "table", f"x={tmp_path / 'missing.json'}"])
    assert "cannot read a result JSON" in capsys.readouterr().err
