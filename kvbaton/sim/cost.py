"""Cost models: what one engine step costs, from the shape of the batch the real scheduler made.

A :class:`StepShape` is what a ``SchedulerOutput`` says about a step's work: for each request,
how many tokens it computes this step and how many tokens of context it already had. A
:class:`CostModel` turns that into seconds. Two kinds share the interface:

- **profiled** (:class:`LinearCostModel` from a ``kvbaton profile`` JSON): step times measured
  on the machine at hand over a grid of prefill and decode batches, fitted to the features
  below by least squares;
- **analytic** (:mod:`kvbaton.sim.analytic`): a roofline from a model config and a hardware
  table.

Features of a step (``StepShape.features``), each a cost the runner really pays:

- ``steps``: 1 (per-step overhead: scheduling, the Python around the forward pass, sampling);
- ``seqs``: requests in the batch (per-sequence bookkeeping, sampling, block tables);
- ``tokens``: tokens computed (the GEMMs: linear in tokens once the batch is large enough);
- ``prefill_attn``: sum over prefilling requests of new x (context + new / 2) (causal
  attention of the new tokens over the cached context and themselves);
- ``decode_ctx``: sum of the context lengths of the decoding requests (reading their KV).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FEATURES = ("steps", "seqs", "tokens", "prefill_attn", "decode_ctx")
PROFILE_VERSION = 1


class CostModelError(ValueError):
    """A cost model (or its profile file) is malformed or does not fit the request made of it."""


class StepShape:
    """One step's work: ``(new tokens, context before them)`` per request in the batch. A
    request computing one token on top of a context is decoding; more is (chunked) prefill.

    Its totals, which every cost model prices, are computed once, here: ``tokens`` computed,
    ``decodes`` (requests computing one token), ``context`` (tokens before the step, summed),
    and the two attention features ``prefill_attn`` and ``decode_ctx`` (see the module
    docstring). A simulator builds and prices one shape per step, millions of them, so this is
    a plain slotted class (a frozen dataclass with cached totals costs more than the sums);
    treat it as immutable. Shapes compare by ``parts``."""

    __slots__ = ("parts", "tokens", "decodes", "context", "prefill_attn", "decode_ctx")

    def __init__(self, parts: tuple[tuple[int, int], ...]) -> None:
        tokens = decodes = context = 0
        prefill_attn = decode_ctx = 0.0
        for new, ctx in parts:
            tokens += new
            context += ctx
            if new == 1:
                decodes += 1
                decode_ctx += ctx + 1
            else:
                prefill_attn += new * (ctx + new / 2)
        self.parts = parts
        self.tokens, self.decodes, self.context = tokens, decodes, context
        self.prefill_attn, self.decode_ctx = prefill_attn, decode_ctx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepShape) and self.parts == other.parts

    def __hash__(self) -> int:
        return hash(self.parts)

    def __repr__(self) -> str:
        return f"StepShape(parts={self.parts!r})"

    def features(self) -> dict[str, float]:
        return {"steps": 1.0, "seqs": float(len(self.parts)), "tokens": float(self.tokens),
                "prefill_attn": self.prefill_attn, "decode_ctx": self.decode_ctx}


@dataclass(frozen=True)
class HostContention:
    """How much slower a served step runs than a profiled one when the workers share a host
    (``kvbaton serve`` on one machine): a profile times one engine alone, while a served worker
    shares its process with the HTTP server and its machine with the router, the clients and
    the other workers. A step the profile prices at ``t`` takes

        (slowdown * t * (1 + per_busy_worker * k) + stream_step_s * [it decodes])
            * max(1, (k + 1) * threads / cores)

    where ``k`` is how many other workers are busy when it starts: ``slowdown`` is what serving
    costs every step, ``per_busy_worker`` what each busy neighbour adds through shared memory
    bandwidth and caches, ``stream_step_s`` what a step that streams tokens costs on top (the
    server wakes once per step to send them, holding the interpreter the engine thread needs;
    measured on CPU it hardly grows with the tokens: about 35-45 ms a step for 2 to 8 of them),
    all three fitted from served step traces by ``kvbaton profile --from-steps --base``; the
    last term is the time-sharing of ``cores`` when the busy workers' threads outnumber them
    (arithmetic, not fitted)."""

    cores: int
    threads: int
    slowdown: float = 1.0
    per_busy_worker: float = 0.0
    stream_step_s: float = 0.0

    def __post_init__(self) -> None:
        if self.cores < 1 or self.threads < 1:
            raise CostModelError(f"host contention needs cores >= 1 and threads >= 1, got {self.cores}, {self.threads}")
        for name in ("slowdown", "per_busy_worker", "stream_step_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (name == "slowdown" and v == 0):
                raise CostModelError(f"host contention {name} must be a finite number "
                                     f"{'> 0' if name == 'slowdown' else '>= 0'}, got {v!r}")

    def share(self, others_busy: float) -> float:
        """The cores' time-sharing factor with ``others_busy`` other workers busy."""
        return max(1.0, (others_busy + 1) * self.threads / self.cores)

    def served(self, seconds: float, decodes: int, others_busy: float) -> float:
        """The served time of a step the profile prices at ``seconds``, with ``decodes``
        decoding requests, starting while ``others_busy`` other workers are busy."""
        t = self.slowdown * seconds * (1 + self.per_busy_worker * others_busy)
        if decodes:
            t += self.stream_step_s
        return t * self.share(others_busy)

    def to_json(self) -> dict[str, Any]:
        return {"cores": self.cores, "threads": self.threads, "slowdown": self.slowdown,
                "per_busy_worker": self.per_busy_worker, "stream_step_s": self.stream_step_s}

    @classmethod
    def from_json(cls, data: Any) -> HostContention:
        if not isinstance(data, dict):
            raise CostModelError("host_contention must be an object")
        try:
            return cls(int(data["cores"]), int(data["threads"]), float(data.get("slowdown", 1.0)),
                       float(data.get("per_busy_worker", 0.0)), float(data.get("stream_step_s", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise CostModelError(f"host_contention: {e!r} (needs cores, threads, slowdown, per_busy_worker, "
                                 "stream_step_s)") from None


class CostModel(ABC):
    """Seconds one engine step takes for a batch of a given shape (the simulator's stand-in for
    the model runner). Implementations must be pure and deterministic: the same shape always
    costs the same, so a simulation with the same seed gives the same result."""

    name: str = "cost model"
    # Set for a profile whose serving conditions were measured (one host shared by the workers).
    host_contention: HostContention | None = None

    @abstractmethod
    def step_time(self, step: StepShape) -> float:
        """Seconds for ``step`` (> 0)."""

    def kv_bytes_per_token(self) -> int | None:
        """Bytes of KV one token holds (what a transfer moves), if the model says; None: unknown."""
        return None

    def describe(self) -> dict[str, Any]:
        """What the model is, for the result JSON."""
        return {"name": self.name}


class LinearCostModel(CostModel):
    """``step_time = sum(coef[f] * feature[f])`` over :data:`FEATURES` (missing coefficients are
    0), at least ``min_step_s``."""

    def __init__(self, coefficients: Mapping[str, float], name: str = "linear", min_step_s: float = 1e-6,
                 kv_bytes_per_token: int | None = None, meta: Mapping[str, Any] | None = None,
                 host_contention: HostContention | None = None) -> None:
        unknown = set(coefficients) - set(FEATURES)
        if unknown:
            raise CostModelError(f"unknown cost features {sorted(unknown)}; known: {', '.join(FEATURES)}")
        for k, v in coefficients.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CostModelError(f"coefficient {k!r} must be a finite number, got {v!r}")
        self.coefficients = {f: float(coefficients.get(f, 0.0)) for f in FEATURES}
        self.name = name
        self.min_step_s = min_step_s
        self._kv_bytes_per_token = kv_bytes_per_token
        self.meta = dict(meta or {})
        self.host_contention = host_contention

    def step_time(self, step: StepShape) -> float:
        c = self.coefficients
        t = (c["steps"] + c["seqs"] * len(step.parts) + c["tokens"] * step.tokens
             + c["prefill_attn"] * step.prefill_attn + c["decode_ctx"] * step.decode_ctx)
        return max(self.min_step_s, t)

    def kv_bytes_per_token(self) -> int | None:
        return self._kv_bytes_per_token

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "coefficients": dict(self.coefficients), **self.meta}
        if self.host_contention is not None:
            d["host_contention"] = self.host_contention.to_json()
        return d


def fit_linear(points: Sequence[tuple[StepShape, float]]) -> dict[str, float]:
    """Least-squares coefficients of :data:`FEATURES` for measured ``(shape, seconds)`` points,
    weighted by 1 / seconds (relative error matters: a 5 ms decode step and a 2 s prefill both),
    with no coefficient below 0 (a negative cost is never physical: such a feature is dropped and
    the fit redone)."""
    import numpy as np

    if len(points) < len(FEATURES):
        raise CostModelError(f"a profile needs at least {len(FEATURES)} points, got {len(points)}")
    active = list(FEATURES)
    while True:
        a = np.array([[p.features()[f] / t for f in active] for p, t in points])
        b = np.ones(len(points))
        coef, *_ = np.linalg.lstsq(a, b, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            return {f: float(max(0.0, c)) for f, c in zip(active, coef)}
        active.pop(int(np.argmin(coef)))


def load_cost_model(spec: str) -> CostModel:
    """A cost model from ``--cost-model``: a profile JSON path, or ``analytic:HARDWARE[:MODEL]``."""
    if spec.startswith("analytic:"):
        from kvbaton.sim.analytic import analytic_cost_model

        return analytic_cost_model(spec[len("analytic:"):])
    return load_profile(spec)


def load_profile(path: str | Path) -> LinearCostModel:
    """The cost model of a ``kvbaton profile`` JSON (CostModelError naming what is wrong)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise CostModelError(f"cannot read the profile {p}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise CostModelError(f"the profile {p} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("kind") != "kvbaton-profile":
        raise CostModelError(f"{p} is not a kvbaton profile (no \"kind\": \"kvbaton-profile\")")
    if data.get("version") != PROFILE_VERSION:
        raise CostModelError(f"{p}: profile version {data.get('version')!r}, this kvbaton reads {PROFILE_VERSION}")
    coef = data.get("coefficients")
    if not isinstance(coef, dict):
        raise CostModelError(f"{p}: no \"coefficients\" object")
    kvb = data.get("kv_bytes_per_token")
    if kvb is not None and (not isinstance(kvb, int) or kvb <= 0):
        raise CostModelError(f"{p}: kv_bytes_per_token must be a positive integer, got {kvb!r}")
    meta = {k: data[k] for k in ("model", "device", "threads", "dtype", "block_size", "num_kv_blocks",
                                 "request_overhead_ms", "step_overhead_ms") if k in data}
    try:
        hc = HostContention.from_json(data["host_contention"]) if data.get("host_contention") else None
    except CostModelError as e:
        raise CostModelError(f"{p}: {e}") from None
    return LinearCostModel(coef, name=f"profile:{p.name}", kv_bytes_per_token=kvb, meta=meta, host_contention=hc)
