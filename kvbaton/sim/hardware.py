"""Accelerators the analytic cost model knows: peak dense compute, memory bandwidth, memory size
and the link a KV transfer between nodes crosses, each number from the vendor's datasheet.

Conventions (the same for every entry, so they compare):

- ``flops``: dense BF16/FP16 tensor-core FLOP/s, **without** 2:4 structured sparsity (NVIDIA's
  datasheets print the sparse figure first, with a footnote; the dense one is half of it);
- ``mem_bw_bytes_s``: peak DRAM (HBM / GDDR) bandwidth, bytes per second;
- ``mem_bytes``: memory size as the datasheet states it, in decimal GB (1e9 bytes). The device
  reports a little more (80 GB H100: 81,559 MiB = 85.5e9 bytes), so fit checks err on the side of
  "does not fit"; the runtime's own reservations (CUDA context, activations) are left to the
  caller's headroom;
- ``link_bytes_s``: the NIC a node of that GPU typically has per GPU for traffic between nodes
  (where a disaggregated prefill node sends its KV to a decode node), bytes per second: for
  the HGX/DGX systems one ConnectX-7 400 Gbit/s port per GPU.

``"cpu"`` is this machine, measured by :func:`probe_cpu` (a float32 GEMM and a large copy).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

from kvbaton.sim.cost import CostModelError

TERA = 1e12
GB = 1e9
GBIT = 1e9 / 8  # bytes per second in one Gbit/s


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or this CPU): the peaks a roofline needs, and where they come from."""

    name: str
    flops: float  # dense BF16 FLOP/s (float32 for "cpu": what the probe measured)
    mem_bw_bytes_s: float  # DRAM bandwidth, bytes/s
    mem_bytes: float  # memory size, bytes
    link_bytes_s: float  # inter-node link for KV transfer, bytes/s
    source: str  # where the numbers come from

    @property
    def is_cpu(self) -> bool:
        return self.name == "cpu"

    def describe(self) -> dict[str, float | str]:
        """The numbers, for a result JSON (TFLOP/s and GB/s: readable)."""
        return {"name": self.name, "tflops": self.flops / TERA, "mem_bw_gb_s": self.mem_bw_bytes_s / GB,
                "mem_gb": self.mem_bytes / GB, "link_gb_s": self.link_bytes_s / GB, "source": self.source}


_DGX_NIC = "ConnectX-7 400 Gbit/s per GPU (DGX H100/H200/B200 user guides)"

ACCELERATORS: dict[str, Hardware] = {
    h.name: h
    for h in (
        # NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM column: BF16 Tensor Core
        # 1,979 TFLOPS "with sparsity" -> 989.5 dense; GPU memory 80 GB; bandwidth 3.35 TB/s.
        Hardware("h100", 989.5 * TERA, 3350 * GB, 80 * GB, 400 * GBIT,
                 f"NVIDIA H100 datasheet (2023), SXM; {_DGX_NIC}"),
        # NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column: BF16 1,979 TFLOPS with
        # sparsity -> 989.5 dense (the H100's compute); 141 GB HBM3e at 4.8 TB/s.
        Hardware("h200", 989.5 * TERA, 4800 * GB, 141 * GB, 400 * GBIT,
                 f"NVIDIA H200 datasheet (2024), SXM; {_DGX_NIC}"),
        # NVIDIA H20 (China-market Hopper) product brief (2023-24; distributed to partners, not on
        # nvidia.com; figures as widely reported): FP16/BF16 148 TFLOPS dense, 96 GB HBM3 at
        # 4.0 TB/s. Sold in HGX 8-GPU boards like the H100, hence the same NIC assumption.
        Hardware("h20", 148 * TERA, 4000 * GB, 96 * GB, 400 * GBIT,
                 f"NVIDIA H20 product brief (2024, as reported); {_DGX_NIC}"),
        # NVIDIA HGX B200 datasheet (2024): per 8-GPU board FP16/BF16 36 PFLOPS with sparsity ->
        # 4.5 PFLOPS sparse, 2.25 dense per GPU; 1.44 TB total -> 180 GB per GPU; HBM3e 8 TB/s
        # per GPU. (The launch announcement said 192 GB; the shipping HGX/DGX B200 lists 180.)
        Hardware("b200", 2250 * TERA, 8000 * GB, 180 * GB, 400 * GBIT,
                 f"NVIDIA HGX B200 datasheet (2024); {_DGX_NIC}"),
        # NVIDIA A100 Tensor Core GPU datasheet (2021), A100 80GB SXM column: BF16 312 TFLOPS
        # dense (624 with sparsity); HBM2e 2,039 GB/s; 80 GB. DGX A100 has one ConnectX-6
        # 200 Gbit/s HDR InfiniBand port per GPU (DGX A100 user guide).
        Hardware("a100", 312 * TERA, 2039 * GB, 80 * GB, 200 * GBIT,
                 "NVIDIA A100 datasheet (2021), 80GB SXM; ConnectX-6 200 Gbit/s per GPU (DGX A100)"),
        # NVIDIA L4 Tensor Core GPU datasheet (2023): BF16 242 TFLOPS with sparsity -> 121 dense;
        # 24 GB GDDR6 at 300 GB/s. A PCIe card in cloud instances: Google Cloud G2 machines
        # (1-8 L4) have up to 100 Gbit/s of networking (Compute Engine GPU machine types docs).
        Hardware("l4", 121 * TERA, 300 * GB, 24 * GB, 100 * GBIT,
                 "NVIDIA L4 datasheet (2023); 100 Gbit/s networking (Google Cloud G2 instances)"),
    )
}

CPU = "cpu"


def known_hardware() -> list[str]:
    """Every name :func:`hardware` accepts."""
    return sorted(ACCELERATORS) + [CPU]


def hardware(name: str, *, threads: int | None = None) -> Hardware:
    """The accelerator called ``name`` (case-insensitive), or this machine's CPU for ``"cpu"``
    (probed with ``threads`` torch threads, default torch's current setting). CostModelError
    listing the known names for any other."""
    key = name.strip().lower()
    if key == CPU:
        return probe_cpu(threads)
    if key in ACCELERATORS:
        return ACCELERATORS[key]
    raise CostModelError(f"unknown hardware {name!r}; known: {', '.join(known_hardware())}")


_cpu_cache: dict[int, Hardware] = {}


def probe_cpu(threads: int | None = None) -> Hardware:
    """This CPU, measured: the best float32 GEMM throughput over a few sizes (FLOP/s) and the
    bandwidth of copying a 64 MiB tensor (bytes read + written per second), each the best of a
    few repeats after a warm-up; about a second in all. Cached per process and thread count.

    ``mem_bytes`` is the machine's physical memory; ``link_bytes_s`` is half the copy bandwidth,
    since KV moves between local workers through shared memory (a copy in, a copy out)."""
    import torch

    n = int(threads) if threads is not None else torch.get_num_threads()
    if n < 1:
        raise CostModelError(f"threads must be at least 1, got {threads!r}")
    if n in _cpu_cache:
        return _cpu_cache[n]
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        flops = 0.0
        for size, reps in ((256, 8), (512, 4), (1024, 2)):
            a = torch.randn(size, size)
            b = torch.randn(size, size)
            torch.mm(a, b)  # warm-up: thread pool, allocation
            best = math.inf
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t0)
            flops = max(flops, 2 * size**3 / max(best, 1e-9))
        src = torch.ones(16 * 1024 * 1024)  # 64 MiB of float32: beyond any last-level cache
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = math.inf
        for _ in range(8):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        bw = 2 * src.numel() * src.element_size() / max(best, 1e-9)
    finally:
        torch.set_num_threads(saved)
    try:
        mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        mem = 16 * GB  # no sysconf (not Linux/macOS): a modest guess
    hw = Hardware(CPU, flops, bw, mem, bw / 2,
                  f"measured on this machine: float32 GEMM and a 64 MiB copy, {n} thread(s)")
    _cpu_cache[n] = hw
    return hw
