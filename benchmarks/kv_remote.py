"""The shared remote KV tier (one Redis server for every worker) on a 4-worker cluster, in one run.

Three parts, each selectable with ``--parts`` (all results in one JSON, ``--out``):

- ``cluster``: ``kvbaton serve --colocated 4 --threads-per-worker 1`` (SmolLM2-135M) with a
  small device pool (``--num-kv-blocks``) and a small host tier (``--kv-host-cache-gib``), so
  the sessions' working set is several times one worker's device + host tiers but fits in the
  Redis server. The workload is LMCache's multi-round-QA shape through ``kvbaton bench run``:
  sessions that each chat about their own long private context over several turns.
  Configurations: ``round_robin``, ``round_robin+remote``, ``kv_aware``, ``kv_aware+remote``
  (remote: ``--kv-remote-url`` to a redis-server this script owns, ``FLUSHALL``-ed before every
  run). Every run starts cold (a fresh ``serve``, an empty Redis); rounds alternate the order
  (A B C D, D C B A, ...) and replay the same sessions (same seed). The cluster's best
  achievable hit rate is measured once: the same sessions on one worker whose device pool holds
  everything (``infinite``), i.e. every prompt token in a full block whose chain prefix an
  earlier request computed.
- ``late-worker``: a warm-up cluster serves the sessions with the remote tier; then a NEW
  worker (``serve --colocated 1``) on the same Redis gets each session's first turn again. The
  fraction of their prompt tokens loaded from the store (``kv_tier_hit_tokens_total
  {tier="remote"}`` / prompt tokens), beside the same prompts on a fresh worker without it.
- ``bandwidth``: ``RemoteTier.write`` / ``RemoteTier.read`` of 64 x 512 KiB blocks to a Redis
  on loopback (pipelined, checksummed), against a one-thread torch memcpy of the same bytes,
  median of ``--repeats``; and the TCP / shared-memory transfer plane through
  ``benchmarks/kv_transfer.py`` (its own CLI, 32 MiB of the same 512 KiB blocks).

Targets: round_robin+remote hit rate >= 95% of best achievable; kv_aware+remote TTFT p99 <=
kv_aware's; late worker >= 0.8 of its prompt tokens from the store; remote read >= 1 GB/s.

Example (the recorded run, ~19 min on the project's 2-core machine; ``--quick``: a ~2 min smoke):

    python benchmarks/kv_remote.py --out docs/results/kv_remote_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from kvbaton.kv.store.redis_server import RedisServer
from kvbaton.kv.store.remote_url import REMOTE_PASSWORD_ENV

MODEL = "smollm2-135m"
HERE = Path(__file__).resolve().parent
BENCH_KEYS = ("prefix_cache_hit_rate", "usage_cached_token_rate", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms",
              "mean_ttft_ms", "request_throughput", "output_throughput", "total_token_throughput", "completed",
              "failed", "duration", "total_input_tokens")
_ROUTER = re.compile(r"kvbaton router serving .* at (http://\S+)/v1")
# Log lines worth reporting (workers' and the router's stderr, merged into serve's output).
_PROBLEM = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|Exception|unreachable|refused", re.IGNORECASE)


def log(msg: str) -> None:
    print(f"[kv_remote {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- processes ------------------------------------------------------------------------------


class Serve:
    """What one ``kvbaton serve`` printed: its router URL and the lines that look like trouble."""

    def __init__(self) -> None:
        self.url = ""
        self.lines = 0
        self.problems: list[str] = []  # while it ran
        self.shutdown_problems: list[str] = []  # after the SIGTERM (workers gone before the router)
        self.stopping = False
        self.started_s = 0.0


@contextmanager
def serve(name: str, args: list[str], env: dict[str, str] | None = None,
          timeout_s: float = 600.0) -> Iterator[Serve]:
    """A ``kvbaton serve`` process (router + workers, output merged) until /health answers 200;
    always stopped afterwards (SIGTERM to its process group, then SIGKILL)."""
    cmd = [sys.executable, "-m", "kvbaton.cli", "serve", "--port", "0", "--model", MODEL, *args]
    log(f"[{name}] {' '.join(shlex.quote(c) for c in cmd)}")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    out = Serve()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.lines += 1
            line = line.rstrip()
            if _PROBLEM.search(line):
                (out.shutdown_problems if out.stopping else out.problems).append(line[:400])
                print(f"[{name}]{' (stopping)' if out.stopping else ''} {line}", file=sys.stderr, flush=True)
            m = _ROUTER.search(line)
            if m and not out.url:
                out.url = m.group(1)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: kvbaton serve exited with {proc.returncode}: {out.problems[-5:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not healthy after {timeout_s} s")
            if out.url:
                try:
                    if httpx.get(f"{out.url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        out.started_s = time.monotonic() - t0
        yield out
    finally:
        out.stopping = True
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                out.problems.append("serve did not exit within 60 s of SIGTERM: SIGKILLed")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        reader.join(10)
        if out.problems or out.shutdown_problems:
            log(f"[{name}] {len(out.problems)} problem lines while serving, {len(out.shutdown_problems)} at shutdown")


class Redis:
    """The redis-server every remote configuration shares (a password, so serve's env path runs)."""

    def __init__(self, maxmemory_bytes: int) -> None:
        import redis

        self.password = secrets.token_hex(16)
        self.server = RedisServer(maxmemory_bytes, policy="allkeys-lru", password=self.password).start()
        self.client = redis.Redis.from_url(self.server.url, password=self.password, socket_timeout=30)
        self.url = self.server.url
        self.env = {REMOTE_PASSWORD_ENV: self.password}

    def flush(self) -> None:
        self.client.flushall()
        self.client.config_resetstat()

    def info(self) -> dict[str, Any]:
        mem, stats = self.client.info("memory"), self.client.info("stats")
        return {"keys": int(self.client.dbsize()), "used_memory_mib": mem["used_memory"] / 2**20,
                "maxmemory_mib": mem["maxmemory"] / 2**20, "evicted_keys": stats["evicted_keys"],
                "expired_keys": stats["expired_keys"], "keyspace_hits": stats["keyspace_hits"],
                "keyspace_misses": stats["keyspace_misses"]}

    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])

    def close(self) -> None:
        self.client.close()
        self.server.stop()


# ---- measuring ------------------------------------------------------------------------------


def bench(url: str, args: list[str], out: Path) -> dict[str, Any]:
    """One ``kvbaton bench run`` (as benchmarks/kv_tiers.py runs it); its result JSON."""
    cmd = [sys.executable, "-m", "kvbaton.cli", "bench", "run", "--base-url", url, "--result-file", str(out),
           "--no-progress", "--temperature", "0", *args]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    res: dict[str, Any] = json.loads(out.read_text())
    return res


def cluster_metrics(url: str) -> dict[str, float]:
    """The workers' KV series federated by the router, summed over workers: ``name[tier]``
    for the tier counters, plain names for the remote tier's and the prefix cache's."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("kvbaton:")
            if name.startswith("kv_tier_") and name.endswith(("_total", "_sum", "_count")):
                key = f"{name.removeprefix('kv_tier_')}[{s.labels.get('tier', '')}]"
            elif name.startswith(("kv_remote_", "prefix_cache_", "kv_offload_sync_stores")):
                key = name
            else:
                continue
            out[key] = out.get(key, 0.0) + float(s.value)
    return dict(sorted(out.items()))


def _ancestors(pid: str) -> set[str]:
    seen: set[str] = set()
    while pid not in ("0", "1") and pid not in seen:
        seen.add(pid)
        try:
            pid = (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            break
    return seen


def other_work() -> list[str]:
    """Tests, type checks and benchmarks on the machine now that are not this script's own
    (someone else's load on the 2 cores)."""
    me, found = str(os.getpid()), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or me in _ancestors(d.name):
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if re.search(r"pytest|mypy|ruff|pip install|benchmarks/|kvbaton\.cli|kvbaton worker|kvbaton serve", cmd):
            found.append(f"{d.name}: {cmd[:160]}")
    return found


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# ---- part 1: the cluster --------------------------------------------------------------------


def qa_workload(a: argparse.Namespace, think_time: float | None = None, request_rate: float | None = None) -> list[str]:
    """``kvbaton bench run`` flags of the multi-round QA sessions (one seed for every run; the
    think time changes when turns are sent, not what they say, as long as it is > 0)."""
    return ["--workload", "multi-turn", "--num-prompts", str(a.sessions), "--turns", str(a.turns),
            "--context-len", str(a.context_len), "--user-len", str(a.user_len), "--output-len", str(a.output_len),
            "--think-time", str(think_time or a.think_time), "--max-concurrency", str(a.sessions),
            "--request-rate", str(request_rate or a.request_rate), "--seed", str(a.seed)]


def small_tiers(a: argparse.Namespace) -> list[str]:
    return ["--num-kv-blocks", str(a.num_kv_blocks), "--kv-host-cache-gib", str(a.host_gib)]


def cluster_configs(a: argparse.Namespace) -> dict[str, list[str]]:
    base = ["--colocated", str(a.workers), "--threads-per-worker", "1", *small_tiers(a),
            "--disagg-min-tokens", str(a.disagg_min_tokens)]
    kv_aware = ["--policy", "kv_aware", "--prefill-load-scale", str(a.prefill_load_scale)]
    configs = {
        "round_robin": [*base, "--policy", "round_robin"],
        "round_robin+remote": [*base, "--policy", "round_robin", "--kv-remote-url", "REDIS"],
        "kv_aware": [*base, *kv_aware],
        "kv_aware+remote": [*base, *kv_aware, "--kv-remote-url", "REDIS"],
    }
    return {k: v for k, v in configs.items() if k in a.configs.split(",")}


def run_config(name: str, args: list[str], redis: Redis, workload: list[str], out: Path) -> dict[str, Any]:
    """One cold run: an empty Redis, a fresh serve, one bench; its numbers and what it logged."""
    remote = "REDIS" in args
    args = [redis.url if x == "REDIS" else x for x in args]
    redis.flush()
    load_before, others_before = os.getloadavg(), other_work()
    t0 = time.monotonic()
    with serve(name, args, env=redis.env if remote else None) as s:
        t1 = time.monotonic()
        res = bench(s.url, workload, out)
        t2 = time.monotonic()
        metrics = cluster_metrics(s.url)
        others_after = other_work()
    row: dict[str, Any] = {k: res.get(k) for k in BENCH_KEYS}
    row.update({
        "ttfts_s": res.get("ttfts"), "errors": res.get("errors"), "metrics": metrics,
        "redis": redis.info() if remote else None, "startup_s": s.started_s, "bench_s": t2 - t1,
        "wall_s": time.monotonic() - t0, "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "other_work_before": others_before, "other_work_after": others_after, "log_lines": s.lines,
        "log_problems": s.problems[:20], "log_problem_count": len(s.problems),
        "log_shutdown_problems": s.shutdown_problems[:10],
    })
    short = {k: row[k] for k in ("prefix_cache_hit_rate", "usage_cached_token_rate", "median_ttft_ms",
                                 "p99_ttft_ms", "completed", "failed")}
    log(f"{name}: {json.dumps(short)} remote hit tokens {metrics.get('hit_tokens_total[remote]')} "
        f"startup {s.started_s:.0f} s bench {t2 - t1:.0f} s; other work: {len(others_before)} / {len(others_after)}")
    return row


def summarize_config(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [t * 1000 for r in rows for t in (r.get("ttfts_s") or [])]
    hits = sum(r["metrics"].get("prefix_cache_hits_total", 0.0) for r in rows)
    queries = sum(r["metrics"].get("prefix_cache_queries_total", 0.0) for r in rows)

    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return statistics.fmean(vals) if vals else None

    return {
        "runs": len(rows),
        "hit_rate": hits / queries if queries else None,  # worker counters: device hits incl. tier loads
        "usage_cached_token_rate": mean("usage_cached_token_rate"),  # client-seen cached_tokens / prompt
        "ttft_p50_ms": pct(ttfts, 50), "ttft_p90_ms": pct(ttfts, 90), "ttft_p99_ms": pct(ttfts, 99),
        "ttft_max_ms": max(ttfts) if ttfts else None,
        "ttft_p99_ms_per_round": [r.get("p99_ttft_ms") for r in rows],
        "ttft_p50_ms_per_round": [r.get("median_ttft_ms") for r in rows],
        "hit_rate_per_round": [r.get("prefix_cache_hit_rate") for r in rows],
        "request_throughput": mean("request_throughput"), "output_throughput": mean("output_throughput"),
        "total_token_throughput": mean("total_token_throughput"),
        "completed": sum(r.get("completed") or 0 for r in rows), "failed": sum(r.get("failed") or 0 for r in rows),
        "remote_hit_tokens": sum(r["metrics"].get("hit_tokens_total[remote]", 0.0) for r in rows),
        "host_hit_tokens": sum(r["metrics"].get("hit_tokens_total[host]", 0.0) for r in rows),
    }


def cluster(a: argparse.Namespace, redis: Redis, tmp: Path) -> dict[str, Any]:
    configs = cluster_configs(a)
    workload = qa_workload(a)
    result: dict[str, Any] = {"configs": configs, "workload": workload}
    infinite_args = ["--colocated", "1", "--threads-per-worker", str(a.infinite_threads),
                     "--num-kv-blocks", str(a.infinite_blocks), "--kv-host-cache-gib", "0"]
    result["infinite_config"] = infinite_args
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    names = list(configs)
    for r in range(a.rounds):
        if r == 0 and not a.no_infinite:
            result["infinite"] = run_config("infinite", infinite_args, redis, workload, tmp / "infinite.json")
        for name in names if r % 2 == 0 else names[::-1]:
            row = run_config(name, configs[name], redis, workload, tmp / f"{name}-{r}.json")
            row["round"] = r
            rows[name].append(row)
    result["rounds"] = rows
    summary = {name: summarize_config(rs) for name, rs in rows.items()}
    best = None
    if "infinite" in result:
        inf = result["infinite"]["metrics"]
        q = inf.get("prefix_cache_queries_total", 0.0)
        best = inf.get("prefix_cache_hits_total", 0.0) / q if q else None
    result["best_achievable_hit_rate"] = best
    result["best_achievable_method"] = (
        "measured: the same sessions on one worker with a device pool that holds everything "
        f"({a.infinite_blocks} blocks, no eviction): its prefix-cache hits / queries, i.e. every prompt "
        "token in a full 16-token block whose chain prefix an earlier request computed")
    for s in summary.values():
        s["hit_rate_vs_best"] = ratio(s["hit_rate"], best)
    targets: dict[str, Any] = {}
    if "round_robin+remote" in summary:
        v = summary["round_robin+remote"]["hit_rate_vs_best"]
        targets["round_robin+remote hit rate >= 0.95 x best achievable"] = {
            "value": v, "pass": v is not None and v >= 0.95}
    if "kv_aware+remote" in summary and "kv_aware" in summary:
        a_p99, b_p99 = summary["kv_aware+remote"]["ttft_p99_ms"], summary["kv_aware"]["ttft_p99_ms"]
        targets["kv_aware+remote TTFT p99 <= kv_aware TTFT p99"] = {
            "value": [a_p99, b_p99], "pass": a_p99 is not None and b_p99 is not None and a_p99 <= b_p99}
    result["summary"] = summary
    result["targets"] = targets
    return result


# ---- part 2: a late worker ------------------------------------------------------------------


def first_turns(a: argparse.Namespace) -> list[str]:
    """The first-turn prompts of the workload's sessions, as ``kvbaton bench`` sends them
    (completions: the session's prefix, then its first user turn)."""
    from kvbaton.bench.workloads import load_tokenizer, make_workload

    wl = make_workload("multi-turn", tokenizer=load_tokenizer(None), seed=a.seed, num_sessions=a.sessions,
                       turns=a.turns, context_len=a.context_len, user_len=a.user_len, output_len=a.output_len,
                       think_time=a.warm_think_time)
    return [s.prefix + s.turns[0].user for s in wl.sessions()]


def replay(url: str, prompts: list[str]) -> dict[str, Any]:
    """Each prompt once, one at a time (1 output token: latency ~ TTFT); usage and timings."""
    lat, prompt_tokens, cached = [], 0, 0
    with httpx.Client(timeout=300) as client:
        for p in prompts:
            t0 = time.perf_counter()
            r = client.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 1,
                                                            "temperature": 0})
            lat.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            usage = r.json()["usage"]
            prompt_tokens += usage["prompt_tokens"]
            cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    m = cluster_metrics(url)
    return {"requests": len(prompts), "prompt_tokens": prompt_tokens, "usage_cached_tokens": cached,
            "remote_hit_tokens": m.get("hit_tokens_total[remote]", 0.0),
            "remote_loads": m.get("loads_total[remote]", 0.0),
            "remote_fraction": m.get("hit_tokens_total[remote]", 0.0) / prompt_tokens if prompt_tokens else None,
            "cached_fraction": cached / prompt_tokens if prompt_tokens else None,
            "latency_ms_p50": pct(lat, 50), "latency_ms_p90": pct(lat, 90), "latency_ms_mean": statistics.fmean(lat),
            "latency_ms": lat, "metrics": m}


def late_worker(a: argparse.Namespace, redis: Redis, tmp: Path) -> dict[str, Any]:
    redis.flush()
    warm_args = ["--colocated", str(a.late_warm_workers), "--threads-per-worker", "1", *small_tiers(a),
                 "--policy", "round_robin", "--disagg-min-tokens", str(a.disagg_min_tokens),
                 "--kv-remote-url", redis.url]
    late_args = ["--colocated", "1", "--threads-per-worker", str(a.infinite_threads), *small_tiers(a)]
    out: dict[str, Any] = {"warm_up_config": warm_args, "late_config": [*late_args, "--kv-remote-url", redis.url],
                           "control_config": late_args, "workload": qa_workload(a, a.warm_think_time,
                                                                                 a.warm_request_rate)}
    with serve("warm-up", warm_args, env=redis.env) as s:
        res = bench(s.url, out["workload"], tmp / "late-warm.json")
        out["warm_up"] = {k: res.get(k) for k in BENCH_KEYS}
        out["warm_up"]["metrics"] = cluster_metrics(s.url)
        time.sleep(1.0)
    out["warm_up"]["log_problems"], out["warm_up"]["log_shutdown_problems"] = s.problems[:20], s.shutdown_problems[:10]
    out["redis_after_warm_up"] = redis.info()
    prompts = first_turns(a)
    with serve("late-worker", [*late_args, "--kv-remote-url", redis.url], env=redis.env) as s:
        out["late"] = replay(s.url, prompts)
    out["late"]["log_problems"], out["late"]["log_shutdown_problems"] = s.problems[:20], s.shutdown_problems[:10]
    with serve("late-control", late_args) as s:  # the same prompts computed: no store to load from
        out["control"] = replay(s.url, prompts)
    out["control"]["log_problems"], out["control"]["log_shutdown_problems"] = s.problems[:20], s.shutdown_problems[:10]
    frac = out["late"]["remote_fraction"]
    out["ttft_speedup_vs_control"] = ratio(out["control"]["latency_ms_p50"], out["late"]["latency_ms_p50"])
    out["target"] = {"late worker: prompt tokens from the store >= 0.8": {
        "value": frac, "pass": frac is not None and frac >= 0.8}}
    log(f"late worker: {json.dumps({k: out['late'][k] for k in ('remote_fraction', 'latency_ms_p50')})} "
        f"control p50 {out['control']['latency_ms_p50']:.0f} ms")
    return out


# ---- part 3: bandwidth ----------------------------------------------------------------------


def bandwidth(a: argparse.Namespace, redis: Redis, tmp: Path) -> dict[str, Any]:
    import redis as redis_py
    import torch
    from redis.utils import HIREDIS_AVAILABLE

    from kvbaton.kv.hashing import HASH_BYTES
    from kvbaton.kv.store.base import BlockMeta
    from kvbaton.kv.store.remote import BATCH_BLOCKS, RemoteTier

    torch.set_num_threads(1)
    n, block_bytes, bs = a.bw_blocks, 512 * 1024, 16
    nbytes = n * block_bytes
    redis.flush()
    tier = RemoteTier(redis.url, block_bytes, bs, "bench-layout", "bench-model", namespace="kvb-bw",
                      password=redis.password, timeout_s=30.0)
    assert tier.up, tier.last_error
    src = torch.randint(0, 256, (n, block_bytes), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    hashes = [hashlib.sha256(str(i).encode()).digest()[:HASH_BYTES] for i in range(n)]
    metas = [BlockMeta(hashes[i - 1] if i else None, tuple(range(i * bs, (i + 1) * bs))) for i in range(n)]
    ids = list(range(n))
    write_s, read_s, probe_s, memcpy_s = [], [], [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        stored = tier.write(hashes, metas, src, ids)
        write_s.append(time.perf_counter() - t0)
        assert len(stored) == n, f"stored {len(stored)} of {n}"
        dst.zero_()
        t0 = time.perf_counter()
        got = tier.read(hashes, metas, dst, ids)
        read_s.append(time.perf_counter() - t0)
        assert got.leading_ok == n, got.status
        t0 = time.perf_counter()
        assert tier.probe(hashes) == n
        probe_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        memcpy_s.append(time.perf_counter() - t0)
    tier.read(hashes, metas, dst, ids)
    dst.copy_(torch.zeros_like(src))
    tier.read(hashes, metas, dst, ids)
    intact = bool(torch.equal(dst, src))
    tier.close()
    redis.flush()

    def gbps(ts: list[float]) -> float:
        return nbytes / statistics.median(ts) / 1e9

    out: dict[str, Any] = {
        "blocks": n, "block_bytes": block_bytes, "bytes": nbytes, "repeats": a.repeats,
        "blocks_per_round_trip": BATCH_BLOCKS, "statistic": "median of repeats",
        "remote_read_gbps": gbps(read_s), "remote_write_gbps": gbps(write_s), "memcpy_gbps": gbps(memcpy_s),
        "remote_read_vs_memcpy": gbps(read_s) / gbps(memcpy_s),
        "remote_read_ms": [t * 1000 for t in read_s], "remote_write_ms": [t * 1000 for t in write_s],
        "probe_ms_median": statistics.median(probe_s) * 1000, "read_data_intact": intact,
        "memcpy": "torch copy_ of the same bytes between two CPU tensors, 1 thread",
        "redis_server": redis.version(), "redis_py": redis_py.__version__,
        "redis_py_parser": "hiredis" if HIREDIS_AVAILABLE else "pure Python (hiredis not installed)",
    }
    read = out["remote_read_gbps"]
    out["target"] = {"remote read >= 1 GB/s": {"value": read, "pass": read >= 1.0}}
    log(f"bandwidth: read {out['remote_read_gbps']:.2f} GB/s write {out['remote_write_gbps']:.2f} GB/s "
        f"memcpy {out['memcpy_gbps']:.2f} GB/s")
    if a.transfer_plane:
        mib = max(1, nbytes // 2**20)
        path = tmp / "kv_transfer.json"
        cmd = [sys.executable, str(HERE / "kv_transfer.py"), "--sizes-mib", str(mib), "--paths", "tcp", "shm",
               "--repeats", str(a.repeats), "--out", str(path)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        tr = json.loads(path.read_text())
        row = tr["rows"][0]
        out["transfer_plane"] = {
            "command": " ".join(["python", "benchmarks/kv_transfer.py", *cmd[2:-2]]),
            "bytes_per_block": tr["spec"]["bytes_per_block"], "mib": row["mib"], "statistic": "best of repeats",
            "tcp_warm_gbps": row["tcp"]["warm_gbps"], "shm_warm_gbps": row["shm"]["warm_gbps"],
            "memcpy_gbps": row["memcpy_gbps"]}
        log(f"transfer plane: {json.dumps(out['transfer_plane'])}")
    return out


# ---- main -----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="a ~2-minute smoke run: 2 workers, 2 configurations, "
                    "a few short sessions, one round")
    ap.add_argument("--parts", default="cluster,late-worker,bandwidth")
    ap.add_argument("--configs", default="round_robin,round_robin+remote,kv_aware,kv_aware+remote")
    ap.add_argument("--rounds", type=int, default=2, help="A B C D, then D C B A, ...")
    ap.add_argument("--workers", type=int, default=4)
    # Sessions: each about its own 384-token context; ~36 blocks of history each by the last
    # turn, ~430 blocks (~320 MB) in all: ~4x one worker's device pool + host tier (~107
    # blocks), a third of the Redis. Rate and think time keep the round-robin cluster without
    # the remote tier (the most prefill work) below saturation, so TTFT measures prefill work.
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--context-len", type=int, default=384)
    ap.add_argument("--user-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--think-time", type=float, default=5.0)
    ap.add_argument("--request-rate", type=float, default=0.3, help="sessions starting per second")
    ap.add_argument("--num-kv-blocks", type=int, default=64, help="device pool per worker (16-token blocks)")
    ap.add_argument("--host-gib", type=float, default=0.03, help="host tier per worker (~43 blocks of 737,280 B)")
    ap.add_argument("--disagg-min-tokens", type=int, default=1_000_000,
                    help="the router's; the default keeps each request on the one worker the policy picks "
                         "(no prefill on another colocated worker and KV handoff)")
    ap.add_argument("--warm-think-time", type=float, default=1.0, help="late-worker warm-up's think time")
    ap.add_argument("--warm-request-rate", type=float, default=1.0, help="late-worker warm-up's session rate")
    ap.add_argument("--redis-gib", type=float, default=1.0, help="maxmemory of the shared redis-server")
    ap.add_argument("--prefill-load-scale", type=float, default=8.0, help="kv_aware's (as the recorded runs)")
    ap.add_argument("--infinite-blocks", type=int, default=4096)
    ap.add_argument("--infinite-threads", type=int, default=2)
    ap.add_argument("--no-infinite", action="store_true", help="skip the best-achievable run")
    ap.add_argument("--late-warm-workers", type=int, default=2)
    ap.add_argument("--bw-blocks", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-transfer-plane", dest="transfer_plane", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.workers, a.sessions, a.turns, a.context_len = 1, 2, 4, 2, 256
        a.think_time, a.request_rate, a.repeats, a.bw_blocks = 1.0, 2.0, 3, 16
        if a.configs == ap.get_default("configs"):
            a.configs = "round_robin,round_robin+remote"
    parts = set(a.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="kvb-remote-"))
    t_start = time.monotonic()
    result: dict[str, Any] = {"bench": "kv_remote", "args": vars(a), "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "load_avg_start": os.getloadavg()}}
    import kvbaton

    result["kvbaton_path"] = str(Path(kvbaton.__file__).parent)
    redis = Redis(int(a.redis_gib * 2**30))
    result["redis"] = {"version": redis.version(), "maxmemory_gib": a.redis_gib, "policy": "allkeys-lru"}
    try:
        if "bandwidth" in parts:
            result["bandwidth"] = bandwidth(a, redis, tmp)
        if "cluster" in parts:
            result["cluster"] = cluster(a, redis, tmp)
        if "late-worker" in parts:
            result["late_worker"] = late_worker(a, redis, tmp)
    finally:
        redis.close()
        result["machine"]["load_avg_end"] = os.getloadavg()
        result["wall_s"] = time.monotonic() - t_start
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    brief: dict[str, Any] = {"wall_s": round(result["wall_s"])}
    if "cluster" in result:
        brief["best_achievable_hit_rate"] = result["cluster"]["best_achievable_hit_rate"]
        brief["cluster"] = {n: {k: s[k] for k in ("hit_rate", "hit_rate_vs_best", "usage_cached_token_rate",
                                                   "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "request_throughput")}
                            for n, s in result["cluster"]["summary"].items()}
        brief["targets"] = result["cluster"]["targets"]
    if "late_worker" in result:
        brief["late_worker"] = result["late_worker"]["target"]
    if "bandwidth" in result:
        brief["bandwidth"] = {k: result["bandwidth"][k] for k in ("remote_read_gbps", "remote_write_gbps",
                                                                   "memcpy_gbps")}
    print(json.dumps(brief, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
