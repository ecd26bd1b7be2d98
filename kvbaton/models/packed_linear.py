"""Linear layers with oneDNN-prepacked weights, for CPU inference.

A CPU decode step is bound by reading the weights: each step streams every matmul's weight
from memory once. PyTorch's ``F.linear`` on a float32 CPU tensor goes to a GEMM that repacks
the weight on every call when the batch has a few rows, so a 4-row decode step reads the
weights at 6-10 GB/s on this project's 2-core machine against 20-33 GB/s for the same product
with the weight reordered once, at load, into oneDNN's blocked layout (measured in
``docs/engine.md``, *Where a step's time goes*). vLLM's CPU backend prepacks its weights the
same way. :func:`pack_linears` swaps a model's ``nn.Linear`` modules for :class:`PackedLinear`
in place; the model code does not change.

The engine packs its model when ``EngineConfig.linear_backend`` (``--linear-backend``) is
``onednn``, or ``auto`` where :func:`onednn_supports` the device and dtype; ``torch`` keeps
``nn.Linear`` as loaded.
"""

from __future__ import annotations

import torch
from torch import nn

# The batch size oneDNN tunes the packed layout for. Decode batches are small; measured over
# 1-256 rows on this machine's layer shapes, 4 was fastest at 1-16 rows and within noise of the
# best at 256 (a prefill chunk), where the GEMM is bound by compute, not by the layout.
PACK_BATCH_HINT = 4


class PackedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` reordered once into oneDNN's blocked layout.

    Holds no ``nn.Parameter``: the packed weight is an opaque oneDNN tensor that can only be
    multiplied, so a packed model is for inference and cannot be trained, saved or moved to
    another device (pack after loading, on the device it runs on).
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = PACK_BATCH_HINT) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def onednn_supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`PackedLinear` can run ``dtype`` on ``device`` in this build of torch."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False  # float16 needs avx512_fp16 or avx_ne_convert, which the packing checks itself


def pack_linears(model: nn.Module, batch_hint: int = PACK_BATCH_HINT) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`PackedLinear` of the same weight, in
    place; returns how many were replaced (0 when it was packed already). A tied LM head gets
    its own packed copy; the embedding keeps the dense weight it looks rows up in."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, batch_hint))
    return len(targets)


def is_packed(model: nn.Module) -> bool:
    """Whether ``model`` has any :class:`PackedLinear` (it then runs its matmuls on oneDNN)."""
    return any(isinstance(m, PackedLinear) for m in model.modules())
