"""Human-readable tables, the JSON result file, and the sweep plot."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvbaton.bench.runner import COMPARE_METRICS

# Past the knee, an added unit of concurrency counts as "still paying" if it buys at least this
# fraction of the throughput it bought before the knee.
STILL_PAYING = 0.5


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:,.{digits}f}"
    return str(v)


def format_result(res: Mapping[str, Any]) -> str:
    """The end-of-run table of one result, in the layout of `vllm bench serve`."""
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="=")]

    def row(label: str, value: Any, digits: int = 2) -> None:
        lines.append(f"{label:<32}{_fmt(value, digits):>18}")

    def section(title: str) -> None:
        lines.append("{s:{c}^{n}}".format(s=f" {title} ", n=w, c="-"))

    row("Endpoint:", f"{res['backend']}")
    row("Model:", res["model_id"])
    row("Workload:", res["workload"]["name"])
    row("Successful requests:", res["completed"])
    row("Failed requests:", res["failed"])
    run = res.get("run", {})
    if run.get("cancelled"):
        row("Cancelled at the time limit:", run["cancelled"])
    row("Maximum request concurrency:", res["max_concurrency"])
    row("Request rate (sessions/s):", res["request_rate"])
    row("Benchmark duration (s):", res["duration"])
    row("Total input tokens:", res["total_input_tokens"])
    row("Total generated tokens:", res["total_output_tokens"])
    row("Request throughput (req/s):", res["request_throughput"])
    if res.get("request_goodput") is not None:
        row("Request goodput (req/s):", res["request_goodput"])
    row("Output token throughput (tok/s):", res["output_throughput"])
    row("Total token throughput (tok/s):", res["total_token_throughput"])
    if res.get("prefix_cache_hit_rate") is not None:
        row("Prefix cache hit rate:", res["prefix_cache_hit_rate"], 3)
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        section(title)
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize() if stat in ('mean', 'median') else stat.upper()} {key.upper()} (ms):",
                res.get(f"{stat}_{key}_ms"))
    if res.get("per_tag"):
        section("Per tag (p50 / p90 ms)")
        for tag, t in res["per_tag"].items():
            lines.append(f"{tag:<14} n={t['completed']:<5} ttft {_fmt(t.get('p50_ttft_ms'), 1)} / "
                         f"{_fmt(t.get('p90_ttft_ms'), 1)}  tpot {_fmt(t.get('p50_tpot_ms'), 1)} / "
                         f"{_fmt(t.get('p90_tpot_ms'), 1)}")
    if res.get("errors"):
        section("First errors")
        lines += [f"  {e}" for e in res["errors"]]
    lines.append("=" * w)
    return "\n".join(lines)


def describe_knee(knee: Mapping[str, Any] | None, unit: str = "tok/s") -> str:
    """One sentence on where added concurrency stops paying."""
    if knee is None:
        return "knee: needs three or more concurrency levels"
    gain = knee.get("gain_after")
    if gain is not None and gain >= STILL_PAYING:
        return (f"no knee: throughput still grows past every level "
                f"({knee['slope_before']:.2f} then {knee['slope_after']:.2f} {unit} per added request)")
    return (f"knee at concurrency {knee['x']:g}: {knee['slope_before']:.2f} {unit} per added request "
            f"before, {knee['slope_after']:.2f} after (fit {knee['y']:.1f} {unit} at the knee)")


def format_sweep(sweep: Mapping[str, Any]) -> str:
    """One row per concurrency level, then the knee."""
    head = f"{'conc':>6} {'req/s':>9} {'out tok/s':>11} {'p90 TTFT ms':>12} {'p90 TPOT ms':>12} {'failed':>7}"
    lines = [head, "-" * len(head)]
    for c, lv in zip(sweep["concurrency"], sweep["levels"]):
        lines.append(f"{c:>6} {_fmt(lv['request_throughput']):>9} {_fmt(lv['output_throughput']):>11} "
                     f"{_fmt(lv['p90_ttft_ms']):>12} {_fmt(lv['p90_tpot_ms']):>12} {lv['failed']:>7}")
    lines.append(describe_knee(sweep.get("knee")))
    return "\n".join(lines)


def format_compare(cmp: Mapping[str, Any]) -> str:
    """Metrics per target as columns, each followed by its ratio to the first target."""
    targets = cmp["targets"]
    names = [t["name"] for t in targets]
    width = max(12, *(len(n) + 2 for n in names))
    head = f"{'metric':<24}" + "".join(f"{n:>{width}}{'ratio':>8}" for n in names)
    if cmp.get("rounds"):
        order = " | ".join(",".join(o) for o in cmp["order"])
        lines = [f"{cmp['rounds']} interleaved rounds, in order: {order}", head, "-" * len(head)]
    else:  # saved results side by side (`kvbaton bench table`)
        lines = [head, "-" * len(head)]
    for key in ("completed", "failed", *COMPARE_METRICS):
        cells = ""
        for t in targets:
            ratio = cmp["ratios"][t["name"]].get(key) if key in COMPARE_METRICS else None
            cells += f"{_fmt(t.get(key)):>{width}}{_fmt(ratio) + 'x' if ratio is not None else '-':>8}"
        lines.append(f"{key:<24}{cells}")
    return "\n".join(lines)


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as strict JSON (NaN/inf become null), creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(obj), indent=2) + "\n")
    return path


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def plot_sweep(sweep: Mapping[str, Any], path: str | Path) -> Path:
    """PNG: output throughput (with the knee) and p90 TTFT/TPOT against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc: Sequence[int] = sweep["concurrency"]
    levels = sweep["levels"]
    fig, (ax_t, ax_l) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    ax_t.plot(conc, [lv["output_throughput"] or 0 for lv in levels], "o-", label="output tok/s")
    knee = sweep.get("knee")
    if knee is not None:
        ax_t.axvline(knee["x"], color="grey", linestyle="--", label=f"knee ({knee['x']:g})")
        xs = [min(conc), knee["x"], max(conc)]
        ys = [knee["y"] - knee["slope_before"] * (knee["x"] - xs[0]), knee["y"],
              knee["y"] + knee["slope_after"] * (xs[2] - knee["x"])]
        ax_t.plot(xs, ys, ":", color="grey", label="two-segment fit")
    ax_t.set_ylabel("output tokens / s")
    ax_t.legend(loc="lower right")
    ax_t.grid(alpha=0.3)
    for key, label in (("p90_ttft_ms", "TTFT p90"), ("p90_tpot_ms", "TPOT p90")):
        ax_l.plot(conc, [lv[key] if lv[key] is not None else float("nan") for lv in levels], "o-", label=label)
    ax_l.set_xlabel("max concurrency")
    ax_l.set_ylabel("ms")
    ax_l.legend(loc="upper left")
    ax_l.grid(alpha=0.3)
    fig.suptitle(f"{levels[0]['model_id']} · {levels[0]['workload']['name']} workload")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
