"""Eviction policies: which resident entry goes when room is needed.

One interface serves the device block pool (keys are block ids) and every tier of the KV
store (keys are block hashes). A policy sees two things about each key: whether it is a
*candidate* (resident and evictable now: not in use, not pinned, not being read) and its
*history* (hits, recency), which outlives candidacy. The device pool, for instance, removes a
cached block from the candidates while a request uses it and inserts it again when the
request frees it; an LFU policy must still remember the block's hits across that.

Calls (all O(1) amortised unless a policy says otherwise):

- ``insert(key)``: the key becomes a candidate (newly resident, or released again);
- ``remove(key)``: the key stops being a candidate; its history is kept;
- ``access(key)``: the key was hit (a lookup found it), candidate or not;
- ``evict()``: remove and return the candidate to evict next (None when there is none); the
  key's history is kept until ``forget``: call it once the key has left the cache;
- ``forget(key)``: drop the key's history (and candidacy);
- ``peek(n)``: ``min(n, len(policy))`` distinct candidates in the order ``evict`` would likely
  take them (so ``peek(len(policy))`` lists every candidate once; ``__iter__`` relies on it). A
  hint (write-back offloads these ahead of need); callers must not rely on it being exact
  (``lru`` and ``lfu`` are exact, ``s3fifo`` is exact only up to a work budget).

Policies are registered by name (``@register_policy``) and built with ``make_policy(name)``:
``lru`` (the default), ``lfu`` and ``s3fifo``. Policies are not thread-safe: the owner
serialises calls.

:class:`ReuseFilter` is the companion admission rule for the lower tiers: offload a block only
once it was seen a number of times.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Iterator
from typing import ClassVar, Generic, Literal, TypeVar

K = TypeVar("K", bound=Hashable)

DEFAULT_POLICY = "lru"


class EvictionPolicy(ABC, Generic[K]):
    """Chooses eviction victims among candidate keys (see the module docstring)."""

    name: ClassVar[str]
    # True when the policy itself bounds what it remembers of evicted keys (S3-FIFO's ghost
    # queue), so an owner whose keys name content (a tier's block hashes) skips ``forget``
    # after ``evict`` and the policy can recognise a key that comes back. Owners whose keys
    # are reused for other content (the device pool's block ids) always forget.
    remembers_evicted: ClassVar[bool] = False

    @abstractmethod
    def insert(self, key: K) -> None:
        """``key`` becomes a candidate. Inserting a current candidate never duplicates it: LRU
        refreshes its recency, LFU and S3-FIFO leave it as it is."""

    @abstractmethod
    def remove(self, key: K) -> None:
        """``key`` stops being a candidate (no-op if it is not); its history stays."""

    @abstractmethod
    def access(self, key: K) -> None:
        """A hit on ``key`` (whether or not it is a candidate)."""

    @abstractmethod
    def evict(self) -> K | None:
        """Remove and return the next victim among the candidates; None if there is none."""

    @abstractmethod
    def forget(self, key: K) -> None:
        """Drop everything known about ``key`` (it left the cache)."""

    @abstractmethod
    def peek(self, n: int) -> list[K]:
        """``min(n, len(self))`` distinct candidates in likely eviction order (the order is a
        hint, not a promise; ``n <= 0`` gives ``[]``)."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of candidates."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is a candidate."""

    def __iter__(self) -> Iterator[K]:
        """The candidates, in no particular order."""
        return iter(self.peek(len(self)))


POLICIES: dict[str, type[EvictionPolicy]] = {}  # type: ignore[type-arg]


def register_policy(cls: type[EvictionPolicy[K]]) -> type[EvictionPolicy[K]]:
    """Class decorator: make ``cls`` selectable by ``cls.name`` (``--kv-eviction-policy``)."""
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"eviction policy {cls.name!r} is already registered")
    POLICIES[cls.name] = cls
    return cls


def make_policy(name: str) -> EvictionPolicy[K]:
    """A new, empty policy by registered name; ValueError lists the known names."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r} (known: {', '.join(sorted(POLICIES))})") from None
    policy: EvictionPolicy[K] = cls()
    return policy


@register_policy
class LRUPolicy(EvictionPolicy[K]):
    """Least recently used first: the candidate inserted or hit longest ago goes.

    The device pool frees a sequence's blocks tail first, so among blocks freed together the
    tail is evicted before the shared head. LRU keeps no history beyond candidacy: a hit on a
    non-candidate is ignored, and a key inserted again starts as the most recent. Every call is
    O(1); ``peek(n)`` is O(n) and exact.
    """

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[K, None] = OrderedDict()

    def insert(self, key: K) -> None:
        """Make ``key`` the most recent candidate (also when it already is one)."""
        self._order[key] = None
        self._order.move_to_end(key)

    def remove(self, key: K) -> None:
        """Drop ``key`` from the candidates."""
        self._order.pop(key, None)

    def access(self, key: K) -> None:
        """Make a candidate the most recent; a hit on a non-candidate is not remembered."""
        if key in self._order:
            self._order.move_to_end(key)

    def evict(self) -> K | None:
        """Remove and return the least recent candidate."""
        if not self._order:
            return None
        key, _ = self._order.popitem(last=False)
        return key

    def forget(self, key: K) -> None:
        """Drop ``key`` (LRU's only state about a key is its candidacy)."""
        self._order.pop(key, None)

    def peek(self, n: int) -> list[K]:
        """The ``n`` least recent candidates, oldest first: exactly what ``evict`` takes next."""
        out: list[K] = []
        for key in self._order:
            if len(out) >= n:
                break
            out.append(key)
        return out

    def __len__(self) -> int:
        """The number of candidates."""
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is a candidate."""
        return key in self._order


@register_policy
class LFUPolicy(EvictionPolicy[K]):
    """Least frequently used first; among equals, the least recently inserted or hit goes.

    A key's frequency is 1 plus its hits: ``insert`` of a key the policy does not know starts it
    at 1 and does not count as a hit, ``access`` adds one (also for a non-candidate, so a block
    hit while a request holds it gets the credit; an access to an unknown key starts its history
    at 1 and counts the hit, so it is at 2). Frequency is history: it survives ``remove``/``insert`` and
    ``evict`` until ``forget``, so the owner must ``forget`` keys that are gone for good or their
    history accumulates.

    Frequencies are capped at ``max_freq`` (64 by default). The cap bounds a hot key's lead: a
    key that stops being hit ties any key that reaches the cap, and among equals it is the older
    one, so it goes first. It also keeps the frequency buckets (and so ``evict``) O(max_freq) =
    O(1) and makes aging fast (log2(64) = 6 halvings take any key back to 1).

    The cap alone does not retire a formerly hot key when the workload moves to keys that are
    reused only a little (they never reach the cap), so with ``aging`` (the default) every
    frequency is halved (floor 1) each time the policy has seen as many touches (``insert`` of a
    non-candidate, ``access``) as ``max(max_freq, keys tracked)``, keys tracked being every key
    with history. A key hit ``h`` times per such period settles near frequency ``2h``: the
    frequency is a hit rate with a half-life of about one pass over the tracked keys (the
    TinyLFU "reset", counted in touches rather than evictions). Aging is driven by touches, never
    by ``evict``, so a run of evictions with no other calls takes exactly the order ``peek``
    shows. A halving costs O(keys tracked) and happens at most once per that many touches: O(1)
    amortised.

    Cost: ``insert``, ``remove``, ``access``, ``forget`` O(1) amortised; ``evict`` O(max_freq)
    (the lowest non-empty bucket); ``peek(n)`` O(n + max_freq log max_freq), exact.
    """

    name = "lfu"

    def __init__(self, max_freq: int = 64, *, aging: bool = True) -> None:
        if max_freq < 1:
            raise ValueError(f"max_freq must be >= 1, got {max_freq!r}")
        self.max_freq = max_freq
        self.aging = aging
        self._freq: dict[K, int] = {}  # history: every key touched and not forgotten
        self._candidates: set[K] = set()
        # frequency -> its candidates, least recently touched first, each with its touch stamp
        # (the stamps let a halving merge two buckets back into recency order).
        self._buckets: dict[int, OrderedDict[K, int]] = {}
        self._clock = 0
        self._touches = 0  # since the last halving

    def frequency(self, key: K) -> int:
        """``key``'s current frequency (0 when the policy keeps no history for it)."""
        return self._freq.get(key, 0)

    def insert(self, key: K) -> None:
        """Make ``key`` the most recent candidate at its frequency (1 if it has no history); a
        no-op for a current candidate."""
        if key in self._candidates:
            return
        freq = self._freq.setdefault(key, 1)
        self._candidates.add(key)
        self._link(key, freq)
        self._touched()

    def remove(self, key: K) -> None:
        """Drop ``key`` from the candidates; its frequency stays."""
        if key in self._candidates:
            self._candidates.discard(key)
            self._unlink(key, self._freq[key])

    def access(self, key: K) -> None:
        """Count a hit (up to ``max_freq``); a candidate also becomes the most recent of its new
        frequency."""
        freq = self._freq.get(key, 1)
        new = min(freq + 1, self.max_freq)
        self._freq[key] = new
        if key in self._candidates:
            self._unlink(key, freq)
            self._link(key, new)
        self._touched()

    def evict(self) -> K | None:
        """Remove and return the least recent candidate of the lowest frequency."""
        if not self._buckets:
            return None
        freq = min(self._buckets)  # at most max_freq buckets exist
        bucket = self._buckets[freq]
        key, _ = bucket.popitem(last=False)
        if not bucket:
            del self._buckets[freq]
        self._candidates.discard(key)
        return key

    def forget(self, key: K) -> None:
        """Drop ``key``'s candidacy and frequency."""
        self.remove(key)
        self._freq.pop(key, None)

    def peek(self, n: int) -> list[K]:
        """The next ``n`` victims, exactly as that many ``evict`` calls would return them."""
        out: list[K] = []
        if n <= 0:
            return out
        for freq in sorted(self._buckets):
            for key in self._buckets[freq]:
                out.append(key)
                if len(out) >= n:
                    return out
        return out

    def __len__(self) -> int:
        """The number of candidates."""
        return len(self._candidates)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is a candidate."""
        return key in self._candidates

    def _link(self, key: K, freq: int) -> None:
        self._clock += 1
        self._buckets.setdefault(freq, OrderedDict())[key] = self._clock

    def _unlink(self, key: K, freq: int) -> None:
        bucket = self._buckets[freq]
        del bucket[key]
        if not bucket:
            del self._buckets[freq]  # so evict's min() sees only non-empty buckets

    def _touched(self) -> None:
        self._touches += 1
        if self.aging and self._touches >= max(self.max_freq, len(self._freq)):
            self._halve()

    def _halve(self) -> None:
        self._touches = 0
        self._freq = {key: max(1, freq >> 1) for key, freq in self._freq.items()}
        # Buckets 2f and 2f+1 (and 1..3 for f = 1) become bucket f. Each old bucket is in stamp
        # order, so a k-way merge by stamp keeps the ties least-recent-first: O(candidates).
        groups: dict[int, list[OrderedDict[K, int]]] = {}
        for freq, bucket in self._buckets.items():
            groups.setdefault(max(1, freq >> 1), []).append(bucket)
        self._buckets = {
            freq: parts[0] if len(parts) == 1 else OrderedDict(heapq.merge(*(p.items() for p in parts),
                                                                           key=_stamp_of))
            for freq, parts in groups.items()
        }


def _stamp_of(item: tuple[object, int]) -> int:
    return item[1]


@register_policy
class S3FIFOPolicy(EvictionPolicy[K]):
    """S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP'23).

    Three FIFO queues: a small one S for keys seen for the first time, a main one M, and a ghost
    one G that remembers recently evicted keys (no data). Each resident key has a frequency
    0..3; ``access`` adds one. A new key enters S, or M if G remembers it (it proved reuse
    before). ``evict`` takes from S while S holds more than 10% of the candidates (or M is
    empty): S's oldest moves to M (frequency reset to 0) if it was hit, else it is evicted into
    G; otherwise M's oldest is reinserted at M's head with its frequency lowered by one if it was
    hit, else evicted. One-hit keys (a scan) so pass through S quickly and never displace the
    reused keys in M. Any hit promotes from S here (implementations differ on that threshold).

    Candidacy: ``remove`` takes a key out of its queue (it can neither be evicted nor block an
    eviction) and keeps its queue and frequency; ``insert`` puts it back at the head of the same
    queue (it was just in use, so it is as fresh as a new entry there). ``access`` on a removed
    key counts; on a ghost or unknown key it is ignored (there is nothing resident to credit).
    An evicted key stays in G until ``forget`` (which clears it everywhere), a ghost hit, or G's
    bound pushes it out: G holds at most as many keys as the policy has resident (candidates
    plus removed keys), close to the paper's ghost of M's size (90% of the cache) while not
    collapsing when M is still small. A ghost only helps if the owner does not ``forget`` a key
    as soon as it evicts it.

    Cost: ``insert``, ``remove``, ``access``, ``forget`` O(1); ``evict`` O(1) amortised (each
    pass of its loop consumes an S entry or an M frequency unit, which ``insert`` and
    ``access`` paid for) and bounded by ``4 * len(self) + 1`` passes; ``peek(n)`` O(n) (see
    there for when it is exact).
    """

    name = "s3fifo"
    remembers_evicted = True
    small_percent: ClassVar[int] = 10  # S's share of the candidates before evict takes from S
    max_freq: ClassVar[int] = 3

    def __init__(self) -> None:
        # Oldest first (the FIFO's tail is the OrderedDict's front); value: the key's frequency.
        self._small: OrderedDict[K, int] = OrderedDict()
        self._main: OrderedDict[K, int] = OrderedDict()
        self._removed: dict[K, tuple[bool, int]] = {}  # key -> (was in M, frequency)
        self._ghost: OrderedDict[K, None] = OrderedDict()  # oldest first

    def queue_of(self, key: K) -> Literal["small", "main", "ghost"] | None:
        """The queue ``key`` is in, or returns to (removed keys), or None when it is unknown."""
        if key in self._small:
            return "small"
        if key in self._main:
            return "main"
        if key in self._removed:
            return "main" if self._removed[key][0] else "small"
        if key in self._ghost:
            return "ghost"
        return None

    def insert(self, key: K) -> None:
        """Candidate again: back to its queue (if removed), into M (if a ghost) or into S."""
        if key in self._small or key in self._main:
            return
        held = self._removed.pop(key, None)
        if held is not None:
            in_main, freq = held
            (self._main if in_main else self._small)[key] = freq
        elif key in self._ghost:
            del self._ghost[key]
            self._main[key] = 0
        else:
            self._small[key] = 0

    def remove(self, key: K) -> None:
        """Take ``key`` out of its queue, remembering the queue and its frequency."""
        if key in self._small:
            self._removed[key] = (False, self._small.pop(key))
        elif key in self._main:
            self._removed[key] = (True, self._main.pop(key))

    def access(self, key: K) -> None:
        """Add one to a resident key's frequency (at most 3)."""
        if key in self._small:
            self._small[key] = min(self._small[key] + 1, self.max_freq)  # keeps its position
        elif key in self._main:
            self._main[key] = min(self._main[key] + 1, self.max_freq)
        elif key in self._removed:
            in_main, freq = self._removed[key]
            self._removed[key] = (in_main, min(freq + 1, self.max_freq))

    def evict(self) -> K | None:
        """Run S3-FIFO's eviction loop; the victim is remembered in G."""
        small, main = self._small, self._main
        if not small and not main:
            return None
        # Each pass consumes an S entry (evicted or moved to M with frequency 0) or one unit of
        # an M key's frequency (at most 3 each), or evicts: it ends within this many passes.
        for _ in range(4 * (len(small) + len(main)) + 1):
            if not main or self._take_small(len(small), len(main)):
                key, freq = small.popitem(last=False)
                if freq > 0:
                    main[key] = 0
                    continue
            else:
                key, freq = main.popitem(last=False)
                if freq > 0:
                    main[key] = freq - 1  # back at M's head
                    continue
            self._bury(key)
            return key
        # Unreachable by the bound above; kept so that a bug cannot turn into an endless loop.
        key, _ = (main if main else small).popitem(last=False)
        self._bury(key)
        return key

    def forget(self, key: K) -> None:
        """Drop ``key`` from S, M, the removed keys and G."""
        self._small.pop(key, None)
        self._main.pop(key, None)
        self._removed.pop(key, None)
        self._ghost.pop(key, None)
        self._trim_ghost()

    def peek(self, n: int) -> list[K]:
        """The next ``n`` victims, from a dry run of ``evict``'s loop on the queues.

        Exact (what ``n`` calls of ``evict`` with nothing in between return) as long as those
        evictions would move or requeue at most ``8 * n + 32`` hit keys; past that budget the dry
        run stops crediting frequencies and lists the remaining keys in queue order, which is
        approximate. The cost is O(n) either way, so write-back can call it every step.
        """
        out: list[K] = []
        budget = 8 * n + 32
        small_left, main_left = len(self._small), len(self._main)
        small_it = iter(self._small.items())
        main_it = iter(self._main.items())
        requeued: deque[tuple[K, int]] = deque()  # what the dry run put at M's head, in order
        while len(out) < n and small_left + main_left > 0:
            if not main_left or self._take_small(small_left, main_left):
                key, freq = next(small_it)
                small_left -= 1
                if freq > 0 and budget > 0:
                    budget -= 1
                    requeued.append((key, 0))
                    main_left += 1
                    continue
            else:
                item = next(main_it, None)
                key, freq = item if item is not None else requeued.popleft()
                if freq > 0 and budget > 0:
                    budget -= 1
                    requeued.append((key, freq - 1))
                    continue
                main_left -= 1
            out.append(key)
        return out

    def __len__(self) -> int:
        """The number of candidates (S and M)."""
        return len(self._small) + len(self._main)

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is a candidate."""
        return key in self._small or key in self._main

    def _take_small(self, small: int, main: int) -> bool:
        return 100 * small > self.small_percent * (small + main)

    def _bury(self, key: K) -> None:
        self._ghost[key] = None
        self._trim_ghost()

    def _trim_ghost(self) -> None:
        limit = len(self._small) + len(self._main) + len(self._removed)
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)


class ReuseFilter:
    """Admission filter for a tier: offload a block only after it was seen ``threshold`` times.

    Like vLLM's offloading ``store_threshold`` or Dynamo's disk-tier filter: blocks that are
    never reused are not worth the write. ``record`` counts one sighting of each key it is given
    (a key listed twice in one call counts once: a call is one sighting, e.g. one request's
    blocks); ``admits`` is ``count >= threshold``. With ``threshold`` 1 everything is admitted,
    also keys never recorded, so a threshold-1 tier behaves exactly as if it had no filter.

    Memory is bounded: counts are kept for at most ``capacity`` keys, and recording a new key
    when full drops the least recently recorded one (its count starts over if it is seen again).
    ``count`` and ``admits`` do not refresh recency. Every call is O(1) per key.
    """

    def __init__(self, threshold: int, capacity: int) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold!r}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self.threshold = threshold
        self.capacity = capacity
        self._counts: OrderedDict[Hashable, int] = OrderedDict()  # least recently recorded first

    def record(self, keys: Iterable[Hashable]) -> None:
        """Count one sighting of each distinct key in ``keys``; they become the most recent."""
        counts = self._counts
        for key in dict.fromkeys(keys):  # distinct, in first-seen order
            counts[key] = counts.get(key, 0) + 1
            counts.move_to_end(key)
            if len(counts) > self.capacity:
                counts.popitem(last=False)

    def count(self, key: Hashable) -> int:
        """How many sightings of ``key`` are remembered (0 if none, or if it was dropped)."""
        return self._counts.get(key, 0)

    def admits(self, key: Hashable) -> bool:
        """Whether ``key`` may be offloaded: seen at least ``threshold`` times."""
        return self.threshold <= 1 or self.count(key) >= self.threshold

    def __len__(self) -> int:
        """The number of keys whose counts are kept (at most ``capacity``)."""
        return len(self._counts)
