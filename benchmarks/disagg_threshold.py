"""Where remote prefill starts to pay: the measurement behind `--disagg-min-tokens`.

One `kvbaton serve --prefill 1 --decode 1` cluster is driven twice per prompt length, on an
idle machine: once forced through the prefill worker (`--disagg-min-tokens 0`) and once forced
to prefill on the decode worker (a huge threshold). For each length it reports

- local TTFT: the decode worker prefills the prompt itself;
- remote TTFT: the prompt goes through the prefill worker and its KV is transferred.

A line fitted to each, ``local(n) = a_l + b_l n`` and ``remote(n) = a_r + b_r n``, separates
fixed costs (HTTP hops, a scheduling step) from per-token ones. Prefilling n tokens locally
stalls every decode running on the decode worker for about ``b_l n``; sending it away costs
this request ``(a_r - a_l) + (b_r - b_l) n`` more TTFT. Remote prefill pays once the stall it
saves exceeds what it costs: ``n > (a_r - a_l) / (2 b_l - b_r)``, rounded up to whole blocks.
The default of `--disagg-min-tokens` comes from this (docs/benchmarks.md).

    python benchmarks/disagg_threshold.py --out results/disagg_threshold.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from topology_compare import serve  # noqa: E402


def ttft(url: str, prompt: list[int]) -> float:
    # return_token_ids makes the worker send a chunk per token even while it holds text back.
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "stream": True,
            "return_token_ids": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("no token arrived")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lengths", default="16,32,64,128,256,512,1024")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--serve-args", default="--threads-per-worker 1")
    ap.add_argument("--out", default="results/disagg_threshold.json")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    rng = random.Random(0)
    vocab = 49152 if args.model == "smollm2-135m" else 512
    rows: dict[int, dict[str, float]] = {n: {} for n in lengths}
    base = ["--model", args.model, *args.serve_args.split()]
    for mode, threshold in (("remote", "0"), ("local", str(1 << 30))):
        with serve(mode, ["--prefill", "1", "--decode", "1", "--disagg-min-tokens", threshold, *base]) as url:
            ttft(url, [rng.randrange(1000, vocab) for _ in range(64)])  # warm up both paths
            for n in lengths:
                # A fresh random prompt each time: no prefix-cache hits anywhere.
                times = [ttft(url, [rng.randrange(1000, vocab) for _ in range(n)]) for _ in range(args.repeats)]
                rows[n][mode] = statistics.median(times)
    table = []
    print(f"{'tokens':>7} {'local prefill ms':>17} {'remote TTFT ms':>15} {'remote overhead ms':>19}")
    for n in lengths:
        local, remote = rows[n]["local"], rows[n]["remote"]
        table.append({"tokens": n, "local_ms": local * 1e3, "remote_ms": remote * 1e3,
                      "overhead_ms": (remote - local) * 1e3})
        print(f"{n:>7} {local * 1e3:>17.1f} {remote * 1e3:>15.1f} {(remote - local) * 1e3:>19.1f}")
    b_l, a_l = np.polyfit(lengths, [r["local_ms"] for r in table], 1)
    b_r, a_r = np.polyfit(lengths, [r["remote_ms"] for r in table], 1)
    denom = 2 * b_l - b_r
    threshold = None
    if denom > 0:
        threshold = max(16, int(-(-max(0.0, (a_r - a_l) / denom) // 16) * 16))
    print(f"fit: local {a_l:.1f} + {b_l:.3f} n ms, remote {a_r:.1f} + {b_r:.3f} n ms")
    print(f"remote prefill pays from {threshold} tokens" if threshold else "remote prefill never pays")
    out = {"model": args.model, "serve_args": args.serve_args, "repeats": args.repeats,
           "rows": table, "fit_ms": {"local": [a_l, b_l], "remote": [a_r, b_r]},
           "threshold_tokens": threshold}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
