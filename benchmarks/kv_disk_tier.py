"""The disk KV tier's write and read throughput against a plain memcpy of the same bytes.

``--blocks`` blocks of ``--block-bytes`` (default 737,280: SmolLM2-135M's fp32 block, 30 layers
x 2 x 3 kv heads x 64 x 4 bytes x 16 tokens) of random bytes, moved as the store's IO thread
moves them, in plans of ``--plan-blocks``:

  1. memcpy: ``dst.copy_(src)`` of all the rows, on one thread (the IO thread is one thread)
     and on torch's default thread count; and the XXH3-64 checksum alone (part of both paths);
  2. write, fresh: ``DiskTier.write`` into an empty tier (every block creates its file);
  3. write, steady state: the tier is full, so each plan evicts as many blocks as it writes and
     ``removed`` drops their files after the plan (timed too), as the engine would: once with
     spare files (evicted files recycled, the default) and once with ``spare_files=0``;
  4. read: ``DiskTier.read`` of every block into other rows (header check, ``readv`` into the
     row, checksum, mtime refresh).

The page cache is warm: reads follow the writes, nothing is synced or dropped, so this measures
the tier's own costs (syscalls, file creation, copies into and out of the page cache,
checksums), not the device. Best of ``--repeats``. Prints one JSON line.

    .venv/bin/python benchmarks/kv_disk_tier.py --blocks 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvbaton.kv.codec import checksum, host_bytes
from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.kv.store.base import BlockMeta
from kvbaton.kv.store.disk import DEFAULT_SPARE_FILES, DiskTier
from kvbaton.kv.store.policies import make_policy

SMOLLM2_FP32_BLOCK_BYTES = 30 * 2 * 3 * 64 * 4 * 16


def filesystem_of(path: Path) -> str:
    """The type of the file system ``path`` is on (from /proc/mounts), or "unknown"."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    except OSError:
        pass
    return kind


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, float]:
    """(first, best) wall seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=512)
    ap.add_argument("--block-bytes", type=int, default=SMOLLM2_FP32_BLOCK_BYTES)
    ap.add_argument("--block-size", type=int, default=16, help="tokens per block (header size)")
    ap.add_argument("--plan-blocks", type=int, default=16, help="blocks per store plan")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the tier (default: a new temp directory)")
    args = ap.parse_args()

    n, bb = args.blocks, args.block_bytes
    total = n * bb
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, 256, (n, bb), dtype=torch.uint8, generator=gen)
    dst = torch.zeros_like(src)  # zeroed: its pages are faulted in before anything is timed

    threads = torch.get_num_threads()
    _, memcpy_all = best_of(args.repeats, lambda: dst.copy_(src))
    torch.set_num_threads(1)
    _, memcpy_one = best_of(args.repeats, lambda: dst.copy_(src))
    torch.set_num_threads(threads)
    _, checksum_s = best_of(args.repeats, lambda: [checksum(host_bytes(src[i])) for i in range(n)])

    root = Path(tempfile.mkdtemp(prefix="kvbaton-disk-bench-", dir=args.dir))
    chains = iter(range(10**6))
    ids = list(range(n))

    def new_chain() -> tuple[list[bytes], list[BlockMeta]]:
        tokens = list(range(n * args.block_size))
        hashes = hash_block_chain(root_hash(f"bench-{next(chains)}"), tokens, args.block_size)
        bs = args.block_size
        return hashes, [BlockMeta(hashes[i - 1] if i else None, tuple(tokens[i * bs : (i + 1) * bs])) for i in range(n)]

    def fill(tier: DiskTier) -> list[bytes]:
        """Store a new chain in plans of --plan-blocks; the hashes."""
        hashes, metas = new_chain()
        for a in range(0, n, args.plan_blocks):
            plan = tier.dir.prepare_store(hashes[a : a + args.plan_blocks], metas[a : a + args.plan_blocks])
            tier.write(plan, src, [hashes.index(h) for h in plan.hashes])
            tier.dir.complete_store(plan, ok=True)
            tier.removed(plan.evicted)
        return hashes

    def tier_at(name: str, spare_files: int) -> DiskTier:
        tier = DiskTier(root / name, n, bb, args.block_size, "bench-layout", "bench-disk-tier", make_policy("lru"),
                        spare_files=spare_files)
        if not tier.enabled:
            raise SystemExit(f"the disk tier is disabled: {tier.disabled_reason}")
        return tier

    try:
        tier = tier_at("recycling", DEFAULT_SPARE_FILES)
        t0 = time.perf_counter()
        fill(tier)
        write_fresh = time.perf_counter() - t0
        last: list[list[bytes]] = []
        _, write_steady = best_of(args.repeats, lambda: last.append(fill(tier)))
        recycled = tier.recycled

        load = tier.dir.prepare_load(last[-1])
        dst.zero_()
        bad: list[bytes] = []
        _, read_best = best_of(args.repeats, lambda: bad.extend(tier.read(load, dst, ids)))
        tier.dir.complete_load(load, ok=not bad, bad=bad)
        if bad or not torch.equal(dst, src):
            raise SystemExit(f"read back wrong bytes ({len(bad)} blocks reported bad)")
        tier.dir.check()
        file_bytes = tier.file_bytes
        tier.close()

        plain = tier_at("no-spares", 0)
        fill(plain)
        _, write_steady_unlink = best_of(args.repeats, lambda: fill(plain))
        plain.dir.check()
        plain.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    gbps = lambda s: round(total / s / 1e9, 2)  # noqa: E731 - one formula, used often
    print(json.dumps({
        "bench": "kv_disk_tier",
        "blocks": n,
        "block_bytes": bb,
        "file_bytes": file_bytes,
        "total_mb": round(total / 1e6, 1),
        "page_cache": "warm",
        "filesystem": filesystem_of(root.parent),
        "repeats": args.repeats,
        "plan_blocks": args.plan_blocks,
        "write_fresh_gbps": gbps(write_fresh),
        "write_steady_gbps": gbps(write_steady),
        "write_steady_no_spares_gbps": gbps(write_steady_unlink),
        "recycled_writes": recycled,
        "read_gbps": gbps(read_best),
        "memcpy_1thread_gbps": gbps(memcpy_one),
        f"memcpy_{threads}threads_gbps": gbps(memcpy_all),
        "checksum_gbps": gbps(checksum_s),
        "write_steady_vs_memcpy": round(memcpy_one / write_steady, 3),
        "read_vs_memcpy": round(memcpy_one / read_best, 3),
        "us_per_block_write_steady": round(write_steady / n * 1e6, 1),
        "us_per_block_read": round(read_best / n * 1e6, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.system()} {platform.release()}",
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
