"""Benchmark arithmetic: per-request records to the aggregate numbers `vllm bench serve` reports,
plus goodput under SLOs, per-tag splits and the knee of a throughput curve.

Everything here is pure (no I/O, no clocks) so it can be tested on synthetic timelines.
Definitions follow vLLM's benchmark so numbers are comparable:

- TTFT: request sent -> first non-empty content chunk.
- TPOT: ``(e2el - ttft) / (output_tokens - 1)`` for requests with more than one output token.
- ITL: the gaps between consecutive content chunks (a chunk may carry several tokens).
- E2EL: request sent -> last byte of the stream.
- Percentiles: numpy's default linear interpolation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES: tuple[int, ...] = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")
MAX_ERROR_MESSAGES = 10


@dataclass
class RequestRecord:
    """What one request did, as the client saw it. Times in seconds."""

    session_id: str
    turn: int
    tags: tuple[str, ...] = ()
    start_s: float = 0.0          # offset of the send from the start of the run
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2el_s: float | None = None
    itls_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0        # the server's usage.prompt_tokens (0 if it sent none)
    output_tokens: int = 0        # usage.completion_tokens, else the number of content chunks
    cached_tokens: int | None = None
    text: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None when there is no second token."""
        if not self.ok or self.ttft_s is None or self.e2el_s is None or self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with numpy's linear interpolation; None for no values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else None


def distribution_ms(values_s: Sequence[float], name: str,
                    percentiles: Iterable[int] = PERCENTILES) -> dict[str, float | None]:
    """``mean_/median_/std_/pNN_<name>_ms`` for values given in seconds (None when empty)."""
    arr = np.asarray(values_s, dtype=float) * 1000.0
    empty = arr.size == 0
    out: dict[str, float | None] = {
        f"mean_{name}_ms": None if empty else float(arr.mean()),
        f"median_{name}_ms": None if empty else float(np.median(arr)),
        f"std_{name}_ms": None if empty else float(arr.std()),
    }
    for p in percentiles:
        out[f"p{p}_{name}_ms"] = None if empty else float(np.percentile(arr, p))
    return out


def parse_slo(text: str) -> dict[str, float]:
    """``"ttft=500,tpot=50[,e2el=2000]"`` (milliseconds) -> ``{"ttft": 500.0, ...}``.

    Raises ValueError naming the bad part: unknown metric, not a positive number, repeated key.
    """
    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"{part.strip()!r}: expected METRIC=MS with METRIC one of {', '.join(SLO_KEYS)}")
        if key in out:
            raise ValueError(f"{key} given twice")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"{key}={value!r} is not a number of milliseconds") from None
        if not ms > 0 or not np.isfinite(ms):
            raise ValueError(f"{key}={value} must be a positive number of milliseconds")
        out[key] = ms
    return out


def meets_slo(rec: RequestRecord, slo: Mapping[str, float]) -> bool:
    """True if a completed request meets every SLO (ms). A single-token answer has no
    inter-token time, so it meets any TPOT SLO (as in vLLM, where its TPOT counts as 0)."""
    if not rec.ok or rec.ttft_s is None or rec.e2el_s is None:
        return False
    tpot = rec.tpot_s or 0.0
    measured = {"ttft": rec.ttft_s, "tpot": tpot, "e2el": rec.e2el_s}
    return all(measured[k] * 1000.0 <= limit for k, limit in slo.items())


def summarize(records: Sequence[RequestRecord], duration_s: float,
              slo: Mapping[str, float] | None = None,
              percentiles: Iterable[int] = PERCENTILES) -> dict:
    """The aggregate metrics of one run, keyed as in `vllm bench serve`'s result JSON.

    Throughputs divide by ``duration_s`` (the run's wall time). ``input_lens``, ``output_lens``,
    ``ttfts`` (s), ``itls`` (s, one list per request) and ``e2els`` (s, ours) list completed
    requests only; ``errors`` holds the first distinct failure messages (vLLM keeps one per
    request), ``failed`` counts them all.
    """
    percentiles = tuple(percentiles)
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors: list[str] = []
    for r in failed:
        msg = r.error or "unknown error"
        if msg not in errors and len(errors) < MAX_ERROR_MESSAGES:
            errors.append(msg)
    dur = duration_s if duration_s > 0 else float("nan")
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    good = sum(meets_slo(r, slo) for r in done) if slo else None
    out: dict = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(failed),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": _rate(len(done), dur),
        "request_goodput": None if good is None else _rate(good, dur),
        "output_throughput": _rate(total_out, dur),
        "total_token_throughput": _rate(total_in + total_out, dur),
        "input_lens": [r.prompt_tokens for r in done],
        "output_lens": [r.output_tokens for r in done],
        "ttfts": [r.ttft_s for r in done],
        "itls": [list(r.itls_s) for r in done],
        "e2els": [r.e2el_s for r in done],
        "errors": errors,
    }
    out.update(_latency_block(done, percentiles))
    return out


def per_tag(records: Sequence[RequestRecord], percentiles: Iterable[int] = PERCENTILES) -> dict:
    """TTFT/TPOT/E2EL distributions of completed requests, split by each tag they carry."""
    percentiles = tuple(percentiles)
    tags = sorted({t for r in records for t in r.tags})
    out: dict = {}
    for tag in tags:
        rs = [r for r in records if tag in r.tags]
        done = [r for r in rs if r.ok]
        block: dict[str, float | None] = {"completed": len(done), "failed": len(rs) - len(done)}
        for name, values in _latency_values(done).items():
            if name != "itl":
                block.update(distribution_ms(values, name, percentiles))
        out[tag] = block
    return out


def _latency_values(done: Sequence[RequestRecord]) -> dict[str, list[float]]:
    return {
        "ttft": [r.ttft_s for r in done if r.ttft_s is not None],
        "tpot": [t for r in done if (t := r.tpot_s) is not None],
        "itl": [g for r in done for g in r.itls_s],
        "e2el": [r.e2el_s for r in done if r.e2el_s is not None],
    }


def _latency_block(done: Sequence[RequestRecord], percentiles: tuple[int, ...]) -> dict:
    out: dict = {}
    for name, values in _latency_values(done).items():
        out.update(distribution_ms(values, name, percentiles))
    return out


def _rate(count: float, duration_s: float) -> float | None:
    return None if not np.isfinite(duration_s) else count / duration_s


@dataclass(frozen=True)
class Knee:
    """Where a curve bends: the breakpoint of the best two-segment piecewise-linear fit.

    ``slope_after / slope_before`` says how much an added unit of x still pays past the knee
    (1: not at all bent, ~0: flat, negative: it gets worse).
    """

    x: float
    y: float            # the fitted value at the knee
    index: int          # position of the breakpoint in the input
    slope_before: float
    slope_after: float
    sse: float          # residual sum of squares of the best fit

    @property
    def gain_after(self) -> float | None:
        return None if self.slope_before == 0 else self.slope_after / self.slope_before

    def as_dict(self) -> dict:
        return {"x": self.x, "y": self.y, "index": self.index, "slope_before": self.slope_before,
                "slope_after": self.slope_after, "gain_after": self.gain_after, "sse": self.sse}


def find_knee(xs: Sequence[float], ys: Sequence[float]) -> Knee | None:
    """Fit ``y = a + b*x + c*max(0, x - x_k)`` by least squares for every interior data point
    ``x_k`` as the breakpoint (a continuous "hinge"), and return the best one.

    Needs three or more points with distinct x; None otherwise. Points are sorted by x first.
    """
    if len(xs) != len(ys):
        raise ValueError("xs and ys differ in length")
    order = np.argsort(np.asarray(xs, dtype=float), kind="stable")
    x = np.asarray(xs, dtype=float)[order]
    y = np.asarray(ys, dtype=float)[order]
    if x.size < 3 or np.unique(x).size != x.size or not np.all(np.isfinite(y)):
        return None
    best: Knee | None = None
    for k in range(1, x.size - 1):
        design = np.column_stack([np.ones_like(x), x, np.maximum(0.0, x - x[k])])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(np.sum((design @ coef - y) ** 2))
        # Ties go to the earliest breakpoint: the first x past which adding more stops paying.
        if best is None or sse < best.sse - 1e-9 * max(1.0, best.sse):
            a, b, c = (float(v) for v in coef)
            best = Knee(x=float(x[k]), y=a + b * float(x[k]), index=int(order[k]),
                        slope_before=b, slope_after=b + c, sse=sse)
    return best
