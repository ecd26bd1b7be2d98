"""What a transfer server keeps besides its connections: counters, injected faults (tests), and
the per-lease checksum cache."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class Faults:
    """TEST-ONLY misbehaviour injected into fetch payloads: ``server.faults = Faults(...)``.

    Applies to every fetch until reset to None. Byte counts are of TCP block payload (after the
    header frame). A shared-memory fetch carries no payload: there a corrupt block is announced
    with a wrong checksum, and a stall or close happens before the reply. The source tensor is
    never modified.
    """

    corrupt_block_index: int | None = None  # flip a byte of the block at this fetch position, on the wire
    stall_after_bytes: int | None = None  # then stop sending until the client hangs up or the server stops
    close_after_bytes: int | None = None  # then drop the connection


@dataclass
class ServerStats:
    """Counters of what the server did and refused (read them; the server updates them)."""

    connections: int = 0
    fetches: int = 0  # every served fetch, TCP or shared memory
    shm_fetches: int = 0  # of which served through shared memory (blocks_sent/bytes_sent count both)
    blocks_sent: int = 0
    bytes_sent: int = 0
    releases: int = 0
    auth_failures: int = 0
    spec_mismatches: int = 0
    lease_errors: int = 0
    errors: list[str] = field(default_factory=list)  # last few connection failures, for debugging


class LeaseChecksums:
    """Per-lease block checksums, computed on the first send: blocks under a lease are immutable.

    Bounded (least recently used leases dropped), so leases that expire unreleased cost little.
    """

    def __init__(self, max_leases: int = 4096) -> None:
        self.max_leases = max_leases
        self._by_lease: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, lease_id: str, block_ids: list[int]) -> list[int | None]:
        with self._lock:
            known = self._by_lease.get(lease_id)
            if known is None:
                return [None] * len(block_ids)
            self._by_lease.move_to_end(lease_id)
            return [known.get(b) for b in block_ids]

    def put(self, lease_id: str, block_ids: list[int], sums: list[int]) -> None:
        with self._lock:
            known = self._by_lease.setdefault(lease_id, {})
            self._by_lease.move_to_end(lease_id)
            known.update(zip(block_ids, sums))
            while len(self._by_lease) > self.max_leases:
                self._by_lease.popitem(last=False)

    def drop(self, lease_id: str) -> None:
        with self._lock:
            self._by_lease.pop(lease_id, None)
