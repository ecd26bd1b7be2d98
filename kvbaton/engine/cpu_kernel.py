"""A C kernel for paged decode attention on the CPU, compiled on first use.

Decode on a CPU is bound by reading the KV cache. Attention through PyTorch ops must first
gather each sequence's blocks into a contiguous tensor (read + write + read again); the kernel
in ``csrc/paged_decode.c`` reads every K/V row once, straight from the block-first cache. It is
plain C compiled with the system compiler (about a second) and loaded with ctypes, so it adds
no Python dependency; where no compiler is found, the caller falls back to SDPA.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("csrc") / "paged_decode.c"
# Reassociation lets the compiler vectorise the dot products; infinities stay meaningful.
_CFLAGS = [
    "-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
    "-fno-trapping-math", "-shared", "-fPIC",
]
# OpenMP first: the kernel then runs on PyTorch's own libgomp team (see csrc/paged_decode.c).
# A compiler without OpenMP still builds it, single-threaded.
_OPENMP = "-fopenmp"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    return Path(os.environ.get("KVBATON_CACHE_DIR", Path.home() / ".cache" / "kvbaton")) / "kernels"


def _cpu_id() -> str:
    """-march=native code must not run on another CPU: key the build by the CPU's flags."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None if it cannot be built."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("KVBATON_DISABLE_C_KERNEL"):
            return None
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            log.warning("no C compiler found: CPU decode attention falls back to SDPA")
            return None
        for flags in ([*_CFLAGS, _OPENMP], _CFLAGS):
            out = _build(cc, flags)
            if out is not None:
                break
        else:
            return None
        if _OPENMP not in flags:
            log.warning("the C compiler has no OpenMP: CPU decode attention runs on one thread")
        lib = ctypes.CDLL(str(out))
        i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        lib.paged_decode_f32.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, i64, i64, f32, i64]
        lib.paged_decode_f32.restype = ctypes.c_int
        _lib = lib
        return lib


def _build(cc: str, flags: list[str]) -> Path | None:
    """The kernel built with ``flags`` (cached by source, flags and CPU); None if it fails."""
    src = _SRC.read_bytes()
    key = hashlib.sha256(src + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
    out = _cache_dir() / f"paged_decode-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        try:
            res = subprocess.run([cc, *flags, "-o", str(tmp_so), str(_SRC), "-lm"], capture_output=True, text=True)
        except OSError as e:  # $CC names a program that is not there
            log.warning("C compiler %r cannot run (%s): CPU decode attention uses SDPA", cc, e)
            return None
        if res.returncode != 0:
            log.warning("C kernel build with %s failed: %s", " ".join(flags), res.stderr[-2000:])
            return None
        os.replace(tmp_so, out)  # atomic: concurrent builders never see half a file
    return out


class PagedDecodeKernel:
    """Runs the C kernel over a batch of decode queries on PyTorch's threads."""

    def __init__(self, lib: ctypes.CDLL, kv_cache: torch.Tensor) -> None:
        if kv_cache.dtype != torch.float32 or kv_cache.device.type != "cpu" or not kv_cache.is_contiguous():
            raise ValueError("the C decode kernel needs a contiguous float32 CPU KV cache")
        self.lib = lib
        self.kv_cache = kv_cache
        self.num_layers, _, self.block_size, self.num_kv_heads, self.head_dim = kv_cache.shape[1:]

    def __call__(self, layer: int, q: torch.Tensor, tables: torch.Tensor, ctx_lens: torch.Tensor) -> torch.Tensor:
        """``q``: ``[B, heads, D]`` contiguous; ``tables``: ``[B, max_blocks]`` int64;
        ``ctx_lens``: ``[B]`` int64. Runs on as many threads as torch uses now."""
        out = torch.empty_like(q)
        rc = self.lib.paged_decode_f32(
            self.kv_cache.data_ptr(), q.data_ptr(), out.data_ptr(), tables.data_ptr(), tables.shape[1],
            ctx_lens.data_ptr(), q.shape[0], layer, self.num_layers, self.block_size, q.shape[1],
            self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("the C decode kernel could not allocate its scores buffer")
        return out
