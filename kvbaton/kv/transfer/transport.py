"""The transfer data plane's interfaces: what the worker and engine see, whatever moves the bytes.

A decode worker holds a :class:`Transport` (the client side) and calls :meth:`Transport.fetch`
with the address and lease from a KV handle; a prefill worker runs a :class:`TransportServer`
over its KV tensor and a :class:`BlockSource` (its lease table). The TCP implementation lives in
``tcp.py``; RDMA transports (NIXL, Mooncake) implement the same two classes, so the engine and
workers never change when one is added.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kvbaton.kv.codec import CHECKSUM_ALGORITHM


class TransferError(Exception):
    """Base of every transfer failure; the caller's answer to any of them is 'recompute'."""


class TransferTimeout(TransferError):
    """A deadline passed: the peer did not answer, or stopped sending or reading mid-payload."""


class PeerClosed(TransferError):
    """The peer closed or reset the connection before the exchange was complete."""


class ChecksumError(TransferError):
    """A received block's checksum does not match the sender's; names the block."""

    def __init__(self, message: str, position: int, block_index: int, dst_block_id: int) -> None:
        super().__init__(message)
        self.position = position  # index into the fetch's block list
        self.block_index = block_index  # lease-relative index asked for
        self.dst_block_id = dst_block_id  # destination block it was written to

    @classmethod
    def at(cls, position: int, block_indexes: Sequence[int], dst_block_ids: Sequence[int]) -> ChecksumError:
        """The error for the block at ``position`` of a fetch."""
        b, d = block_indexes[position], dst_block_ids[position]
        msg = (
            f"block {position} of the fetch (lease index {b}, destination block {d}) "
            f"failed its {CHECKSUM_ALGORITHM} check"
        )
        return cls(msg, position, b, d)


class SpecMismatch(TransferError):
    """The two ends disagree on the KV layout or model fingerprint; refused at the handshake."""


class AuthError(TransferError):
    """Shared-secret authentication failed (wrong secret, or only one side holds one)."""


class LeaseError(TransferError):
    """Unknown or expired lease, or a block index outside it. Raised by a :class:`BlockSource`
    on the server and re-raised with the server's message on the client."""


class ProtocolError(TransferError):
    """The peer sent something this protocol does not allow (bad frame, wrong version)."""


@dataclass(frozen=True)
class FetchStats:
    """What one fetch moved and how long it took (seconds include connecting when not reused).

    ``path`` is how the bytes came: ``"tcp"`` or ``"shm"`` (same-host shared memory)."""

    bytes: int
    blocks: int
    seconds: float
    path: str = "tcp"

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class BlockSource(Protocol):
    """The server's view of its lease table. Called from transfer-server threads, concurrently:
    implementations must be thread-safe.

    Blocks resolved under a lease must not be written while the lease is held: the server may
    cache their checksums for the lease's lifetime. Lease ids are never reused.
    """

    def resolve(self, lease_id: str, block_indexes: list[int]) -> Sequence[int]:
        """Map lease-relative indexes to block ids in the KV tensor.

        Raise :class:`LeaseError` for an unknown or expired lease or an index outside it.
        """
        ...

    def release(self, lease_id: str) -> bool:
        """Free the lease's blocks. True if it was held, False if already released or expired."""
        ...

    # Optional: ``end(lease_id)`` is called after every successful ``resolve`` once the
    # blocks were sent (or the send failed), so a source can pin a lease while it is read.


class Transport(ABC):
    """Client side of the data plane: copies leased blocks from a peer's KV into local blocks.

    After a failed fetch the destination blocks' content is unspecified; the caller must not
    use them (it frees them and recomputes).
    """

    @abstractmethod
    def fetch(
        self,
        host: str,
        port: int,
        lease_id: str,
        block_indexes: list[int],
        dst: torch.Tensor,
        dst_block_ids: list[int],
    ) -> FetchStats:
        """Write the peer's blocks ``block_indexes`` (lease-relative) into ``dst[dst_block_ids[i]]``.

        ``dst`` is a block-first KV tensor of this transport's spec. Every block is verified
        (checksum) before this returns. Raises a :class:`TransferError` subclass on any failure,
        never blocks past the transport's timeout.
        """

    @abstractmethod
    def release(self, host: str, port: int, lease_id: str) -> bool:
        """Tell the peer the lease is no longer needed. True if it was held; idempotent."""

    @abstractmethod
    def close(self) -> None:
        """Drop cached connections and resources. The transport may not be used afterwards."""


class TransportServer(ABC):
    """Server side of the data plane: serves one worker's KV blocks to its peers."""

    @abstractmethod
    def start(self) -> TransportServer:
        """Begin accepting peers (non-blocking: serves from background threads). Returns self."""

    @abstractmethod
    def stop(self) -> None:
        """Stop accepting, drop every connection (in-flight fetches fail on the peer), join threads.

        Bounded in time whatever the peers do.
        """

    @property
    @abstractmethod
    def address(self) -> tuple[str, int]:
        """(host, port) a peer passes to :meth:`Transport.fetch`; valid after :meth:`start`."""
