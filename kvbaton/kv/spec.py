"""KVSpec: the shape of one worker's KV cache, which must match on both ends of a transfer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a dtype name (``float32``, ``bfloat16``, ``float16``) to torch; ValueError otherwise."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class KVSpec:
    """Block-first KV layout: ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``.

    One block of one sequence, for all layers, K and V, is one contiguous byte range, so a
    block is the unit of transfer and of storage with no gather.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_size: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def bytes_per_token(self) -> int:
        elem = torch.finfo(self.torch_dtype).bits // 8  # every supported dtype is a float
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * elem

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def block_shape(self) -> tuple[int, ...]:
        """Shape of one block: ``[num_layers, 2, block_size, num_kv_heads, head_dim]``."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def layout_id(self) -> str:
        """A short string that names the layout; part of the block-hash root."""
        return (
            f"blockfirst:L{self.num_layers}:H{self.num_kv_heads}:D{self.head_dim}"
            f":{self.dtype}:B{self.block_size}"
        )

    def allocate(self, num_blocks: int, device: str | torch.device) -> torch.Tensor:
        """A zeroed KV cache tensor for ``num_blocks`` blocks."""
        return torch.zeros((num_blocks, *self.block_shape()), dtype=self.torch_dtype, device=device)
