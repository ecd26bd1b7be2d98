"""``kvbaton profile``: measure the real engine's step time over a grid of batch shapes and write
the profile the simulator's cost model is fitted from.

The grid: prefill steps of P new tokens on top of C cached tokens (the cached prefix is
computed by an earlier request, so the step is the real chunk the scheduler makes), decode
steps of B requests at context L, and mixed steps (B decodes beside one prefill chunk), each
measured ``repeats`` times (the median is kept) after one warm-up. The shape of every timed
step is read from the real scheduler's output, so a point says exactly what ran. The points are
fitted to :data:`kvbaton.sim.cost.FEATURES` (:func:`kvbaton.sim.cost.fit_linear`); the file
keeps both, and the fit's error on its own points.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvbaton.engine.step_trace import TRACE_KIND, StepRecorder
from kvbaton.sim.cost import (
    FEATURES,
    PROFILE_VERSION,
    CostModel,
    CostModelError,
    HostContention,
    LinearCostModel,
    StepShape,
    fit_linear,
    load_profile,
)

# The header fields of a step trace that a step time depends on (all traces fitted together
# must agree on them; the pool size and token budget may differ).
TRACE_META = ("model", "device", "dtype", "threads", "block_size", "kv_bytes_per_token")

PREFILL_TOKENS = (16, 64, 256, 512, 1024)
PREFILL_CACHED = (0, 512, 1536)
DECODE_BATCH = (1, 4, 16, 32)
DECODE_CONTEXT = (128, 512, 1024)
MIXED = ((4, 256), (16, 256), (16, 64))  # (decodes, prefill tokens)
QUICK: dict[str, Any] = {"prefill_tokens": (16, 256), "prefill_cached": (0, 512), "decode_batch": (1, 8),
                         "decode_context": (128,), "mixed": ((4, 64),)}


def profile_engine(engine: Any, repeats: int = 3, quick: bool = False, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``engine`` (an :class:`~kvbaton.engine.engine.LLMEngine` with room for the
    grid: ``max_num_batched_tokens`` at least the largest prefill) and return the profile."""
    from kvbaton.sampling_params import SamplingParams

    grid: dict[str, Any] = QUICK if quick else {"prefill_tokens": PREFILL_TOKENS, "prefill_cached": PREFILL_CACHED,
                                "decode_batch": DECODE_BATCH, "decode_context": DECODE_CONTEXT, "mixed": MIXED}
    # Detokenize as a serving worker does (text after every step, for streaming): that cost is
    # inside its steps.
    engine.incremental_detokenize = True
    # The engine's own step recorder times each step and says what it ran (as scheduled).
    rec = StepRecorder()
    saved, engine.step_trace = engine.step_trace, rec
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    bs = engine.config.block_size
    budget = engine.config.max_num_batched_tokens
    points: list[dict[str, Any]] = []
    ids = iter(range(10**9))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def timed_step() -> tuple[tuple[tuple[int, int], ...], float]:
        n = len(rec.steps)
        engine.step()
        if len(rec.steps) == n:
            return (), 0.0
        step = rec.steps[-1]
        return tuple((int(a), int(b)) for a, b in step["parts"]), float(step["dt"])

    def drain() -> None:
        while engine.has_unfinished_requests():
            engine.step()

    def keep(kind: str, samples: list[tuple[tuple[tuple[int, int], ...], float]]) -> None:
        by_shape: dict[tuple[tuple[int, int], ...], list[float]] = {}
        for parts, dt in samples:
            if parts:
                by_shape.setdefault(parts, []).append(dt)
        for parts, dts in by_shape.items():
            points.append({"kind": kind, "parts": [list(p) for p in parts], "seconds": statistics.median(dts)})

    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine.add_request(tokens(64), one, f"warm-{next(ids)}")
    drain()
    for p_tokens in grid["prefill_tokens"]:
        for cached in grid["prefill_cached"]:
            if p_tokens > budget:
                continue
            samples = []
            for _ in range(repeats):
                prefix = tokens(cached)
                if cached:
                    engine.add_request(prefix, one, f"prefix-{next(ids)}")
                    drain()
                engine.add_request(prefix + tokens(p_tokens), one, f"prefill-{next(ids)}")
                samples.append(timed_step())
                drain()
            keep("prefill", samples)
            if progress:
                progress(f"prefill {p_tokens} on {cached} cached: {samples[-1][1] * 1000:.1f} ms")
    for batch in grid["decode_batch"]:
        for ctx in grid["decode_context"]:
            many = SamplingParams(max_tokens=repeats + 2 + ctx // bs, temperature=0, ignore_eos=True)
            for _ in range(batch):
                engine.add_request(tokens(ctx), many, f"decode-{next(ids)}")
            # Prefill them all first (several steps when they exceed the budget).
            while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
                engine.step()
            samples = [timed_step() for _ in range(repeats + 1)][1:]
            keep("decode", samples)
            for rid in list(engine.scheduler.requests):
                engine.abort_request(rid)
            if progress:
                progress(f"decode batch {batch} at {ctx}: {samples[-1][1] * 1000:.1f} ms")
    for batch, p_tokens in grid["mixed"]:
        many = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        for _ in range(batch):
            engine.add_request(tokens(256), many, f"mixed-d-{next(ids)}")
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
            engine.step()
        samples = []
        for _ in range(repeats):
            engine.add_request(tokens(p_tokens), one, f"mixed-p-{next(ids)}")
            samples.append(timed_step())
            engine.step()  # decode the rest of that step's output
        keep("mixed", samples)
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid)
        if progress:
            progress(f"mixed {batch} decodes + {p_tokens} prefill: {samples[-1][1] * 1000:.1f} ms")
    engine.step_trace = saved
    return build_profile(points, engine)


def build_profile(points: Sequence[dict[str, Any]], engine: Any) -> dict[str, Any]:
    """The profile JSON for measured ``points`` of ``engine``."""
    return profile_of(points, engine.cost_meta())


def profile_of(points: Sequence[dict[str, Any]], meta: Mapping[str, Any],
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The profile JSON for measured ``points`` (``kind``, ``parts``, ``seconds``) of the engine
    ``meta`` describes (:meth:`~kvbaton.engine.engine.LLMEngine.cost_meta`): the fitted
    coefficients and the fit's relative error on the points."""
    shapes = [(StepShape(tuple((int(n), int(c)) for n, c in p["parts"])), float(p["seconds"])) for p in points]
    coef = fit_linear(shapes)
    model = LinearCostModel(coef)
    errors = sorted(abs(model.step_time(s) - t) / t for s, t in shapes)
    return {
        "kind": "kvbaton-profile", "version": PROFILE_VERSION, **meta, **(extra or {}),
        "coefficients": coef,
        "fit": {"points": len(shapes), "median_rel_error": statistics.median(errors), "max_rel_error": errors[-1]},
        "points": list(points),
    }


def read_step_traces(paths: Sequence[str | Path]) -> tuple[dict[str, Any], list[list[dict[str, Any]]]]:
    """The header and each file's steps of step-trace files (:mod:`kvbaton.engine.step_trace`),
    all of one engine setup: CostModelError naming the file and line of anything malformed, and
    of a header that differs from the first one in what a step time depends on."""
    meta: dict[str, Any] | None = None
    per_file: list[list[dict[str, Any]]] = []
    for path in paths:
        p = Path(path)
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise CostModelError(f"cannot read the step trace {p}: {e.strerror or e}") from None
        steps: list[dict[str, Any]] = []
        seen_header = False
        for no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CostModelError(f"{p}:{no}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise CostModelError(f"{p}:{no}: a step trace line is a JSON object")
            if rec.get("kind") == TRACE_KIND:
                head = {k: v for k, v in rec.items() if k != "kind"}
                seen_header = True
                if meta is None:
                    meta = head
                diff = sorted(k for k in TRACE_META if head.get(k) != meta.get(k))
                if diff:
                    raise CostModelError(f"{p}:{no}: this trace's engine differs from the first one's in "
                                         f"{', '.join(diff)}: profile one setup at a time")
                continue
            if not seen_header:
                raise CostModelError(f"{p}:{no}: a step before any header: not a kvbaton step trace")
            steps.append(_trace_step(rec, f"{p}:{no}"))
        per_file.append(steps)
    if meta is None:
        raise CostModelError("no step trace header in " + ", ".join(str(p) for p in paths))
    return meta, per_file


def _trace_step(rec: dict[str, Any], where: str) -> dict[str, Any]:
    t, dt, gap, parts = rec.get("t"), rec.get("dt"), rec.get("gap"), rec.get("parts")
    if not isinstance(t, (int, float)) or not math.isfinite(t):
        raise CostModelError(f"{where}: \"t\" must be a number of seconds, got {t!r}")
    if not isinstance(dt, (int, float)) or not dt > 0 or not math.isfinite(dt):
        raise CostModelError(f"{where}: \"dt\" must be a number of seconds > 0, got {dt!r}")
    if gap is not None and (not isinstance(gap, (int, float)) or not math.isfinite(gap)):
        raise CostModelError(f"{where}: \"gap\" must be a number of seconds or null, got {gap!r}")
    if (not isinstance(parts, list) or not parts
            or not all(isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) and v >= 0 for v in x)
                       and x[0] >= 1 for x in parts)):
        raise CostModelError(f"{where}: \"parts\" must be a non-empty list of [new tokens >= 1, context >= 0]")
    return {"t": float(t), "dt": float(dt), "gap": None if gap is None else max(0.0, float(gap)), "parts": parts}


def profile_from_steps(paths: Sequence[str | Path], base: str | Path | None = None) -> dict[str, Any]:
    """A profile from the steps served workers recorded (``kvbaton profile --from-steps``).

    Without ``base``: each step is a point of the fit, so the step times include what serving
    adds to a step (the HTTP server's share of the process, the other processes on the
    machine). With ``base`` (a grid profile of the same engine setup): its coefficients stay,
    and the served steps measure the :class:`~kvbaton.sim.cost.HostContention` of the host the
    traces come from (each file one worker of one ``kvbaton serve``, recorded at the same time;
    see :func:`fit_host_contention`). Either way the worker loop's cost between busy steps
    becomes ``step_overhead_ms`` (the median ``gap``), which ``kvbaton sim`` uses unless told
    otherwise."""
    meta, per_worker = read_step_traces(paths)
    steps = [s for ss in per_worker for s in ss]
    if len(steps) < len(FEATURES):
        raise CostModelError(f"the step traces hold {len(steps)} steps; a fit needs at least {len(FEATURES)}")
    gaps = [s["gap"] for s in steps if s["gap"] is not None]
    extra: dict[str, Any] = {"source": "step-trace", "traces": [str(p) for p in paths],
                             "step_overhead_ms": statistics.median(gaps) * 1000 if gaps else 0.0}
    if base is None:
        points = [{"kind": "served", "parts": s["parts"], "seconds": s["dt"]} for s in steps]
        return profile_of(points, meta, extra)
    model = load_profile(base)
    data = json.loads(Path(base).read_text())
    diff = sorted(k for k in TRACE_META if data.get(k) != meta.get(k))
    if diff:
        raise CostModelError(f"the base profile {base} differs from the traces' engine in {', '.join(diff)}")
    cores = int(meta.get("host_cores") or data.get("host_cores") or os.cpu_count() or 1)
    hc, fit = fit_host_contention(model, per_worker, cores, int(meta.get("threads") or 1))
    out = {k: v for k, v in data.items() if k not in ("traces", "source", "host_contention", "contention_fit")}
    out.update(extra, source="grid + step-trace", base=str(base), host_cores=cores,
               host_contention=hc.to_json(), contention_fit=fit)
    return out


def fit_host_contention(model: CostModel, workers: Sequence[Sequence[dict[str, Any]]], cores: int,
                        threads: int) -> tuple[HostContention, dict[str, Any]]:
    """The :class:`~kvbaton.sim.cost.HostContention` of served steps (``workers``: each worker's
    steps, on one clock) against ``model``'s predictions ``t``. For each step, ``k`` is how many
    other workers were busy during it (the overlap of their steps, as a fraction of this one's)
    and ``d`` how many of its requests decode; ``r`` is served time / time-sharing.

    Medians, so that a step stretched by a garbage collection moves nothing, and each term from
    its own kind of step, so that the terms cannot trade off against each other:
    ``slowdown`` is the median ``r / t`` of the steps that compute a prompt and ran alone
    (k < 0.25; 1 when there are none), ``per_busy_worker`` from those that ran beside others
    (k >= 0.75; 0 when there are none), and ``stream_step_s`` the median of what the
    decode-only steps take beyond that (never below 0); each with the other kind's term taken
    out, in two rounds."""
    spans = [[(s["t"], s["t"] + s["dt"]) for s in ss] for ss in workers]
    rows: list[tuple[float, float, int, float, bool]] = []  # (t, k, d, r, computes a prompt)
    for w, ss in enumerate(workers):
        for s in ss:
            a, b = s["t"], s["t"] + s["dt"]
            k = 0.0
            for v, other in enumerate(spans):
                if v == w:
                    continue
                i = max(0, bisect.bisect_left(other, (a, a)) - 1)  # the step before may still run at a
                while i < len(other) and other[i][0] < b:
                    o0, o1 = other[i]
                    k += max(0.0, min(b, o1) - max(a, o0)) / (b - a)
                    i += 1
            parts = tuple((int(n), int(c)) for n, c in s["parts"])
            t = model.step_time(StepShape(parts))
            d = sum(1 for n, _ in parts if n == 1)
            rows.append((t, k, d, s["dt"] / max(1.0, (k + 1) * threads / cores), d < len(parts)))
    # Steps that compute a prompt (t is mostly the prefill) tell the multiplicative terms; steps
    # that only decode tell the streaming one. Each kind's estimate removes the other's term, so
    # two rounds settle them (the first round takes no per-token cost).
    prefill = [(t, k, d, r) for t, k, d, r, p in rows if p]
    decode = [(t, k, d, r) for t, k, d, r, p in rows if not p]
    slowdown, per_busy, stream = 1.0, 0.0, 0.0
    for _ in range(2):
        alone = [(r - stream * (d > 0)) / t for t, k, d, r in prefill if k < 0.25]
        beside = [(k, (r - stream * (d > 0)) / t) for t, k, d, r in prefill if k >= 0.75]
        slowdown = max(1e-3, statistics.median(alone)) if alone else 1.0
        per_busy = 0.0
        if beside:
            mean_k = statistics.fmean(k for k, _ in beside)
            per_busy = max(0.0, (statistics.median(x for _, x in beside) / slowdown - 1) / mean_k)
        extra = [r - slowdown * t * (1 + per_busy * k) for t, k, d, r in decode]
        stream = max(0.0, statistics.median(extra)) if extra else 0.0
    hc = HostContention(cores, threads, slowdown, per_busy, stream)
    errors = sorted(abs(hc.served(t, d, k) / hc.share(k) - r) / r for t, k, d, r, _ in rows)
    fit = {"steps": len(rows), "prefill_alone": len(alone), "prefill_beside": len(beside),
           "decode_only": len(decode), "median_rel_error": statistics.median(errors),
           "p90_rel_error": errors[int(0.9 * (len(errors) - 1))]}
    return hc, fit


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(profile, indent=1) + "\n")
    return p
