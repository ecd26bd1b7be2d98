"""TCP transport, server side: serves one worker's leased KV blocks to its peers.

One thread accepts; each connection gets its own thread (the socket calls and checksums release
the GIL). A connection handshakes once, then serves any number of fetch and release requests.

When the KV tensor lives in shared memory (``shm.SharedKV``), clients on this host are offered
it at the handshake; their fetches then move no bytes over the socket: the server resolves and
pins the lease, names the blocks and their checksums, and unpins when the client says it has
copied them, drops the connection, or takes longer than ``io_timeout_s``.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from kvbaton.kv.codec import checksum
from kvbaton.kv.spec import KVSpec
from kvbaton.kv.transfer import shm, sockio, wire
from kvbaton.kv.transfer.blocks import DEFAULT_STAGING_BYTES, BlockIO, check_kv
from kvbaton.kv.transfer.handshake import server_handshake
from kvbaton.kv.transfer.server_state import Faults, LeaseChecksums, ServerStats
from kvbaton.kv.transfer.sockio import Deadline
from kvbaton.kv.transfer.transport import (
    AuthError,
    BlockSource,
    LeaseError,
    PeerClosed,
    ProtocolError,
    SpecMismatch,
    TransferError,
    TransferTimeout,
    TransportServer,
)

__all__ = ["Faults", "ServerStats", "TransferServer"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_JOIN_S = 5.0


class TransferServer(TransportServer):
    """Serves blocks of ``kv`` (CPU or CUDA, block-first, of ``spec``) under the leases of ``source``.

    ``io_timeout_s`` bounds a handshake and the sending of one reply (a client that stops
    reading is dropped); ``idle_timeout_s`` closes connections with no request for that long.
    With ``secret`` set, only peers holding the same secret are served. ``prefer_shm=False``
    never offers shared memory, even when ``kv`` lives in it.
    """

    def __init__(
        self,
        kv: torch.Tensor,
        spec: KVSpec,
        fingerprint: str,
        source: BlockSource,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: bytes | None = None,
        io_timeout_s: float = 30.0,
        idle_timeout_s: float = 300.0,
        max_connections: int = 256,
        socket_buffer_bytes: int | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        prefer_shm: bool = True,
    ) -> None:
        check_kv(kv, spec, "kv")
        self.kv, self.spec, self.fingerprint, self.source = kv, spec, fingerprint, source
        self.host, self.port, self.secret = host, port, secret
        self.io_timeout_s, self.idle_timeout_s = io_timeout_s, idle_timeout_s
        self.max_connections = max_connections
        self.socket_buffer_bytes, self.staging_bytes = socket_buffer_bytes, staging_bytes
        self.faults: Faults | None = None
        self.stats = ServerStats()
        self._spec_msg = wire.SpecMsg.of(spec)
        self._block_bytes = spec.bytes_per_block
        self._checksums = LeaseChecksums()
        self._shm_offer = shm.offer_for(kv, spec.bytes_per_block) if prefer_shm else None
        self._listener: socket.socket | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("the transfer server is not started")
        return self.host, self.port

    def start(self) -> TransferServer:
        if self._listener is not None:
            raise RuntimeError("the transfer server is already started")
        self._listener = sockio.listen(self.host, self.port, self.socket_buffer_bytes)
        self.port = self._listener.getsockname()[1]
        self._listener.settimeout(0.2)  # so the accept loop notices stop() promptly
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"kv-transfer-accept:{self.port}", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(_JOIN_S)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = dict(self._conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv or send
            except OSError:
                pass
        for thread in conns.values():
            thread.join(_JOIN_S)

    def put_checksums(self, lease_id: str, block_ids: list[int], checksums: list[int]) -> None:
        """Hand over checksums computed elsewhere (``codec.block_checksums`` when the lease was
        made) so sends skip computing them. Without this they are computed on the first send."""
        if len(block_ids) != len(checksums):
            raise ValueError(f"{len(block_ids)} block_ids but {len(checksums)} checksums")
        self._checksums.put(lease_id, list(block_ids), list(checksums))

    def __enter__(self) -> TransferServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                log.warning("kv transfer server: accept failed: %s", exc)
                self._stopping.wait(0.1)
                continue
            sockio.configure(sock)
            thread = threading.Thread(target=self._serve, args=(sock, peer), name=f"kv-transfer:{peer}", daemon=True)
            with self._lock:
                if len(self._conns) >= self.max_connections or self._stopping.is_set():
                    sock.close()
                    continue
                self._conns[sock] = thread
                self.stats.connections += 1
            thread.start()

    @property
    def shm_offer(self) -> wire.ShmOffer | None:
        """What same-host clients are offered: None unless ``kv`` is in a live shared file."""
        offer = self._shm_offer
        return offer if offer is not None and shm.is_offered(offer) else None

    def _serve(self, sock: socket.socket, peer: object) -> None:
        try:
            shm_ok = server_handshake(
                sock, self._spec_msg, self.fingerprint, self.secret,
                Deadline(self.io_timeout_s, f"handshake with {peer}"), self.shm_offer,
            )
            io = BlockIO(self.kv, self.spec, self.staging_bytes)
            while not self._stopping.is_set():
                req = sockio.recv_msg(sock, Deadline(self.idle_timeout_s, f"waiting for a request from {peer}"))
                deadline = Deadline(self.io_timeout_s, f"reply to {peer}")
                if isinstance(req, wire.FetchRequest):
                    if not self._fetch(sock, io, req, deadline, shm_ok, peer):
                        return
                elif isinstance(req, wire.ReleaseRequest):
                    self._checksums.drop(req.lease_id)
                    released = self._call_source(sock, deadline, self.source.release, req.lease_id)
                    if released is not None:
                        self._count(releases=1)
                        sockio.send_msg(sock, wire.ReleaseReply(bool(released)), deadline)
                else:
                    sockio.send_msg(sock, wire.Error("protocol", f"unexpected {type(req).__name__}"), deadline)
                    return
        except (PeerClosed, TransferTimeout) as exc:
            if not self._stopping.is_set():
                log.debug("kv transfer server: %s", exc)
        except TransferError as exc:
            self._record_failure(exc, peer)
        except Exception:
            log.exception("kv transfer server: connection from %s failed", peer)
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            sock.close()

    def _record_failure(self, exc: TransferError, peer: object) -> None:
        counter = {AuthError: "auth_failures", SpecMismatch: "spec_mismatches"}.get(type(exc))
        log.log(logging.WARNING if counter else logging.INFO, "kv transfer server: refused %s: %s", peer, exc)
        with self._lock:  # one step, so a reader never sees the count without the message
            if counter:
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)
            self.stats.errors = [*self.stats.errors[-9:], f"{type(exc).__name__}: {exc}"]

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                setattr(self.stats, name, getattr(self.stats, name) + d)

    def _call_source(
        self, sock: socket.socket, deadline: Deadline, fn: Callable[..., T], lease_id: str, *args: Any
    ) -> T | None:
        """``fn(lease_id, *args)``, or None after telling the client why it failed."""
        try:
            return fn(lease_id, *args)
        except LeaseError as exc:
            self._count(lease_errors=1)
            self._checksums.drop(lease_id)
            sockio.send_msg(sock, wire.Error("lease", str(exc)), deadline)
        except Exception as exc:
            log.exception("kv transfer server: block source failed")
            sockio.send_msg(sock, wire.Error("internal", f"block source failed: {type(exc).__name__}: {exc}"), deadline)
        return None

    # -- fetch ------------------------------------------------------------------------------

    def _fetch(
        self, sock: socket.socket, io: BlockIO, req: wire.FetchRequest, deadline: Deadline, shm_ok: bool, peer: object
    ) -> bool:
        """Serve one fetch; False when the connection must close (a fault was injected)."""
        if req.shm and not shm_ok:
            msg = "shared memory was not offered on this connection; fetch over TCP"
            sockio.send_msg(sock, wire.Error("protocol", msg), deadline)
            return True
        ids = self._call_source(sock, deadline, self.source.resolve, req.lease_id, req.block_indexes)
        if ids is None:
            return True
        # A source may pin the lease while its blocks are read (so an expiry mid-send cannot
        # hand them to another request); ``end`` unpins, whatever happens to the send, and for
        # shared memory whatever the client does (done, hang-up, or silence past io_timeout_s).
        end = getattr(self.source, "end", None)
        try:
            ids = [int(b) for b in ids]
            if len(ids) != len(req.block_indexes) or any(not 0 <= b < io.num_blocks for b in ids):
                log.error("kv transfer server: block source resolved %s to invalid block ids", req.lease_id)
                sockio.send_msg(sock, wire.Error("internal", "block source returned invalid block ids"), deadline)
                return True
            sums = self._lease_checksums(io, req.lease_id, ids)
            if req.shm:
                return self._lend_shared(sock, ids, sums, deadline, peer)
            return self._send_blocks(sock, io, ids, sums, deadline)
        finally:
            if end is not None:
                end(req.lease_id)

    def _lease_checksums(self, io: BlockIO, lease_id: str, ids: list[int]) -> list[int]:
        sums = self._checksums.get(lease_id, ids)
        missing = [p for p, s in enumerate(sums) if s is None]
        if missing:
            missing_ids = [ids[p] for p in missing]
            computed = [checksum(v) for chunk in io.read(missing_ids) for v in chunk.blocks]
            self._checksums.put(lease_id, missing_ids, computed)
            for p, s in zip(missing, computed):
                sums[p] = s
        return sums  # type: ignore[return-value]  # every None was filled

    def _lend_shared(
        self, sock: socket.socket, ids: list[int], sums: list[int], deadline: Deadline, peer: object
    ) -> bool:
        """Name the blocks in the shared tensor and hold the pin until the client has copied them."""
        faults = self.faults
        if faults is not None:
            k = faults.corrupt_block_index
            if k is not None and 0 <= k < len(sums):
                sums = [*sums[:k], sums[k] ^ 1, *sums[k + 1 :]]  # what the client sees of a corrupt block
            if faults.stall_after_bytes is not None or faults.close_after_bytes is not None:
                self._stall_or_close(sock, faults)
                return False
        sockio.send_msg(sock, wire.ShmBlocks(ids, sums), deadline)
        wait = Deadline(self.io_timeout_s, f"waiting for {peer} to copy {len(ids)} shared blocks")
        done = sockio.recv_msg(sock, wait)
        if not isinstance(done, wire.ShmDone):
            raise ProtocolError(f"expected shm_done after shm_blocks, got {type(done).__name__}")
        self._count(fetches=1, shm_fetches=1, blocks_sent=len(ids), bytes_sent=len(ids) * self._block_bytes)
        return True

    def _send_blocks(
        self, sock: socket.socket, io: BlockIO, ids: list[int], sums: list[int], deadline: Deadline
    ) -> bool:
        sockio.send_msg(sock, wire.BlocksHeader(io.block_bytes, sums), deadline)
        faults = self.faults
        if faults is not None:
            return self._send_faulty(sock, io, ids, deadline, faults)
        for chunk in io.read(ids):
            sockio.send_all(sock, chunk.iov, deadline)
        self._count(fetches=1, blocks_sent=len(ids), bytes_sent=len(ids) * io.block_bytes)
        return True

    def _send_faulty(
        self, sock: socket.socket, io: BlockIO, ids: list[int], deadline: Deadline, faults: Faults
    ) -> bool:
        limit = faults.stall_after_bytes if faults.stall_after_bytes is not None else faults.close_after_bytes
        sent = 0
        for chunk in io.read(ids):
            iov: list[memoryview] = list(chunk.blocks)
            k = (faults.corrupt_block_index if faults.corrupt_block_index is not None else -1) - chunk.start
            if 0 <= k < len(iov):
                bad = bytearray(iov[k])  # a copy: the source block stays intact
                bad[len(bad) // 2] ^= 0xFF
                iov[k] = memoryview(bad)
            if limit is not None:
                iov = _first_bytes(iov, limit - sent)
            sockio.send_all(sock, iov, deadline)
            sent += sum(len(v) for v in iov)
            if limit is not None and sent >= limit:
                self._stall_or_close(sock, faults)
                return False
        return True

    def _stall_or_close(self, sock: socket.socket, faults: Faults) -> None:
        """Leave the client waiting (stall) or just return (the caller drops the connection)."""
        if faults.stall_after_bytes is not None:
            while not self._stopping.is_set() and not select.select([sock], [], [], 0.05)[0]:
                pass  # until the client hangs up (readable at EOF) or the server stops


def _first_bytes(iov: list[memoryview], n: int) -> list[memoryview]:
    out: list[memoryview] = []
    for v in iov:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(out[-1])
    return out
