"""Where an engine step's time goes on this machine, per linear backend: decode steps at
several batch sizes and a prefill, each split into matmuls (every projection and the LM head),
attention (the backend's call, KV write included) and the rest (norms, RoPE, embedding,
sampling, the scheduler and Python between them).

Each configuration runs in a fresh process (``--one``), in A B B A order over the backends, so
drift on a shared machine falls on both. Prompts are random token ids (``--prompt-len``); the
decode steps are timed after every prompt has been prefilled, over ``--steps`` steps. The
split comes from wall-clock timers around each matmul and attention call (about 1 µs each,
some 150 calls a step), so the parts add up to the step minus "rest".

    python benchmarks/engine_steps.py --out docs/results/engine_steps_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any


def measure(model: str, dtype: str, backend: str, batch: int, prompt_len: int, steps: int,
            threads: int, second_thread: bool = False) -> dict[str, Any]:
    """One configuration in this process: prefill and decode step times and their split
    (``second_thread``: the steps run on a thread other than the one that built the engine)."""
    llm = build(model, dtype, backend, threads)
    if not second_thread:
        return _measure_steps(llm, batch, prompt_len, steps)
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(_measure_steps(llm, batch, prompt_len, steps)))
    t.start()
    t.join()
    return {**box, "steps_on_second_thread": True}


def build(model: str, dtype: str, backend: str, threads: int) -> Any:
    from kvbaton import LLM

    return LLM(model, dtype=dtype, linear_backend=backend, num_threads=threads)


def _measure_steps(llm: Any, batch: int, prompt_len: int, steps: int) -> dict[str, Any]:
    import torch
    from torch import nn

    from kvbaton import SamplingParams
    from kvbaton.models.packed_linear import PackedLinear

    eng = llm.engine
    spent: dict[str, float] = defaultdict(float)

    def timed(fn: Callable[..., Any], part: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - t
        return run

    for m in eng.loaded.model.modules():
        if isinstance(m, (nn.Linear, PackedLinear)):
            m.forward = timed(m.forward, "matmul")  # type: ignore[method-assign]
    eng.runner.backend.forward = timed(eng.runner.backend.forward, "attention")  # type: ignore[method-assign]
    rng = random.Random(0)
    vocab = eng.model_config.vocab_size
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    for i in range(batch):
        eng.add_request([rng.randrange(100, vocab) for _ in range(prompt_len)], params, f"r{i}")

    def prefilling() -> bool:
        sched = eng.scheduler
        return bool(sched.waiting) or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running)

    def run_steps(n: int | None) -> tuple[float, int, dict[str, float]]:
        """``n`` steps, or (None) steps until every prompt is prefilled: (seconds, steps, split)."""
        spent.clear()
        t = time.perf_counter()
        k = 0
        while prefilling() if n is None else k < n:
            eng.step()
            k += 1
        return time.perf_counter() - t, k, dict(spent)

    prefill_s, prefill_steps, prefill_parts = run_steps(None)
    run_steps(2)  # warm the decode path
    decode_s, _, decode_parts = run_steps(steps)
    ms = 1000.0 / steps
    return {
        "model": eng.config.model, "dtype": str(eng.runner.kv_cache.dtype).removeprefix("torch."),
        "linear_backend": eng.linear_backend,
        "attention_backend": eng.runner.backend.name, "threads": torch.get_num_threads(),
        "batch": batch, "prompt_len": prompt_len,
        "prefill_tok_s": batch * prompt_len / prefill_s, "prefill_steps": prefill_steps,
        "prefill_ms": {"total": prefill_s * 1000, **{k: v * 1000 for k, v in prefill_parts.items()},
                       "rest": (prefill_s - sum(prefill_parts.values())) * 1000},
        "decode_step_ms": {"total": decode_s * ms, **{k: v * ms for k, v in decode_parts.items()},
                           "rest": (decode_s - sum(decode_parts.values())) * ms},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backends", default="torch,onednn", help="linear backends, comma-separated (A,B)")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps-on-second-thread", action="store_true",
                    help="build the engine on the main thread and run the steps on another (as a worker "
                         "did before it built its engine on a short-lived thread): shows what a second "
                         "OpenMP team costs")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # BACKEND:BATCH, in a child process
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.one:
        backend, batch = args.one.split(":")
        print(json.dumps(measure(args.model, args.dtype, backend, int(batch), args.prompt_len, args.steps,
                                 args.threads, args.steps_on_second_thread)))
        return 0
    a, b = args.backends.split(",")
    runs: list[dict[str, Any]] = []
    for batch in (int(x) for x in args.batches.split(",")):
        for backend in (a, b, b, a):
            cmd = [sys.executable, __file__, "--one", f"{backend}:{batch}", "--model", args.model, "--dtype",
                   args.dtype, "--prompt-len", str(args.prompt_len), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            if args.steps_on_second_thread:
                cmd.append("--steps-on-second-thread")
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            runs.append(r)
            d = r["decode_step_ms"]
            print(f"{backend:7s} batch {batch:3d}: decode step {d['total']:6.1f} ms (matmul "
                  f"{d.get('matmul', 0):5.1f}, attention {d.get('attention', 0):5.1f}, rest {d['rest']:5.1f}); "
                  f"prefill {r['prefill_tok_s']:5.0f} tok/s", flush=True)
    summary: dict[str, dict[str, Any]] = {}
    for r in runs:
        s = summary.setdefault(f"{r['linear_backend']}:{r['batch']}", {"decode": [], "prefill": []})
        s["decode"].append(r["decode_step_ms"]["total"])
        s["prefill"].append(r["prefill_tok_s"])
    med = {k: {"decode_step_ms": statistics.median(v["decode"]), "prefill_tok_s": statistics.median(v["prefill"])}
           for k, v in summary.items()}
    result = {"command": " ".join(sys.argv), "medians": med, "runs": runs}
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    for k, v in med.items():
        print(f"{k:12s} decode step {v['decode_step_ms']:6.1f} ms  prefill {v['prefill_tok_s']:5.0f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
