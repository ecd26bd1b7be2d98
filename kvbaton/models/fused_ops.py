"""RMSNorm, rotary embedding and SwiGLU as one C call each on the CPU (``csrc/fused_ops.c``).

A decode step's tensors are a few rows wide, so in PyTorch these ops cost dispatch, not
arithmetic: about ten small tensor ops per norm and per rotation, in every layer. The model
(``kvbaton.models.llama``) calls :func:`available` once per forward pass and, where it says
yes, these functions instead. They compute in float32 and round a bfloat16 result where
PyTorch's bfloat16 ops round, so both paths agree to rounding. Anything else (CUDA, float16,
non-contiguous tensors, no C compiler, ``KVBATON_DISABLE_C_KERNEL=1``) runs the PyTorch ops.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch

from kvbaton.models import native

_SRC = Path(__file__).with_name("csrc") / "fused_ops.c"
_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for sfx in _DTYPES.values():
        getattr(lib, f"rms_norm_{sfx}").argtypes = [ptr, ptr, ptr, ptr, i64, i64, f32]
        getattr(lib, f"rope_{sfx}").argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64]
        getattr(lib, f"silu_mul_{sfx}").argtypes = [ptr, ptr, i64, i64]
        for op in ("rms_norm", "rope", "silu_mul"):
            getattr(lib, f"{op}_{sfx}").restype = None


def _load() -> ctypes.CDLL | None:
    return native.load_library(_SRC, _declare)


def available(x: torch.Tensor) -> bool:
    """Whether the fused ops run for activations like ``x`` (CPU, float32 or bfloat16)."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and _load() is not None


def _fn(op: str, x: torch.Tensor) -> Any:
    lib = _load()
    assert lib is not None, "call fused_ops.available() first"
    return getattr(lib, f"{op}_{_DTYPES[x.dtype]}")


def _check(*ts: torch.Tensor) -> None:
    for t in ts:
        if not t.is_contiguous() or t.dtype != ts[0].dtype:
            raise ValueError("fused ops take contiguous tensors of one dtype")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dim; with ``residual``, ``residual += x`` first
    (in place) and the norm is of the sum."""
    dim = x.shape[-1]
    _check(x, weight, *([] if residual is None else [residual]))
    out = torch.empty_like(x)
    _fn("rms_norm", x)(x.data_ptr(), None if residual is None else residual.data_ptr(), weight.data_ptr(),
                       out.data_ptr(), x.numel() // dim, dim, eps)
    return out


def rope_(qk: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor,
          cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate in place the first ``heads`` heads of each row of ``qk`` (``[T, row]``, rows
    contiguous; the q and k heads of a fused projection) by the float32 tables at
    ``positions`` (int64)."""
    if qk.stride(-1) != 1 or positions.dtype != torch.int64 or not positions.is_contiguous():
        raise ValueError("rope_ takes rows of unit stride and contiguous int64 positions")
    if cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("rope_ takes contiguous float32 cos/sin tables")
    _fn("rope", qk)(qk.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), qk.shape[0],
                    qk.stride(0), heads, head_dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = gate | up`` along the last dim."""
    _check(gate_up)
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], inter))
    _fn("silu_mul", gate_up)(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * inter), inter)
    return out
