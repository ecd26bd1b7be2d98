"""A load generator the anchors use (vLLM's GuideLLM) against `kvbaton serve`, unchanged, beside
`kvbaton bench run` on the same workload in one run, rounds interleaved A B B A.

Workload: random prompts of 256 tokens, 64 output tokens (both clients fix the output length),
4 concurrent streams, the bundled SmolLM2-135M served by `kvbaton serve --colocated 1
--threads-per-worker 2`, ``/v1/completions``. GuideLLM is installed on first use into its own
virtual environment outside the repository (``$KVBATON_CACHE_DIR/peers/guidellm``; it brings
its own torch and transformers), and reads the tokenizer from the HF directory kvbaton
converts the bundled GGUF into. This is a benchmark, not a test: CI never installs GuideLLM.

Compared per round: output tokens/s (GuideLLM's server throughput vs bench's
``output_throughput``), median TTFT, and median inter-token latency (GuideLLM's ITL vs bench's
TPOT, both ``(e2e - ttft) / (tokens - 1)``; GuideLLM's own "TPOT" includes the TTFT).

    python benchmarks/third_party_loadgen.py --out docs/results/third_party_loadgen.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from kvbaton.models.gguf import cached_hf_dir_for_gguf, find_bundled_smollm2_gguf, kvbaton_cache_dir
from topology_compare import serve
from vs_vllm_cpu import bench, load_average

GUIDELLM_VERSION = "0.8.1"
BENCH_FLAGS = "--workload random --input-len 256 --output-len 64 --max-concurrency 4"


def ensure_guidellm(env: Path) -> Path:
    """GuideLLM in its own virtual environment (made once); returns its CLI."""
    cli = env / "bin" / "guidellm"
    if not cli.exists():
        print(f"creating GuideLLM's environment in {env}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q",
                        f"guidellm=={GUIDELLM_VERSION}"], check=True)
    return cli


def guidellm_round(cli: Path, url: str, model: str, tokenizer: Path, requests: int, seed: int) -> dict[str, Any]:
    """One GuideLLM run (a scenario file: its CLI takes ``kind=...`` objects); its medians."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "g.json"
        scenario = {"spec": {
            "backend": {"kind": "openai_http", "target": url, "model": model, "request_format": "/v1/completions"},
            "profile": {"kind": "concurrent", "streams": [4]},
            "data": [{"kind": "synthetic_text", "prompt_tokens": 256, "output_tokens": 64}],
            "tokenizer": {"kind": "hf_auto", "model": str(tokenizer)},
            "constraints": [{"kind": "max_requests", "count": requests}],
            "seed": {"kind": "static", "value": seed},
            "outputs": [{"kind": "json", "path": str(out)}],
        }}
        path = Path(d) / "scenario.json"
        path.write_text(json.dumps(scenario))
        subprocess.run([str(cli), "run", "-c", str(path), "--disable-console"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        m = json.loads(out.read_text())["benchmarks"][0]["metrics"]
    return {
        "completed": m["request_totals"]["successful"],
        "errored": m["request_totals"]["errored"],
        "output_throughput": m["output_tokens_per_second"]["total"]["mean"],
        "median_ttft_ms": m["time_to_first_token_ms"]["successful"]["median"],
        "median_itl_ms": m["inter_token_latency_ms"]["successful"]["median"],
    }


def _children_cpu_s() -> float:
    """User + system CPU seconds of the finished child processes (the clients; the server,
    still running, is not counted)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _server_tpot(url: str) -> tuple[float, float]:
    """(sum, count) of the workers' ``kvbaton:time_per_output_token_seconds`` histogram, from
    the router's federated /metrics."""
    total = count = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("kvbaton:time_per_output_token_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("kvbaton:time_per_output_token_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32, help="requests per round")
    ap.add_argument("--peer-env", type=Path, default=kvbaton_cache_dir() / "peers" / "guidellm")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cli = ensure_guidellm(args.peer_env)
    tokenizer = cached_hf_dir_for_gguf(find_bundled_smollm2_gguf())
    rounds: dict[str, list[dict[str, Any]]] = {"guidellm": [], "kvbaton_bench": []}
    with serve("kvbaton", ["--colocated", "1", "--threads-per-worker", "2"]) as url:
        model = "smollm2-135m"
        bench(url, BENCH_FLAGS, 4, 99)  # warm-up
        for i, who in enumerate(("guidellm", "kvbaton_bench", "kvbaton_bench", "guidellm")):  # A B B A
            load = load_average()
            before, server_before = _children_cpu_s(), _server_tpot(url)
            if who == "guidellm":
                r = guidellm_round(cli, url, model, tokenizer, args.requests, i)
            else:
                r = {**bench(url, BENCH_FLAGS, args.requests, i)}
                r["median_itl_ms"] = r.pop("median_tpot_ms")
            r["load_average_1m"] = load
            # The client's own CPU time: on 2 cores, what it burns the server does not get.
            r["client_cpu_s"] = _children_cpu_s() - before
            # The server's own view of the same round (its TPOT histogram): if it agrees with
            # the client's, the clients measure alike and the server itself ran at that speed.
            server_after = _server_tpot(url)
            r["server_mean_tpot_ms"] = 1000 * (server_after[0] - server_before[0]) / max(
                1.0, server_after[1] - server_before[1])
            rounds[who].append(r)
            print(who, json.dumps(r), file=sys.stderr, flush=True)
    keys = ("output_throughput", "median_ttft_ms", "median_itl_ms", "client_cpu_s", "server_mean_tpot_ms")
    med = {who: {k: statistics.median(float(x[k]) for x in rs) for k in keys} for who, rs in rounds.items()}
    report = {
        "command": " ".join(sys.argv), "workload": BENCH_FLAGS, "requests_per_round": args.requests,
        "guidellm_version": GUIDELLM_VERSION, "cpus": os.cpu_count(), "rounds": rounds, "medians": med,
        "guidellm_over_bench": {k: med["guidellm"][k] / med["kvbaton_bench"][k] for k in keys},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
