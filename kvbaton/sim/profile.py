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

import json
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvbaton.engine.scheduler import SchedulerOutput
from kvbaton.sim.cost import PROFILE_VERSION, LinearCostModel, StepShape, fit_linear

PREFILL_TOKENS = (16, 64, 256, 512, 1024)
PREFILL_CACHED = (0, 512, 1536)
DECODE_BATCH = (1, 4, 16, 32)
DECODE_CONTEXT = (128, 512, 1024)
MIXED = ((4, 256), (16, 256), (16, 64))  # (decodes, prefill tokens)
QUICK: dict[str, Any] = {"prefill_tokens": (16, 256), "prefill_cached": (0, 512), "decode_batch": (1, 8),
                         "decode_context": (128,), "mixed": ((4, 64),)}


class _Recorder:
    """Wraps the engine's ``scheduler.schedule`` to keep the output of each step it runs."""

    def __init__(self, schedule: Callable[[], SchedulerOutput]) -> None:
        self._schedule = schedule
        self.last: SchedulerOutput | None = None

    def __call__(self) -> SchedulerOutput:
        self.last = self._schedule()
        return self.last


def profile_engine(engine: Any, repeats: int = 3, quick: bool = False, seed: int = 0,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure ``engine`` (an :class:`~kvbaton.engine.engine.LLMEngine` with room for the
    grid: ``max_num_batched_tokens`` at least the largest prefill) and return the profile."""
    from kvbaton.sampling_params import SamplingParams

    grid: dict[str, Any] = QUICK if quick else {"prefill_tokens": PREFILL_TOKENS, "prefill_cached": PREFILL_CACHED,
                                "decode_batch": DECODE_BATCH, "decode_context": DECODE_CONTEXT, "mixed": MIXED}
    rec = _Recorder(engine.scheduler.schedule)
    engine.scheduler.schedule = rec
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    bs = engine.config.block_size
    budget = engine.config.max_num_batched_tokens
    points: list[dict[str, Any]] = []
    ids = iter(range(10**9))

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab) for _ in range(n)]

    def timed_step() -> tuple[tuple[tuple[int, int], ...], float]:
        t = time.perf_counter()
        engine.step()
        dt = time.perf_counter() - t
        out = rec.last
        assert out is not None
        return tuple((s.num_new_tokens, s.start) for s in out.scheduled), dt

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
    engine.scheduler.schedule = rec._schedule
    return build_profile(points, engine)


def build_profile(points: Sequence[dict[str, Any]], engine: Any) -> dict[str, Any]:
    """The profile JSON for measured ``points`` of ``engine``: the fitted coefficients and the
    fit's relative error on the points."""
    shapes = [(StepShape(tuple((int(n), int(c)) for n, c in p["parts"])), float(p["seconds"])) for p in points]
    coef = fit_linear(shapes)
    model = LinearCostModel(coef)
    errors = sorted(abs(model.step_time(s) - t) / t for s, t in shapes)
    cfg = engine.config
    return {
        "kind": "kvbaton-profile", "version": PROFILE_VERSION,
        "model": cfg.model, "device": str(engine.device),
        "dtype": str(engine.runner.kv_cache.dtype).replace("torch.", ""),
        "threads": cfg.num_threads, "block_size": cfg.block_size,
        "num_kv_blocks": engine.pool.num_blocks, "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "kv_bytes_per_token": int(engine.kv_spec.bytes_per_token),
        "coefficients": coef,
        "fit": {"points": len(shapes), "median_rel_error": statistics.median(errors), "max_rel_error": errors[-1]},
        "points": list(points),
    }


def write_profile(profile: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(profile, indent=1) + "\n")
    return p
