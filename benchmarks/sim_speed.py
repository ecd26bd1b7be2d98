"""How fast the simulator runs, apart from generating its workload: engine steps per wall
second and the cyclic GC's share.

Takes any `kvbaton sim` flags; builds the workload (timed apart, it is the bench's generator),
then runs the same simulation `kvbaton sim` runs and reports its simulated seconds, wall
seconds, the speed, how many engine steps the simulated workers took and the microseconds per
step, and the cyclic collector's collections and seconds during the run (from
``gc.callbacks``; the pools' construction included). Run one at a time on a quiet machine:

    python benchmarks/sim_speed.py --cost-model analytic:h200:llama-3.1-8b --colocated 16 \\
        --workload random --input-len 1024 --output-len 128 --num-prompts 8000 --request-rate 20
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

from kvbaton.cli import build_parser
from kvbaton.sim import cli as sim_cli
from kvbaton.sim import run as sim_run


def run_once(config: Any, cost: Any, sessions: Any, tokenizer: Any, load: Any) -> dict[str, Any]:
    """One simulation, timed, with the collector's collections counted."""
    collections = [0, 0, 0]
    gc_s = 0.0
    started = 0.0

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        nonlocal gc_s, started
        if phase == "start":
            started = time.perf_counter()
        else:
            gc_s += time.perf_counter() - started
            collections[info["generation"]] += 1

    gc.callbacks.append(on_gc)
    try:
        res = sim_run.simulate(config, cost, sessions, tokenizer, load)
    finally:
        gc.callbacks.remove(on_gc)
    steps = sum(w.steps for w in res.cluster.workers)
    return {"requests": len(res.records), "completed": sum(r.ok for r in res.records),
            "simulated_s": round(res.duration_s, 1), "wall_s": round(res.wall_s, 2), "speed": round(res.speed, 2),
            "steps": steps, "us_per_step": round(1e6 * res.wall_s / steps, 1) if steps else None,
            "gc_collections_by_generation": collections, "gc_s": round(gc_s, 2)}


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(["sim", *argv])
    cost, config = sim_cli._cluster(args, parser, *sim_cli._topology(args))
    t = time.perf_counter()
    cfg, tokenizer, sessions = sim_cli._workload(args, parser)
    print(json.dumps({"workload_s": round(time.perf_counter() - t, 1),
                      **run_once(config, cost, sessions, tokenizer, cfg.load)}))
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
