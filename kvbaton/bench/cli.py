"""`kvbaton bench run|sweep|compare`: flags to a BenchConfig, results to a table and JSON."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from kvbaton.bench.client import ENDPOINT_TYPES, BenchError
from kvbaton.bench.load import LoadConfig
from kvbaton.bench.metrics import parse_slo
from kvbaton.bench.workloads import OPTIONS, WORKLOAD_NAMES
from kvbaton.cli_args import HelpFormatter, add_log_level_arg

# Flags whose name is not simply the option's with dashes (``--kind`` or ``--block-size`` alone
# would not say what they are about).
_FLAG_NAMES = {"kind": "--corpus-kind", "block_size": "--trace-block-size"}


def option_flag(option: str) -> str:
    """The command-line flag that sets workload option ``option``."""
    return _FLAG_NAMES.get(option, "--" + option.replace("_", "-"))


def _workload_flags() -> dict[str, tuple[type, dict[str, Any]]]:
    """option -> (type, {workload: default}) over every workload's options."""
    out: dict[str, tuple[type, dict[str, Any]]] = {}
    for workload, options in OPTIONS.items():
        for name, default in options.items():
            out.setdefault(name, (type(default), {}))[1][workload] = default
    return out


def _checked(kind: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


POS_INT = _checked(int, lambda v: v >= 1, "an integer >= 1")
NONNEG_INT = _checked(int, lambda v: v >= 0, "an integer >= 0")
POS_FLOAT = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
NONNEG_FLOAT = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
RATE = _checked(float, lambda v: v > 0, "a positive number or inf")


def _slo(text: str) -> dict[str, float]:
    try:
        return parse_slo(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _concurrency_list(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        levels = []
    if not levels or any(c < 1 for c in levels) or len(set(levels)) != len(levels):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of distinct integers >= 1")
    return sorted(levels)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def _option_value(text: str) -> Any:
    """``--workload-opt`` values: int, float, true/false, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _add_common(p: argparse.ArgumentParser, with_base_url: bool = True) -> None:
    srv = p.add_argument_group("server")
    if with_base_url:
        srv.add_argument("--base-url", default="http://127.0.0.1:8000",
                         help="server root, with or without /v1 (default %(default)s)")
    srv.add_argument("--endpoint-type", default="completions", choices=ENDPOINT_TYPES)
    srv.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    srv.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    srv.add_argument("--temperature", type=NONNEG_FLOAT, default=0.0)
    srv.add_argument("--request-timeout", type=POS_FLOAT, default=300.0,
                     help="seconds of silence from the server before a request fails (default %(default)s)")
    add_workload_args(p)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The workload, load and output flags (``kvbaton bench`` and ``kvbaton sim`` share them)."""
    wl = p.add_argument_group("workload")
    wl.add_argument("--workload", default="random", choices=WORKLOAD_NAMES)
    wl.add_argument("--num-prompts", type=POS_INT, default=1000,
                    help="sessions to generate (= requests for single-turn workloads; default %(default)s)")
    wl.add_argument("--seed", type=NONNEG_INT, default=0)
    wl.add_argument("--tokenizer", default=None,
                    help="tokenizer that sizes prompts: a model dir, 'tiny-random', or the bundled SmolLM2 (default)")
    for option, (kind, defaults) in _workload_flags().items():
        shown = ", ".join(f"{w}: {os.path.basename(d) if option == 'trace_file' else d}"
                          for w, d in defaults.items())
        wl.add_argument(option_flag(option), dest=f"wl_{option}", type=kind, default=None,
                        metavar=option.upper(),
                        help=f"workload option {option} (default {shown})")
    wl.add_argument("--workload-opt", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                    help="any other workload option (repeatable)")
    ld = p.add_argument_group("load")
    ld.add_argument("--request-rate", type=RATE, default=math.inf,
                    help="session arrivals per second (default inf: all at once)")
    ld.add_argument("--burstiness", type=POS_FLOAT, default=1.0,
                    help="gamma shape of inter-arrival times; 1 = Poisson (default)")
    ld.add_argument("--max-concurrency", type=POS_INT, default=None, help="sessions in flight at most")
    ld.add_argument("--duration", type=POS_FLOAT, default=None, help="stop starting requests after this many seconds")
    ld.add_argument("--drain-timeout", type=NONNEG_FLOAT, default=30.0,
                    help="after --duration, seconds in-flight requests may still finish before they are "
                         "cancelled (default %(default)s)")
    ld.add_argument("--time-scale", type=POS_FLOAT, default=1.0, help="multiplies trace arrival times")
    out = p.add_argument_group("output")
    out.add_argument("--slo", type=_slo, default=None, metavar="ttft=MS,tpot=MS[,e2el=MS]",
                     help="SLOs for goodput")
    out.add_argument("--result-file", default=None, help="write the JSON result here")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_log_level_arg(out)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench run|sweep|compare` on the top-level CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmark an OpenAI-compatible server",
                                  formatter_class=HelpFormatter)
    sub = bench.add_subparsers(dest="bench_command", required=True)
    run = sub.add_parser("run", help="one run of a workload", formatter_class=HelpFormatter)
    _add_common(run)
    run.set_defaults(func=run_bench_command, bench_func=_cmd_run, parser=run)
    sw = sub.add_parser("sweep", help="run at several concurrency levels and find the throughput knee",
                        formatter_class=HelpFormatter)
    _add_common(sw)
    sw.add_argument("--concurrency", type=_concurrency_list, required=True, metavar="1,2,4,...")
    sw.add_argument("--plot-file", default=None, help="PNG plot (default: the result file with .png)")
    sw.set_defaults(func=run_bench_command, bench_func=_cmd_sweep, parser=sw,
                    result_default="bench-sweep.json")
    cmp = sub.add_parser("compare", help="the same workload against several endpoints, interleaved",
                         formatter_class=HelpFormatter)
    _add_common(cmp, with_base_url=False)
    cmp.add_argument("--target", type=_key_value, action="append", required=True, metavar="NAME=URL",
                     help="an endpoint to compare (repeat; the first is the baseline of the ratios)")
    cmp.add_argument("--rounds", type=POS_INT, default=4,
                     help="the workload is split into this many rounds, run ABBA-interleaved (default %(default)s)")
    cmp.set_defaults(func=run_bench_command, bench_func=_cmd_compare, parser=cmp)
    tab = sub.add_parser("table", help="saved result files side by side (real runs, simulated runs)",
                         formatter_class=HelpFormatter)
    tab.add_argument("results", nargs="+", type=_key_value, metavar="NAME=FILE",
                     help="a result JSON of `kvbaton bench run` or `kvbaton sim` (the first is the baseline)")
    add_log_level_arg(tab)
    tab.set_defaults(func=_cmd_table, parser=tab)
    return bench


def _cmd_table(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from kvbaton.bench.report import format_compare
    from kvbaton.bench.runner import compare_ratios

    targets = []
    for name, path in args.results:
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"{name}={path}: cannot read a result JSON: {e}")
        if not isinstance(res, dict) or "completed" not in res:
            parser.error(f"{name}={path}: not a result of `kvbaton bench run` or `kvbaton sim`")
        targets.append({**res, "name": name})
    print(format_compare({"targets": targets, "ratios": compare_ratios(targets)}), flush=True)
    return 0


def bench_config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The BenchConfig of parsed bench (or sim) flags; usage errors name the flag."""
    from kvbaton.bench.runner import BenchConfig

    options: dict[str, Any] = {k.replace("-", "_"): _option_value(v) for k, v in args.workload_opt}
    accepted = OPTIONS[args.workload]
    for option in _workload_flags():
        value = getattr(args, f"wl_{option}")
        if value is None:
            continue
        if option not in accepted:
            parser.error(f"{option_flag(option)} does not apply to --workload {args.workload} "
                         f"(it takes {', '.join(option_flag(o) for o in accepted)})")
        options[option] = value
    try:
        load = LoadConfig(max_concurrency=args.max_concurrency, request_rate=args.request_rate,
                          burstiness=args.burstiness, duration_s=args.duration,
                          drain_timeout_s=args.drain_timeout, time_scale=args.time_scale, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))
    return BenchConfig(
        base_url=getattr(args, "base_url", "http://127.0.0.1:8000"),
        endpoint_type=getattr(args, "endpoint_type", "completions"), model=getattr(args, "model", None),
        api_key=getattr(args, "api_key", None), temperature=getattr(args, "temperature", 0.0), workload=args.workload,
        workload_options=options, num_prompts=args.num_prompts, seed=args.seed, tokenizer=args.tokenizer,
        load=load, slo=args.slo, request_timeout_s=getattr(args, "request_timeout", 300.0),
        progress=not args.no_progress,
    )


def _cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvbaton.bench.report import format_result, write_json
    from kvbaton.bench.runner import run_bench

    res = run_bench(bench_config(args, parser))
    print(format_result(res), flush=True)
    if args.result_file:
        print(f"result: {write_json(res, args.result_file)}", flush=True)
    return _nothing_completed([res])


def _cmd_sweep(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    from kvbaton.bench.report import format_sweep, plot_sweep, write_json
    from kvbaton.bench.runner import run_sweep

    sweep = run_sweep(bench_config(args, parser), args.concurrency)
    print(format_sweep(sweep), flush=True)
    result = Path(args.result_file or args.result_default)
    print(f"result: {write_json(sweep, result)}", flush=True)
    print(f"plot: {plot_sweep(sweep, args.plot_file or result.with_suffix('.png'))}", flush=True)
    return _nothing_completed(sweep["levels"])


def _cmd_compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvbaton.bench.report import format_compare, write_json
    from kvbaton.bench.runner import run_compare

    names = [n for n, _ in args.target]
    if len(set(names)) != len(names):
        parser.error(f"--target names must be distinct, got {names}")
    cmp = run_compare(bench_config(args, parser), args.target, rounds=args.rounds)
    print(format_compare(cmp), flush=True)
    if args.result_file:
        print(f"result: {write_json(cmp, args.result_file)}", flush=True)
    return _nothing_completed(cmp["targets"])


def _nothing_completed(results: list[dict]) -> int:
    """Exit code 1 if some run finished without a single successful request (a broken
    endpoint should fail a script), else 0."""
    for res in results:
        if res["completed"] == 0:
            first = res["errors"][0] if res["errors"] else "no request was sent"
            where = f" ({res['name']})" if "name" in res else ""
            print(f"kvbaton bench: error: no request succeeded{where}: {first}", file=sys.stderr, flush=True)
            return 1
    return 0


def run_bench_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run a parsed `bench` command (the ``func`` the top-level CLI calls): exit code 0, 1 (the
    server or a file failed) or 2 (a bad flag, via ``parser.error``)."""
    from kvbaton.bench.runner import WorkloadOptionError

    try:
        return args.bench_func(args, parser)
    except WorkloadOptionError as e:
        # Name the flag the user typed, not the option's Python name.
        msg = re.sub(r"option '(\w+)'", lambda m: option_flag(m.group(1)), str(e))
        parser.error(f"--workload {args.workload}: {msg}")
    except BenchError as e:
        print(f"kvbaton bench: error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # an unwritable --result-file / --plot-file
        print(f"kvbaton bench: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
