"""The tiered KV store on the LMCache multi-round-QA shape, side by side in one run.

One worker (`kvbaton worker`, SmolLM2-135M, a small device pool `--num-kv-blocks`) serves
multi-turn sessions that each chat about their own long context, so the working set of
reusable prefixes is several times the device pool but fits in the host tier. Configurations:

- ``device``: no tiers (what a pool that forgets evicted prefixes gives);
- ``host``: a host tier; ``host+disk``: a host tier and a disk tier;
- ``infinite``: a device pool that holds everything (the hit rate to reach).

Rounds use fresh sessions (seed per round) and alternate the order of the configurations
(A B C D, D C B A, ...), with one server at a time on the machine, each started cold. Then:

- ``no-reuse``: random prompts with nothing to reuse, tiers off vs on (the cost of offloading
  when it buys nothing);
- ``restart``: a host+disk worker serves a round, is SIGKILLed, restarts on the same disk
  directory, and serves the same sessions again: the first round after the restart hits the
  disk;
- ``load-bandwidth``: host tier -> device copies through the store's own mover, against a
  plain memcpy of the same bytes.

Prints a summary and writes one JSON (``--out``). Example (the recorded run):

    python benchmarks/kv_tiers.py --out docs/results/kv_tiers_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from kvbaton.router.local_cluster import WorkerProcess, WorkerSpec

KEYS = ("prefix_cache_hit_rate", "usage_cached_token_rate", "median_ttft_ms", "p90_ttft_ms", "mean_ttft_ms",
        "request_throughput", "output_throughput", "completed")


@contextmanager
def worker(name: str, args: list[str], threads: int, timeout_s: float = 600.0) -> Iterator[WorkerProcess]:
    """One `kvbaton worker` process, healthy, always stopped afterwards."""
    spec = WorkerSpec("both", ("--model", "smollm2-135m", "--threads", str(threads), *args))
    print(f"[{name}] worker {' '.join(spec.args)}", file=sys.stderr, flush=True)
    w = WorkerProcess(spec, dict(os.environ), stdout=subprocess.DEVNULL)
    try:
        url = w.wait_ready(time.monotonic() + timeout_s)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: worker not healthy")
            time.sleep(0.5)
        yield w
    finally:
        w.terminate()
        w.wait_or_kill(60)


def bench(url: str, args: list[str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "kvbaton.cli", "bench", "run", "--base-url", url, "--result-file", str(out),
           "--no-progress", "--temperature", "0", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res = json.loads(out.read_text())
    return {k: res.get(k) for k in KEYS}


def tier_metrics(url: str) -> dict[str, float]:
    """The worker's tier counters (hit tokens, loads, load bytes and seconds) by tier."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kvbaton:kv_tier_") and "{" in line:
            name, rest = line.split("{", 1)
            labels, value = rest.rsplit("}", 1)
            tier = next((p.split("=")[1].strip('"') for p in labels.split(",") if p.startswith("tier=")), "")
            if name.endswith(("_total", "_sum", "_count")):
                out[f"{name[len('kvbaton:kv_tier_'):]}[{tier}]"] = float(value)
        if line.startswith("kvbaton:kv_offload_sync_stores_total"):
            out["sync_stores"] = float(line.rsplit(" ", 1)[1])
    return out


def mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.fmean(vals) if vals else None


def qa_workload(a: argparse.Namespace) -> list[str]:
    """`kvbaton bench run` flags of the multi-round QA sessions (without a seed)."""
    return ["--workload", "multi-turn", "--num-prompts", str(a.sessions), "--turns", str(a.turns),
            "--context-len", str(a.context_len), "--user-len", str(a.user_len), "--output-len", str(a.output_len),
            "--think-time", str(a.think_time), "--max-concurrency", str(a.concurrency),
            "--request-rate", str(a.request_rate)]


def multi_round_qa(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base = ["--num-kv-blocks", str(a.num_kv_blocks)]
    host = ["--kv-host-cache-gib", str(a.host_gib), "--kv-offload-mode", a.mode]
    configs: dict[str, list[str]] = {
        "device": [*base, "--kv-host-cache-gib", "0"],
        "host": [*base, *host],
        "host+disk": [*base, *host, "--kv-disk-cache-gib", str(a.disk_gib)],  # + a fresh dir per round
        "infinite": ["--num-kv-blocks", str(a.infinite_blocks), "--kv-host-cache-gib", "0"],
    }
    workload = qa_workload(a)
    configs = {k: v for k, v in configs.items() if k in a.configs.split(",")}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            args = list(configs[name])
            if name == "host+disk":
                d = tmp / f"disk-{r}"
                args += ["--kv-disk-cache-dir", str(d)]
            with worker(name, args, a.threads) as w:
                res = bench(w.url or "", [*workload, "--seed", str(a.seed + r)], tmp / f"{name}-{r}.json")
                res["tiers"] = tier_metrics(w.url or "")
            res["round"] = r
            rows[name].append(res)
            print(f"round {r} {name}: {json.dumps({k: res[k] for k in KEYS})}", file=sys.stderr, flush=True)
    summary = {name: {k: mean(rs, k) for k in KEYS} for name, rs in rows.items()}
    inf_hit = summary.get("infinite", {}).get("prefix_cache_hit_rate") or 0.0
    dev_ttft = summary.get("device", {}).get("median_ttft_ms") or 0.0
    for name in [n for n in ("host", "host+disk") if n in summary]:
        s = summary[name]
        s["hit_rate_vs_infinite"] = (s["prefix_cache_hit_rate"] or 0.0) / inf_hit if inf_hit else None
        s["ttft_p50_speedup_vs_device"] = dev_ttft / s["median_ttft_ms"] if s["median_ttft_ms"] and dev_ttft else None
    return {"configs": configs, "workload": workload, "rounds": rows, "summary": summary}


def no_reuse(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base = ["--num-kv-blocks", str(a.num_kv_blocks)]
    configs = {"tiers-off": [*base, "--kv-host-cache-gib", "0"],
               "tiers-on": [*base, "--kv-host-cache-gib", str(a.host_gib), "--kv-offload-mode", a.mode]}
    workload = ["--workload", "random", "--num-prompts", str(a.random_prompts), "--input-len", "256",
                "--output-len", "32", "--max-concurrency", str(a.concurrency)]
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in configs}
    names = list(configs)
    for r in range(a.rounds * 2):  # A B B A A B B A ...
        order = names if r % 4 in (0, 3) else names[::-1]
        for name in order:
            with worker(name, configs[name], a.threads) as w:
                rows[name].append(bench(w.url or "", [*workload, "--seed", str(a.seed + 50 + r)],
                                        tmp / f"nr-{name}-{r}.json"))
    summary = {n: {k: mean(rs, k) for k in KEYS} for n, rs in rows.items()}
    off, on = summary["tiers-off"]["output_throughput"], summary["tiers-on"]["output_throughput"]
    summary["throughput_on_vs_off"] = on / off if off and on else None
    return {"configs": configs, "workload": workload, "rounds": rows, "summary": summary}


def restart(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    d = tmp / "restart-disk"
    args = ["--num-kv-blocks", str(a.num_kv_blocks), "--kv-host-cache-gib", str(a.host_gib),
            "--kv-disk-cache-dir", str(d), "--kv-disk-cache-gib", str(a.disk_gib)]
    workload = [*qa_workload(a), "--seed", str(a.seed + 99)]
    out: dict[str, Any] = {"args": args, "workload": workload}
    with worker("before", args, a.threads) as w:
        out["before"] = bench(w.url or "", workload, tmp / "restart-before.json")
        time.sleep(3)  # the last host stores reach the disk (the idle loop collects them)
        assert w.proc.pid
        os.kill(w.proc.pid, signal.SIGKILL)  # no graceful close: what is on disk is what survives
        w.proc.wait()
    out["files_on_disk"] = sum(1 for _ in d.rglob("*.kvb"))
    with worker("after", args, a.threads) as w:
        out["after"] = bench(w.url or "", workload, tmp / "restart-after.json")
        out["after_tiers"] = tier_metrics(w.url or "")
    before, after = out["before"]["prefix_cache_hit_rate"], out["after"]["prefix_cache_hit_rate"]
    out["after_vs_before_hit_rate"] = after / before if before and after is not None else None
    return out


def load_bandwidth(blocks: int, block_bytes: int, repeats: int) -> dict[str, Any]:
    """Host tier -> device rows through BlockMover (as loads run), vs one memcpy of the bytes."""
    import torch

    from kvbaton.kv.store.base import LoadPlan
    from kvbaton.kv.store.host import HostTier
    from kvbaton.kv.store.mover import BlockMover
    from kvbaton.kv.store.policies import make_policy

    host = HostTier(blocks, block_bytes, 16, make_policy("lru"))
    host.rows.random_(0, 255)
    device = torch.empty((blocks, block_bytes), dtype=torch.uint8)
    device.fill_(0)
    mover = BlockMover(device)
    # Scattered slots and rows, as a real prefix lands: every other slot, rows in reverse.
    slots = list(range(0, blocks, 2)) + list(range(1, blocks, 2))
    dst = list(range(blocks - 1, -1, -1))
    plan = LoadPlan([bytes(16)] * blocks, slots)
    best_mover, best_memcpy = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mover.load(host, plan, dst)
        best_mover = min(best_mover, time.perf_counter() - t0)
        t0 = time.perf_counter()
        device.copy_(host.rows)
        best_memcpy = min(best_memcpy, time.perf_counter() - t0)
    nbytes = blocks * block_bytes
    return {"blocks": blocks, "block_bytes": block_bytes, "mover_gbps": nbytes / best_mover / 1e9,
            "memcpy_gbps": nbytes / best_memcpy / 1e9, "mover_vs_memcpy": best_memcpy / best_mover,
            "torch_threads": torch.get_num_threads(), "note": "best of repeats; warm memory"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    # Defaults: sessions arrive a few seconds apart and think long enough that others are
    # served between their turns (their contexts leave a device pool that holds ~3 of them),
    # while the server stays below saturation, so TTFT measures prefill work, not queueing.
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--request-rate", type=float, default=0.3, help="sessions starting per second")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context-len", type=int, default=512)
    ap.add_argument("--user-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=24)
    ap.add_argument("--think-time", type=float, default=40.0)
    ap.add_argument("--concurrency", type=int, default=12)
    ap.add_argument("--num-kv-blocks", type=int, default=160, help="device pool of the tiered configs")
    ap.add_argument("--infinite-blocks", type=int, default=4096)
    ap.add_argument("--host-gib", type=float, default=1.0)
    ap.add_argument("--disk-gib", type=float, default=2.0)
    ap.add_argument("--mode", default="write-back", choices=["write-back", "write-through"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--random-prompts", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="qa,no-reuse,restart,bandwidth")
    ap.add_argument("--configs", default="device,host,host+disk,infinite", help="multi-round QA configurations")
    a = ap.parse_args()
    parts = set(a.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="kvb-tiers-"))
    result: dict[str, Any] = {"bench": "kv_tiers", "args": vars(a), "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}}
    try:
        if "bandwidth" in parts:
            result["load_bandwidth"] = load_bandwidth(256, 737_280, 5)
            print(json.dumps(result["load_bandwidth"]), file=sys.stderr, flush=True)
        if "qa" in parts:
            result["multi_round_qa"] = multi_round_qa(a, tmp)
        if "no-reuse" in parts:
            result["no_reuse"] = no_reuse(a, tmp)
        if "restart" in parts:
            result["restart"] = restart(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        result["machine"]["load_avg_end"] = os.getloadavg()
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k]["summary"] if isinstance(result.get(k), dict) and "summary" in result[k]
                      else result.get(k) for k in ("multi_round_qa", "no_reuse")}, indent=2))
    if "restart" in result:
        print(json.dumps({k: result["restart"][k] for k in ("before", "after", "after_vs_before_hit_rate",
                                                            "files_on_disk")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
