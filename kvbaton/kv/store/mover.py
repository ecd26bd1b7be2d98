"""Moving block bytes between the device KV cache and a tier, on the store's IO thread.

The device cache is seen as ``rows``: ``[num_blocks, block_bytes]`` uint8, one row per block
(the block-first layout makes a block one contiguous byte range). On a CPU device the tiers
read and write those rows directly. On CUDA, copies to and from the (pinned) host tier run on
a side stream, so they overlap the model's kernels on the default stream; a tier that can only
take host memory (the disk) goes through a pinned staging buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from kvbaton.kv.hashing import BlockHash
from kvbaton.kv.store.base import KVTier, LoadPlan, StorePlan, copy_rows
from kvbaton.kv.store.host import HostTier

# Staging rows the CUDA path allocates (pinned) for tiers that need host memory.
STAGING_BLOCKS = 64


class BlockReader(Protocol):
    """What a load reads from: a tier, or one load's view of the remote tier."""

    def read(self, plan: LoadPlan, rows: torch.Tensor, row_ids: Sequence[int]) -> list[BlockHash]: ...


def kv_rows(kv_cache: torch.Tensor) -> torch.Tensor:
    """The device cache as ``[num_blocks, block_bytes]`` uint8 rows (a view, no copy)."""
    return kv_cache.view(torch.uint8).view(kv_cache.shape[0], -1)


class BlockMover:
    """Copies between ``rows`` (the device cache) and tiers; IO thread only."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows
        self.on_cuda = rows.device.type == "cuda"
        self._stream: torch.cuda.Stream | None = None
        self._staging: torch.Tensor | None = None

    def load(self, tier: BlockReader, plan: LoadPlan, dst_ids: Sequence[int]) -> list[BlockHash]:
        """Fill device rows ``dst_ids`` from the tier; returns the hashes that failed
        validation (their rows hold garbage). On CUDA a reader other than the host tier fills
        pinned staging rows, copied up in chunks."""
        if not self.on_cuda:
            return tier.read(plan, self.rows, dst_ids)
        if isinstance(tier, HostTier):
            with torch.cuda.stream(self._side_stream()):
                bad = tier.read(plan, self.rows, dst_ids)
            self._side_stream().synchronize()
            return bad
        bad_all: list[BlockHash] = []
        staging = self._staging_rows()
        for start in range(0, len(dst_ids), STAGING_BLOCKS):
            part = LoadPlan(plan.hashes[start : start + STAGING_BLOCKS], plan.slots[start : start + STAGING_BLOCKS])
            n = len(part.hashes)
            bad_all += tier.read(part, staging, range(n))
            with torch.cuda.stream(self._side_stream()):
                copy_rows(self.rows, dst_ids[start : start + n], staging, range(n))
            self._side_stream().synchronize()  # before the staging rows are reused
        return bad_all

    def store(self, tier: KVTier, plan: StorePlan, src_ids: Sequence[int]) -> None:
        """Write device rows ``src_ids`` into the tier as ``plan.hashes``."""
        if not self.on_cuda:
            tier.write(plan, self.rows, src_ids)
            return
        if isinstance(tier, HostTier):
            with torch.cuda.stream(self._side_stream()):
                tier.write(plan, self.rows, src_ids)
            self._side_stream().synchronize()
            return
        staging = self._staging_rows()
        for start in range(0, len(src_ids), STAGING_BLOCKS):
            ids = src_ids[start : start + STAGING_BLOCKS]
            n = len(ids)
            with torch.cuda.stream(self._side_stream()):
                copy_rows(staging, range(n), self.rows, ids)
            self._side_stream().synchronize()
            part = StorePlan(plan.hashes[start : start + n], plan.slots[start : start + n],
                             plan.metas[start : start + n])
            try:
                tier.write(part, staging, range(n))
            except Exception:
                # The caller drops the whole plan: what earlier parts wrote must go too.
                tier.removed(plan.hashes[:start])
                raise

    def _side_stream(self) -> torch.cuda.Stream:
        # No wait on the default stream is needed: jobs are submitted between steps, and a
        # step ends with a host sync (sampling reads its tokens), so every kernel that wrote a
        # stored block or last read a refilled one has finished. Loads and stores then overlap
        # the next step's kernels.
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.rows.device)  # type: ignore[no-untyped-call]
        return self._stream

    def _staging_rows(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty((STAGING_BLOCKS, self.rows.shape[1]), dtype=torch.uint8, pin_memory=True)
        return self._staging
