"""Every message of the TCP transfer protocol, as msgspec Structs (msgpack on the wire, never pickle).

A connection carries length-prefixed frames: 4 bytes big-endian length, then one msgpack-encoded
message. Block bytes never go through msgpack: a :class:`BlocksHeader` frame is followed directly
by ``len(checksums) * block_bytes`` raw bytes, the blocks in request order.

Conversation::

    client                                   server
    Hello(spec, fingerprint, nonce, auth) ->
                                          <- Welcome(nonce, proof)     | Error(spec|auth|protocol)
    Proof(proof)                          ->                           (only when a secret is set)
                                          <- Ready                     | Error(auth)
    then any number of requests:
    FetchRequest(lease_id, block_indexes) ->
                                          <- BlocksHeader + raw bytes  | Error(lease|...)
    FetchRequest(..., shm=True)           ->                           (only after a ShmOffer)
                                          <- ShmBlocks(block_ids, checksums) | Error(...)
    ShmDone                               ->                           (no reply; unpins the lease)
    ReleaseRequest(lease_id)              ->
                                          <- ReleaseReply(released)    | Error(...)

Same-host shared memory: a client that sends its ``host_id`` in Hello may get a
:class:`ShmOffer` in Ready (sent only after authentication) naming the file in /dev/shm that
holds the server's KV tensor. It then asks for fetches with ``shm=True``: the server resolves
and pins the lease and answers with the blocks' ids in that tensor; the client copies them out
of its read-only mapping, verifies the checksums, and sends ``ShmDone``, which unpins.
"""

from __future__ import annotations

import struct

import msgspec

from kvbaton.kv.spec import KVSpec

PROTOCOL_VERSION = 1
# Frames before authentication are small; a peer that announces more is refused before any
# allocation. After the handshake a fetch request may list many block indexes.
MAX_HANDSHAKE_FRAME = 64 * 1024
MAX_FRAME = 16 * 1024 * 1024
FRAME_PREFIX = struct.Struct("!I")


class SpecMsg(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A :class:`KVSpec` on the wire; compared field by field at the handshake."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int

    @classmethod
    def of(cls, spec: KVSpec) -> SpecMsg:
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.dtype, spec.block_size)


class Hello(msgspec.Struct, tag="hello", frozen=True):
    """Client's opening: what it will read, who it is, and a fresh nonce for the HMAC proofs."""

    version: int
    spec: SpecMsg
    fingerprint: str
    checksum: str
    nonce: bytes
    auth: bool  # the client holds a shared secret and expects the server to prove it holds it too
    host_id: str | None = None  # set when the client would read the server's KV through shared memory


class Welcome(msgspec.Struct, tag="welcome", frozen=True):
    """Server accepts the spec; ``proof`` is its HMAC over the handshake when it holds a secret."""

    nonce: bytes
    proof: bytes | None = None


class Proof(msgspec.Struct, tag="proof", frozen=True):
    """Client's HMAC over the handshake (sent only when both sides hold a secret)."""

    proof: bytes


class ShmOffer(msgspec.Struct, frozen=True):
    """Where the server's KV tensor lies in shared memory: ``num_blocks`` rows of ``block_bytes``
    at ``offset`` in the file ``path`` (``size`` bytes, identified by ``dev``/``ino``) on host
    ``host_id``."""

    host_id: str
    path: str
    size: int
    dev: int
    ino: int
    offset: int
    num_blocks: int
    block_bytes: int


class Ready(msgspec.Struct, tag="ready", frozen=True):
    """Handshake complete: requests may follow. ``shm`` is set only for a client on this host."""

    shm: ShmOffer | None = None


class FetchRequest(msgspec.Struct, tag="fetch", frozen=True):
    """Send the blocks at these lease-relative indexes, in this order."""

    lease_id: str
    block_indexes: list[int]
    shm: bool = False  # answer with ShmBlocks: the client reads the bytes from the shared mapping


class BlocksHeader(msgspec.Struct, tag="blocks", frozen=True):
    """Precedes the raw block bytes; one checksum per block, in request order."""

    block_bytes: int
    checksums: list[int]


class ShmBlocks(msgspec.Struct, tag="shm_blocks", frozen=True):
    """Reply to a shm fetch: the blocks' rows in the offered tensor and their checksums, in
    request order. The lease stays pinned until the client's :class:`ShmDone`."""

    block_ids: list[int]
    checksums: list[int]


class ShmDone(msgspec.Struct, tag="shm_done", frozen=True):
    """The client has copied (or given up on) the blocks of its last shm fetch."""


class ReleaseRequest(msgspec.Struct, tag="release", frozen=True):
    """The client is done with the lease: its blocks may be freed."""

    lease_id: str


class ReleaseReply(msgspec.Struct, tag="released", frozen=True):
    released: bool  # False when the lease was already released or had expired


class Error(msgspec.Struct, tag="error", frozen=True):
    """A refused handshake or request; ``kind`` picks the client's exception class."""

    kind: str  # "spec" | "auth" | "lease" | "protocol" | "internal"
    message: str


Message = (
    Hello | Welcome | Proof | Ready | FetchRequest | BlocksHeader | ShmBlocks | ShmDone
    | ReleaseRequest | ReleaseReply | Error
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode_frame(msg: Message) -> bytes:
    """Length prefix + msgpack body of one message."""
    body = _encoder.encode(msg)
    return FRAME_PREFIX.pack(len(body)) + body


def decode(body: bytes | bytearray | memoryview) -> Message:
    """One message body; raises msgspec.DecodeError / ValidationError on anything else."""
    return _decoder.decode(body)


def handshake_transcript(
    role: bytes, client_nonce: bytes, server_nonce: bytes, spec: SpecMsg, fingerprint: str
) -> bytes:
    """The bytes each side MACs: role-labelled so one side's proof can never be replayed as the other's."""
    return _encoder.encode((b"kvbaton-transfer-v1", role, client_nonce, server_nonce, spec, fingerprint))
