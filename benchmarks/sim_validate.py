"""The simulator against the real cluster, on the same requests, on this machine.

For each case: run `kvbaton serve` with the case's topology and flags, drive it with
`kvbaton bench run` (one server at a time), then run `kvbaton sim` with the same topology,
engine flags, workload, seed and load, with a cost model profiled on this machine
(`kvbaton profile`, one profile per torch thread count the cases use). Report, per metric, the
simulated value, the real one and the relative error; check the targets (every mean/median
within 10%, the median error over all cells <= 5%, p90/p99 within 20%) and whether the simulator
ranks the cases of each comparison group in the same order as the real runs.

What serving adds to the profiled steps is measured on the first case, not tuned per case: its
workers' step traces (``--step-trace``) give the host's contention and the worker loop's cost
between steps (``kvbaton profile --from-steps --base``), and ten short requests sent one at a
time before its traffic (the idle probe) give the per-request overhead (HTTP, router,
tokenizing): their real median TTFT less the simulated one. No case's latencies are fitted;
every case other than the first is a held-out prediction, and the first one's latencies are
predicted too (only its step traces were used).

    python benchmarks/sim_validate.py --out docs/results/sim_validation_cpu.json

``--resimulate RESULT`` runs only the simulated side again, against the real runs, profile and
calibration recorded in an earlier RESULT (after a change to the simulator: the real cluster
has not changed, and rerunning it would add its own run-to-run spread to the comparison).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from topology_compare import serve  # noqa: E402

ENGINE = ["--num-kv-blocks", "512", "--max-num-seqs", "32", "--max-num-batched-tokens", "512"]
# name, group (cases compared for ranking), serve topology flags, workload flags, load flags
# Every worker has one torch thread, so one profile serves all cases and a busy worker holds
# one of the machine's cores. The first case calibrates (see the module docstring).
CO = ["--threads-per-worker", "1", "--disagg-min-tokens", "1000000"]  # colocated: no internal disaggregation
RANDOM = ["--workload", "random", "--input-len", "256", "--output-len", "32", "--num-prompts", "40"]
# Eight 1024-token prefixes: all of them fill a worker's 512-block pool, half of them do not, so
# the policy decides the hit rate (with fewer, both policies end up caching everything).
SHARED = ["--workload", "shared-prefix", "--num-prompts", "32", "--workload-opt", "num_prefixes=8",
          "--workload-opt", "prefix_len=1024", "--workload-opt", "question_len=32", "--workload-opt", "output_len=16"]
# Long prompts of 1536 tokens (6 s of prefill on one thread) beside short ones; the trace's
# arrivals stretched 10x: loads these workers carry, near their capacity at the higher rate.
MIXED = ["--workload", "mixed", "--num-prompts", "24", "--workload-opt", "long_input_len=1536"]
CASES: list[tuple[str, str, list[str], list[str], list[str]]] = [
    ("colocated x2", "topology", ["--colocated", "2", *CO], RANDOM, ["--max-concurrency", "4"]),
    ("colocated x1", "topology", ["--colocated", "1", *CO], RANDOM, ["--max-concurrency", "4"]),
    ("1P1D", "topology", ["--prefill", "1", "--decode", "1", "--threads-per-worker", "1"], RANDOM,
     ["--max-concurrency", "4"]),
    ("2P2D", "topology", ["--prefill", "2", "--decode", "2", "--threads-per-worker", "1"], RANDOM,
     ["--max-concurrency", "4"]),
    ("shared-prefix round_robin", "policy", ["--colocated", "2", *CO, "--policy", "round_robin"], SHARED,
     ["--max-concurrency", "4"]),
    ("shared-prefix kv_aware", "policy", ["--colocated", "2", *CO, "--policy", "kv_aware"], SHARED,
     ["--max-concurrency", "4"]),
    ("mixed 0.3/s", "rate", ["--colocated", "2", *CO], MIXED, ["--request-rate", "0.3"]),
    ("mixed 0.8/s", "rate", ["--colocated", "2", *CO], MIXED, ["--request-rate", "0.8"]),
    ("mooncake trace", "trace", ["--colocated", "2", *CO], ["--workload", "trace", "--num-prompts", "20"],
     ["--time-scale", "10"]),
]
METRICS = [  # (result key, kind): kind "central" (10% target) or "tail" (20%)
    ("mean_ttft_ms", "central"), ("median_ttft_ms", "central"), ("p90_ttft_ms", "tail"),
    ("mean_tpot_ms", "central"), ("p99_tpot_ms", "tail"), ("output_throughput", "central"),
    ("prefix_cache_hit_rate", "central"),
]


def _run(cmd: list[str]) -> None:
    print(" ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def profile(threads: int, out: Path, repeats: int) -> Path:
    if not out.exists():
        _run([sys.executable, "-m", "kvbaton.cli", "profile", "--threads", str(threads), "--repeats", str(repeats),
              "--out", str(out)])
    return out


def threads_of(flags: list[str]) -> int:
    return int(flags[flags.index("--threads-per-worker") + 1])


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("/", "_")


# The idle-path probe: short requests one at a time, whose TTFT is the serving path's own
# latency (HTTP, router, tokenizing) plus one small prefill step.
PROBE = (["--workload", "random", "--input-len", "16", "--output-len", "2", "--num-prompts", "10"],
         ["--max-concurrency", "1"])


def real(name: str, topo: list[str], workload: list[str], load: list[str], tmp: Path,
         probe: bool = False) -> dict[str, Any]:
    """The served run; its workers' step traces land in tmp/steps-<case>/. ``probe``: first
    send the PROBE requests to a cluster of their own (their result in tmp/real-probe.json;
    their steps are not the case's)."""
    out = tmp / f"real-{_slug(name)}.json"
    # No host tier: the simulator models the device pool only.
    flags = [*topo, *ENGINE, "--kv-host-cache-gib", "0"]
    if probe:
        with serve(f"{name} probe", flags) as url:
            _run([sys.executable, "-m", "kvbaton.cli", "bench", "run", "--base-url", url, *PROBE[0], *PROBE[1],
                  "--no-progress", "--result-file", str(tmp / "real-probe.json")])
    steps = str(tmp / f"steps-{_slug(name)}")
    with serve(name, [*flags, "--step-trace", steps]) as url:
        _run([sys.executable, "-m", "kvbaton.cli", "bench", "run", "--base-url", url, *workload, *load,
              "--no-progress", "--result-file", str(out)])
    return dict(json.loads(out.read_text()))


def simulated(name: str, topo: list[str], workload: list[str], load: list[str], prof: Path, tmp: Path,
              overhead: tuple[float, float] | None) -> dict[str, Any]:
    """The simulated run (``overhead``: request and step overheads in ms; None: the profile's)."""
    out = tmp / f"sim-{_slug(name)}.json"
    skip = {topo.index("--threads-per-worker"), topo.index("--threads-per-worker") + 1}
    topo = [f for i, f in enumerate(topo) if i not in skip]  # sim has no threads: the profile has them
    flags = [] if overhead is None else ["--request-overhead-ms", f"{overhead[0]:.3f}",
                                         "--step-overhead-ms", f"{overhead[1]:.3f}"]
    _run([sys.executable, "-m", "kvbaton.cli", "sim", "--cost-model", str(prof), *topo, *ENGINE, *workload, *load,
          *flags, "--no-progress", "--result-file", str(out)])
    return dict(json.loads(out.read_text()))


def rel_err(sim: float | None, real_v: float | None) -> float | None:
    if sim is None or real_v is None or real_v == 0:
        return None
    return abs(sim - real_v) / abs(real_v)


def _cells(s: dict[str, Any], real_of: Callable[[str], Any]) -> dict[str, dict[str, Any]]:
    """Each metric's simulated and real value and their relative error."""
    return {k: {"sim": s.get(k), "real": real_of(k), "rel_error": rel_err(s.get(k), real_of(k)), "kind": kind}
            for k, kind in METRICS}


def resimulate(prev_path: Path, out: Path, cases: set[str] | None) -> int:
    """The simulated side of every case in ``prev_path`` again (see the module docstring)."""
    prev = json.loads(prev_path.read_text())
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="kvbaton-simval-"))
    profiles = {}
    for t, data in prev["profiles"].items():
        profiles[int(t)] = tmp / f"profile-t{t}.json"
        profiles[int(t)].write_text(json.dumps(data))
    o = prev["summary"]["overhead_ms"]
    overhead = None if o is None else (float(o["request"]), float(o["step"]))
    rows = []
    for row in prev["cases"]:
        if cases is not None and row["case"] not in cases:
            continue
        s = simulated(row["case"], row["serve"], row["workload"], row["load"], profiles[threads_of(row["serve"])],
                      tmp, overhead)
        cells = _cells(s, lambda k, row=row: row["cells"][k]["real"])
        rows.append({**row, "cells": cells, "sim_speed": s["sim"]["speed"]})
        print(json.dumps({row["case"]: {k: (v["sim"], v["real"]) for k, v in cells.items()}}), file=sys.stderr,
              flush=True)
    summary = _summary(rows, overhead, prev["profiles"][str(max(profiles))], started)
    summary["resimulated_from"] = str(prev_path)
    out.write_text(json.dumps({"cases": rows, "summary": summary, "engine": prev["engine"],
                               "profiles": prev["profiles"]}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--repeats", type=int, default=3, help="profile repeats per grid point")
    ap.add_argument("--profile-dir", default=None, help="reuse profiles here (profile-t<threads>.json)")
    ap.add_argument("--no-calibrate", action="store_true", help="no per-request / per-step overheads")
    ap.add_argument("--resimulate", metavar="RESULT", default=None,
                    help="simulate again against the real runs recorded in RESULT (no real runs)")
    a = ap.parse_args()
    if a.resimulate:
        return resimulate(Path(a.resimulate), Path(a.out), set(a.cases.split(",")) if a.cases else None)
    cases = [c for c in CASES if a.cases is None or c[0] in a.cases.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kvbaton-simval-"))
    pdir = Path(a.profile_dir) if a.profile_dir else tmp
    pdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    threads = sorted({threads_of(c[2]) for c in cases})
    profiles = {t: profile(t, pdir / f"profile-t{t}.json", a.repeats) for t in threads}
    rows: list[dict[str, Any]] = []
    overhead: tuple[float, float] | None = None
    calibrated: dict[str, Any] = {}
    for i, (name, group, topo, workload, load) in enumerate(cases):
        calibrating = i == 0 and not a.no_calibrate
        r = real(name, topo, workload, load, tmp, probe=calibrating)
        prof = profiles[threads_of(topo)]
        if calibrating:
            # Calibration on the first case, from what its served workers recorded: the host's
            # contention and the worker loop's cost between steps (`kvbaton profile --from-steps
            # --base`), then the per-request overhead (HTTP, router, tokenizing) from the idle
            # probe: its real TTFT less the simulated one. The case's own latencies are not used.
            traces = sorted(str(p) for p in (tmp / f"steps-{_slug(name)}").glob("*.jsonl"))
            cal = pdir / f"profile-t{threads_of(topo)}-served.json"
            _run([sys.executable, "-m", "kvbaton.cli", "profile", "--from-steps", *traces, "--base", str(prof),
                  "--out", str(cal)])
            profiles[threads_of(topo)] = prof = cal
            calibrated = json.loads(cal.read_text())
            step_ms = float(calibrated["step_overhead_ms"])
            probe_real = json.loads((tmp / "real-probe.json").read_text())
            s0 = simulated("probe", topo, *PROBE, prof, tmp, (0.0, step_ms))
            req_ms = max(0.0, (probe_real["median_ttft_ms"] or 0) - (s0["median_ttft_ms"] or 0))
            overhead = (req_ms, step_ms)
            print(f"calibrated: request overhead {req_ms:.1f} ms, step overhead {step_ms:.2f} ms, host contention "
                  f"{calibrated['host_contention']}", file=sys.stderr)
        s = simulated(name, topo, workload, load, prof, tmp, overhead)
        cells = _cells(s, r.get)
        rows.append({"case": name, "group": group, "calibration": i == 0 and not a.no_calibrate,
                     "serve": topo, "workload": workload, "load": load, "cells": cells,
                     "sim_speed": s["sim"]["speed"], "real_duration_s": r["duration"]})
        brief = {k: (v["sim"], v["real"]) for k, v in cells.items()}
        print(json.dumps({name: brief}), file=sys.stderr, flush=True)
    summary = _summary(rows, overhead, calibrated, started)
    Path(a.out).write_text(json.dumps({"cases": rows, "summary": summary, "engine": ENGINE,
                                       "profiles": {str(t): json.loads(p.read_text()) for t, p in profiles.items()}},
                                      indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


def _summary(rows: list[dict[str, Any]], overhead: tuple[float, float] | None, calibrated: dict[str, Any],
             started: float) -> dict[str, Any]:
    """The targets' tallies and each group's ranking over ``rows``."""
    held = [row for row in rows if not row["calibration"]]
    errs = [c["rel_error"] for row in held for c in row["cells"].values() if c["rel_error"] is not None]
    central = [c["rel_error"] for row in held for c in row["cells"].values()
               if c["kind"] == "central" and c["rel_error"] is not None]
    tail = [c["rel_error"] for row in held for c in row["cells"].values()
            if c["kind"] == "tail" and c["rel_error"] is not None]
    ranking = {}
    for group in sorted({row["group"] for row in rows}):
        members = [row for row in rows if row["group"] == group]
        if len(members) < 2:
            continue
        key = "mean_ttft_ms"
        order_real = [m["case"] for m in sorted(members, key=lambda m: m["cells"][key]["real"] or 0)]
        order_sim = [m["case"] for m in sorted(members, key=lambda m: m["cells"][key]["sim"] or 0)]
        ranking[group] = {"by": key, "real": order_real, "sim": order_sim, "same": order_real == order_sim}
    every = [c["rel_error"] for row in rows for c in row["cells"].values() if c["rel_error"] is not None]
    summary = {
        "median_rel_error": statistics.median(errs) if errs else None,
        "median_rel_error_with_calibration_case": statistics.median(every) if every else None,
        "central_within_10pct": sum(e <= 0.10 for e in central), "central_cells": len(central),
        "tail_within_20pct": sum(e <= 0.20 for e in tail), "tail_cells": len(tail),
        "ranking": ranking,
        "overhead_ms": None if overhead is None else {"request": overhead[0], "step": overhead[1]},
        "host_contention": calibrated.get("host_contention"), "contention_fit": calibrated.get("contention_fit"),
        "wall_s": time.time() - started,
    }
    return summary


if __name__ == "__main__":
    sys.exit(main())
