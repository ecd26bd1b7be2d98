"""A C kernel for paged decode attention on the CPU, compiled on first use.

Decode on a CPU is bound by reading the KV cache. Attention through PyTorch ops must first
gather each sequence's blocks into a contiguous tensor (read + write + read again); the kernel
in ``csrc/paged_decode.c`` reads every K/V row once, straight from the block-first cache. It is
plain C built by :mod:`kvbaton.models.native` (the system compiler, on first use), so it adds
no Python dependency; where no compiler is found, the caller falls back to SDPA.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kvbaton.models import native

_SRC = Path(__file__).with_name("csrc") / "paged_decode.c"


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None if it cannot be built."""
    lib = native.load_library(_SRC)
    if lib is not None:
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        for fn in (lib.paged_decode_f32, lib.paged_decode_bf16):
            fn.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, i64, f32, i64]
            fn.restype = ctypes.c_int
    return lib


# The cache dtypes the kernel reads; its queries, scores and outputs are float32 for both.
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


class PagedDecodeKernel:
    """Runs the C kernel over a batch of decode queries on PyTorch's threads."""

    def __init__(self, lib: ctypes.CDLL, kv_cache: torch.Tensor) -> None:
        if kv_cache.dtype not in KERNEL_DTYPES or kv_cache.device.type != "cpu" or not kv_cache.is_contiguous():
            raise ValueError("the C decode kernel needs a contiguous float32 or bfloat16 CPU KV cache")
        self.lib = lib
        self.kv_cache = kv_cache
        self._fn = lib.paged_decode_f32 if kv_cache.dtype == torch.float32 else lib.paged_decode_bf16
        self.num_layers, _, self.block_size, self.num_kv_heads, self.head_dim = kv_cache.shape[1:]

    def __call__(self, layer: int, q: torch.Tensor, tables: torch.Tensor, ctx_lens: torch.Tensor) -> torch.Tensor:
        """``q``: ``[B, heads, D]`` contiguous float32; ``tables``: ``[B, max_blocks]`` int64;
        ``ctx_lens``: ``[B]`` int64. Returns float32 ``[B, heads, D]``. Runs on as many threads
        as torch uses now."""
        if q.dtype != torch.float32 or not q.is_contiguous():
            raise ValueError("the C decode kernel takes contiguous float32 queries")
        out = torch.empty_like(q)
        rc = self._fn(
            self.kv_cache.data_ptr(), q.data_ptr(), out.data_ptr(), tables.data_ptr(), tables.shape[1],
            ctx_lens.data_ptr(), q.shape[0], layer, self.num_layers, self.block_size, q.shape[1],
            self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("the C decode kernel could not allocate its scores buffer")
        return out
