"""Small C kernels compiled on first use with the system compiler and loaded with ctypes.

The project's C sources (``kvbaton/models/csrc``, ``kvbaton/engine/csrc``) are plain C with no
Python headers: each is built once (about a second), cached under
``$KVBATON_CACHE_DIR/kernels`` keyed by source, flags and CPU, and loaded with ctypes (whose
calls release the GIL). A source is built with OpenMP first, so it links the libgomp PyTorch
already loaded and runs on PyTorch's own thread team (one pool, see docs/architecture.md);
a compiler without OpenMP builds it single-threaded. Without a compiler, or with
``KVBATON_DISABLE_C_KERNEL=1``, :func:`load_library` returns None and callers use PyTorch.
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
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# Reassociation lets the compiler vectorise the reductions; infinities stay meaningful.
CFLAGS = [
    "-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
    "-fno-trapping-math", "-shared", "-fPIC",
]
OPENMP = "-fopenmp"
_lock = threading.Lock()
_loaded: dict[Path, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
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


def load_library(src: Path, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    """``src`` compiled and loaded, and ``declare`` run on it to set its functions' argument
    types, once per process; None if it cannot be built here. Callers may ask on every call:
    after the first answer it is a dict lookup."""
    if src in _loaded:  # answered before: no lock on the hot path
        return _loaded[src]
    with _lock:
        if src not in _loaded:
            _loaded[src] = _build_and_load(src, declare)
        return _loaded[src]


def _build_and_load(src: Path, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL | None:
    if os.environ.get("KVBATON_DISABLE_C_KERNEL"):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.warning("no C compiler found: %s is not built and PyTorch ops run instead", src.name)
        return None
    for flags in ([*CFLAGS, OPENMP], CFLAGS):
        out = build(src, cc, flags)
        if out is not None:
            break
    else:
        return None
    if OPENMP not in flags:
        log.warning("the C compiler has no OpenMP: %s runs on one thread", src.name)
    lib = ctypes.CDLL(str(out))
    declare(lib)
    return lib


# Headers every source may include (`#include "fastmath.h"`): on the include path of each build
# and hashed into each build's key, so a changed header rebuilds everything.
INCLUDE_DIR = Path(__file__).with_name("csrc")


def build(src: Path, cc: str, flags: list[str]) -> Path | None:
    """``src`` built with ``flags`` (cached by source, headers, flags and CPU); None if it fails."""
    text = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(INCLUDE_DIR.glob("*.h")))
    key = hashlib.sha256(text + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
    out = cache_dir() / f"{src.stem}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        try:
            res = subprocess.run([cc, *flags, "-I", str(INCLUDE_DIR), "-o", str(tmp_so), str(src), "-lm"],
                                 capture_output=True, text=True)
        except OSError as e:  # $CC names a program that is not there
            log.warning("C compiler %r cannot run (%s): %s is not built", cc, e, src.name)
            return None
        if res.returncode != 0:
            log.warning("building %s with %s failed: %s", src.name, " ".join(flags), res.stderr[-2000:])
            return None
        os.replace(tmp_so, out)  # atomic: concurrent builders never see half a file
    return out
