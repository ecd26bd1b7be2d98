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


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, ptr, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    lib.paged_decode.argtypes = [ptr, i32, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64,
                                 i64, f32, i64]
    lib.paged_decode.restype = ctypes.c_int
    lib.write_kv.argtypes = [ptr, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, i64, i64]
    lib.write_kv.restype = None


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None if it cannot be built."""
    return native.load_library(_SRC, _declare)


# The cache dtypes the kernel reads; it computes in float32 for both.
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _rows_of(t: torch.Tensor, what: str) -> int:
    """The row stride of ``[T, heads, D]`` whose heads are dense within a row (a view of a
    fused projection's output qualifies); ValueError otherwise."""
    if t.dim() != 3 or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
        raise ValueError(f"the C decode kernel takes {what} as [T, heads, D] with dense rows")
    return t.stride(0)


class PagedDecodeKernel:
    """Runs the C kernel over a batch of decode queries on PyTorch's threads."""

    def __init__(self, lib: ctypes.CDLL, kv_cache: torch.Tensor) -> None:
        if kv_cache.dtype not in KERNEL_DTYPES or kv_cache.device.type != "cpu" or not kv_cache.is_contiguous():
            raise ValueError("the C decode kernel needs a contiguous float32 or bfloat16 CPU KV cache")
        self.lib = lib
        self.kv_cache = kv_cache
        self.num_layers, _, self.block_size, self.num_kv_heads, self.head_dim = kv_cache.shape[1:]
        self._bf16 = int(kv_cache.dtype == torch.bfloat16)

    def __call__(self, layer: int, q: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, tables: torch.Tensor,
                 ctx_lens: torch.Tensor) -> None:
        """Attend ``q[rows[i]]`` over sequence ``i``'s blocks into ``out[rows[i]]``. ``q`` and
        ``out``: ``[T, heads, D]`` in the cache's dtype, rows dense (``q`` may be a view of the
        fused projection); ``rows``, ``ctx_lens``: ``[B]`` int64; ``tables``: ``[B,
        max_blocks]`` int64. Runs on as many threads as torch uses now."""
        if q.dtype != self.kv_cache.dtype or out.dtype != q.dtype or q.shape != out.shape:
            raise ValueError("the C decode kernel takes q and out of the cache's dtype and one shape")
        rc = self.lib.paged_decode(
            self.kv_cache.data_ptr(), self._bf16, q.data_ptr(), _rows_of(q, "q"), out.data_ptr(), _rows_of(out, "out"),
            rows.data_ptr(), tables.data_ptr(), tables.shape[1], ctx_lens.data_ptr(), rows.shape[0], layer,
            self.num_layers, self.block_size, q.shape[1], self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("the C decode kernel could not allocate its scores buffer")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """Store ``k[t]``/``v[t]`` (``[T, kv_heads, D]``, rows dense) at slot ``offsets[t]`` of
        block ``blocks[t]`` of ``layer`` (both ``[T]`` int64)."""
        if k.dtype != self.kv_cache.dtype or v.dtype != k.dtype or k.shape[1:] != self.kv_cache.shape[-2:]:
            raise ValueError("write_kv takes k and v of the cache's dtype and head shape")
        self.lib.write_kv(
            self.kv_cache.data_ptr(), k.data_ptr(), _rows_of(k, "k"), v.data_ptr(), _rows_of(v, "v"),
            blocks.data_ptr(), offsets.data_ptr(), k.shape[0], layer, self.num_layers, self.block_size,
            self.num_kv_heads * self.head_dim, self.kv_cache.element_size(),
        )
