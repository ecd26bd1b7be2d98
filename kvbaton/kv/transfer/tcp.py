"""TCP transport, client side: fetches blocks from a ``TransferServer`` (tcp_server.py).

Block bytes go from the KV tensor's memory to the socket with ``sendmsg`` over memoryviews of
the source rows (one iovec per run of contiguous blocks), and from the socket into the
destination rows with ``recvmsg_into``; Python never copies a block. Each block's checksum is
checked on arrival. On CUDA tensors both ends stage through pinned host memory.

Same host: when the server offers its KV in shared memory and the file opens, the client maps
it read-only once per peer and fetches by copying blocks out of the mapping (``shm_read``); the
connection then carries only the request, the block ids with their checksums, and "done".
Anything that stops the offer from working (another host, another ``/dev/shm``, a closed file,
``prefer_shm=False`` on either side) leaves the TCP byte path in use, transparently.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from kvbaton.kv.codec import checksum
from kvbaton.kv.spec import KVSpec
from kvbaton.kv.transfer import sockio, wire
from kvbaton.kv.transfer.blocks import DEFAULT_STAGING_BYTES, BlockIO, check_kv
from kvbaton.kv.transfer.handshake import client_handshake, remote_error
from kvbaton.kv.transfer.shm import host_id
from kvbaton.kv.transfer.shm_read import ShmMapping
from kvbaton.kv.transfer.sockio import Deadline
from kvbaton.kv.transfer.transport import (
    ChecksumError,
    FetchStats,
    PeerClosed,
    ProtocolError,
    TransferError,
    Transport,
)

log = logging.getLogger(__name__)


class _Conn:
    """One authenticated connection to a peer, and the peer's shared KV if it can be read."""

    def __init__(self, sock: socket.socket, key: tuple[str, int], mapping: ShmMapping | None) -> None:
        self.sock = sock
        self.key = key
        self.mapping = mapping
        self.reused = False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class TransferClient(Transport):
    """Fetches leased blocks from :class:`TransferServer` peers over TCP.

    ``timeout_s`` bounds each whole call (connect, handshake, request, every payload byte):
    size it for the largest fetch. Idle connections are kept per peer and reused (a reused one
    the peer has meanwhile closed is replaced once, transparently). With ``prefer_shm`` (the
    default) a peer on this host that offers its KV in shared memory is read through it; the
    mapping is kept per peer until the peer offers another one, cannot be reached, or
    :meth:`close` (:attr:`num_mapped` counts the mappings held). Thread-safe.
    """

    def __init__(
        self,
        spec: KVSpec,
        fingerprint: str,
        secret: bytes | None = None,
        timeout_s: float = 10.0,
        max_idle_per_peer: int = 2,
        socket_buffer_bytes: int | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        prefer_shm: bool = True,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.spec = spec
        self.fingerprint = fingerprint
        self.secret = secret
        self.timeout_s = timeout_s
        self.max_idle_per_peer = max_idle_per_peer
        self.socket_buffer_bytes = socket_buffer_bytes
        self.staging_bytes = staging_bytes
        self.prefer_shm = prefer_shm
        self._block_bytes = spec.bytes_per_block
        self._maps: dict[tuple[str, int], tuple[wire.ShmOffer, ShmMapping | None]] = {}
        self._spec_msg = wire.SpecMsg.of(spec)
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._staging: list[torch.Tensor] = []  # pinned CUDA staging buffers are slow to make: reuse
        self._lock = threading.Lock()
        self._closed = False

    def fetch(
        self,
        host: str,
        port: int,
        lease_id: str,
        block_indexes: list[int],
        dst: torch.Tensor,
        dst_block_ids: list[int],
    ) -> FetchStats:
        """See :meth:`Transport.fetch`. On failure ``dst[dst_block_ids]`` holds unspecified bytes."""
        self._check_fetch_args(block_indexes, dst, dst_block_ids)
        t0 = time.perf_counter()
        if not block_indexes:
            return FetchStats(0, 0, 0.0)
        n = len(block_indexes)
        deadline = Deadline(self.timeout_s, f"fetch of {n} blocks (lease {lease_id!r}) from {host}:{port}")
        conn, header = self._exchange(
            host, port, lambda c: wire.FetchRequest(lease_id, list(block_indexes), shm=c.mapping is not None), deadline
        )
        if conn.mapping is not None:
            self._copy_shared(conn, header, deadline, block_indexes, dst, dst_block_ids)
            return FetchStats(n * self._block_bytes, n, time.perf_counter() - t0, "shm")
        try:
            if not isinstance(header, wire.BlocksHeader):
                raise ProtocolError(f"expected blocks, got {type(header).__name__}")
            if header.block_bytes != self._block_bytes or len(header.checksums) != n:
                raise ProtocolError(
                    f"server announced {len(header.checksums)} blocks of {header.block_bytes} bytes; "
                    f"asked for {n} of {self._block_bytes}"
                )
            self._receive(conn.sock, deadline, header.checksums, block_indexes, dst, dst_block_ids)
        except BaseException:
            conn.close()  # the stream may hold the rest of a payload: never reuse it
            raise
        self._checkin(conn)
        return FetchStats(n * self._block_bytes, n, time.perf_counter() - t0)

    def release(self, host: str, port: int, lease_id: str) -> bool:
        """See :meth:`Transport.release`."""
        deadline = Deadline(self.timeout_s, f"release of lease {lease_id!r} at {host}:{port}")
        conn, reply = self._exchange(host, port, lambda c: wire.ReleaseRequest(lease_id), deadline)
        if isinstance(reply, wire.ReleaseReply):
            self._checkin(conn)
            return reply.released
        conn.close()
        raise ProtocolError(f"expected released, got {type(reply).__name__}")

    @property
    def num_mapped(self) -> int:
        """How many peers' shared KV this client holds mapped now (offers that could not be
        opened, and so are read over TCP, are not counted)."""
        with self._lock:
            return sum(mapping is not None for _, mapping in self._maps.values())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
            self._staging.clear()
            self._maps.clear()  # unmapped once no fetch in flight still reads them
        for c in conns:
            c.close()

    def __enter__(self) -> TransferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _check_fetch_args(self, block_indexes: list[int], dst: torch.Tensor, dst_block_ids: list[int]) -> None:
        check_kv(dst, self.spec, "dst")
        if len(block_indexes) != len(dst_block_ids):
            raise ValueError(
                f"block_indexes has {len(block_indexes)} entries but dst_block_ids has {len(dst_block_ids)}"
            )
        if any(i < 0 for i in block_indexes):
            raise ValueError("block_indexes must be >= 0")
        bad = [b for b in dst_block_ids if not 0 <= b < dst.shape[0]]
        if bad:
            raise ValueError(f"dst_block_ids {bad[:5]} are outside dst's {dst.shape[0]} blocks")
        if len(set(dst_block_ids)) != len(dst_block_ids):
            raise ValueError("dst_block_ids contains duplicates")

    def _receive(
        self,
        sock: socket.socket,
        deadline: Deadline,
        checksums: list[int],
        block_indexes: list[int],
        dst: torch.Tensor,
        dst_block_ids: list[int],
    ) -> None:
        with self._block_io(dst) as io:
            for chunk in io.write(dst_block_ids):
                sockio.recv_all(sock, chunk.iov, deadline)
                for k, view in enumerate(chunk.blocks):
                    if checksum(view) != checksums[chunk.start + k]:
                        raise ChecksumError.at(chunk.start + k, block_indexes, dst_block_ids)

    def _copy_shared(
        self,
        conn: _Conn,
        reply: wire.Message,
        deadline: Deadline,
        block_indexes: list[int],
        dst: torch.Tensor,
        dst_block_ids: list[int],
    ) -> None:
        """Copy the blocks a ShmBlocks reply names out of the peer's mapping, then say done."""
        assert conn.mapping is not None
        if not isinstance(reply, wire.ShmBlocks):
            conn.close()
            raise ProtocolError(f"expected shm_blocks, got {type(reply).__name__}")
        try:
            with self._block_io(dst) as io:
                conn.mapping.copy_verified(reply.block_ids, reply.checksums, io, block_indexes, dst_block_ids)
        except TransferError:
            self._done_shared(conn, deadline)  # unpin and keep the stream in step, then report
            raise
        except BaseException:
            conn.close()  # the server unpins when the connection drops
            raise
        self._done_shared(conn, deadline)

    def _done_shared(self, conn: _Conn, deadline: Deadline) -> None:
        try:
            sockio.send_msg(conn.sock, wire.ShmDone(), deadline)
        except TransferError:
            conn.close()  # the server unpins on hang-up; the copied blocks were verified already
            return
        self._checkin(conn)

    @contextmanager
    def _block_io(self, dst: torch.Tensor) -> Iterator[BlockIO]:
        """Byte access to ``dst``; on CUDA through a pooled pinned staging buffer."""
        if dst.device.type != "cuda":
            yield BlockIO(dst, self.spec)
            return
        with self._lock:
            spare = self._staging.pop() if self._staging else None
        if spare is not None and spare.numel() < self._block_bytes:
            spare = None
        io = BlockIO(dst, self.spec, self.staging_bytes, staging=spare)
        try:
            yield io
        finally:
            if io.staging is not None:
                with self._lock:
                    self._staging.append(io.staging)

    def _mapping(self, key: tuple[str, int], offer: wire.ShmOffer | None) -> ShmMapping | None:
        """The peer's shared KV, mapped once per offer; None (TCP bytes) if it cannot be read."""
        if offer is None:
            return None
        with self._lock:
            cached = self._maps.get(key)
        if cached is not None and cached[0] == offer:
            return cached[1]
        try:
            mapping: ShmMapping | None = ShmMapping.open(offer, self._block_bytes)
        except (OSError, ValueError) as exc:
            log.info("kv transfer: %s:%d offers shared memory this process cannot use (%s); using TCP", *key, exc)
            mapping = None
        with self._lock:
            if not self._closed:
                self._maps[key] = (offer, mapping)  # replaces (and so unmaps) an older offer's mapping
        return mapping

    def _exchange(
        self, host: str, port: int, request: Callable[[_Conn], wire.Message], deadline: Deadline
    ) -> tuple[_Conn, wire.Message]:
        """Send one request (built for the connection it goes on) and read its reply frame,
        retrying once if a cached connection is stale."""
        for attempt in range(2):
            conn = self._checkout(host, port, deadline, allow_idle=attempt == 0)
            try:
                sockio.send_msg(conn.sock, request(conn), deadline)
                reply = sockio.recv_msg(conn.sock, deadline)
            except PeerClosed:
                conn.close()
                if conn.reused and attempt == 0:
                    continue  # the peer dropped it while idle; nothing was processed
                raise
            except BaseException:
                conn.close()
                raise
            if isinstance(reply, wire.Error):
                # A refused request leaves the stream in sync, so the connection stays usable.
                self._checkin(conn)
                raise remote_error(reply)
            return conn, reply
        raise AssertionError("unreachable")

    def _checkout(self, host: str, port: int, deadline: Deadline, allow_idle: bool) -> _Conn:
        key = (host, port)
        with self._lock:
            if self._closed:
                raise TransferError("the client is closed")
            idle = self._idle.get(key)
            if allow_idle and idle:
                conn = idle.pop()
                conn.reused = True
                return conn
        try:
            sock = sockio.connect(host, port, deadline, self.socket_buffer_bytes)
        except TransferError:
            with self._lock:
                self._maps.pop(key, None)  # a peer that is gone must not keep its KV mapped here
            raise
        try:
            offer = client_handshake(
                sock, self._spec_msg, self.fingerprint, self.secret, deadline, host_id() if self.prefer_shm else None
            )
            return _Conn(sock, key, self._mapping(key, offer))
        except BaseException:
            sock.close()
            raise

    def _checkin(self, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if not self._closed and len(idle) < self.max_idle_per_peer:
                idle.append(conn)
                return
        conn.close()
