"""``kvbaton profile`` and ``kvbaton sim`` (flags; the logic is in :mod:`kvbaton.sim`)."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

from kvbaton.cli_args import HelpFormatter, add_log_level_arg


def _pos_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _pos_float(text: str) -> float:
    v = _nonneg_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def _percent(text: str) -> float:
    v = _nonneg_float(text)
    if not 0 < v <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


def add_sim_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``profile`` and ``sim`` on the top-level CLI."""
    from kvbaton.bench.cli import add_workload_args
    from kvbaton.router.config import DEFAULT_DISAGG_MIN_TOKENS, DEFAULT_POLICY
    from kvbaton.router.policies import POLICIES

    p = sub.add_parser("profile", help="measure the engine's step times for the simulator's cost model",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file or HF directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--threads", type=_pos_int, default=None, help="torch CPU threads (as the workers use)")
    p.add_argument("--max-num-batched-tokens", type=_pos_int, default=2048,
                   help="the profiling engine's token budget (at least the largest prefill of the grid)")
    p.add_argument("--repeats", type=_pos_int, default=3, help="measurements per grid point (the median is kept)")
    p.add_argument("--quick", action="store_true", help="a small grid (seconds; for smoke tests)")
    p.add_argument("--from-steps", nargs="+", default=None, metavar="TRACE",
                   help="fit the profile to steps served workers recorded (`--step-trace` of kvbaton "
                        "worker/serve) instead of measuring a grid: they include what serving adds")
    p.add_argument("--base", default=None, metavar="PROFILE.json",
                   help="with --from-steps: keep this grid profile's step costs and measure from the traces "
                        "(all workers of one serve, recorded together) how much the host's sharing slows them")
    p.add_argument("--out", default="profile.json", help="where to write the profile JSON")
    add_log_level_arg(p)
    p.set_defaults(func=_cmd_profile, parser=p)

    s = sub.add_parser("sim", help="simulate a cluster serving a bench workload (the real scheduler and "
                       "router on a virtual clock)", formatter_class=HelpFormatter)
    t = s.add_argument_group("cluster (as kvbaton serve)")
    t.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1; 0 with --colocated)")
    t.add_argument("--decode", type=int, default=None, help="decode workers (default 1; 0 with --colocated)")
    t.add_argument("--colocated", type=int, default=None, help="workers that do both")
    names = ", ".join(sorted(POLICIES))
    t.add_argument("--policy", default=None, help=f"placement policy for both legs ({names})")
    t.add_argument("--prefill-policy", default=None, help=f"default {DEFAULT_POLICY}")
    t.add_argument("--decode-policy", default=None, help=f"default {DEFAULT_POLICY}")
    t.add_argument("--disagg-min-tokens", type=int, default=DEFAULT_DISAGG_MIN_TOKENS,
                   help="prefill remotely only when at least this many prompt tokens are uncached")
    _add_engine_cost_args(s)
    add_workload_args(s)
    s.set_defaults(func=_cmd_sim, parser=s)

    pl = sub.add_parser("plan", help="find the cluster layout (colocated or xPyD) that carries the most "
                        "traffic under an SLO, by simulation", formatter_class=HelpFormatter)
    g = pl.add_argument_group("search")
    g.add_argument("--workers", type=_pos_int, default=None,
                   help="rank every layout of this many workers (colocated and each xPyD split)")
    g.add_argument("--target-rate", type=_pos_float, default=None, metavar="R",
                   help="find the smallest cluster (up to --max-workers) whose best layout carries R sessions/s")
    g.add_argument("--max-workers", type=_pos_int, default=8)
    g.add_argument("--attainment", type=_percent, default=90.0, metavar="PCT",
                   help="share of requests that must meet every SLO bound")
    g.add_argument("--policy", default=None, help=f"placement policy for both legs ({names})")
    g.add_argument("--disagg-min-tokens", type=int, default=DEFAULT_DISAGG_MIN_TOKENS)
    g.add_argument("--min-rate", type=_pos_float, default=0.05, help="first rate tried (sessions/s)")
    g.add_argument("--plot-file", default=None, help="Pareto plot PNG (tokens/s per worker vs per user)")
    _add_engine_cost_args(pl)
    add_workload_args(pl)
    pl.set_defaults(func=_cmd_plan, parser=pl)


def _add_engine_cost_args(p: argparse.ArgumentParser) -> None:
    """The simulated workers' engine flags and the cost model's (``sim`` and ``plan``)."""
    from kvbaton.engine.config import EngineConfig  # light: the config module imports no torch

    e = p.add_argument_group("engine (per worker)")
    e.add_argument("--num-kv-blocks", type=_pos_int, default=None,
                   help="device KV blocks per worker (default: the profile's, else 4096)")
    e.add_argument("--block-size", type=_pos_int, default=16)
    e.add_argument("--max-num-seqs", type=_pos_int, default=64)
    e.add_argument("--max-num-batched-tokens", type=_pos_int, default=EngineConfig.max_num_batched_tokens)
    e.add_argument("--long-prefill-token-threshold", type=int, default=0)
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--max-model-len", type=_pos_int, default=8192)
    from kvbaton.router.config import RouterConfig

    r = p.add_argument_group("router (as kvbaton serve)")
    r.add_argument("--request-timeout", type=_pos_float, default=RouterConfig.request_timeout_s, metavar="S",
                   help="seconds the router waits for a decode leg's first token before it aborts the leg "
                        "and retries on another decode worker, or answers 504")
    r.add_argument("--max-retries", type=int, default=RouterConfig.max_retries,
                   help="other decode workers a request is tried on after a timeout")
    c = p.add_argument_group("cost")
    c.add_argument("--cost-model", required=True, metavar="PROFILE.json|analytic:HW[:MODEL]",
                   help="a `kvbaton profile` file, or the roofline model of hardware HW (h100, h200, ...)")
    c.add_argument("--link-gbps", type=_nonneg_float, default=80.0,
                   help="prefill -> decode KV link, Gbit/s (default 80: the loopback transfer plane)")
    c.add_argument("--link-latency-ms", type=_nonneg_float, default=0.5)
    c.add_argument("--request-overhead-ms", type=_nonneg_float, default=None,
                   help="per request: HTTP, tokenizing, routing (default: the profile's, else 0)")
    c.add_argument("--step-overhead-ms", type=_nonneg_float, default=None,
                   help="per engine step: the worker loop (default: the profile's, else 0)")
    c.add_argument("--no-host-contention", action="store_true",
                   help="ignore the profile's host contention (from `kvbaton profile --from-steps --base`): "
                        "simulate each worker on a machine of its own")


def _cmd_profile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvbaton.engine.config import EngineConfig
    from kvbaton.engine.engine import LLMEngine
    from kvbaton.errors import ConfigError
    from kvbaton.sim.cost import CostModelError
    from kvbaton.sim.profile import profile_engine, profile_from_steps, write_profile

    if args.base is not None and not args.from_steps:
        parser.error("--base: only with --from-steps (it is the grid the traces are compared with)")
    if args.from_steps:
        try:
            prof = profile_from_steps(args.from_steps, args.base)
        except CostModelError as e:
            parser.error(f"--{'base' if args.base and str(args.base) in str(e) else 'from-steps'}: {e}")
        path = write_profile(prof, args.out)
        if args.base is None:
            fit = prof["fit"]
            how = (f"{fit['points']} served steps; fit error median {fit['median_rel_error'] * 100:.1f}%, "
                   f"max {fit['max_rel_error'] * 100:.1f}%")
        else:
            hc, cf = prof["host_contention"], prof["contention_fit"]
            how = (f"{args.base}'s step costs; host contention from {cf['steps']} steps: "
                   f"slowdown {hc['slowdown']:.3f}, "
                   f"+{hc['per_busy_worker'] * 100:.1f}% per busy neighbour, "
                   f"{hc['stream_step_s'] * 1000:.2f} ms per streaming step, {hc['cores']} cores; "
                   f"error median {cf['median_rel_error'] * 100:.1f}%")
        print(f"profile: {path} ({how}; step overhead {prof['step_overhead_ms']:.2f} ms)", flush=True)
        return 0
    try:
        cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                           num_threads=args.threads, max_num_batched_tokens=args.max_num_batched_tokens,
                           enable_chunked_prefill=True)  # KV sized as a default worker's
    except ConfigError as e:
        parser.error(f"{e.flag}: {e.reason}")
    print(f"kvbaton profile: loading {args.model} ...", file=sys.stderr, flush=True)
    engine = LLMEngine(cfg)
    prof = profile_engine(engine, repeats=args.repeats, quick=args.quick,
                          progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    path = write_profile(prof, args.out)
    fit = prof["fit"]
    print(f"profile: {path} ({fit['points']} points; fit error median {fit['median_rel_error'] * 100:.1f}%, "
          f"max {fit['max_rel_error'] * 100:.1f}%)", flush=True)
    return 0


def _topology(args: argparse.Namespace) -> tuple[int, int, int]:
    colocated = args.colocated or 0
    default = 0 if colocated else 1
    prefill = default if args.prefill is None else args.prefill
    decode = default if args.decode is None else args.decode
    return prefill, decode, colocated


def _cluster(args: argparse.Namespace, parser: argparse.ArgumentParser, prefill: int, decode: int,
             colocated: int) -> tuple[Any, Any]:
    """The cost model and the SimConfig the flags describe (usage errors name the flag)."""
    from kvbaton.router.config import DEFAULT_POLICY
    from kvbaton.sim.cluster import SimConfig, SimEngine
    from kvbaton.sim.cost import CostModelError, load_cost_model

    try:
        cost = load_cost_model(args.cost_model)
    except CostModelError as e:
        parser.error(f"--cost-model: {e}")
    meta: dict[str, Any] = getattr(cost, "meta", {})
    try:
        # Default pool: the profiled worker's, or what the accelerator's memory holds after the weights.
        max_kv = getattr(cost, "max_kv_tokens", None)
        default_blocks = int(meta.get("num_kv_blocks") or (max_kv() // args.block_size if max_kv else 4096))
        engine = SimEngine(num_kv_blocks=args.num_kv_blocks or default_blocks,
                           block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           long_prefill_token_threshold=args.long_prefill_token_threshold,
                           enable_prefix_caching=not args.no_prefix_caching, max_model_len=args.max_model_len)
        ms = 1e-3
        config = SimConfig(
            prefill=prefill, decode=decode, colocated=colocated, engine=engine,
            decode_policy=getattr(args, "decode_policy", None) or args.policy or DEFAULT_POLICY,
            prefill_policy=getattr(args, "prefill_policy", None) or args.policy or DEFAULT_POLICY,
            disagg_min_tokens=args.disagg_min_tokens, link_bytes_s=args.link_gbps * 1e9 / 8,
            link_latency_s=args.link_latency_ms * ms,
            request_overhead_s=(args.request_overhead_ms if args.request_overhead_ms is not None
                                else float(meta.get("request_overhead_ms") or 0.0)) * ms,
            step_overhead_s=(args.step_overhead_ms if args.step_overhead_ms is not None
                             else float(meta.get("step_overhead_ms") or 0.0)) * ms,
            host_contention=None if args.no_host_contention else cost.host_contention,
            request_timeout_s=args.request_timeout, max_retries=args.max_retries,
            seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    return cost, config


def _workload(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Any, Any, list[Any]]:
    """(bench config, tokenizer, sessions) of the workload flags."""
    from kvbaton.bench.cli import bench_config
    from kvbaton.bench.runner import load_bench_tokenizer, make_bench_workload, workload_sessions

    cfg = bench_config(args, parser)
    try:
        tokenizer = load_bench_tokenizer(cfg)
        # Token ids are all a simulation sends: no workload text need be made and counted.
        sessions = workload_sessions(make_bench_workload(cfg, tokenizer=tokenizer), ids_only=True)
    except ValueError as e:
        parser.error(str(e))
    return cfg, tokenizer, sessions


def _cmd_sim(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvbaton.bench.report import format_result, write_json
    from kvbaton.sim.run import result_json, simulate

    cost, config = _cluster(args, parser, *_topology(args))
    generated = time.perf_counter()
    cfg, tokenizer, sessions = _workload(args, parser)
    generated = time.perf_counter() - generated
    try:
        res = simulate(config, cost, sessions, tokenizer, cfg.load)
    except ValueError as e:
        print(f"kvbaton: error: {e}", file=sys.stderr, flush=True)
        return 1
    out = result_json(res, cfg.load, cfg.workload, dict(cfg.workload_options), cfg.seed, cfg.num_prompts,
                      dict(cfg.slo) if cfg.slo else None)
    print(format_result(out), flush=True)
    # The workload's generation (the bench's: cutting and counting its prompts' tokens) is not
    # part of the simulation's speed; both are said.
    print(f"simulated {res.duration_s:.1f} s in {res.wall_s:.1f} s ({res.speed:.1f}x real time); "
          f"the workload took {generated:.1f} s to generate", flush=True)
    if args.result_file:
        print(f"result: {write_json(out, args.result_file)}", flush=True)
    return 0 if out["completed"] else 1


def _cmd_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvbaton.sim.plan import closest, format_table, layouts, pareto, plot_pareto, search

    if (args.workers is None) == (args.target_rate is None):
        parser.error("--workers: give either --workers N (rank the layouts of N workers) or --target-rate R")
    if not args.slo:
        parser.error("--slo: plan needs an SLO, e.g. --slo ttft=2000,tpot=200")
    cost, base = _cluster(args, parser, 0, 0, 1)
    cfg, tokenizer, sessions = _workload(args, parser)
    slo = dict(args.slo)
    target = args.attainment / 100
    from tqdm import tqdm

    bar = tqdm(desc="simulations", unit="sim", disable=args.no_progress, file=sys.stderr)

    def rank(n: int) -> list[Any]:
        return [search(lay, base, cost, sessions, tokenizer, slo, target, min_rate=args.min_rate,
                       on_probe=lambda p: bar.update(1)) for lay in layouts(n)]

    try:
        if args.workers is not None:
            results = rank(args.workers)
        else:
            results = []
            for n in range(1, args.max_workers + 1):
                results = rank(n)
                if max(r.goodput for r in results) >= args.target_rate:
                    break
    except ValueError as e:
        bar.close()
        print(f"kvbaton: error: {e}", file=sys.stderr, flush=True)
        return 1
    bar.close()
    print(format_table(results, slo, target), flush=True)
    best = max(results, key=lambda r: r.goodput_per_worker)
    if best.best is None:
        near = closest(results)
        where = (f"{near.layout} at {near.rate:.3g} sessions/s meets it for {near.attainment * 100:.0f}% of requests"
                 if near is not None else "none ran")
        print(f"no configuration meets the SLO; the closest is {where}", flush=True)
        return 1
    if args.target_rate is not None:
        if best.goodput < args.target_rate:
            print(f"no cluster of up to {args.max_workers} workers carries {args.target_rate:g} sessions/s; the "
                  f"largest ({best.layout}) carries {best.goodput:.3g}", flush=True)
            return 1
        fit = max((r for r in results if r.goodput >= args.target_rate), key=lambda r: r.goodput_per_worker)
        print(f"smallest cluster for {args.target_rate:g} sessions/s: {fit.layout} "
              f"({fit.layout.workers} workers, carries {fit.goodput:.3g})", flush=True)
    else:
        print(f"best: {best.layout} ({best.goodput:.3g} sessions/s, {best.goodput_per_worker:.3g} per worker)",
              flush=True)
    front = pareto([p for r in results for p in r.probes])
    print(f"Pareto front: {len(front)} of {sum(len(r.probes) for r in results)} simulations", flush=True)
    if args.plot_file:
        print(f"plot: {plot_pareto(results, args.plot_file)}", flush=True)
    if args.result_file:
        import json

        rows = [{"layout": str(r.layout), "goodput": r.goodput, "goodput_per_worker": r.goodput_per_worker,
                 "best": None if r.best is None else vars(r.best) | {"layout": str(r.layout)},
                 "probes": [vars(p) | {"layout": str(p.layout)} for p in r.probes]} for r in results]
        with open(args.result_file, "w") as f:
            json.dump({"slo": slo, "attainment": target, "layouts": rows}, f, indent=1, default=str)
        print(f"result: {args.result_file}", flush=True)
    return 0
