"""The tier interface of the KV store, and the bookkeeping every tier shares.

A tier (host memory, a disk directory; later a remote store) holds whole KV blocks, named by
their chain hash (:mod:`kvbaton.kv.hashing`), so the model fingerprint and the tenant salt in
the chain's root keep models and tenants apart with no extra key. The interface follows vLLM's
``OffloadingManager``: ``lookup`` of leading hits; ``prepare_store`` / ``complete_store``
(which also report what was evicted to make room) and ``prepare_load`` / ``complete_load``
around the data movement; ``touch``; and KV events (``take_events``) with the tier's
``medium``, so routers know where each block lives.

Threads. Metadata methods run on the engine thread only. ``write`` and ``read`` run on the
store's IO thread (:mod:`kvbaton.kv.store.io`) and touch only the slots a plan reserved: an
entry being stored is not yet loadable and one being loaded cannot be evicted, until the
plan's ``complete_*`` call on the engine thread, so the two sides never need a lock.

Lifecycle of an entry: ``prepare_store`` reserves a slot (storing, not findable) →
``complete_store(ok)`` makes it ready (a candidate for eviction, BlockStored) or drops it →
``prepare_load`` takes a read reference (not evictable) → ``complete_load`` releases it (or
drops a block that failed its checksum). ``pin`` keeps a ready entry from eviction and expiry
until a deadline; ``expire`` drops entries idle longer than the tier's TTL.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from kvbaton.kv.events import BlockRemoved, BlockStored, KVEvent
from kvbaton.kv.hashing import BlockHash
from kvbaton.kv.store.policies import EvictionPolicy


class TierError(RuntimeError):
    """A tier could not read or write a block (I/O error, full or unwritable medium)."""


class CorruptBlockError(TierError):
    """A stored block failed validation (checksum, size, header): it is dropped, never used."""


@dataclass(frozen=True)
class BlockMeta:
    """What a tier keeps beside a block's bytes: its parent's hash and its tokens, so the
    tier's events (and a restarted disk tier's) carry what vLLM's ``BlockStored`` carries."""

    parent: BlockHash | None
    token_ids: tuple[int, ...]


@dataclass
class StorePlan:
    """Slots reserved for ``hashes`` (in order) with their ``metas`` (so the IO thread never
    reads the directory); ``evicted`` were dropped to make room."""

    hashes: list[BlockHash]
    slots: list[int]
    metas: list[BlockMeta] = field(default_factory=list)
    evicted: list[BlockHash] = field(default_factory=list)


@dataclass
class LoadPlan:
    """Ready entries ``hashes`` (in order) at ``slots``, held from eviction until completed."""

    hashes: list[BlockHash]
    slots: list[int]


class _Entry:
    __slots__ = ("slot", "meta", "ready", "readers", "pinned_until", "last_used")

    def __init__(self, slot: int, meta: BlockMeta, now: float) -> None:
        self.slot = slot
        self.meta = meta
        self.ready = False
        self.readers = 0
        self.pinned_until = 0.0
        self.last_used = now


class BlockDirectory:
    """Which blocks a tier holds, in which slot, and which of them may be evicted.

    ``capacity`` slots numbered ``0..capacity-1``; an eviction ``policy`` over the hashes of
    ready entries that nobody reads or pins; a ``ttl_s`` (0: none) after which an idle entry
    is dropped. Events go to an internal list the owner drains (``take_events``).
    """

    def __init__(self, capacity: int, policy: EvictionPolicy[BlockHash], block_size: int,
                 medium: str, ttl_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if ttl_s < 0:
            raise ValueError("ttl_s must be >= 0 (0: no TTL)")
        self.capacity = capacity
        self.policy = policy
        self.block_size = block_size
        self.medium = medium
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: dict[BlockHash, _Entry] = {}
        self._free_slots = list(range(capacity - 1, -1, -1))  # pop() takes slot 0 first
        self._events: list[KVEvent] = []
        self.num_stored = 0
        self.num_loaded = 0
        self.num_evicted = 0
        self.num_expired = 0
        self.num_dropped = 0  # failed stores and corrupt loads

    # ---- queries -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_ready(self) -> int:
        return sum(1 for e in self._entries.values() if e.ready)

    @property
    def num_pinned(self) -> int:
        now = self.clock()
        return sum(1 for e in self._entries.values() if e.pinned_until > now)

    def is_ready(self, h: BlockHash) -> bool:
        e = self._entries.get(h)
        return e is not None and e.ready and not self._expired(e, self.clock())

    def __contains__(self, h: object) -> bool:
        return h in self._entries

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading ``hashes`` are ready to load."""
        now = self.clock()
        n = 0
        for h in hashes:
            e = self._entries.get(h)
            if e is None or not e.ready or self._expired(e, now):
                break
            n += 1
        return n

    def ready_entries(self) -> Iterator[tuple[BlockHash, BlockMeta]]:
        """Every ready entry (for snapshots), parents before children when both are here."""
        ready = {h: e for h, e in self._entries.items() if e.ready}
        done: set[BlockHash] = set()
        for h in ready:
            chain = []
            cur: BlockHash | None = h
            while cur is not None and cur in ready and cur not in done:
                chain.append(cur)
                cur = ready[cur].meta.parent
            for c in reversed(chain):
                done.add(c)
                yield c, ready[c].meta

    def slot_of(self, h: BlockHash) -> int:
        return self._entries[h].slot

    def meta_of(self, h: BlockHash) -> BlockMeta:
        return self._entries[h].meta

    # ---- storing -----------------------------------------------------------------------

    def prepare_store(self, hashes: Sequence[BlockHash], metas: Sequence[BlockMeta]) -> StorePlan:
        """Reserve a slot for each of ``hashes`` not held yet, evicting candidates when full.
        Stops at the first block it cannot place (everything else is in use or pinned)."""
        plan = StorePlan([], [])
        now = self.clock()
        for h, meta in zip(hashes, metas):
            if h in self._entries:
                continue
            slot = self._free_slot(plan.evicted)
            if slot is None:
                break
            self._entries[h] = _Entry(slot, meta, now)
            plan.hashes.append(h)
            plan.slots.append(slot)
            plan.metas.append(meta)
        return plan

    def complete_store(self, plan: StorePlan, ok: bool) -> None:
        """The plan's bytes are written (``ok``): its entries become loadable; else dropped."""
        for h in plan.hashes:
            e = self._entries.get(h)
            if e is None or e.ready:
                continue
            if ok:
                e.ready = True
                e.last_used = self.clock()
                self.policy.insert(h)
                self.num_stored += 1
                self._events.append(
                    BlockStored([h], e.meta.parent, list(e.meta.token_ids), self.block_size, medium=self.medium)
                )
            else:
                self._discard(h, announce=False)
                self.num_dropped += 1

    def add_ready(self, h: BlockHash, meta: BlockMeta, last_used: float) -> int | None:
        """Register a block already present on the medium (a disk tier found at startup);
        its slot, or None when the tier is full of entries that cannot be evicted."""
        if h in self._entries:
            return self._entries[h].slot
        evicted: list[BlockHash] = []
        slot = self._free_slot(evicted)
        if slot is None:
            return None
        e = self._entries[h] = _Entry(slot, meta, last_used)
        e.ready = True
        self.policy.insert(h)
        self._events.append(BlockStored([h], meta.parent, list(meta.token_ids), self.block_size, medium=self.medium))
        return slot

    # ---- loading -----------------------------------------------------------------------

    def prepare_load(self, hashes: Sequence[BlockHash]) -> LoadPlan:
        """Hold the ready entries ``hashes`` (all must be ready) from eviction while they are
        read."""
        plan = LoadPlan([], [])
        for h in hashes:
            e = self._entries[h]
            if not e.ready:
                raise KeyError(f"block {h.hex()} is not ready in the {self.medium} tier")
            e.readers += 1
            self.policy.remove(h)
            plan.hashes.append(h)
            plan.slots.append(e.slot)
        return plan

    def complete_load(self, plan: LoadPlan, ok: bool, bad: Sequence[BlockHash] = ()) -> None:
        """Release the plan's read holds. ``ok``: the blocks were read and count as hits;
        ``bad``: blocks that failed validation, dropped from the tier."""
        now = self.clock()
        for h in plan.hashes:
            e = self._entries.get(h)
            if e is None:
                continue
            e.readers -= 1
            if h in bad:
                if e.readers == 0:
                    self._discard(h, announce=True)
                    self.num_dropped += 1
                continue
            if ok:
                e.last_used = now
                self.policy.access(h)
                self.num_loaded += 1
            self._maybe_candidate(h, e, now)

    def touch(self, hashes: Sequence[BlockHash]) -> None:
        """A request used these blocks (found on the device, say): they are recently used here."""
        now = self.clock()
        for h in hashes:
            e = self._entries.get(h)
            if e is not None and e.ready:
                e.last_used = now
                self.policy.access(h)

    # ---- pins and expiry ---------------------------------------------------------------

    def pin(self, hashes: Sequence[BlockHash], until: float) -> int:
        """Keep the ready entries among ``hashes`` from eviction and expiry until ``until``
        (a clock time; a later pin extends it). Returns how many were pinned."""
        n = 0
        for h in hashes:
            e = self._entries.get(h)
            if e is None or not e.ready:
                continue
            e.pinned_until = max(e.pinned_until, until)
            self.policy.remove(h)
            n += 1
        return n

    def unpin(self, hashes: Sequence[BlockHash]) -> int:
        """End the pins on ``hashes`` now; returns how many were still pinned."""
        now = self.clock()
        n = 0
        for h in hashes:
            e = self._entries.get(h)
            if e is None or e.pinned_until == 0.0:
                continue
            n += e.pinned_until > now
            e.pinned_until = 0.0
            self._maybe_candidate(h, e, now)
        return n

    def expire(self) -> list[BlockHash]:
        """Drop entries idle past the TTL and end pins past their deadline; the dropped."""
        now = self.clock()
        dropped = []
        for h, e in list(self._entries.items()):
            if not e.ready or e.readers:
                continue
            if 0 < e.pinned_until <= now:
                self._maybe_candidate(h, e, now)
            if self._expired(e, now):
                self._discard(h, announce=True)
                self.num_expired += 1
                dropped.append(h)
        return dropped

    # ---- events and internals ----------------------------------------------------------

    def take_events(self) -> list[KVEvent]:
        out, self._events = self._events, []
        return out

    def discard(self, h: BlockHash) -> bool:
        """Drop ``h`` now if nothing reads it (a block known to be bad); True if dropped."""
        e = self._entries.get(h)
        if e is None or e.readers:
            return False
        self._discard(h, announce=e.ready)
        return True

    def check(self) -> None:
        """Assert the directory's invariants (tests, ``check_integrity``)."""
        slots = [e.slot for e in self._entries.values()]
        problems = []
        if len(set(slots)) != len(slots):
            problems.append("two entries share a slot")
        if set(slots) & set(self._free_slots):
            problems.append("a used slot is also free")
        if len(slots) + len(self._free_slots) != self.capacity:
            problems.append(f"{len(slots)} used + {len(self._free_slots)} free != capacity {self.capacity}")
        for h, e in self._entries.items():
            # A pin past its deadline is only cleared by the next expire(): until then the
            # entry is (correctly, conservatively) still out of the candidates.
            should = e.ready and e.readers == 0 and e.pinned_until == 0.0
            if e.readers < 0:
                problems.append(f"{h.hex()[:8]} has {e.readers} readers")
            if (h in self.policy) != should:
                problems.append(f"{h.hex()[:8]} candidate={h in self.policy}, should be {should}")
        if len(self.policy) > len(self._entries):
            problems.append("the policy holds keys the directory does not")
        if problems:
            raise AssertionError(f"{self.medium} tier: " + "; ".join(problems[:10]))

    def _expired(self, e: _Entry, now: float) -> bool:
        return self.ttl_s > 0 and e.pinned_until <= now and now - e.last_used > self.ttl_s

    def _maybe_candidate(self, h: BlockHash, e: _Entry, now: float) -> None:
        if 0 < e.pinned_until <= now:
            e.pinned_until = 0.0  # the pin ran out
        if e.ready and e.readers == 0 and e.pinned_until == 0.0:
            self.policy.insert(h)

    def _free_slot(self, evicted: list[BlockHash]) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        victim = self.policy.evict()
        if victim is None:
            return None
        slot = self._entries[victim].slot
        self._discard(victim, announce=True, keep_slot=True, evicted=True)
        self.num_evicted += 1
        evicted.append(victim)
        return slot

    def _discard(self, h: BlockHash, announce: bool, keep_slot: bool = False, evicted: bool = False) -> None:
        e = self._entries.pop(h)
        if not (evicted and self.policy.remembers_evicted):  # a ghost entry may bring it back to main
            self.policy.forget(h)
        if not keep_slot:
            self._free_slots.append(e.slot)
        if announce:
            self._events.append(BlockRemoved([h], medium=self.medium))


def paired_runs(a: Sequence[int], b: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(a_start, b_start, length)`` of each maximal run where both ``a`` and ``b`` count up
    by one together: one run is one contiguous copy on each side."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for p in range(1, len(a) + 1):
        if p == len(a) or a[p] != a[p - 1] + 1 or b[p] != b[p - 1] + 1:
            runs.append((a[start], b[start], p - start))
            start = p
    return runs


def copy_rows(dst: torch.Tensor, dst_ids: Sequence[int], src: torch.Tensor, src_ids: Sequence[int]) -> None:
    """``dst[dst_ids[i]] = src[src_ids[i]]`` for 2-D uint8 row tensors, one ``copy_`` per run
    of consecutive ids. Across devices (pinned host <-> CUDA) the copies are asynchronous on
    the current stream: the caller synchronizes it."""
    if len(dst_ids) != len(src_ids):
        raise ValueError(f"{len(dst_ids)} destination rows for {len(src_ids)} source rows")
    if dst.device.type == "cpu" and src.device.type == "cpu":
        # numpy's memcpy, on this thread alone: torch's copy_ would start an OpenMP team on the
        # IO thread beside the engine thread's, and with more OpenMP threads than CPUs libgomp
        # stops spin-waiting, which slows every step (see build_engine_on_own_thread).
        dst_np, src_np = dst.numpy(), src.numpy()
        for d, s_, n in paired_runs(dst_ids, src_ids):
            dst_np[d : d + n] = src_np[s_ : s_ + n]
        return
    non_blocking = dst.device != src.device
    for d, s_, n in paired_runs(dst_ids, src_ids):
        dst[d : d + n].copy_(src[s_ : s_ + n], non_blocking=non_blocking)


class KVTier(ABC):
    """One tier of the KV store: the metadata (a :class:`BlockDirectory`, engine thread) and
    the bytes (``write``/``read``, IO thread) of whole blocks of ``block_bytes`` each.

    ``name`` is the tier's label in flags and metrics (``host``, ``disk``); ``medium`` is the
    name its KV events carry (``CPU_TIER``, ``DISK``).
    """

    name: str
    medium: str

    def __init__(self, directory: BlockDirectory, block_bytes: int) -> None:
        self.dir = directory
        self.block_bytes = block_bytes

    @property
    def capacity_blocks(self) -> int:
        return self.dir.capacity

    @property
    def enabled(self) -> bool:
        """False once the tier has stopped taking blocks (a disk that filled or failed)."""
        return self.dir.capacity > 0

    @abstractmethod
    def write(self, plan: StorePlan, rows: torch.Tensor, row_ids: Sequence[int]) -> None:
        """IO thread: store ``rows[row_ids[i]]`` (uint8 rows of ``block_bytes``, on the CPU)
        as ``plan.hashes[i]``. Raises :class:`TierError` when the medium fails."""

    @abstractmethod
    def read(self, plan: LoadPlan, rows: torch.Tensor, row_ids: Sequence[int]) -> list[BlockHash]:
        """IO thread: fill ``rows[row_ids[i]]`` with ``plan.hashes[i]``'s bytes. Returns the
        hashes that failed validation (their rows hold garbage; the caller must not use them);
        raises :class:`TierError` when the medium fails as a whole."""

    def removed(self, hashes: Sequence[BlockHash]) -> None:  # noqa: B027 - optional hook
        """IO thread: the directory dropped ``hashes`` (evicted, expired, corrupt): release
        what the medium keeps for them. Host memory keeps nothing; a disk deletes files."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the medium (end of the worker)."""
