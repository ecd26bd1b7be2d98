"""Block identity: the hash chain that names every full KV block.

``h_i = H(h_{i-1} || token_ids_i || extra_keys)`` with ``h_{-1}`` a root derived from the model
fingerprint and the request's cache salt. SHA-256 truncated to 128 bits: collision resistance
matters because a collision across tenants would leak one tenant's KV to another. The engine,
the store, the router and the bench all import this one module; nothing uses Python's
``hash()``, which is salted per process.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

BlockHash = bytes
HASH_BYTES = 16
_VERSION = b"kvbaton-block-hash-v1"


def root_hash(model_fingerprint: str, cache_salt: str | None = None) -> BlockHash:
    """The chain's root for one model and one tenant (``cache_salt``; None = shared)."""
    h = hashlib.sha256(_VERSION)
    h.update(model_fingerprint.encode())
    h.update(b"\x00salt\x00" if cache_salt is not None else b"\x00nosalt\x00")
    if cache_salt is not None:
        h.update(cache_salt.encode())
    return h.digest()[:HASH_BYTES]


_PACKERS: dict[int, Callable[..., bytes]] = {}  # token count -> its compiled little-endian u32 packer


def block_hash(
    parent: BlockHash, token_ids: Sequence[int], extra_keys: bytes = b""
) -> BlockHash:
    """Hash of one full block given its parent's hash."""
    # One digest over one buffer, with the packer compiled once per length: this runs for
    # every block of every prompt (a simulated hour hashes millions).
    n = len(token_ids)
    pack = _PACKERS.get(n)
    if pack is None:
        pack = _PACKERS[n] = struct.Struct(f"<{n}I").pack
    data = parent + pack(*token_ids)
    if extra_keys:
        data += b"\x00extra\x00" + extra_keys
    return hashlib.sha256(data).digest()[:HASH_BYTES]


def hash_block_chain(
    root: BlockHash,
    token_ids: Sequence[int],
    block_size: int,
    start_parent: BlockHash | None = None,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids`` from block ``start_block`` on.

    ``start_parent`` is the hash of block ``start_block - 1`` (the root when starting at 0),
    so callers can extend a chain incrementally as a sequence grows.
    """
    parent = root if start_parent is None else start_parent
    out: list[BlockHash] = []
    for b in range(start_block, len(token_ids) // block_size):
        parent = block_hash(parent, token_ids[b * block_size : (b + 1) * block_size])
        out.append(parent)
    return out
