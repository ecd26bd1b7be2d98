"""Run one `kvbaton bench compare` workload against several `kvbaton serve` topologies.

Each topology is a `kvbaton serve` process (router + worker processes) on a free port; all of
them start first, then `kvbaton bench compare` runs the same sessions against each, in
interleaved ABBA rounds so machine drift cancels, and writes one JSON. Every server is shut
down afterwards, whatever happens.

Example (issue 5: disaggregated vs colocated on the mixed workload, same threads in total):

    python benchmarks/topology_compare.py \\
        --topology disagg-1p1d="--prefill 1 --decode 1" \\
        --topology colocated-2="--colocated 2" \\
        --serve-args "--threads-per-worker 1" \\
        --bench-args "--workload mixed --request-rate 0.3 --num-prompts 40 --slo tpot=200" \\
        --out results/disagg_mixed.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx

_ROUTER = re.compile(r"kvbaton router serving .* at (http://\S+)/v1")


def stop_group(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group ``proc`` leads (a server and its children) and wait for it;
    SIGKILL after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def serve(name: str, args: list[str], timeout_s: float = 900.0) -> Iterator[str]:
    """A `kvbaton serve` process; yields its URL once /health answers 200."""
    cmd = [sys.executable, "-m", "kvbaton.cli", "serve", "--port", "0", *args]
    print(f"[{name}] {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    url: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[{name}] {line.rstrip()}", file=sys.stderr, flush=True)
            m = _ROUTER.search(line)
            if m and not url:
                url.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name}: kvbaton serve exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: not healthy after {timeout_s} s")
            if url:
                try:
                    if httpx.get(f"{url[0]}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        yield url[0]
    finally:
        stop_group(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", action="append", required=True, metavar='NAME="SERVE FLAGS"',
                    help="a target: name=flags of `kvbaton serve` (repeatable; the first is the baseline)")
    ap.add_argument("--serve-args", default="", help="flags every `kvbaton serve` gets")
    ap.add_argument("--bench-args", default="", help="flags of `kvbaton bench compare`")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", required=True, help="JSON result file")
    args = ap.parse_args()
    tops: list[tuple[str, list[str]]] = []
    for t in args.topology:
        name, sep, flags = t.partition("=")
        if not sep or not name:
            ap.error(f"--topology: expected NAME=FLAGS, got {t!r}")
        tops.append((name, shlex.split(flags) + shlex.split(args.serve_args)))
    with ExitStack() as stack:
        urls = [(name, stack.enter_context(serve(name, flags))) for name, flags in tops]
        cmd = [sys.executable, "-m", "kvbaton.cli", "bench", "compare", "--rounds", str(args.rounds),
               "--result-file", args.out, *shlex.split(args.bench_args)]
        for name, url in urls:
            cmd += ["--target", f"{name}={url}"]
        print(" ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
        code = subprocess.call(cmd)
    if code == 0:
        result = json.loads(Path(args.out).read_text())
        result["topologies"] = {name: flags for name, flags in tops}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
