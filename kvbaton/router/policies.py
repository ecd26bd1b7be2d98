"""Placement: which worker runs each leg of a request, and how much of a prompt a worker
already holds.

Two pluggable parts, both picked by name from the router's config:

- :class:`PlacementPolicy` chooses one worker among healthy candidates for one leg
  (``prefill`` or ``decode``). ``round_robin`` and ``least_load`` live here; the KV-aware
  policy registers itself the same way (``@register_policy``).
- :class:`PrefixOverlap` predicts how many prompt tokens a worker has cached. The router uses
  it to decide whether a request is worth a remote prefill (conditional disaggregation), and
  KV-aware policies use it to score candidates. The default, :class:`NoPrefixOverlap`, says
  nothing is cached; the KV index provides the real answer.

Policies see workers only through :class:`WorkerView`, so the simulator can drive the same
policies with simulated workers.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Protocol, Sequence

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
    def in_flight_requests(self) -> int: ...

    @property
    def in_flight_tokens(self) -> int: ...


class PrefixOverlap(ABC):
    """Predicts the prompt tokens a worker will find in its prefix cache."""

    @abstractmethod
    def cached_tokens(self, request: RoutingRequest, worker: WorkerView) -> int:
        """Prompt tokens of ``request`` that ``worker`` is expected to hold already
        (a multiple of the block size, at most the prompt length). Must be fast and must not
        block: it runs on the event loop for every request and candidate."""


class NoPrefixOverlap(PrefixOverlap):
    """Assumes no worker holds anything (until the KV index exists)."""

    def cached_tokens(self, request: RoutingRequest, worker: WorkerView) -> int:
        return 0


class PlacementPolicy(ABC):
    """Chooses the worker for one leg of a request.

    One instance serves one leg kind for the router's lifetime; it may keep state (a
    round-robin counter) but must not block or do I/O. ``overlap`` is the router's
    :class:`PrefixOverlap` provider, for policies that credit cached prefixes.
    """

    name: ClassVar[str]

    def __init__(self, overlap: PrefixOverlap | None = None) -> None:
        self.overlap = overlap or NoPrefixOverlap()

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


def make_policy(name: str, overlap: PrefixOverlap | None = None) -> PlacementPolicy:
    """A new policy by registered name; ValueError lists the known names."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(sorted(POLICIES))})") from None
    return cls(overlap)


@register_policy
class RoundRobinPolicy(PlacementPolicy):
    """Candidates in turn, ignoring load."""

    name = "round_robin"

    def __init__(self, overlap: PrefixOverlap | None = None) -> None:
        super().__init__(overlap)
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

    def __init__(self, overlap: PrefixOverlap | None = None) -> None:
        super().__init__(overlap)
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
