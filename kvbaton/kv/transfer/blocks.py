"""Host-memory access to a KV tensor's blocks for socket I/O: direct views on CPU, staged on CUDA.

On CPU the views alias the tensor, so ``sendmsg`` reads the source blocks and ``recvmsg_into``
writes the destination blocks with no copy in Python. On CUDA, blocks go through a pinned host
buffer in chunks (device<->pinned copies on a side stream, synchronized before the bytes are
used), which keeps the path simple; it is not overlapped with the socket I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from kvbaton.kv.codec import host_bytes
from kvbaton.kv.spec import KVSpec

DEFAULT_STAGING_BYTES = 32 * 1024 * 1024


def contiguous_runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(position, length)`` of each maximal run with ``ids[p + k] == ids[p] + k``.

    One run is one contiguous byte range, so it costs one iovec instead of one per block.
    """
    runs: list[tuple[int, int]] = []
    start = 0
    for p in range(1, len(ids) + 1):
        if p == len(ids) or ids[p] != ids[p - 1] + 1:
            runs.append((start, p - start))
            start = p
    return runs


def check_kv(kv: torch.Tensor, spec: KVSpec, what: str) -> None:
    """ValueError naming ``what`` unless ``kv`` is a contiguous block-first tensor of ``spec``."""
    if tuple(kv.shape[1:]) != spec.block_shape() or kv.dtype != spec.torch_dtype:
        raise ValueError(
            f"{what} has shape {tuple(kv.shape)} and dtype {kv.dtype}; the KVSpec needs "
            f"[num_blocks, *{spec.block_shape()}] of {spec.torch_dtype}"
        )
    if not kv.is_contiguous():
        raise ValueError(f"{what} must be contiguous")


@dataclass
class Chunk:
    """Consecutive blocks ``start .. start + len(blocks)`` of one request, as host memory."""

    start: int
    blocks: list[memoryview]  # one view per block, for checksums
    iov: list[memoryview]  # the same bytes merged into contiguous runs, for the socket call


class BlockIO:
    """Byte access to the blocks of one block-first KV tensor (CPU or CUDA).

    Not thread-safe on CUDA (one staging buffer): use one instance per connection.
    """

    def __init__(
        self,
        kv: torch.Tensor,
        spec: KVSpec,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        staging: torch.Tensor | None = None,
    ) -> None:
        """``staging``: a pinned uint8 buffer from an earlier BlockIO of the same spec to reuse
        (pinning is slow); one of ``staging_bytes`` is pinned on first use otherwise."""
        check_kv(kv, spec, "the KV tensor")
        self.kv = kv
        self.num_blocks = kv.shape[0]
        self.block_bytes = spec.bytes_per_block
        self.on_cuda = kv.device.type == "cuda"
        self._staging_blocks = max(1, staging_bytes // self.block_bytes)
        self._mv = None if self.on_cuda else host_bytes(kv)
        self.staging: torch.Tensor | None = None
        self._staging_mv: memoryview | None = None
        self._stream: torch.cuda.Stream | None = None
        if staging is not None and self.on_cuda:
            self._staging_blocks = staging.numel() // self.block_bytes
            self.staging = staging.reshape(-1)[: self._staging_blocks * self.block_bytes].view(
                self._staging_blocks, self.block_bytes
            )
            self._staging_mv = host_bytes(self.staging)

    def read(self, block_ids: Sequence[int]) -> Iterator[Chunk]:
        """Chunks holding the bytes of ``kv[block_ids]``, in order."""
        if self._mv is not None:  # on CPU
            yield self._direct(self._mv, 0, block_ids)
            return
        rows = self.kv.view(torch.uint8).view(self.num_blocks, self.block_bytes)
        for start in range(0, len(block_ids), self._staging_blocks):
            ids = block_ids[start : start + self._staging_blocks]
            staging, staging_mv, stream = self._ensure_staging()
            with torch.cuda.stream(stream):
                for p, n in contiguous_runs(ids):
                    staging[p : p + n].copy_(rows[ids[p] : ids[p] + n], non_blocking=True)
            stream.synchronize()
            yield self._staged(staging_mv, start, len(ids))

    def write(self, block_ids: Sequence[int]) -> Iterator[Chunk]:
        """Chunks to fill with the bytes destined for ``kv[block_ids]``, in order.

        On CUDA a chunk reaches the tensor when the next one is requested, so exhaust the
        iterator; stopping early (a failed fetch) leaves the rest unwritten.
        """
        if self._mv is not None:  # on CPU
            yield self._direct(self._mv, 0, block_ids)
            return
        rows = self.kv.view(torch.uint8).view(self.num_blocks, self.block_bytes)
        for start in range(0, len(block_ids), self._staging_blocks):
            ids = block_ids[start : start + self._staging_blocks]
            staging, staging_mv, stream = self._ensure_staging()
            yield self._staged(staging_mv, start, len(ids))
            with torch.cuda.stream(stream):
                for p, n in contiguous_runs(ids):
                    rows[ids[p] : ids[p] + n].copy_(staging[p : p + n], non_blocking=True)
            stream.synchronize()  # before the staging buffer is overwritten

    def _direct(self, mv: memoryview, start: int, block_ids: Sequence[int]) -> Chunk:
        bb = self.block_bytes
        blocks = [mv[b * bb : (b + 1) * bb] for b in block_ids]
        iov = [mv[block_ids[p] * bb : (block_ids[p] + n) * bb] for p, n in contiguous_runs(block_ids)]
        return Chunk(start, blocks, iov)

    def _staged(self, mv: memoryview, start: int, count: int) -> Chunk:
        bb = self.block_bytes
        blocks = [mv[i * bb : (i + 1) * bb] for i in range(count)]
        return Chunk(start, blocks, [mv[: count * bb]])

    def _ensure_staging(self) -> tuple[torch.Tensor, memoryview, torch.cuda.Stream]:
        """The pinned staging buffer, a byte view of it, and the side stream (made on first use)."""
        if self.staging is None or self._staging_mv is None:  # both set together
            self.staging = torch.empty(
                (self._staging_blocks, self.block_bytes), dtype=torch.uint8, pin_memory=True
            )
            self._staging_mv = host_bytes(self.staging)
        if self._stream is None:
            # torch.cuda.Stream.__new__ has no annotations.
            self._stream = torch.cuda.Stream(device=self.kv.device)  # type: ignore[no-untyped-call]
        return self.staging, self._staging_mv, self._stream
