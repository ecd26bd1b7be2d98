"""kvbaton's router in front of two real `vllm serve` workers (vLLM's CPU build), with their KV
events on: ``--policy kv_aware`` against ``--policy round_robin`` on the shared-prefix and
multi-turn workloads, rounds interleaved A B B A.

Each vLLM worker is pinned to one of this machine's two cores (``VLLM_CPU_OMP_THREADS_BIND``),
runs with prefix caching, ``--enable-prompt-tokens-details`` (its usage reports cached tokens)
and ``--kv-events-config`` (ZMQ PUB + replay), and is given to the router as
``--vllm-worker URL,events=tcp://...,replay=tcp://...``. Before every round both caches are
reset (``POST /reset_prefix_cache``, vLLM's dev mode) and a fresh router is started, so each
round begins cold. Per round it records the bench summary (TTFT, throughput) and, from both
sides of the wire:

- vLLM's own prefix-cache hit rate: the change of ``vllm:prefix_cache_hits_total`` over
  ``vllm:prefix_cache_queries_total`` (tokens) on both workers during the round;
- the router's prediction: prompt tokens its index expected cached on the worker it chose
  (``kvbaton:router_kv_predicted_cached_tokens_total``), beside what the workers reported in
  usage (``kvbaton:router_kv_actual_cached_tokens_total``) and the change of vLLM's hit counter.

``--mixed``: the second worker is one of ours (`kvbaton worker`, pinned to core 1, started
afresh for every row instead of reset) and both run with block size 32, so the router drives a
mixed cluster: vLLM's blocks re-keyed into the chain rooted in our worker's model fingerprint,
beside our worker's own events, in one index.

It creates vLLM's virtual environment like benchmarks/vs_vllm_cpu.py (a benchmark, not a test:
CI never installs vLLM). vLLM takes about 3 minutes to start here.

    python benchmarks/vllm_workers.py --out docs/results/vllm_workers.json
    python benchmarks/vllm_workers.py --mixed --rounds CBBC --out docs/results/vllm_workers_mixed.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvbaton.models.gguf import cached_hf_dir_for_gguf, find_bundled_smollm2_gguf, kvbaton_cache_dir
from kvbaton.router.vllm_worker import parse_vllm_metrics
from topology_compare import stop_group
from vs_vllm_cpu import VLLM_VERSION, WORKLOADS, bench, ensure_peer_env, free_port, load_average, serve_vllm

ROWS = ("shared-prefix-8x512-c4", "multi-turn-3-c4")
MIXED_BLOCK_SIZE = 32  # vLLM's CPU attention takes multiples of 32; ours any size
# Round letters: (label, the router's placement flags).
POLICIES = {"A": ("kv_aware", "--policy kv_aware"), "B": ("round_robin", "--policy round_robin"),
            "C": ("kv_aware_scale4", "--policy kv_aware --prefill-load-scale 4")}


@contextmanager
def vllm_worker(cli: Path, model_dir: Path, cpu: str, role: str | None = None,
                block_size: int | None = None) -> Iterator[str]:
    """One `vllm serve` on core ``cpu`` with KV events; yields its --vllm-worker spec. With
    ``role`` it also runs vLLM's NixlConnector on host memory (``kv_buffer_device: cpu``) and
    the spec says which legs it takes."""
    pub, replay = free_port(), free_port()
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{pub}",
              "replay_endpoint": f"tcp://*:{replay}", "topic": "kv-events"}
    extra = ["--enable-prompt-tokens-details", "--kv-events-config", json.dumps(events)]
    if block_size is not None:
        extra += ["--block-size", str(block_size)]
    env = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    if role is not None:
        connector = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
        extra += ["--kv-transfer-config", json.dumps(connector)]
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port())  # one per process on a host
    with serve_vllm(cli, model_dir, "float32", extra_args=extra, cpus=cpu, env_extra=env) as url:
        spec = f"{url},events=tcp://127.0.0.1:{pub},replay=tcp://127.0.0.1:{replay}"
        yield spec if role is None else f"{spec},role={role}"


@contextmanager
def kvbaton_worker(model_dir: Path, cpu: str, block_size: int) -> Iterator[str]:
    """One `kvbaton worker` (both roles, one thread) pinned to core ``cpu``; yields its URL."""
    port = free_port()
    cmd = ["taskset", "-c", cpu, sys.executable, "-m", "kvbaton.cli", "worker", "--model", str(model_dir),
           "--port", str(port), "--threads", "1", "--block-size", str(block_size)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, "the kvbaton worker")
        yield url
    finally:
        stop_group(proc)


def _wait_healthy(proc: subprocess.Popen[Any], url: str, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not become healthy in {timeout_s:.0f} s")
        time.sleep(0.5)


@contextmanager
def router(model_dir: Path, specs: list[str], flags: str) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "kvbaton.cli", "router", "--model", str(model_dir), "--port", str(port),
           *shlex.split(flags), *[a for s in specs for a in ("--vllm-worker", s)]]
    print(f"[router] {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, "the router", 120)
        yield url
    finally:
        stop_group(proc)


def worker_url(spec: str) -> str:
    return spec.split(",", 1)[0]


def cache_counters(urls: list[str]) -> dict[str, tuple[float, float]]:
    """(prefix-cache queries, hits) per worker, tokens: vLLM's series or ours."""
    out = {}
    for u in urls:
        text = httpx.get(f"{u}/metrics", timeout=10).text
        m = parse_vllm_metrics(text)
        if m.prefix_queries is not None:
            out[u] = (m.prefix_queries, m.prefix_hits or 0.0)
            continue
        sums = {"kvbaton:prefix_cache_queries_total": 0.0, "kvbaton:prefix_cache_hits_total": 0.0}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name in sums:
                    sums[s.name] += s.value
        out[u] = (sums["kvbaton:prefix_cache_queries_total"], sums["kvbaton:prefix_cache_hits_total"])
    return out


def router_counters(url: str) -> dict[str, float]:
    """The router's cache-prediction counters, summed over workers."""
    want = {"kvbaton:router_kv_predicted_cached_tokens_total": "predicted",
            "kvbaton:router_kv_actual_cached_tokens_total": "reported",
            "kvbaton:router_kv_prompt_tokens_total": "prompt"}
    sums = dict.fromkeys(want.values(), 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name in want:
                sums[want[s.name]] += s.value
    return sums


def reset_caches(model: str, urls: list[str]) -> None:
    """Empty both prefix caches; one tiny request each makes vLLM publish the reset's
    AllBlocksCleared (it goes out with the next step's events)."""
    for u in urls:
        r = httpx.post(f"{u}/reset_prefix_cache", timeout=30)
        r.raise_for_status()
        httpx.post(f"{u}/v1/completions", json={"model": model, "prompt": [1], "max_tokens": 1},
                   timeout=60).raise_for_status()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", default="ABBA", help="A = kv_aware, B = round_robin, C = kv_aware with "
                    "--prefill-load-scale 4, in this order")
    ap.add_argument("--workload", action="append", choices=ROWS, help="a row (repeatable; default both)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16,
                    help="tokens per answer (short: the prompts' prefill, where the cache matters, dominates)")
    ap.add_argument("--peer-env", type=Path, default=kvbaton_cache_dir() / "peers" / "vllm-cpu")
    ap.add_argument("--mixed", action="store_true",
                    help="the second worker is a kvbaton worker (block size 32 on both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if set(args.rounds) - set(POLICIES) or not args.rounds:
        ap.error(f"--rounds: only A and B, got {args.rounds!r}")
    rows = args.workload or list(ROWS)
    cli = ensure_peer_env(args.peer_env)
    model_dir = cached_hf_dir_for_gguf(find_bundled_smollm2_gguf())
    used = {POLICIES[letter][0] for letter in args.rounds}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {r: {p: [] for p, _ in POLICIES.values() if p in used}
                                                        for r in rows}
    with ExitStack() as stack:
        if args.mixed:
            vllm_specs = [stack.enter_context(vllm_worker(cli, model_dir, "0", block_size=MIXED_BLOCK_SIZE))]
        else:
            vllm_specs = [stack.enter_context(vllm_worker(cli, model_dir, cpu)) for cpu in ("0", "1")]
        for i, letter in enumerate(args.rounds):
            policy, policy_flags = POLICIES[letter]
            for row in rows:
                flags = f"{WORKLOADS[row]} --output-len {args.output_len}"
                reset_caches(str(model_dir), [worker_url(s) for s in vllm_specs])
                with ExitStack() as row_stack:
                    ours = ([row_stack.enter_context(kvbaton_worker(model_dir, "1", MIXED_BLOCK_SIZE))]
                            if args.mixed else [])
                    urls = [worker_url(s) for s in vllm_specs] + ours
                    flags_router = policy_flags + "".join(f" --worker {u}" for u in ours)
                    url = row_stack.enter_context(router(model_dir, vllm_specs, flags_router))
                    before = cache_counters(urls)
                    load = load_average()
                    r = bench(url, flags, args.num_prompts, args.seed)
                    time.sleep(1.0)  # the last usage chunks are counted
                    after = cache_counters(urls)
                    rc = router_counters(url)
                queries = sum(after[u][0] - before[u][0] for u in urls)
                hits = sum(after[u][1] - before[u][1] for u in urls)
                r.update(round=i, policy=policy, load_before=round(load, 2),
                         vllm_hit_rate=hits / queries if queries else None, vllm_hit_tokens=hits,
                         vllm_query_tokens=queries, router_predicted_cached=rc["predicted"],
                         router_reported_cached=rc["reported"], router_prompt_tokens=rc["prompt"],
                         per_worker_queries={u: after[u][0] - before[u][0] for u in urls})
                runs[row][policy].append(r)
                print(f"round {i} {policy:11s} {row:24s} hit {r['vllm_hit_rate'] or 0:.3f} "
                      f"TTFT p50 {r['median_ttft_ms']:7.1f} ms  {r['output_throughput']:6.1f} tok/s  "
                      f"predicted {rc['predicted']:.0f} / vLLM hits {hits:.0f} (load {load:.2f})",
                      file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for row, by in runs.items():
        med = {p: {k: statistics.median(x[k] for x in rs) if rs else None
                   for k in ("vllm_hit_rate", "median_ttft_ms", "p99_ttft_ms", "output_throughput")}
               for p, rs in by.items()}
        # How well the router's index predicts vLLM's own hit counter, over every round.
        agreement = [x["router_predicted_cached"] / x["vllm_hit_tokens"]
                     for rs in by.values() for x in rs if x["vllm_hit_tokens"]]
        summary[row] = {**med, "prediction_over_vllm_hits": [min(agreement), max(agreement)] if agreement else None}
    result = {"vllm": f"vllm-cpu {VLLM_VERSION}", "model_dir": str(model_dir), "rounds": args.rounds,
              "mixed": args.mixed,
              "num_prompts": args.num_prompts, "output_len": args.output_len, "summary": summary, "runs": runs,
              "command": " ".join(shlex.quote(a) for a in sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row, s in summary.items():
        print(f"{row}: {json.dumps(s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
