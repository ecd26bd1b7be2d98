"""The host tier: a preallocated buffer of whole KV blocks in host memory.

One ``[capacity, block_bytes]`` uint8 tensor, allocated once at startup, so the tier never
fragments and never allocates on the serving path; a block's slot is its row. With a CUDA
device the buffer is page-locked (pinned), so device <-> host copies run asynchronously on a
side stream at full PCIe speed; on a CPU device it is ordinary memory and a copy is a memcpy
on the store's IO thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from kvbaton.kv.hashing import BlockHash
from kvbaton.kv.store.base import BlockDirectory, KVTier, LoadPlan, StorePlan, copy_rows
from kvbaton.kv.store.policies import EvictionPolicy

HOST_MEDIUM = "CPU_TIER"


class HostTier(KVTier):
    """Whole blocks in one preallocated host buffer (see the module docstring)."""

    name = "host"
    medium = HOST_MEDIUM

    def __init__(self, capacity_blocks: int, block_bytes: int, block_size: int,
                 policy: EvictionPolicy[BlockHash], ttl_s: float = 0.0, pin_memory: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity_blocks < 1:
            raise ValueError("the host tier needs at least one block of capacity")
        super().__init__(BlockDirectory(capacity_blocks, policy, block_size, self.medium, ttl_s, clock), block_bytes)
        # torch.empty touches no page: memory is committed as blocks are first written.
        self.rows = torch.empty((capacity_blocks, block_bytes), dtype=torch.uint8, pin_memory=pin_memory)

    @property
    def nbytes(self) -> int:
        return self.rows.numel()

    def write(self, plan: StorePlan, rows: torch.Tensor, row_ids: Sequence[int]) -> None:
        copy_rows(self.rows, plan.slots, rows, row_ids)

    def read(self, plan: LoadPlan, rows: torch.Tensor, row_ids: Sequence[int]) -> list[BlockHash]:
        # Host memory does not corrupt blocks between a write and a read the way a file can
        # (torn writes, another process): nothing to validate.
        copy_rows(rows, row_ids, self.rows, plan.slots)
        return []
