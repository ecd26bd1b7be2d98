"""The connection handshake: protocol version, KVSpec and model fingerprint checks, and optional
shared-secret authentication.

Authentication is mutual HMAC-SHA256: each side sends a fresh nonce, and each proves it holds
the secret with an HMAC over both nonces, the spec and the fingerprint (role-labelled, compared
in constant time). The client sends its proof before checking the server's, so a wrong secret
is reported as :class:`AuthError` on both ends. It authenticates peers; it does not encrypt.

A shared-memory offer rides on the final Ready, so a server that holds a secret shows where its
KV lies only to peers that proved they hold it too, and only to those on its own host.
"""

from __future__ import annotations

import hmac
import os
import socket
from hashlib import sha256
from typing import TypeVar

from kvbaton.kv.codec import CHECKSUM_ALGORITHM
from kvbaton.kv.transfer import wire
from kvbaton.kv.transfer.sockio import Deadline, recv_msg, send_msg
from kvbaton.kv.transfer.transport import (
    AuthError,
    LeaseError,
    ProtocolError,
    SpecMismatch,
    TransferError,
)

NONCE_BYTES = 32
_ERRORS: dict[str, type[TransferError]] = {
    "spec": SpecMismatch,
    "auth": AuthError,
    "lease": LeaseError,
    "protocol": ProtocolError,
}


def remote_error(err: wire.Error) -> TransferError:
    """The exception a client raises for an :class:`wire.Error` the server sent."""
    return _ERRORS.get(err.kind, TransferError)(f"peer refused: {err.message}")


def _proof(secret: bytes, role: bytes, hello: wire.Hello, server_nonce: bytes) -> bytes:
    transcript = wire.handshake_transcript(role, hello.nonce, server_nonce, hello.spec, hello.fingerprint)
    return hmac.new(secret, transcript, sha256).digest()


def spec_differences(ours: wire.SpecMsg, theirs: wire.SpecMsg) -> list[str]:
    """One ``field (client X, server Y)`` entry per differing KVSpec field."""
    return [
        f"{f} (client {getattr(theirs, f)!r}, server {getattr(ours, f)!r})"
        for f in wire.SpecMsg.__struct_fields__
        if getattr(ours, f) != getattr(theirs, f)
    ]


def _refuse(sock: socket.socket, deadline: Deadline, exc: TransferError, kind: str) -> TransferError:
    """Tell the peer why, then hand back the exception for the server to raise."""
    try:
        send_msg(sock, wire.Error(kind, str(exc)), deadline)
    except TransferError:
        pass  # the peer is gone; our own error is what matters
    return exc


def server_handshake(
    sock: socket.socket,
    spec: wire.SpecMsg,
    fingerprint: str,
    secret: bytes | None,
    deadline: Deadline,
    shm: wire.ShmOffer | None = None,
) -> bool:
    """Accept a client or raise (after telling it why) SpecMismatch, AuthError or ProtocolError.

    ``shm`` is offered to a client that asked from the same host; True when it was."""
    hello = recv_msg(sock, deadline, wire.MAX_HANDSHAKE_FRAME)
    if not isinstance(hello, wire.Hello):
        raise _refuse(sock, deadline, ProtocolError(f"expected hello, got {type(hello).__name__}"), "protocol")
    if hello.version != wire.PROTOCOL_VERSION:
        msg = f"protocol version {hello.version} is not supported (server speaks {wire.PROTOCOL_VERSION})"
        raise _refuse(sock, deadline, ProtocolError(msg), "protocol")
    diffs = spec_differences(spec, hello.spec)
    if diffs:
        raise _refuse(sock, deadline, SpecMismatch("KVSpec mismatch: " + "; ".join(diffs)), "spec")
    if hello.fingerprint != fingerprint:
        msg = f"model fingerprint mismatch (client {hello.fingerprint!r}, server {fingerprint!r})"
        raise _refuse(sock, deadline, SpecMismatch(msg), "spec")
    if hello.checksum != CHECKSUM_ALGORITHM:
        msg = f"checksum {hello.checksum!r} is not supported (server uses {CHECKSUM_ALGORITHM!r})"
        raise _refuse(sock, deadline, ProtocolError(msg), "protocol")
    if hello.auth != (secret is not None):
        msg = (
            "this server requires a shared secret; the client has none"
            if secret is not None
            else "the client expects a shared secret; this server has none"
        )
        raise _refuse(sock, deadline, AuthError(msg), "auth")
    nonce = os.urandom(NONCE_BYTES)
    proof = _proof(secret, b"server", hello, nonce) if secret is not None else None
    send_msg(sock, wire.Welcome(nonce, proof), deadline)
    if secret is not None:
        reply = recv_msg(sock, deadline, wire.MAX_HANDSHAKE_FRAME)
        if not isinstance(reply, wire.Proof):
            raise _refuse(sock, deadline, ProtocolError(f"expected proof, got {type(reply).__name__}"), "protocol")
        if not hmac.compare_digest(reply.proof, _proof(secret, b"client", hello, nonce)):
            raise _refuse(sock, deadline, AuthError("the client's shared-secret proof is wrong"), "auth")
    offered = shm is not None and hello.host_id == shm.host_id
    send_msg(sock, wire.Ready(shm if offered else None), deadline)
    return offered


def client_handshake(
    sock: socket.socket,
    spec: wire.SpecMsg,
    fingerprint: str,
    secret: bytes | None,
    deadline: Deadline,
    host_id: str | None = None,
) -> wire.ShmOffer | None:
    """Open a connection or raise SpecMismatch, AuthError or ProtocolError.

    With ``host_id`` set the client asks for the server's shared-memory offer, returned if made."""
    hello = wire.Hello(
        wire.PROTOCOL_VERSION,
        spec,
        fingerprint,
        CHECKSUM_ALGORITHM,
        os.urandom(NONCE_BYTES),
        secret is not None,
        host_id,
    )
    send_msg(sock, hello, deadline)
    welcome = _expect(recv_msg(sock, deadline, wire.MAX_HANDSHAKE_FRAME), wire.Welcome)
    if secret is not None:
        send_msg(sock, wire.Proof(_proof(secret, b"client", hello, welcome.nonce)), deadline)
        expected = _proof(secret, b"server", hello, welcome.nonce)
        if welcome.proof is None or not hmac.compare_digest(welcome.proof, expected):
            raise AuthError("the server's shared-secret proof is wrong (different secret?)")
    ready = _expect(recv_msg(sock, deadline, wire.MAX_HANDSHAKE_FRAME), wire.Ready)
    return ready.shm if host_id is not None else None


_M = TypeVar("_M")


def _expect(msg: wire.Message, cls: type[_M]) -> _M:
    if isinstance(msg, wire.Error):
        raise remote_error(msg)
    if not isinstance(msg, cls):
        raise ProtocolError(f"expected {cls.__name__.lower()}, got {type(msg).__name__}")
    return msg
