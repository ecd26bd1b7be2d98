"""Socket I/O with deadlines: scatter/gather sends and receives, and msgspec frames.

Sockets stay in blocking mode with kernel timeouts (SO_SNDTIMEO / SO_RCVTIMEO) re-armed to the
time left before each call. That lets one ``recvmsg_into(..., MSG_WAITALL)`` fill many
destination blocks in a single syscall while still never waiting past the deadline: Python's
own socket timeouts would switch the socket to non-blocking mode, where MSG_WAITALL is ignored
and every few hundred KiB costs a poll and a recv.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Sequence

import msgspec

from kvbaton.kv.transfer import wire
from kvbaton.kv.transfer.transport import PeerClosed, ProtocolError, TransferError, TransferTimeout

try:
    IOV_MAX = int(os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):
    IOV_MAX = 1024
_TIMEVAL = struct.Struct("ll")
_MIN_WAIT_S = 0.001  # a zero timeval means "wait forever" to the kernel


class Deadline:
    """An absolute point in monotonic time that every socket call of one exchange respects."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        """Seconds left; raises TransferTimeout once the deadline has passed."""
        left = self.at - time.monotonic()
        if left <= 0:
            raise TransferTimeout(f"{self.what}: no completion within {self.seconds:g}s")
        return left


def configure(sock: socket.socket) -> None:
    """Blocking mode (kernel timeouts) and no Nagle delay on a connected socket."""
    sock.settimeout(None)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _set_buffers(sock: socket.socket, buffer_bytes: int | None) -> None:
    """Fixed kernel buffer sizes (None keeps Linux's autotuning)."""
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


def _arm(sock: socket.socket, option: int, deadline: Deadline) -> None:
    left = max(deadline.remaining(), _MIN_WAIT_S)
    sec = int(left)
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(sec, int((left - sec) * 1e6)))


def _advance(iov: list[memoryview], i: int, n: int) -> int:
    """Consume ``n`` bytes from ``iov[i:]`` (slicing the first partly-done view); the new index."""
    while n > 0:
        if n >= len(iov[i]):
            n -= len(iov[i])
            i += 1
        else:
            iov[i] = iov[i][n:]
            n = 0
    return i


def _closed(deadline: Deadline, exc: OSError | None = None) -> PeerClosed:
    detail = f": {exc}" if exc else ""
    return PeerClosed(f"{deadline.what}: connection closed by peer{detail}")


def send_all(sock: socket.socket, buffers: Sequence[memoryview | bytes], deadline: Deadline) -> None:
    """Send every byte of ``buffers`` in as few ``sendmsg`` calls as the kernel allows."""
    iov = [memoryview(b) for b in buffers if len(b)]
    i = 0
    while i < len(iov):
        _arm(sock, socket.SO_SNDTIMEO, deadline)
        try:
            n = sock.sendmsg(iov[i : i + IOV_MAX])
        except (BlockingIOError, TimeoutError):
            deadline.remaining()
            raise TransferTimeout(f"{deadline.what}: peer stopped reading") from None
        except OSError as exc:
            raise _closed(deadline, exc) from None
        i = _advance(iov, i, n)


def recv_all(sock: socket.socket, buffers: Sequence[memoryview | bytearray], deadline: Deadline) -> None:
    """Fill every byte of ``buffers`` from the socket (scatter receive, MSG_WAITALL)."""
    iov = [memoryview(b) for b in buffers if len(b)]
    i = 0
    while i < len(iov):
        _arm(sock, socket.SO_RCVTIMEO, deadline)
        try:
            n = sock.recvmsg_into(iov[i : i + IOV_MAX], 0, socket.MSG_WAITALL)[0]
        except (BlockingIOError, TimeoutError):
            deadline.remaining()
            raise TransferTimeout(f"{deadline.what}: peer stopped sending") from None
        except OSError as exc:
            raise _closed(deadline, exc) from None
        if n == 0:
            raise _closed(deadline)
        i = _advance(iov, i, n)


def send_msg(sock: socket.socket, msg: wire.Message, deadline: Deadline, payload: Sequence[memoryview] = ()) -> None:
    """One frame, optionally followed by raw payload bytes in the same ``sendmsg``."""
    send_all(sock, [wire.encode_frame(msg), *payload], deadline)


def recv_msg(sock: socket.socket, deadline: Deadline, max_bytes: int = wire.MAX_FRAME) -> wire.Message:
    """One frame; ProtocolError if it is oversized or not a message of this protocol."""
    prefix = bytearray(wire.FRAME_PREFIX.size)
    recv_all(sock, [prefix], deadline)
    (size,) = wire.FRAME_PREFIX.unpack(prefix)
    if size > max_bytes:
        raise ProtocolError(f"{deadline.what}: frame of {size} bytes exceeds the {max_bytes}-byte limit")
    body = bytearray(size)
    recv_all(sock, [body], deadline)
    try:
        return wire.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"{deadline.what}: malformed message: {exc}") from None


def connect(host: str, port: int, deadline: Deadline, buffer_bytes: int | None) -> socket.socket:
    """A configured TCP connection; TransferTimeout or TransferError if the peer is unreachable.

    Buffer sizes are set before connecting, so the TCP window scale can use them.
    """
    try:
        addrs = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise TransferError(f"cannot resolve {host}:{port}: {exc}") from None
    error: OSError | None = None
    for family, kind, proto, _, addr in addrs:
        sock = socket.socket(family, kind, proto)
        try:
            _set_buffers(sock, buffer_bytes)
            sock.settimeout(deadline.remaining())
            sock.connect(addr)
            configure(sock)
            return sock
        except TimeoutError:
            sock.close()
            raise TransferTimeout(f"connect to {host}:{port}: no answer within {deadline.seconds:g}s") from None
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise TransferError(f"cannot connect to {host}:{port}: {error}")


def listen(host: str, port: int, buffer_bytes: int | None) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one); accepted sockets inherit its buffer sizes.

    (Not ``kvbaton.worker.server.bind_socket``: ``kv`` must not import ``worker``.)
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _set_buffers(sock, buffer_bytes)
        sock.bind((host, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock
