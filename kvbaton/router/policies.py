"""Placement: which worker runs each leg of a request, and how much of a prompt a worker
already holds.

Two pluggable parts, both picked by name from the router's config:

- :class:`PlacementPolicy` chooses one worker among healthy candidates for one leg
  (``prefill`` or ``decode``): ``round_robin``, ``least_load`` and ``kv_aware`` live here,
  registered by name (``@register_policy``).
- :class:`PrefixOverlap` predicts how many prompt tokens a worker has cached. The router uses
  it to decide whether a request is worth a remote prefill (conditional disaggregation), and
  ``kv_aware`` uses its tier-discounted form (``credited_tokens_each``) to score candidates.
  The default, :class:`NoPrefixOverlap`, says nothing is cached; the router's KV index
  (``kvbaton.router.kv_feed``) gives the real answer.

Policies see workers only through :class:`WorkerView`, so the simulator can drive the same
policies with simulated workers.
"""

from __future__ import annotations

import itertools
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from kvbaton.kv.hashing import BlockHash

Leg = Literal["prefill", "decode"]


@dataclass(frozen=True)
class RoutingRequest:
    """What placement knows about one request.

    ``block_hashes`` are the hashes of the prompt's full blocks (``kvbaton.kv.hashing``, root
    from the cluster's model fingerprint and ``cache_salt``, ``block_size`` from the workers'
    ``/kv/info``); empty when the workers did not report a fingerprint. ``max_tokens`` is the
    most tokens the request may generate, for load estimates.
    """

    request_id: str
    token_ids: tuple[int, ...]
    block_hashes: tuple[BlockHash, ...]
    block_size: int | None
    cache_salt: str | None
    max_tokens: int

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.token_ids)


class WorkerView(Protocol):
    """The read-only face of a worker that policies see."""

    @property
    def url(self) -> str: ...

    @property
    def worker_id(self) -> str: ...

    @property
    def role(self) -> str: ...

    @property
    def model_fingerprint(self) -> str | None:
        """The model fingerprint the worker reported (None until it did)."""
        ...

    @property
    def kv_protocol(self) -> str | None:
        """How it passes KV to another worker or takes it (``"kvbaton"``, ``"vllm"``); None:
        it cannot, so it prefills its own requests. Prefill and decode pair within one."""
        ...

    @property
    def in_flight_requests(self) -> int: ...

    @property
    def in_flight_tokens(self) -> int: ...

    @property
    def active_requests(self) -> int:
        """Requests running or waiting on the worker (the router's, plus others reported)."""
        ...

    @property
    def active_blocks(self) -> int:
        """KV blocks the worker's running requests hold or will need (the router's in-flight
        legs, shared prompt blocks counted once, plus what the worker reported beyond them)."""
        ...

    def shared_active_blocks(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many of ``block_hashes`` are among the active blocks (a new request shares
        them rather than adding to the load)."""
        ...


class PrefixOverlap(ABC):
    """Predicts the prompt tokens a worker will find in its prefix cache."""

    @abstractmethod
    def cached_tokens(self, request: RoutingRequest, worker: WorkerView) -> int:
        """Prompt tokens of ``request`` that ``worker`` is expected to hold already, or to load
        from a KV tier every worker shares (a multiple of the block size, at most the prompt
        length). Must be fast and must not block: it runs on the event loop for every request
        and candidate."""

    def cached_tokens_each(self, request: RoutingRequest, workers: Sequence[WorkerView]) -> list[int]:
        """``cached_tokens`` for each of ``workers``; override when one lookup answers all."""
        return [self.cached_tokens(request, w) for w in workers]

    def credited_tokens_each(self, request: RoutingRequest, workers: Sequence[WorkerView]) -> list[float]:
        """Prompt tokens each of ``workers`` holds, discounted by how slow their medium is to
        load: a cached token held in a medium of credit ``c`` (1 = as good as the device, 0 =
        no better than computing it) counts ``c`` tokens. At most ``cached_tokens_each``.

        ``kv_aware`` scores candidates with this; whole-token decisions (conditional
        disaggregation, the predicted-vs-actual metrics) keep ``cached_tokens``, because a
        block on a slow tier is still reused, not recomputed. The default credits every
        cached token fully (a provider that knows no mediums)."""
        return [float(c) for c in self.cached_tokens_each(request, workers)]

    def routed(self, request: RoutingRequest, worker: WorkerView) -> None:  # noqa: B027 - optional hook
        """The router just sent ``request``'s prompt to ``worker`` (it will compute or fetch
        those blocks there); a provider may count them as held there from now on. Optional:
        the default does nothing."""

    def served(self, request: RoutingRequest, worker: WorkerView, cached_tokens: int,  # noqa: B027
               sent_at: float) -> None:
        """``worker`` answered ``request`` (sent at ``sent_at``, monotonic) reporting
        ``cached_tokens`` of its prompt as cached, so it computed and cached the full blocks
        beyond them; a provider that follows KV events may check that their events came.
        Optional: the default does nothing."""


class NoPrefixOverlap(PrefixOverlap):
    """Assumes no worker holds anything (until the KV index exists)."""

    def cached_tokens(self, request: RoutingRequest, worker: WorkerView) -> int:
        return 0


@dataclass(frozen=True)
class PolicyOptions:
    """Knobs of the cost-based policies (``--prefill-load-scale``, ``--routing-temperature``).

    ``prefill_load_scale``: what one KV block still to prefill costs, in blocks of decode
    load. ``temperature``: 0 picks the cheapest worker; above 0 samples with probability
    proportional to ``exp(-cost / temperature)`` (cost in blocks). ``seed`` seeds the
    random tie-break and sampling (tests, the simulator).
    """

    prefill_load_scale: float = 1.0
    temperature: float = 0.0
    seed: int | None = None


class PlacementPolicy(ABC):
    """Chooses the worker for one leg of a request.

    One instance serves one leg kind for the router's lifetime; it may keep state (a
    round-robin counter) but must not block or do I/O. ``overlap`` is the router's
    :class:`PrefixOverlap` provider, for policies that credit cached prefixes; ``options``
    the cost knobs (policies that have none ignore them).
    """

    name: ClassVar[str]

    def __init__(self, overlap: PrefixOverlap | None = None, options: PolicyOptions | None = None) -> None:
        self.overlap = overlap or NoPrefixOverlap()
        self.options = options or PolicyOptions()

    @abstractmethod
    def choose(self, request: RoutingRequest, candidates: Sequence[WorkerView], leg: Leg) -> WorkerView:
        """One of ``candidates`` (non-empty, healthy, able to run ``leg``, in a stable
        order) to run ``leg`` of ``request``."""


POLICIES: dict[str, type[PlacementPolicy]] = {}


def register_policy(cls: type[PlacementPolicy]) -> type[PlacementPolicy]:
    """Class decorator: make ``cls`` selectable by ``cls.name`` (``--policy NAME``)."""
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"policy {cls.name!r} is already registered")
    POLICIES[cls.name] = cls
    return cls


def make_policy(
    name: str, overlap: PrefixOverlap | None = None, options: PolicyOptions | None = None
) -> PlacementPolicy:
    """A new policy by registered name; ValueError lists the known names."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})") from None
    return cls(overlap, options)


@register_policy
class RoundRobinPolicy(PlacementPolicy):
    """Candidates in turn, ignoring load."""

    name = "round_robin"

    def __init__(self, overlap: PrefixOverlap | None = None, options: PolicyOptions | None = None) -> None:
        super().__init__(overlap, options)
        self._next = itertools.count()

    def choose(self, request: RoutingRequest, candidates: Sequence[WorkerView], leg: Leg) -> WorkerView:
        return candidates[next(self._next) % len(candidates)]


@register_policy
class LeastLoadPolicy(PlacementPolicy):
    """Fewest in-flight work as the router counts it.

    Decode legs compare in-flight requests first (each holds a batch slot for its whole
    generation), then tokens; prefill legs compare in-flight tokens first (prefill cost grows
    with prompt length), then requests. Ties rotate, so an idle cluster still spreads requests.
    """

    name = "least_load"

    def __init__(self, overlap: PrefixOverlap | None = None, options: PolicyOptions | None = None) -> None:
        super().__init__(overlap, options)
        self._turn = itertools.count()

    def choose(self, request: RoutingRequest, candidates: Sequence[WorkerView], leg: Leg) -> WorkerView:
        key: Callable[[WorkerView], tuple[int, int]]
        if leg == "decode":
            key = lambda w: (w.in_flight_requests, w.in_flight_tokens)  # noqa: E731
        else:
            key = lambda w: (w.in_flight_tokens, w.in_flight_requests)  # noqa: E731
        best = min(key(w) for w in candidates)
        tied = [w for w in candidates if key(w) == best]
        return tied[next(self._turn) % len(tied)]


@register_policy
class KVAwarePolicy(PlacementPolicy):
    """Lowest cost, where a worker's cost for a request is

        cost = prefill_load_scale * (prompt blocks it would still compute after cache credit)
               + (KV blocks active on it that the request would not share)

    Prompt blocks are ``ceil(prompt / block_size)``; the cache credit is
    ``overlap.credited_tokens_each / block_size`` (the KV index's longest cached prefix there,
    own recent placements included, each block discounted by how slow its medium is to load:
    a prefix on disk is worth less than the same prefix on the device; a prefix in the shared
    remote tier is every worker's, at its credit, so it does not pull every request to the
    worker that computed it). Active blocks are
    :attr:`WorkerView.active_blocks` minus
    :meth:`WorkerView.shared_active_blocks` of the prompt (a running sibling's prefix is not
    extra load for this request). So a worker holding ``k`` more leading blocks of the prompt
    (on the device) than another wins unless its (unshared) active blocks exceed the other's by
    at least ``prefill_load_scale * k``: that is the load margin a cache hit is worth. Ties go to fewer
    active requests, then at random; with ``temperature`` > 0 the choice is sampled from
    ``softmax(-cost / temperature)``.
    """

    name = "kv_aware"

    def __init__(self, overlap: PrefixOverlap | None = None, options: PolicyOptions | None = None) -> None:
        super().__init__(overlap, options)
        self._rng = random.Random(self.options.seed)

    def costs(self, request: RoutingRequest, candidates: Sequence[WorkerView]) -> list[float]:
        """Each candidate's cost (see the class docstring), in blocks."""
        bs = request.block_size or 16
        prompt = request.num_prompt_tokens
        blocks = -(-prompt // bs)
        credited = self.overlap.credited_tokens_each(request, candidates)
        scale = self.options.prefill_load_scale
        hashes = request.block_hashes
        return [
            scale * self._blocks_to_prefill(blocks, prompt, c, bs)
            + w.active_blocks - w.shared_active_blocks(hashes)
            for w, c in zip(candidates, credited)
        ]

    @staticmethod
    def _blocks_to_prefill(blocks: int, prompt: int, credited: float, bs: int) -> float:
        """Prompt blocks still to compute after ``credited`` tokens of cache credit. The credit
        is fractional (tier discounts), so it is subtracted in blocks rather than rounding the
        uncached tokens up to blocks, which would erase a discount smaller than one block;
        for whole cached blocks both give ``ceil((prompt - cached) / bs)``."""
        if credited >= prompt:
            return 0.0  # the whole prompt is held (also a provider rounding past the last block)
        return blocks - max(credited, 0.0) / bs

    def choose(self, request: RoutingRequest, candidates: Sequence[WorkerView], leg: Leg) -> WorkerView:
        costs = self.costs(request, candidates)
        best = min(costs)
        t = self.options.temperature
        if t > 0:
            weights = [math.exp(-(c - best) / t) for c in costs]
            return self._rng.choices(list(candidates), weights)[0]
        tied = [w for w, c in zip(candidates, costs) if c == best]
        fewest = min(w.active_requests for w in tied)
        return self._rng.choice([w for w in tied if w.active_requests == fewest])
