"""The stored form of one KV block, shared by the tiers that keep blocks outside this process
(a disk tier's files, a remote tier's values): a small header that names the block, then its
raw bytes.

Format (version 1)::

    offset 0   "KVBT" | u16 format version | u16 header length n | u32 payload offset P  (little-endian)
    offset 12  n bytes: msgpack array [block hash, layout id, model fingerprint,
               payload length, XXH3-64 of the payload, parent hash or nil, token ids]
    ...        zero padding up to P
    offset P   the payload: exactly ``payload length`` raw bytes of the block

A disk tier pads P to whole pages (every file has one size, and the payload maps to whole
page-cache pages); a remote value has no padding (P = 12 + n). A reader rejects any other
version, and any header that does not name the block, model and layout it expects: a block of
another model, layout or size is refused, never loaded.
"""

from __future__ import annotations

import struct

import msgspec

from kvbaton.kv.hashing import HASH_BYTES, BlockHash
from kvbaton.kv.store.base import BlockMeta

MAGIC = b"KVBT"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<4sHHI")  # magic, format version, header length, payload offset


class BlockHeader(msgspec.Struct, array_like=True, frozen=True):
    """What the header says about the block that follows it."""

    block_hash: bytes
    layout_id: str
    model_fingerprint: str
    payload_len: int
    checksum: int
    parent: bytes | None
    token_ids: tuple[int, ...]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(BlockHeader)


class BlockFormat:
    """Encodes and checks the headers of one model's blocks of ``block_bytes`` each
    (``block_size`` tokens, KV layout ``layout_id``). ``payload_offset``: a fixed, padded
    offset (a disk tier's); None puts the payload right after the header."""

    def __init__(self, layout_id: str, model_fingerprint: str, block_bytes: int, block_size: int,
                 payload_offset: int | None = None) -> None:
        self.layout_id = layout_id
        self.model_fingerprint = model_fingerprint
        self.block_bytes = block_bytes
        self.block_size = block_size
        self.payload_offset = payload_offset

    def widest_header(self) -> int:
        """Bytes of the largest prefix + header this format can write (every field at its widest)."""
        widest = BlockHeader(b"\xff" * HASH_BYTES, self.layout_id, self.model_fingerprint, self.block_bytes,
                             2**64 - 1, b"\xff" * HASH_BYTES, (2**64 - 1,) * self.block_size)
        return PREFIX.size + len(_encoder.encode(widest))

    def encode(self, h: BlockHash, meta: BlockMeta, payload_checksum: int) -> bytes:
        """The prefix and header (and padding up to a fixed payload offset) of block ``h``."""
        body = _encoder.encode(BlockHeader(h, self.layout_id, self.model_fingerprint, self.block_bytes,
                                           payload_checksum, meta.parent, tuple(meta.token_ids)))
        offset = PREFIX.size + len(body) if self.payload_offset is None else self.payload_offset
        if PREFIX.size + len(body) > offset:
            raise ValueError(f"block {h.hex()}'s header does not fit ({len(meta.token_ids)} token ids)")
        return PREFIX.pack(MAGIC, FORMAT_VERSION, len(body), offset) + body + bytes(offset - PREFIX.size - len(body))

    def parse(self, buf: bytes | bytearray | memoryview, h: BlockHash) -> tuple[BlockHeader, int] | None:
        """(header, payload offset) if ``buf`` starts with one of ours naming block ``h`` of this
        model, layout and size; None otherwise. The payload itself is not checked here."""
        if len(buf) < PREFIX.size:
            return None
        magic, version, n, offset = PREFIX.unpack_from(buf, 0)
        if magic != MAGIC or version != FORMAT_VERSION or PREFIX.size + n > min(len(buf), offset):
            return None
        if self.payload_offset is not None and offset != self.payload_offset:
            return None
        try:
            header = _decoder.decode(memoryview(buf)[PREFIX.size : PREFIX.size + n])
        except msgspec.DecodeError:
            return None
        if (header.block_hash != h or header.layout_id != self.layout_id
                or header.model_fingerprint != self.model_fingerprint or header.payload_len != self.block_bytes
                or len(header.token_ids) > self.block_size
                or (header.parent is not None and len(header.parent) != HASH_BYTES)):
            return None
        return header, offset
