"""Block codec: raw byte views of KV blocks and their per-block checksums.

A block of the block-first layout is one contiguous byte range, so its wire form is simply its
bytes; this module gives zero-copy views of them and the checksum both ends of a transfer agree
on. CRC-32 (zlib) is the checksum: in the standard library, strong against the corruptions a
data plane can introduce (flipped bits, shifted or truncated data, the wrong block), and it
releases the GIL on large buffers.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

CHECKSUM_ALGORITHM = "crc32"


def host_bytes(kv: torch.Tensor) -> memoryview:
    """A flat, writable uint8 memoryview over a contiguous CPU tensor's memory (any dtype; no copy).

    Viewing as uint8 first is what makes bfloat16 work: numpy has no bfloat16. Keep ``kv``
    alive while the view is in use.
    """
    if kv.device.type != "cpu":
        raise ValueError(f"host_bytes needs a CPU tensor, got one on {kv.device}")
    if not kv.is_contiguous():
        raise ValueError("host_bytes needs a contiguous tensor")
    return memoryview(kv.view(torch.uint8).reshape(-1).numpy())


def checksum(data: memoryview | bytes) -> int:
    """The checksum of one block's bytes (CRC-32, unsigned)."""
    return zlib.crc32(data)


def block_checksums(kv: torch.Tensor, block_ids: Sequence[int]) -> list[int]:
    """Checksums of whole blocks ``kv[block_ids]`` of a CPU block-first KV tensor.

    For a lease, call this once when the lease is created (its blocks are immutable while it is
    held) and hand the result to the transfer server, so sends pay no checksum cost.
    """
    mv = host_bytes(kv)
    bpb = len(mv) // kv.shape[0]
    return [checksum(mv[b * bpb : (b + 1) * bpb]) for b in block_ids]
