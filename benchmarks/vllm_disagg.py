"""Disaggregated vLLM behind kvbaton's router: a vLLM CPU prefill worker and a vLLM CPU decode
worker, both running vLLM's NixlConnector on host memory (NIXL over UCX), listed as
``--vllm-worker ...,role=prefill`` and ``...,role=decode``. The router runs each request's
prefill leg on the first (``kv_transfer_params: {"do_remote_decode": true}``, one token) and
hands vLLM's answer (``remote_engine_id``, ``remote_block_ids``, ...) unchanged to the decode
leg on the second, whose connector pulls the KV: the protocol llm-d's sidecar speaks.

It checks and records:

- greedy equality: every prompt's answer through the disaggregated router equals the prefill
  worker's own colocated answer to the same prompt (temperature 0);
- the path of every request (the router's ``requests_total{path}``) and the decode worker's
  NIXL transfers (``vllm:nixl_xfer_time_seconds`` count and sum);
- a `kvbaton bench` run through it (random 256/64, concurrency 2) beside the same run against
  the two vLLM workers colocated (``--vllm-worker`` without ``role=``, ``round_robin``),
  interleaved A B B A. Both servers share this machine's two cores (one each), so this shows
  the mechanism works and what it costs here, not what P/D buys on a GPU cluster.

It creates vLLM's environment like benchmarks/vs_vllm_cpu.py, plus NIXL (`pip install nixl`).
Not a test: CI never installs vLLM.

    python benchmarks/vllm_disagg.py --out docs/results/vllm_disagg.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kvbaton.models.gguf import cached_hf_dir_for_gguf, find_bundled_smollm2_gguf, kvbaton_cache_dir
from vllm_workers import reset_caches, router, vllm_worker, worker_url
from vs_vllm_cpu import VLLM_VERSION, bench, ensure_nixl, ensure_peer_env, load_average

PROMPTS = [
    "Explain in two sentences why the sky looks blue at noon and red at sunset.",
    "Write a short note to a neighbour asking them to water the plants while you travel.",
    "List three differences between a suspension bridge and an arch bridge.",
    "The printing press changed Europe because",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Summarize the plot of a detective story set in a lighthouse, in one paragraph.",
]
BENCH = "--workload random --input-len 256 --output-len 64 --max-concurrency 2"


def samples(url: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of the named samples (over labels) in ``url``'s /metrics."""
    out = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name in out:
                out[s.name] += s.value
    return out


def paths(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "kvbaton:router_requests_total":
                out[s.labels["path"]] = s.value
    return out


def complete(url: str, model: str | None, prompt: str) -> str:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": 32, "temperature": 0}
    if model:  # straight to vLLM: tokenized as the router tokenizes (no special tokens added)
        body.update(model=model, add_special_tokens=False)
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    return str(r.json()["choices"][0]["text"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", default="ABBA", help="A = disaggregated (1P1D), B = colocated x2")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--peer-env", type=Path, default=kvbaton_cache_dir() / "peers" / "vllm-cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if set(args.rounds) - {"A", "B"} or not args.rounds:
        ap.error(f"--rounds: only A and B, got {args.rounds!r}")
    cli = ensure_peer_env(args.peer_env)
    ensure_nixl(args.peer_env)
    model_dir = cached_hf_dir_for_gguf(find_bundled_smollm2_gguf())
    model = str(model_dir)
    result: dict[str, Any] = {"vllm": f"vllm-cpu {VLLM_VERSION}", "connector": "NixlConnector (UCX, host memory)",
                              "command": " ".join(shlex.quote(a) for a in sys.argv), "bench": BENCH,
                              "num_prompts": args.num_prompts}
    with ExitStack() as stack:
        p_spec = stack.enter_context(vllm_worker(cli, model_dir, "0", role="prefill"))
        d_spec = stack.enter_context(vllm_worker(cli, model_dir, "1", role="decode"))
        p_url, d_url = worker_url(p_spec), worker_url(d_spec)
        disagg = [p_spec, d_spec]
        colocated = [s.rsplit(",role=", 1)[0] for s in disagg]
        # 1. Greedy equality, prompt by prompt: through the router (disaggregated), then the
        # prefill worker's own answer to the same prompt.
        reset_caches(model, [p_url, d_url])
        nixl = ("vllm:nixl_xfer_time_seconds_count", "vllm:nixl_xfer_time_seconds_sum")
        before = samples(d_url, nixl)
        checks = []
        with router(model_dir, disagg, "--policy round_robin --disagg-min-tokens 0") as url:
            for prompt in PROMPTS:
                via_router = complete(url, None, prompt)
                colocated_answer = complete(p_url, model, prompt)
                checks.append({"prompt": prompt, "equal": via_router == colocated_answer,
                               "router": via_router, "colocated": colocated_answer})
            result["equality_paths"] = paths(url)
        after = samples(d_url, nixl)
        result["greedy_equal"] = f"{sum(c['equal'] for c in checks)}/{len(checks)}"
        result["nixl_transfers"] = after[nixl[0]] - before[nixl[0]]
        result["nixl_transfer_s_mean"] = ((after[nixl[1]] - before[nixl[1]]) / result["nixl_transfers"]
                                          if result["nixl_transfers"] else None)
        result["checks"] = checks
        print(f"greedy equal {result['greedy_equal']}, paths {result['equality_paths']}, "
              f"NIXL transfers {result['nixl_transfers']:.0f}", file=sys.stderr, flush=True)
        # 2. The same bench through 1P1D and through the two workers colocated.
        runs: dict[str, list[dict[str, Any]]] = {"disaggregated": [], "colocated": []}
        for i, letter in enumerate(args.rounds):
            name, specs = ("disaggregated", disagg) if letter == "A" else ("colocated", colocated)
            reset_caches(model, [p_url, d_url])
            with router(model_dir, specs, "--policy round_robin") as url:
                load = load_average()
                r = bench(url, BENCH, args.num_prompts, args.seed)
                time.sleep(0.5)
                r.update(round=i, load_before=round(load, 2), paths=paths(url))
            runs[name].append(r)
            print(f"round {i} {name:13s} TTFT p50 {r['median_ttft_ms']:7.1f} ms TPOT p50 "
                  f"{r['median_tpot_ms']:6.1f} ms {r['output_throughput']:6.1f} tok/s paths {r['paths']} "
                  f"(load {load:.2f})", file=sys.stderr, flush=True)
        result["runs"] = runs
        result["summary"] = {name: {k: statistics.median(x[k] for x in rs)
                                    for k in ("median_ttft_ms", "median_tpot_ms", "output_throughput")}
                             for name, rs in runs.items() if rs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
