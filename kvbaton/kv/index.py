"""KVIndex: the cluster-wide prefix index the router consults (block hash -> workers).

Fed by every worker's KV event stream (``apply``), it answers one question fast: for a
request's hash chain, how many leading blocks does each worker hold (``longest_prefix``)?
``weighted_prefix`` answers the same and also weighs each block of those runs by the medium
it is held in (device, host tier, disk), for callers that credit slower mediums less.

Layout, chosen for the lookup: each worker gets a slot (a bit), and ``_holders`` maps a block
hash to the bitmask of workers holding it, so a lookup is one dict probe per block plus integer
ANDs, whatever the number of workers. Per-worker dicts (hash -> medium bitmask) make removing
a worker O(its blocks) and give the per-worker counts. Predicted entries (``predict``) live in
a parallel mask dict with per-entry expiry, so the router's own recent decisions count until
the worker's events catch up.

Dropping a worker's entries (clear, gap, removal) must not stall lookups for the tens of ms
that 100k+ dict updates take: the worker's bit is retired (masked out of every lookup at once)
and the worker continues under a fresh bit; the retired bit is then scrubbed from ``_holders``
in chunks, releasing the lock between them, by the call that retired it, and only then is
its slot reused.

The remote tier. Blocks a worker stores with medium ``REMOTE_MEDIUM`` are in the store all
workers share (a Redis server), so any worker can load them: they are kept in one cluster-wide
set (``_remote``: hash -> clock time of its last ``BlockStored``, oldest first), not in any
worker's entries, and a worker's clear, gap or removal leaves the set alone (the blocks are
still on the server). ``BlockRemoved`` with that medium, from any worker, takes a hash out; the
server also drops keys by itself without an event (a TTL refreshed on each hit, LRU eviction),
so an entry counts until ``remote_ttl_s`` after its last store (match the workers'
``--kv-remote-ttl``) and expired ones are dropped from the front in bounded chunks. In the
lookups every worker's run continues through blocks in the set, each weighed at the
``REMOTE`` credit unless the worker holds it in a medium it weighs more, and a worker the
index has never heard of reaches the set's own leading run (``PrefixRuns.others``). With the
set empty the lookups take their old paths unchanged.

What the index claims: for a worker not flagged approximate, exactly the blocks its event
stream says it holds; for an approximate one (a gap that replay could not fill), a subset of
them, because entries are dropped at the gap and only later events are applied. A subset only
costs cache hits, never correctness: the worker verifies every block it reuses. The remote set
may claim more than the server holds (keys it dropped by itself before the TTL): a worker that
then misses a key publishes its ``BlockRemoved``, and a miss only costs that block's compute.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import operator
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from kvbaton.kv.events import (
    DEFAULT_MEDIUM,
    REMOTE_MEDIUM,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from kvbaton.kv.hashing import BlockHash

WorkerId = Hashable
_T = TypeVar("_T")

# How long a remote-tier block counts after its last BlockStored, by default: the workers'
# default --kv-remote-ttl (the key's TTL on the shared server).
DEFAULT_REMOTE_TTL_S = 3600.0
_NEVER = -math.inf  # the store time of a hash the remote set does not hold


class HasEvents(Protocol):
    """A batch of events, such as a decoded ``KVEventBatch``."""

    @property
    def events(self) -> Sequence[KVEvent]: ...


@dataclass
class WorkerIndexStats:
    """Per-worker numbers for metrics."""

    blocks: int
    predicted: int
    approximate: bool
    last_seq: int | None


_PURGE_CHUNK = 1024  # hashes scrubbed per lock hold (a few hundred µs)
# Up to this many distinct mediums, weighted_prefix precomputes the weight of every medium mask
# (2**n floats); beyond it (foreign engines naming many) weights are computed per mask on demand.
_TABLE_MAX_MEDIUMS = 10


class PrefixRuns(dict[WorkerId, _T], Generic[_T]):
    """A lookup's answer: worker -> its run (``longest_prefix``: blocks; ``weighted_prefix``:
    (blocks, weight)) for each worker the index knows that matched, and ``others``: what any
    worker not listed reaches, the remote tier's own leading run (0 without one), the same for
    every such worker, including ones the index has never heard of. ``of(worker)`` is the
    worker's run either way. Compares equal to a plain dict of the same runs."""

    __slots__ = ("others",)

    def __init__(self, runs: Mapping[WorkerId, _T], others: _T) -> None:
        super().__init__(runs)
        self.others = others

    def of(self, worker_id: WorkerId) -> _T:
        return self.get(worker_id, self.others)


class _LazyWeights(dict[int, float]):
    """mask -> the largest weight among its medium bits, computed on first use."""

    def __init__(self, by_bit: list[tuple[int, float]]) -> None:
        super().__init__({0: 1.0})
        self._by_bit = by_bit

    def __missing__(self, mask: int) -> float:
        w = self[mask] = max(w for bit, w in self._by_bit if mask & bit)
        return w


class _Worker:
    __slots__ = ("worker_id", "bit", "blocks", "predicted", "approximate", "last_seq")

    def __init__(self, worker_id: WorkerId, bit: int) -> None:
        self.worker_id = worker_id
        self.bit = bit
        self.blocks: dict[BlockHash, int] = {}  # hash -> bitmask of mediums
        self.predicted: dict[BlockHash, float] = {}  # hash -> expiry (clock time)
        self.approximate = False
        self.last_seq: int | None = None


class KVIndex:
    """Block hash -> set of (worker, medium), with longest-prefix lookup; plus the cluster's
    remote-tier blocks, reachable by every worker. Thread-safe.

    ``clock`` (seconds, monotonic) is injectable so prediction and remote TTLs can be tested.
    ``remote_ttl_s``: how long a ``REMOTE_MEDIUM`` block counts after its last ``BlockStored``
    (settable later; it applies to every entry, as they are kept by store time).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 remote_ttl_s: float = DEFAULT_REMOTE_TTL_S) -> None:
        self._clock = clock
        self._remote_ttl = self._check_ttl(remote_ttl_s)
        # hash -> clock time of its last REMOTE BlockStored, oldest first (a store moves it last)
        self._remote: OrderedDict[BlockHash, float] = OrderedDict()
        self._lock = threading.Lock()
        self._workers: dict[WorkerId, _Worker] = {}
        self._slot_owner: dict[int, WorkerId] = {}
        self._free_slots: list[int] = []  # min-heap: reuse low slots so masks stay small ints
        self._next_slot = 0
        self._live = 0  # bits of current workers; retired bits still in _holders are not
        self._retired: deque[tuple[int, Iterator[BlockHash]]] = deque()  # (slot, its hashes)
        self._purging = False
        self._holders: dict[BlockHash, int] = {}  # hash -> bitmask of worker slots
        self._pred_holders: dict[BlockHash, int] = {}
        # (expiry, tiebreak, worker, hashes): one entry per predict() call, checked lazily.
        self._pred_expiry: list[tuple[float, int, WorkerId, tuple[BlockHash, ...]]] = []
        self._tiebreak = itertools.count()
        self._mediums: dict[str, int] = {}
        self._weight_tables: dict[tuple[tuple[tuple[str, float], ...], int], Callable[[int], float] | None] = {}

    # ---- feeding ---------------------------------------------------------------------------

    def apply(self, worker_id: WorkerId, seq: int, events: Iterable[KVEvent] | HasEvents) -> None:
        """Apply one batch of a worker's stream (``events``: the batch's events, or any
        object with an ``events`` attribute such as a decoded ``KVEventBatch``).

        ``seq`` is checked against the last one applied: seq 0 starts a fresh stream (a
        worker's cache is empty when its publisher starts); any other discontinuity (a forward
        gap, a restart whose first batches were missed, a stream joined late) drops the
        worker's entries and flags it approximate until an ``AllBlocksCleared`` resyncs it.
        A restart whose seq 0 was lost is invisible in seqs alone: the subscriber detects it
        by stream id and replays from 0 or calls ``mark_approximate``.
        """
        evs: Iterable[KVEvent] = events.events if hasattr(events, "events") else events
        with self._lock:
            w = self._worker(worker_id)
            expected = 0 if w.last_seq is None else w.last_seq + 1
            if seq != expected:
                self._clear(w)
                w.approximate = seq != 0
            w.last_seq = seq
            for ev in evs:
                if isinstance(ev, BlockStored):
                    if ev.medium == REMOTE_MEDIUM:
                        self._store_remote(ev.block_hashes)
                    else:
                        self._store(w, ev.block_hashes, ev.medium)
                elif isinstance(ev, BlockRemoved):
                    if ev.medium == REMOTE_MEDIUM:
                        self._remove_remote(ev.block_hashes)
                    else:
                        self._remove(w, ev.block_hashes, ev.medium)
                elif isinstance(ev, AllBlocksCleared):
                    self._clear(w)  # the worker's own cache: its remote-tier blocks stay
                    w.approximate = False
                else:
                    raise TypeError(f"not a KV event: {type(ev).__name__}")
            if self._remote:
                self._expire_remote(self._clock() - self._remote_ttl, _PURGE_CHUNK)
        self._purge()

    def mark_approximate(self, worker_id: WorkerId) -> None:
        """A gap replay could not fill: drop the worker's entries (they may be stale) and flag
        it approximate until an ``AllBlocksCleared`` arrives. Predictions are kept: they
        record where the router sent work, not what the events said; so is the remote tier."""
        with self._lock:
            w = self._worker(worker_id)
            self._clear(w)
            w.approximate = True
        self._purge()

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Forget a worker entirely (left the pool). Its entries vanish from lookups at once
        and are scrubbed, O(its blocks), before this returns; unknown ids are ignored. The
        remote-tier blocks it stored stay (they are on the shared server)."""
        with self._lock:
            w = self._workers.pop(worker_id, None)
            if w is None:
                return
            for h in w.predicted:
                self._unset(self._pred_holders, h, w.bit)
            self._retire(w.bit, w.blocks)
        self._purge()

    def predict(self, worker_id: WorkerId, hashes: Sequence[BlockHash], ttl_s: float) -> None:
        """The router just sent ``hashes`` to ``worker_id``: count them as held there for
        ``ttl_s`` so sibling requests that arrive before the worker's events follow them.
        A real ``BlockStored`` replaces the prediction; blocks already held are skipped."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        with self._lock:
            now = self._clock()
            self._expire(now)
            w = self._worker(worker_id)
            expiry = now + ttl_s
            added: list[BlockHash] = []
            for h in hashes:
                if h in w.blocks:
                    continue
                old = w.predicted.get(h)
                if old is None:
                    self._pred_holders[h] = self._pred_holders.get(h, 0) | w.bit
                elif old >= expiry:
                    continue
                w.predicted[h] = expiry
                added.append(h)
            if added:
                heapq.heappush(
                    self._pred_expiry, (expiry, next(self._tiebreak), worker_id, tuple(added))
                )

    # ---- lookups ---------------------------------------------------------------------------

    def longest_prefix(
        self, hashes: Sequence[BlockHash], include_predicted: bool = True, include_remote: bool = True
    ) -> PrefixRuns[int]:
        """For each worker that can reach the chain's first block: how many leading blocks of
        ``hashes`` it reaches (counting stops at its first block it neither holds nor finds in
        the remote tier). Workers with no match are absent; ``others`` is the remote tier's own
        leading run, what a worker with nothing of its own reaches (one the index does not
        know included): use ``.of(worker)``. Predicted entries count unless
        ``include_predicted`` is False, the remote tier unless ``include_remote`` is False."""
        with self._lock:
            return self._longest_prefix(hashes, include_predicted, self._remote_cutoff(include_remote))

    def weighted_prefix(
        self,
        hashes: Sequence[BlockHash],
        weights: Mapping[str, float],
        default_weight: float = 1.0,
        include_predicted: bool = True,
        include_remote: bool = True,
    ) -> PrefixRuns[tuple[int, float]]:
        """``longest_prefix`` with each block of a worker's run weighed by where it is held:
        worker -> (run length in blocks, sum over the run of each block's weight).

        A block's weight is the largest ``weights[medium]`` among the mediums the worker holds
        it in (a medium not in ``weights``: ``default_weight``; events without a medium are
        ``DEFAULT_MEDIUM``), and ``weights[REMOTE_MEDIUM]`` among them when the block is also
        in the remote tier. A block the worker does not hold is either predicted, 1.0 (the
        router just sent the prompt there, so the worker computes it on the device; a block
        already stored keeps its medium's weight after a prediction, which skips it: the
        worker must still load it until its events say otherwise), or in the remote tier, the
        ``REMOTE`` weight. ``others``: (the remote tier's leading run, its weight). The run
        lengths are exactly ``longest_prefix``'s, from the same locked view, so the two never
        disagree.
        """
        with self._lock:
            cutoff = self._remote_cutoff(include_remote)
            runs = self._longest_prefix(hashes, include_predicted, cutoff)
            r0 = runs.others
            others = (r0, r0 * float(weights.get(REMOTE_MEDIUM, default_weight)))
            if not runs:
                return PrefixRuns({}, others)
            table = self._weight_table(weights, default_weight)
            if table is None:
                # Every medium (and a prediction) weighs 1: the sum is the run length, so the
                # runs need no second walk. The common case for a device-only cluster.
                return PrefixRuns({wid: (n, float(n)) for wid, n in runs.items()}, (r0, float(r0)))
            out: dict[WorkerId, tuple[int, float]] = {}
            remote = self._remote_masks(hashes[:max(runs.values())], cutoff, include_predicted)
            for wid, n in runs.items():
                # mask -> weight for each block of the run, looped in C (map/sum): this walk is
                # the lookup's extra cost over longest_prefix. A block in the run but not stored
                # is a prediction: mask 0, which the table weighs 1.
                w = self._workers[wid]
                masks = map(w.blocks.get, hashes[:n], itertools.repeat(0, n))
                if remote is None:
                    out[wid] = (n, math.fsum(map(table, masks)))
                    continue
                # In the remote tier: the REMOTE bit joins the block's own mediums (mask REMOTE
                # alone when it holds none). Such a block that is also predicted there (never
                # stored there: predictions skip stored blocks and stores end them) weighs 1.
                rmasks, pmasks, pred_bits = remote
                weighed = map(table, map(operator.or_, masks, rmasks))
                predicted = 0 if not pred_bits & w.bit else sum(
                    map(bool, map(operator.and_, pmasks, itertools.repeat(w.bit, n))))
                if predicted:
                    rb = self._mediums[REMOTE_MEDIUM]
                    fix = table(0) - table(rb)  # 1 - w_remote, per such block
                    out[wid] = (n, math.fsum(itertools.chain(weighed, itertools.repeat(fix, predicted))))
                else:
                    out[wid] = (n, math.fsum(weighed))
            return PrefixRuns(out, others)

    def in_remote(self, block_hash: BlockHash) -> bool:
        """Whether ``block_hash`` is in the remote tier per the workers' events (unexpired)."""
        with self._lock:
            return self._remote.get(block_hash, _NEVER) > self._clock() - self._remote_ttl

    def remote_block_count(self) -> int:
        """Blocks in the remote tier per the workers' events, expired ones dropped first (in
        chunks, releasing the lock between them)."""
        cutoff = self._clock() - self._remote_ttl
        while True:
            with self._lock:
                if self._expire_remote(cutoff, _PURGE_CHUNK):
                    return len(self._remote)
            time.sleep(0)

    @property
    def remote_ttl_s(self) -> float:
        """Seconds a remote-tier block counts after its last ``BlockStored``."""
        return self._remote_ttl

    @remote_ttl_s.setter
    def remote_ttl_s(self, value: float) -> None:
        ttl = self._check_ttl(value)
        with self._lock:
            self._remote_ttl = ttl

    def holders(self, block_hash: BlockHash) -> set[tuple[WorkerId, str]]:
        """Which (worker, medium) pairs hold ``block_hash`` per the events (no predictions)."""
        with self._lock:
            mask = self._holders.get(block_hash, 0) & self._live
            names = {bit: name for name, bit in self._mediums.items()}
            out: set[tuple[WorkerId, str]] = set()
            while mask:
                low = mask & -mask
                worker_id = self._slot_owner[low.bit_length() - 1]
                mediums = self._workers[worker_id].blocks[block_hash]
                for bit, name in names.items():
                    if mediums & bit:
                        out.add((worker_id, name))
                mask ^= low
            return out

    def is_approximate(self, worker_id: WorkerId) -> bool:
        """True while the worker's entries are a subset of its cache (an unfilled gap)."""
        with self._lock:
            w = self._workers.get(worker_id)
            return w is not None and w.approximate

    def workers(self) -> list[WorkerId]:
        with self._lock:
            return list(self._workers)

    def block_count(self, worker_id: WorkerId) -> int:
        """Blocks indexed for the worker (from events; 0 if unknown)."""
        with self._lock:
            w = self._workers.get(worker_id)
            return 0 if w is None else len(w.blocks)

    def stats(self) -> dict[WorkerId, WorkerIndexStats]:
        """Per-worker counts for metrics (expired predictions are purged first)."""
        with self._lock:
            self._expire(self._clock())
            return {
                wid: WorkerIndexStats(len(w.blocks), len(w.predicted), w.approximate, w.last_seq)
                for wid, w in self._workers.items()
            }

    def __len__(self) -> int:
        """Distinct block hashes indexed for workers (from events; while a dropped worker's
        entries are being scrubbed by another thread, those may still be counted). The remote
        tier's are counted by ``remote_block_count``."""
        with self._lock:
            return len(self._holders)

    # ---- internals (lock held) -------------------------------------------------------------

    def _weight_table(self, weights: Mapping[str, float], default: float) -> Callable[[int], float] | None:
        """medium mask -> weight (mask 0, no medium: a prediction, 1.0), or None when every
        medium known weighs 1. Cached per (weights of the known mediums, their count): mediums
        only ever get new bits, so the count says which masks exist, and a caller passes the
        same few weight maps on every request, so a table is built once, not per lookup."""
        key = (tuple(sorted((name, weights.get(name, default)) for name in self._mediums)), len(self._mediums))
        if key in self._weight_tables:
            return self._weight_tables[key]
        by_bit = [(bit, weights.get(name, default)) for name, bit in self._mediums.items()]
        table: Callable[[int], float] | None
        if all(w == 1.0 for _, w in by_bit):
            table = None
        elif len(by_bit) <= _TABLE_MAX_MEDIUMS:
            masks = range(1, 1 << len(by_bit))
            table = ([1.0] + [max(w for bit, w in by_bit if mask & bit) for mask in masks]).__getitem__
        else:
            table = _LazyWeights(by_bit).__getitem__
        if len(self._weight_tables) >= 16:  # a caller passing ever-new maps: stay bounded
            self._weight_tables.clear()
        self._weight_tables[key] = table
        return table

    def _remote_cutoff(self, include_remote: bool) -> float | None:
        """Remote entries stored after this time count (None: the lookup ignores the tier,
        asked to or because it is empty)."""
        if not (include_remote and self._remote):
            return None
        return self._clock() - self._remote_ttl

    def _longest_prefix(
        self, hashes: Sequence[BlockHash], include_predicted: bool, remote_cutoff: float | None
    ) -> PrefixRuns[int]:
        if not hashes:
            return PrefixRuns({}, 0)
        preds = self._pred_holders
        if preds:
            self._expire(self._clock())
        use_pred = include_predicted and bool(preds)
        if remote_cutoff is not None:
            return self._longest_prefix_remote(hashes, use_pred, remote_cutoff)
        holders = self._holders.get
        pred = preds.get
        out: dict[WorkerId, int] = {}
        alive = (holders(hashes[0], 0) | (pred(hashes[0], 0) if use_pred else 0)) & self._live
        i = 1
        n = len(hashes)
        while alive and i < n:
            h = hashes[i]
            mask = holders(h, 0) | (pred(h, 0) if use_pred else 0)
            gone = alive & ~mask
            if gone:
                self._emit(gone, i, out)
                alive &= mask
            i += 1
        if alive:
            self._emit(alive, n, out)
        return PrefixRuns(out, 0)

    def _longest_prefix_remote(self, hashes: Sequence[BlockHash], use_pred: bool, cutoff: float) -> PrefixRuns[int]:
        """``_longest_prefix`` with the remote tier: a block in it is reached by every worker,
        so it ends no run; its leading run is every worker's start (and ``others``)."""
        holders, pred, fresh = self._holders.get, self._pred_holders.get, self._remote.get
        out: dict[WorkerId, int] = {}
        n = len(hashes)
        r0 = 0
        while r0 < n and fresh(hashes[r0], _NEVER) > cutoff:
            r0 += 1
        if r0:
            alive, i = self._live, r0
        else:
            alive, i = (holders(hashes[0], 0) | (pred(hashes[0], 0) if use_pred else 0)) & self._live, 1
        while alive and i < n:
            h = hashes[i]
            if fresh(h, _NEVER) <= cutoff:
                mask = holders(h, 0) | (pred(h, 0) if use_pred else 0)
                gone = alive & ~mask
                if gone:
                    self._emit(gone, i, out)
                    alive &= mask
            i += 1
        if alive:
            self._emit(alive, n, out)
        return PrefixRuns(out, r0)

    def _remote_masks(
        self, hashes: Sequence[BlockHash], cutoff: float | None, include_predicted: bool
    ) -> tuple[list[int], list[int], int] | None:
        """For weighing runs over ``hashes``: the REMOTE medium bit at each block in the remote
        tier (0 elsewhere), the prediction masks at those blocks, and the bits of the workers
        predicted at any of them (0: no worker needs them); None when no block of ``hashes``
        is in the tier."""
        if cutoff is None:
            return None
        fresh = self._remote.get
        rb = self._mediums[REMOTE_MEDIUM]  # the tier holds something: a REMOTE store named it
        rmasks = [rb if fresh(h, _NEVER) > cutoff else 0 for h in hashes]
        if not any(rmasks):
            return None
        pmasks: list[int] = []
        pred_bits = 0
        if include_predicted and self._pred_holders:
            pred = self._pred_holders.get
            pmasks = [pred(h, 0) if r else 0 for h, r in zip(hashes, rmasks)]
            pred_bits = functools.reduce(operator.or_, pmasks, 0)
        return rmasks, pmasks, pred_bits

    def _emit(self, mask: int, count: int, out: dict[WorkerId, int]) -> None:
        owner = self._slot_owner
        while mask:
            low = mask & -mask
            out[owner[low.bit_length() - 1]] = count
            mask ^= low

    def _worker(self, worker_id: WorkerId) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            w = self._workers[worker_id] = _Worker(worker_id, self._new_bit(worker_id))
        return w

    def _new_bit(self, worker_id: WorkerId) -> int:
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        else:
            slot, self._next_slot = self._next_slot, self._next_slot + 1
        self._slot_owner[slot] = worker_id
        self._live |= 1 << slot
        return 1 << slot

    def _medium_bit(self, medium: str | None) -> int:
        name = DEFAULT_MEDIUM if medium is None else medium
        bit = self._mediums.get(name)
        if bit is None:
            bit = self._mediums[name] = 1 << len(self._mediums)
        return bit

    def _store(self, w: _Worker, hashes: Sequence[BlockHash], medium: str | None) -> None:
        mbit = self._medium_bit(medium)
        blocks, holders, predicted = w.blocks, self._holders, w.predicted
        for h in hashes:
            old = blocks.get(h)
            if old is None:
                blocks[h] = mbit
                holders[h] = holders.get(h, 0) | w.bit
                if predicted and h in predicted:
                    del predicted[h]
                    self._unset(self._pred_holders, h, w.bit)
            else:
                blocks[h] = old | mbit

    def _remove(self, w: _Worker, hashes: Sequence[BlockHash], medium: str | None) -> None:
        mbit = self._medium_bit(medium)
        blocks = w.blocks
        for h in hashes:
            old = blocks.get(h)
            if old is None:
                continue  # never seen (stream joined after the store, or approximate)
            left = old & ~mbit
            if left:
                blocks[h] = left
            else:
                del blocks[h]
                self._unset(self._holders, h, w.bit)

    def _store_remote(self, hashes: Sequence[BlockHash]) -> None:
        self._medium_bit(REMOTE_MEDIUM)  # so the weight tables know the medium
        now, remote = self._clock(), self._remote
        for h in hashes:
            if h in remote:
                remote.move_to_end(h)
            remote[h] = now

    def _remove_remote(self, hashes: Sequence[BlockHash]) -> None:
        remote = self._remote
        for h in hashes:
            remote.pop(h, None)

    def _expire_remote(self, cutoff: float, limit: int) -> bool:
        """Drop up to ``limit`` remote entries stored at or before ``cutoff``, oldest first;
        True when none is left (lookups skip expired ones meanwhile)."""
        remote = self._remote
        for _ in range(limit):
            if not remote or remote[next(iter(remote))] > cutoff:
                return True
            remote.popitem(last=False)
        return not remote or remote[next(iter(remote))] > cutoff

    @staticmethod
    def _check_ttl(value: float) -> float:
        if not value > 0:
            raise ValueError(f"remote_ttl_s must be > 0, got {value}")
        return float(value)

    def _clear(self, w: _Worker) -> None:
        """Drop the worker's entries in O(its predictions): it moves to a fresh bit."""
        if not w.blocks:
            return
        old, new = w.bit, self._new_bit(w.worker_id)
        for h in w.predicted:
            self._pred_holders[h] = (self._pred_holders[h] & ~old) | new
        self._retire(old, w.blocks)
        w.bit, w.blocks = new, {}

    def _retire(self, bit: int, blocks: dict[BlockHash, int]) -> None:
        slot = bit.bit_length() - 1
        self._live &= ~bit
        del self._slot_owner[slot]
        # ``blocks`` is detached from its worker, so iterating it across lock releases is safe.
        self._retired.append((slot, iter(blocks)))

    def _purge(self) -> None:
        """Scrub retired bits from ``_holders`` in chunks, then free their slots. Called
        without the lock; one thread purges at a time (a concurrent caller leaves it to it)."""
        with self._lock:
            if self._purging:
                return
            self._purging = True
        try:
            while True:
                with self._lock:
                    if not self._retired:
                        return
                    slot, hashes = self._retired[0]
                    bit, holders = 1 << slot, self._holders
                    n = 0
                    for h in itertools.islice(hashes, _PURGE_CHUNK):
                        self._unset(holders, h, bit)
                        n += 1
                    if n < _PURGE_CHUNK:  # this slot is clean: it may be reused
                        self._retired.popleft()
                        heapq.heappush(self._free_slots, slot)
                # Lock is not fair: without giving up the GIL here this thread would take it
                # straight back and a waiting lookup would stall for the whole purge.
                time.sleep(0)
        finally:
            with self._lock:
                self._purging = False

    @staticmethod
    def _unset(masks: dict[BlockHash, int], h: BlockHash, bit: int) -> None:
        left = masks.get(h, 0) & ~bit
        if left:
            masks[h] = left
        else:
            masks.pop(h, None)

    def _expire(self, now: float) -> None:
        heap = self._pred_expiry
        while heap and heap[0][0] <= now:
            expiry, _, worker_id, hashes = heapq.heappop(heap)
            w = self._workers.get(worker_id)
            if w is None:
                continue
            for h in hashes:
                # A later predict() may have extended this entry; only its own expiry ends it.
                if w.predicted.get(h) == expiry:
                    del w.predicted[h]
                    self._unset(self._pred_holders, h, w.bit)
