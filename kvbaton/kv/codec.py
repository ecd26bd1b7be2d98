"""Block codec: raw byte views of KV blocks and their per-block checksums.

A block of the block-first layout is one contiguous byte range, so its wire form is simply its
bytes; this module gives zero-copy views of them and the checksum both ends of a transfer agree
on. The checksum is XXH3-64: it catches the corruptions a data plane can introduce (flipped
bits, shifted or truncated data, the wrong block, a block rewritten after it was checksummed),
releases the GIL, and runs at ~60 GB/s on a cache-hot block, against ~4 GB/s for zlib's CRC-32,
which alone held same-host transfers to a fraction of memcpy speed. It is not a MAC: peers are
authenticated by the handshake, not by checksums. Both ends name it in the handshake.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import xxhash

CHECKSUM_ALGORITHM = "xxh3_64"


def host_bytes(kv: torch.Tensor) -> memoryview:
    """A flat, writable uint8 memoryview over a contiguous CPU tensor's memory (any dtype; no copy).

    Viewing as uint8 first is what makes bfloat16 work: numpy has no bfloat16. Keep ``kv``
    alive while the view is in use.
    """
    if kv.device.type != "cpu":
        raise ValueError(f"host_bytes needs a CPU tensor, got one on {kv.device}")
    if not kv.is_contiguous():
        raise ValueError("host_bytes needs a contiguous tensor")
    return kv.view(torch.uint8).reshape(-1).numpy().data  # == memoryview(array), typed as one


def checksum(data: memoryview | bytes | np.ndarray) -> int:
    """The checksum of one block's bytes (XXH3-64, unsigned); any contiguous buffer."""
    # numpy's stubs declare ndarray's buffer protocol (__buffer__) only for Python >= 3.12.
    return xxhash.xxh3_64_intdigest(data)  # type: ignore[arg-type]


def block_checksums(kv: torch.Tensor, block_ids: Sequence[int]) -> list[int]:
    """Checksums of whole blocks ``kv[block_ids]`` of a CPU block-first KV tensor.

    For a lease, call this once when the lease is created (its blocks are immutable while it is
    held) and hand the result to the transfer server, so sends pay no checksum cost.
    """
    mv = host_bytes(kv)
    bpb = len(mv) // kv.shape[0]
    return [checksum(mv[b * bpb : (b + 1) * bpb]) for b in block_ids]
