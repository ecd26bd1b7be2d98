"""Leases: KV blocks pinned for a transfer, with a deadline.

A prefill-only request ends with its prompt's blocks still referenced, under a lease, so a
decode worker can fetch them. The lease ends when the decode side releases it or when its
deadline passes; either way the blocks go back to the pool (full blocks stay findable by hash,
so a later request with the same prefix still hits them).

The table is shared between threads: the transfer server resolves and releases leases on its
own threads, while only the engine thread touches the ``BlockPool``. So ending a lease here
only *marks* it; the engine thread collects ended leases (``collect``) and frees their blocks.
A lease that is being read by a transfer is never collected until the transfer ends, even if
its deadline passed meanwhile, so a freed block is never sent.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvbaton.kv.hashing import BlockHash


class LeaseError(KeyError):
    """Unknown, expired or released lease, or a block index outside it."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else "lease error"


@dataclass
class Lease:
    """Blocks of one prompt, in order (full blocks first, then the partial tail if any)."""

    lease_id: str
    block_ids: list[int]
    block_hashes: list[BlockHash]
    num_tokens: int
    deadline: float
    active_transfers: int = 0
    ended: bool = False  # released or expired: no new transfer may start
    end_reason: str | None = None
    created: float = field(default_factory=time.monotonic)


class LeaseTable:
    """Thread-safe table of leases; the engine thread frees what ``collect`` returns."""

    def __init__(
        self, default_ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if default_ttl_s <= 0:
            raise ValueError("lease ttl must be > 0 seconds")
        self.default_ttl_s = default_ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        # Called (from any thread) when a lease ends, so an idle engine loop wakes to collect.
        self.on_end: Callable[[], None] | None = None
        self.num_created = 0
        self.num_released = 0
        self.num_expired = 0

    def create(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[BlockHash],
        num_tokens: int,
        ttl_s: float | None = None,
    ) -> Lease:
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        lease = Lease(
            uuid.uuid4().hex, list(block_ids), list(block_hashes), num_tokens,
            self._clock() + ttl,
        )
        with self._lock:
            self._leases[lease.lease_id] = lease
            self.num_created += 1
        return lease

    def begin_transfer(self, lease_id: str, indexes: Sequence[int]) -> list[int]:
        """Block ids for lease-relative ``indexes``; pins the lease until ``end_transfer``."""
        with self._lock:
            lease = self._live(lease_id)
            n = len(lease.block_ids)
            bad = [i for i in indexes if not 0 <= i < n]
            if bad:
                raise LeaseError(f"block index {bad[0]} outside lease {lease_id} of {n} blocks")
            lease.active_transfers += 1
            return [lease.block_ids[i] for i in indexes]

    def end_transfer(self, lease_id: str) -> None:
        notify = False
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is not None and lease.active_transfers > 0:
                lease.active_transfers -= 1
                notify = lease.ended and lease.active_transfers == 0
        if notify:
            self._notify()

    def release(self, lease_id: str) -> bool:
        """End a lease early (the decode side has its blocks). Idempotent: False if unknown."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.ended:
                return False
            lease.ended, lease.end_reason = True, "released"
            self.num_released += 1
        self._notify()
        return True

    def get(self, lease_id: str) -> Lease | None:
        with self._lock:
            return self._leases.get(lease_id)

    def collect(self) -> list[Lease]:
        """Remove and return leases that ended (released or past their deadline) and that no
        transfer is reading; the caller frees their blocks. Engine thread only."""
        if not self._leases:  # the common case, every step: no lock, no clock (leases are added on this thread)
            return []
        now = self._clock()
        out: list[Lease] = []
        with self._lock:
            for lid, lease in list(self._leases.items()):
                if not lease.ended and now >= lease.deadline:
                    lease.ended, lease.end_reason = True, "expired"
                    self.num_expired += 1
                if lease.ended and lease.active_transfers == 0:
                    out.append(self._leases.pop(lid))
        return out

    def drain(self) -> list[Lease]:
        """Remove every lease (engine shutdown or reset); the caller frees their blocks."""
        with self._lock:
            out = list(self._leases.values())
            self._leases.clear()
        return out

    def next_deadline(self) -> float | None:
        with self._lock:
            live = [lease.deadline for lease in self._leases.values() if not lease.ended]
        return min(live) if live else None

    def ids(self) -> list[str]:
        """Ids of the leases not collected yet (live or ended)."""
        with self._lock:
            return list(self._leases)

    def block_refs(self) -> dict[int, int]:
        """Block -> number of leases holding it (for integrity checks)."""
        refs: dict[int, int] = {}
        with self._lock:
            for lease in self._leases.values():
                for b in lease.block_ids:
                    refs[b] = refs.get(b, 0) + 1
        return refs

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def _live(self, lease_id: str) -> Lease:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseError(f"unknown lease {lease_id!r} (expired, released or never issued)")
        if lease.ended or self._clock() >= lease.deadline:
            raise LeaseError(f"lease {lease_id!r} has {lease.end_reason or 'expired'}")
        return lease

    def _notify(self) -> None:
        cb = self.on_end
        if cb is not None:
            cb()
