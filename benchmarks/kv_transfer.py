"""KV transfer throughput between two processes vs this machine's memcpy bandwidth, in one run.

A server process holds a KV tensor (in shared memory, ``SharedKV``, when on CPU) and serves it;
this process fetches payloads of ``--sizes-mib`` into scattered destination blocks (a seeded
permutation, so the receive side cannot merge runs) over each path of ``--paths`` and keeps
the best of ``--repeats``:

  * tcp: block bytes over the loopback socket (a client with ``prefer_shm=False``);
  * shm: the same-host shared-memory path (bytes copied out of the server's mapping; the
    socket carries only the request, block ids + checksums, and "done").
Per path and size:
  * warm: the server already holds the lease's checksums (the usual case when it computes them
    once per lease) - pure data-plane cost incl. the receiver's checksum check;
  * cold: a fresh lease, so the server computes checksums on the serving path too;
and once per size, memcpy: ``torch`` copy of the same byte count between two CPU buffers, one
thread, best of N. Also the checksum rates alone (the one in use, and zlib CRC-32 for
reference). Target: warm transfer >= 50% of memcpy for large payloads.

    .venv/bin/python benchmarks/kv_transfer.py --out results/kv_transfer.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from kvbaton.kv.codec import CHECKSUM_ALGORITHM, checksum
from kvbaton.kv.spec import KVSpec
from kvbaton.kv.transfer import LeaseError, SharedKV, TransferClient, TransferServer

MiB = 1024 * 1024
FINGERPRINT = "kv-transfer-bench"


class _AllBlocks:
    """Every lease id names the whole tensor, so each new id is a cold lease for the server."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks

    def resolve(self, lease_id: str, block_indexes: list[int]) -> list[int]:
        if any(not 0 <= i < self.num_blocks for i in block_indexes):
            raise LeaseError("block index out of range")
        return block_indexes

    def release(self, lease_id: str) -> bool:
        return True


def _spec(args: argparse.Namespace) -> KVSpec:
    return KVSpec(args.layers, args.kv_heads, args.head_dim, args.dtype, args.block_size)


def serve(args: argparse.Namespace) -> None:
    """Server process: print the port, serve until stdin closes."""
    torch.set_num_threads(1)
    spec = _spec(args)
    num_blocks = -(-max(args.sizes_mib) * MiB // spec.bytes_per_block)
    values = torch.randint(-100, 100, (num_blocks, *spec.block_shape()), dtype=torch.int16).to(spec.torch_dtype)
    if args.device == "cpu":
        shared = SharedKV.create(spec, num_blocks)  # the server offers it to same-host clients
        kv = shared.tensor.copy_(values)
    else:
        kv = values.to(args.device)
    server = TransferServer(kv, spec, FINGERPRINT, _AllBlocks(num_blocks), socket_buffer_bytes=args.socket_buffer_bytes)
    with server:
        print(f"PORT {server.address[1]}", flush=True)
        sys.stdin.read()


def best_of(n: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memcpy_gbps(nbytes: int, repeats: int) -> float:
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    return nbytes / best_of(repeats, lambda: dst.copy_(src)) / 1e9


def checksum_gbps(fn: Callable[[memoryview], int], nbytes: int, repeats: int) -> float:
    buf = memoryview(torch.randint(0, 255, (nbytes,), dtype=torch.uint8).numpy())
    return nbytes / best_of(repeats, lambda: fn(buf)) / 1e9


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    spec = _spec(args)
    cmd = [sys.executable, __file__, "--serve", *sys.argv[1:]]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise SystemExit(f"server process failed to start (said {line!r})")
        port = int(line.split()[1])
        clients = {
            path: TransferClient(
                spec, FINGERPRINT, timeout_s=60.0, socket_buffer_bytes=args.socket_buffer_bytes,
                prefer_shm=path == "shm",
            )
            for path in args.paths
        }
        gen = torch.Generator().manual_seed(0)
        fresh = (f"lease-{i}" for i in itertools.count())
        for size in args.sizes_mib:
            n = max(1, size * MiB // spec.bytes_per_block)
            nbytes = n * spec.bytes_per_block
            dst = spec.allocate(n, args.device)
            dst_ids = torch.randperm(n, generator=gen).tolist()
            idx = list(range(n))
            mem = memcpy_gbps(nbytes, args.repeats)
            row: dict = {"mib": nbytes / MiB, "blocks": n, "memcpy_gbps": mem}
            for path, client in clients.items():
                used: set[str] = set()

                # The loop's values are bound as defaults (fetch is only called in this iteration).
                def fetch(
                    lease: str, *, client: TransferClient = client, idx: list[int] = idx, dst: torch.Tensor = dst,
                    dst_ids: list[int] = dst_ids, used: set[str] = used,
                ) -> float:
                    stats = client.fetch("127.0.0.1", port, lease, idx, dst, dst_ids)
                    used.add(stats.path)
                    return stats.seconds

                cold = min(fetch(next(fresh)) for _ in range(args.repeats))
                warm_lease = next(fresh)
                fetch(warm_lease)  # the server computes and keeps this lease's checksums
                warm = min(fetch(warm_lease) for _ in range(args.repeats))
                row[path] = {
                    "used": sorted(used),  # "tcp" under "shm" means the shared path fell back
                    "warm_gbps": nbytes / warm / 1e9,
                    "cold_gbps": nbytes / cold / 1e9,
                    "warm_vs_memcpy": nbytes / warm / 1e9 / mem,
                }
                r = row[path]
                note = "" if used == {path} else f"  (went over {'+'.join(sorted(used))})"
                print(
                    f"{row['mib']:>8.1f} {n:>7d} {path:>5} {r['warm_gbps']:>10.2f} {r['cold_gbps']:>10.2f} "
                    f"{mem:>11.2f} {r['warm_vs_memcpy']:>8.2f}{note}",
                    flush=True,
                )
            rows.append(row)
        for client in clients.values():
            client.close()
    finally:
        proc.stdin.close()
        proc.wait(30)
    return {
        "benchmark": "kv_transfer",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "transport": "tcp-loopback" if args.paths == ["tcp"] else "same-host: " + ", ".join(args.paths),
        "paths": args.paths,
        "device": args.device,
        "spec": {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                 "dtype": spec.dtype, "block_size": spec.block_size, "bytes_per_block": spec.bytes_per_block},
        "socket_buffer_bytes": args.socket_buffer_bytes,
        "checksum": CHECKSUM_ALGORITHM,
        "checksum_gbps": checksum_gbps(checksum, 64 * MiB, args.repeats),
        "crc32_gbps": checksum_gbps(zlib.crc32, 64 * MiB, args.repeats),
        "rows": rows,
        "target": "warm_vs_memcpy >= 0.5 for large payloads (rows[*].shm on one host)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--repeats", type=int, default=5, help="best of N per size")
    p.add_argument("--paths", nargs="+", default=["tcp", "shm"], choices=["tcp", "shm"],
                   help="transfer paths to measure (shm needs --device cpu on the server)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="where both KV tensors live (cpu or cuda)")
    p.add_argument("--socket-buffer-bytes", type=int, default=None, help="SO_SNDBUF/SO_RCVBUF (default: autotune)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if any(s <= 0 for s in args.sizes_mib):
        p.error("--sizes-mib must be positive")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.serve:
        serve(args)
        return
    spec = _spec(args)
    print(f"block = {spec.bytes_per_block / 1024:.0f} KiB ({spec.layout_id()}), device {args.device}")
    print(f"{'MiB':>8} {'blocks':>7} {'path':>5} {'warm GB/s':>10} {'cold GB/s':>10} {'memcpy GB/s':>11} {'ratio':>8}")
    result = run(args)
    print(f"{result['checksum']}: {result['checksum_gbps']:.2f} GB/s, crc32: {result['crc32_gbps']:.2f} GB/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
