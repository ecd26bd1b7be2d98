"""``kvbaton plan``: which cluster serves a traffic mix under an SLO, found by simulation.

For a number of workers N, every layout is a candidate: N colocated workers, and every split
into x prefill and y decode workers (x + y = N). For each, a DistServe-style search finds the
highest session arrival rate at which the SLO attainment (the share of requests meeting every
SLO bound) stays at or above the target: the rate is doubled until the SLO fails, then bisected.
Each probe is one simulation (:func:`kvbaton.sim.run.simulate`) of the same sessions with
Poisson arrivals at that rate, with the real scheduler and router policies.

The answer is a table ranked by goodput per worker (the highest rate that meets the SLO,
divided by N), with the TTFT and TPOT percentiles and the transfer bandwidth a layout needs at
that rate, plus the Pareto front of every probe (output tokens/s per worker against tokens/s per
user, 1 / TPOT). With ``target_rate``, the search grows N from 1 until some layout carries it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kvbaton.bench.load import LoadConfig
from kvbaton.bench.metrics import meets_slo
from kvbaton.bench.workloads import Session
from kvbaton.sim.cluster import SimConfig
from kvbaton.sim.cost import CostModel
from kvbaton.sim.run import SimResult, simulate


@dataclass(frozen=True)
class Layout:
    """A cluster layout: x prefill + y decode workers, or n colocated."""

    prefill: int = 0
    decode: int = 0
    colocated: int = 0

    @property
    def workers(self) -> int:
        return self.prefill + self.decode + self.colocated

    def __str__(self) -> str:
        return f"{self.colocated} colocated" if self.colocated else f"{self.prefill}P{self.decode}D"


def layouts(n: int) -> list[Layout]:
    """Colocated ×n and every xPyD split of n workers."""
    if n < 1:
        raise ValueError("a cluster needs at least one worker")
    return [Layout(colocated=n)] + [Layout(prefill=x, decode=n - x) for x in range(1, n)]


@dataclass
class Probe:
    """One simulation of a layout at one rate."""

    layout: Layout
    rate: float
    attainment: float
    completed: int
    output_tokens_per_s: float
    ttft_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    transfer_bytes_per_s: float
    peak_kv_fraction: float

    @property
    def tokens_per_s_per_worker(self) -> float:
        return self.output_tokens_per_s / self.layout.workers

    @property
    def tokens_per_s_per_user(self) -> float | None:
        p50 = self.tpot_ms.get("p50")
        return 1000.0 / p50 if p50 else None


@dataclass
class LayoutResult:
    """The search's answer for one layout: its best probe meeting the SLO (None: none did)."""

    layout: Layout
    best: Probe | None
    probes: list[Probe] = field(default_factory=list)

    @property
    def goodput(self) -> float:
        return self.best.rate if self.best is not None else 0.0

    @property
    def goodput_per_worker(self) -> float:
        return self.goodput / self.layout.workers


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def probe(layout: Layout, base: SimConfig, cost: CostModel, sessions: Sequence[Session], tokenizer: Any,
          rate: float, slo: dict[str, float], seed: int = 0) -> Probe:
    """Simulate ``layout`` at ``rate`` sessions/s and measure the SLO attainment."""
    cfg = replace(base, prefill=layout.prefill, decode=layout.decode, colocated=layout.colocated)
    res: SimResult = simulate(cfg, cost, sessions, tokenizer, LoadConfig(request_rate=rate, seed=seed))
    recs = res.records
    ok = [r for r in recs if r.ok]
    good = sum(1 for r in ok if meets_slo(r, slo))
    ttfts = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    tpots = [t * 1000 for r in ok if (t := r.tpot_s) is not None]
    dur = res.duration_s or math.nan
    peak = max((w.pool.peak_used_blocks / w.pool.num_blocks for w in res.cluster.workers), default=0.0)
    return Probe(layout, rate, good / len(recs) if recs else 0.0, len(ok),
                 sum(r.output_tokens for r in ok) / dur if ok else 0.0,
                 {f"p{q}": _pct(ttfts, q) for q in (50, 90, 99)}, {f"p{q}": _pct(tpots, q) for q in (50, 90, 99)},
                 res.cluster.transfer_bytes / dur if ok else 0.0, peak)


def search(layout: Layout, base: SimConfig, cost: CostModel, sessions: Sequence[Session], tokenizer: Any,
           slo: dict[str, float], attainment: float = 0.9, min_rate: float = 0.05, max_rate: float = 1e4,
           rel_tol: float = 0.05, on_probe: Callable[[Probe], None] | None = None) -> LayoutResult:
    """The highest rate (sessions/s) at which ``layout`` meets ``slo`` for ``attainment`` of its
    requests: doubling from ``min_rate``, then bisection to ``rel_tol``."""
    out = LayoutResult(layout, None)

    def run(rate: float) -> bool:
        p = probe(layout, base, cost, sessions, tokenizer, rate, slo)
        out.probes.append(p)
        if on_probe is not None:
            on_probe(p)
        good = p.attainment >= attainment
        if good and (out.best is None or p.rate > out.best.rate):
            out.best = p
        return good

    if not run(min_rate):
        return out
    lo, hi = min_rate, min_rate * 2
    while hi < max_rate and run(hi):
        lo, hi = hi, hi * 2
    if hi >= max_rate:
        return out
    while (hi - lo) / lo > rel_tol:
        mid = (lo + hi) / 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return out


def pareto(probes: Sequence[Probe]) -> list[Probe]:
    """Probes no other beats on both tokens/s per worker and tokens/s per user."""
    pts = [p for p in probes if p.tokens_per_s_per_user is not None and p.completed]
    front = []
    for p in pts:
        u = p.tokens_per_s_per_user or 0.0
        if not any((q.tokens_per_s_per_worker >= p.tokens_per_s_per_worker and (q.tokens_per_s_per_user or 0) >= u)
                   and (q.tokens_per_s_per_worker > p.tokens_per_s_per_worker or (q.tokens_per_s_per_user or 0) > u)
                   for q in pts):
            front.append(p)
    return sorted(front, key=lambda p: p.tokens_per_s_per_worker)


def closest(results: Sequence[LayoutResult]) -> Probe | None:
    """When no layout meets the SLO: the probe with the best attainment."""
    probes = [p for r in results for p in r.probes]
    return max(probes, key=lambda p: (p.attainment, -p.rate), default=None)


def format_table(results: Sequence[LayoutResult], slo: dict[str, float], attainment: float) -> str:
    """The ranked table (best goodput per worker first)."""
    ranked = sorted(results, key=lambda r: -r.goodput_per_worker)
    head = (f"{'layout':<14}{'goodput/s':>10}{'per worker':>11}{'TTFT p50':>10}{'TTFT p90':>10}"
            f"{'TPOT p50':>10}{'TPOT p99':>10}{'KV peak':>9}{'link MB/s':>11}")
    bounds = ", ".join(f"{k}<={v:g} ms" for k, v in slo.items())
    lines = [f"SLO {bounds} for {attainment * 100:g}% of requests; rates in sessions/s", head, "-" * len(head)]

    def ms(v: float | None) -> str:
        return f"{v:.0f}" if v is not None else "-"

    for r in ranked:
        b = r.best
        if b is None:
            lines.append(f"{r.layout!s:<14}{'misses':>10}")
            continue
        lines.append(f"{r.layout!s:<14}{b.rate:>10.3g}{r.goodput_per_worker:>11.3g}{ms(b.ttft_ms['p50']):>10}"
                     f"{ms(b.ttft_ms['p90']):>10}{ms(b.tpot_ms['p50']):>10}{ms(b.tpot_ms['p99']):>10}"
                     f"{b.peak_kv_fraction * 100:>8.0f}%{b.transfer_bytes_per_s / 1e6:>11.1f}")
    return "\n".join(lines)


def plot_pareto(results: Sequence[LayoutResult], path: str) -> str:
    """Tokens/s per worker against tokens/s per user of every probe, front highlighted (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in results:
        pts = [(p.tokens_per_s_per_user, p.tokens_per_s_per_worker) for p in r.probes if p.tokens_per_s_per_user]
        if pts:
            ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, label=str(r.layout))
    front = pareto([p for r in results for p in r.probes])
    if front:
        ax.plot([p.tokens_per_s_per_user or 0.0 for p in front], [p.tokens_per_s_per_worker for p in front], "k--",
                lw=1, label="Pareto front")
    ax.set_xlabel("tokens/s per user (1 / TPOT p50)")
    ax.set_ylabel("output tokens/s per worker")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
