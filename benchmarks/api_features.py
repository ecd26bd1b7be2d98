"""What the OpenAI-parity features cost, measured against their plain counterparts in one run,
rounds interleaved A B B A, through `kvbaton serve` with the bundled SmolLM2 model:

- ``structured``: the same chat prompts answered freely and under a JSON schema
  (``response_format: json_schema``): output tokens/s, p50 TTFT and TPOT, and whether every
  constrained answer parses and matches the schema.
- ``n``: each prompt asked once with ``n=4`` and as four separate requests sent together:
  throughput, peak KV blocks in use and prefix-cache hits (read from the router's federated
  ``/metrics``).

    python benchmarks/api_features.py --out docs/results/api_features.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from topology_compare import serve

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24},
                   "population_millions": {"type": "number"}, "is_capital": {"type": "boolean"}},
    "required": ["city", "country", "population_millions", "is_capital"],
    "additionalProperties": False,
}
CITIES = ["Paris", "Oslo", "Lima", "Osaka", "Cairo", "Quito", "Perth", "Accra", "Hanoi", "Porto",
          "Seoul", "Dakar", "Bern", "Kyiv", "Doha", "Turin"]
LONG_CONTEXT = ("You are a careful assistant for a travel agency. Answer with facts only, no chatter. "
                "Keep names in their usual English spelling. ") * 12


def _structured_ok(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return (isinstance(obj, dict) and set(obj) == set(SCHEMA["properties"])
            and isinstance(obj["is_capital"], bool) and isinstance(obj["population_millions"], (int, float)))


async def _chat_stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed chat request: TTFT, end-to-end time, completion tokens, text."""
    start = time.perf_counter()
    first = None
    text = []
    usage: dict[str, Any] = {}
    async with client.stream("POST", f"{url}/v1/chat/completions",
                             json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices") or ():
                content = ch.get("delta", {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    text.append(content)
    end = time.perf_counter()
    tokens = int(usage.get("completion_tokens", 0))
    ttft = (first or end) - start
    return {"ttft_s": ttft, "e2e_s": end - start, "tokens": tokens, "text": "".join(text),
            "tpot_s": (end - (first or end)) / max(1, tokens - 1)}


async def _run(url: str, bodies: list[dict[str, Any]], concurrency: int) -> tuple[list[dict[str, Any]], float]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(b: dict[str, Any]) -> dict[str, Any]:
            async with sem:
                return await _chat_stream(client, url, b)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(b) for b in bodies))
        return list(results), time.perf_counter() - start


def structured_round(url: str, constrained: bool, prompts: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    bodies = []
    for i in range(prompts):
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": f"Describe the city of {CITIES[i % len(CITIES)]} as JSON with "
                          "its city, country, population in millions and whether it is a capital."}],
            "max_tokens": max_tokens, "temperature": 0,
        }
        if constrained:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
        bodies.append(body)
    results, wall = asyncio.run(_run(url, bodies, concurrency))
    tokens = sum(r["tokens"] for r in results)
    return {
        "output_tokens_per_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
        "p50_ttft_s": statistics.median(r["ttft_s"] for r in results),
        "p50_tpot_s": statistics.median(r["tpot_s"] for r in results),
        "valid_json": sum(_structured_ok(r["text"]) for r in results), "requests": len(results),
    }


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class _PeakBlocks:
    """Polls the router's federated /metrics for the largest kv_blocks_used seen."""

    def __init__(self, url: str) -> None:
        self.url, self.peak, self._stop = url, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                text = httpx.get(f"{self.url}/metrics", timeout=5).text
                self.peak = max(self.peak, _metric(text, "kvbaton:kv_blocks_used"))
            except httpx.HTTPError:
                pass
            self._stop.wait(0.05)

    def __enter__(self) -> _PeakBlocks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def n_round(url: str, use_n: bool, prompts: int, max_tokens: int) -> dict[str, Any]:
    bodies = []
    for i in range(prompts):
        base = {"messages": [{"role": "system", "content": LONG_CONTEXT},
                             {"role": "user", "content": f"Name three sights in {CITIES[i % len(CITIES)]}."}],
                "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": True}
        bodies.extend([{**base, "n": 4}] if use_n else [{**base, "seed": i + j} for j in range(4)])
    hits_before = _metric(httpx.get(f"{url}/metrics", timeout=10).text, "kvbaton:prefix_cache_hits_total")
    with _PeakBlocks(url) as peak:
        # The same load either way: four sequences per prompt, every prompt at once.
        results, wall = asyncio.run(_run(url, bodies, len(bodies)))
    hits = _metric(httpx.get(f"{url}/metrics", timeout=10).text, "kvbaton:prefix_cache_hits_total") - hits_before
    tokens = sum(r["tokens"] for r in results)
    return {"output_tokens_per_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
            "peak_kv_blocks_used": peak.peak, "prefix_cache_hit_tokens": hits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="structured,n", help="comma-separated: structured, n")
    ap.add_argument("--prompts", type=int, default=16, help="requests per structured round")
    ap.add_argument("--n-prompts", type=int, default=4, help="prompts per n round (x4 sequences)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--serve-args", default="--colocated 1 --threads-per-worker 2",
                    help="extra `kvbaton serve` flags")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {"command": " ".join(sys.argv), "serve_args": args.serve_args}
    with serve("kvbaton", args.serve_args.split()) as url:
        # Warm-up: compile the schema, build the grammar token table, fill the caches.
        structured_round(url, True, 2, 1, 8)
        structured_round(url, False, 2, 1, 8)
        if "structured" in parts:
            rounds: dict[str, list[dict[str, Any]]] = {"free": [], "json_schema": []}
            for constrained in (False, True, True, False):  # A B B A
                r = structured_round(url, constrained, args.prompts, args.concurrency, args.max_tokens)
                rounds["json_schema" if constrained else "free"].append(r)
                print(("json_schema" if constrained else "free"), json.dumps(r), file=sys.stderr, flush=True)
            report["structured"] = {k: {"rounds": v, "median_output_tokens_per_s":
                                        statistics.median(x["output_tokens_per_s"] for x in v),
                                        "median_p50_tpot_s": statistics.median(x["p50_tpot_s"] for x in v),
                                        "median_p50_ttft_s": statistics.median(x["p50_ttft_s"] for x in v)}
                                    for k, v in rounds.items()}
        if "n" in parts:
            n_round(url, True, 2, 16)  # warm-up: the long shared system prompt's first run
            nr: dict[str, list[dict[str, Any]]] = {"n4": [], "separate4": []}
            for use_n in (True, False, False, True):
                r = n_round(url, use_n, args.n_prompts, args.max_tokens)
                nr["n4" if use_n else "separate4"].append(r)
                print(("n4" if use_n else "separate4"), json.dumps(r), file=sys.stderr, flush=True)
            report["n"] = {k: {"rounds": v, "median_output_tokens_per_s":
                               statistics.median(x["output_tokens_per_s"] for x in v),
                               "median_peak_kv_blocks_used": statistics.median(x["peak_kv_blocks_used"] for x in v),
                               "median_prefix_cache_hit_tokens": statistics.median(
                                   x["prefix_cache_hit_tokens"] for x in v)}
                           for k, v in nr.items()}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
