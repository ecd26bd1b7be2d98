"""KVIndex at cluster scale: lookups/s, events/s applied, routing-decision latency.

Workload (seeded): ``--workers`` workers; request chains of ``--chain-min``..``--chain-max``
blocks, each starting with one of ``--shared-prefixes`` common prefixes (system prompts) of
``--prefix-blocks`` blocks followed by a unique suffix; each chain lives on one worker (its
shared prefix on every worker that holds a chain starting with it), until ``--blocks`` block
entries are indexed.

Measured, all in this process:
  1. apply: the BlockStored batches that build the index (one block per event, as the engine's
     BlockPool emits them, ``--batch-events`` per batch) -> events/s; and, on a sample, the
     same batches msgpack-decoded first (what the subscriber thread does) -> events/s.
  2. lookup: ``longest_prefix`` on ``--chain-len``-block query chains (half a prefix of an
     indexed chain, half a shared prefix then unseen blocks) -> lookups/s.
  3. routing decision: one ``longest_prefix`` + picking the best of the workers (most cached
     blocks, then least load) -> p50/p99 latency. Target: p99 < 1 ms. The same with
     ``weighted_prefix`` (kv_aware's tier-discounted credit) under weights that weigh no
     medium 1, so every matched worker's run is walked block by block (its worst case; when
     every medium weighs 1 it costs what ``longest_prefix`` does).
  4. remove_worker: dropping one worker's entries; and the slowest routing decision made by
     another thread while a second worker is removed (the removal scrubs in chunks and
     releases the lock between them, so decisions are not stalled for the whole removal).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import threading
import time
from pathlib import Path

from kvbaton.kv.event_stream import KVEventBatch, decode_batch, encode_batch
from kvbaton.kv.events import BlockStored
from kvbaton.kv.index import KVIndex

TARGET_P99_MS = 1.0


def rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def build_chains(args: argparse.Namespace, rng: random.Random) -> list[tuple[int, list[bytes]]]:
    prefixes = [[rng.randbytes(16) for _ in range(args.prefix_blocks)]
                for _ in range(args.shared_prefixes)]
    chains: list[tuple[int, list[bytes]]] = []
    entries = 0
    while entries < args.blocks:
        length = rng.randint(args.chain_min, args.chain_max)
        prefix = rng.choice(prefixes)
        chain = prefix + [rng.randbytes(16) for _ in range(length - len(prefix))]
        chains.append((rng.randrange(args.workers), chain))
        entries += len(chain)
    return chains


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="block entries to index")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--chain-min", type=int, default=64)
    ap.add_argument("--chain-max", type=int, default=512)
    ap.add_argument("--shared-prefixes", type=int, default=200)
    ap.add_argument("--prefix-blocks", type=int, default=32)
    ap.add_argument("--batch-events", type=int, default=64)
    ap.add_argument("--chain-len", type=int, default=128, help="blocks per lookup query")
    ap.add_argument("--lookups", type=int, default=20_000)
    ap.add_argument("--decode-sample", type=int, default=100_000,
                    help="events of the apply phase also timed with msgpack decoding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/kv_index.json")
    args = ap.parse_args()
    for flag in ("blocks", "workers", "chain_min", "batch_events", "chain_len", "lookups"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not args.prefix_blocks <= args.chain_min <= args.chain_max:
        ap.error("need --prefix-blocks <= --chain-min <= --chain-max")

    rng = random.Random(args.seed)
    chains = build_chains(args, rng)
    tokens = list(range(16))
    per_worker: dict[int, list[BlockStored]] = {w: [] for w in range(args.workers)}
    for w, chain in chains:
        parent = None
        for h in chain:
            per_worker[w].append(BlockStored([h], parent, tokens, 16))
            parent = h
    batches = [(w, evs[i:i + args.batch_events]) for w, evs in per_worker.items()
               for i in range(0, len(evs), args.batch_events)]
    rng.shuffle(batches)  # interleave workers, as a subscriber sees them
    n_events = sum(len(evs) for _, evs in batches)

    # 1. apply
    index = KVIndex()
    seqs = {w: 0 for w in per_worker}
    rss0 = rss_mb()
    t0 = time.perf_counter()
    for w, evs in batches:
        index.apply(w, seqs[w], evs)
        seqs[w] += 1
    apply_s = time.perf_counter() - t0
    rss1 = rss_mb()

    sample, count = [], 0
    for w, evs in batches:
        if count >= args.decode_sample:
            break
        sample.append((w, encode_batch(KVEventBatch(time.time(), evs, 0))))
        count += len(evs)
    scratch = KVIndex()
    sseq = {w: 0 for w in per_worker}
    t0 = time.perf_counter()
    for w, payload in sample:
        scratch.apply(w, sseq[w], decode_batch(payload))
        sseq[w] += 1
    decode_apply_s = time.perf_counter() - t0
    del scratch

    # 2./3. queries: half hits on an indexed chain's prefix, half a shared prefix + new blocks
    long_chains = [c for _, c in chains if len(c) >= args.chain_len] or [c for _, c in chains]
    queries = []
    for i in range(min(args.lookups, 2000)):
        base = rng.choice(long_chains)[:args.chain_len]
        if i % 2:
            cut = rng.randint(1, len(base))
            base = base[:cut] + [rng.randbytes(16) for _ in range(len(base) - cut)]
        queries.append(base)
    t0 = time.perf_counter()
    matched = 0
    for i in range(args.lookups):
        matched += len(index.longest_prefix(queries[i % len(queries)]))
    lookup_s = time.perf_counter() - t0

    load = {w: rng.random() for w in range(args.workers)}
    lat = []
    for i in range(args.lookups):
        q = queries[i % len(queries)]
        t = time.perf_counter()
        m = index.longest_prefix(q)
        best = max(load, key=lambda w: (m.get(w, 0), -load[w]))
        lat.append(time.perf_counter() - t)
        assert best is not None
    lat.sort()
    p50 = lat[len(lat) // 2] * 1e3
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3

    # 2b./3b. the weighted lookup: "device" (every event here) weighs 0.95, so no fast path.
    walk = {"device": 0.95}
    t0 = time.perf_counter()
    for i in range(args.lookups):
        index.weighted_prefix(queries[i % len(queries)], walk)
    weighted_s = time.perf_counter() - t0
    wlat = []
    for i in range(args.lookups):
        q = queries[i % len(queries)]
        t = time.perf_counter()
        wm = index.weighted_prefix(q, walk)
        best = max(load, key=lambda w: (wm[w][1] if w in wm else 0.0, -load[w]))
        wlat.append(time.perf_counter() - t)
    wlat.sort()
    wp50 = wlat[len(wlat) // 2] * 1e3
    wp99 = wlat[min(len(wlat) - 1, int(len(wlat) * 0.99))] * 1e3

    # 4. remove one worker, then another while a thread keeps making routing decisions
    distinct = len(index)
    victim_blocks = index.block_count(0)
    t0 = time.perf_counter()
    index.remove_worker(0)
    remove_s = time.perf_counter() - t0
    during: list[float] = []
    stop = threading.Event()

    def decide_until_stopped() -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            m = index.longest_prefix(queries[i % len(queries)])
            max(load, key=lambda w: (m.get(w, 0), -load[w]))
            during.append(time.perf_counter() - t)
            i += 1

    th = threading.Thread(target=decide_until_stopped)
    th.start()
    time.sleep(0.01)
    index.remove_worker(1)
    stop.set()
    th.join()
    during.sort()
    during_max = during[-1] * 1e3 if during else None
    during_p99 = during[int(len(during) * 0.99)] * 1e3 if during else None

    result = {
        "command": "python benchmarks/kv_index.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor()},
        "indexed_block_entries": n_events,
        "distinct_hashes": distinct,
        # The hash bytes are shared with the events built before: this is the index's own.
        "index_rss_mb": None if rss0 is None or rss1 is None else round(rss1 - rss0, 1),
        "apply_events_per_s": n_events / apply_s,
        "decode_apply_events_per_s": count / decode_apply_s if count else None,
        "lookups_per_s": args.lookups / lookup_s,
        "mean_workers_matched": matched / args.lookups,
        "decision_p50_ms": p50,
        "decision_p99_ms": p99,
        "decision_mean_ms": statistics.fmean(lat) * 1e3,
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": p99 < TARGET_P99_MS,
        "weighted_lookups_per_s": args.lookups / weighted_s,
        "weighted_decision_p50_ms": wp50,
        "weighted_decision_p99_ms": wp99,
        "remove_worker_blocks": victim_blocks,
        "remove_worker_ms": remove_s * 1e3,
        "decisions_during_remove": len(during),
        "decision_p99_ms_during_remove": during_p99,
        "decision_max_ms_during_remove": during_max,
    }
    rows = [
        ("block entries indexed", f"{n_events:,} ({args.workers} workers)"),
        ("index memory (RSS delta)", f"{result['index_rss_mb']} MB"),
        ("apply BlockStored", f"{result['apply_events_per_s']:,.0f} events/s"),
        ("decode + apply (sample)", f"{result['decode_apply_events_per_s'] or 0:,.0f} events/s"),
        (f"longest_prefix ({args.chain_len} blocks)", f"{result['lookups_per_s']:,.0f} lookups/s"),
        ("routing decision p50", f"{p50:.3f} ms"),
        ("routing decision p99", f"{p99:.3f} ms (target < {TARGET_P99_MS} ms: "
                                 f"{'met' if result['meets_target'] else 'MISSED'})"),
        (f"weighted_prefix ({args.chain_len} blocks)", f"{result['weighted_lookups_per_s']:,.0f} lookups/s"),
        ("weighted decision p50 / p99", f"{wp50:.3f} / {wp99:.3f} ms"),
        (f"remove_worker ({victim_blocks:,} blocks)", f"{result['remove_worker_ms']:.1f} ms"),
        ("decisions during a removal: p99 / max",
         f"{during_p99 or 0:.3f} / {during_max or 0:.3f} ms ({len(during)} decisions)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
