"""Offline throughput of kvbaton vs Hugging Face transformers, prefix-cache TTFT, and the
machine's matmul ceiling, all measured in one run.

Workload: ``--num-requests`` prompts of real text (the Python standard library's ``*.py`` files
concatenated in sorted order and cut into distinct, non-overlapping token windows, so the prefix
cache cannot help), lengths evenly spread over ``[--min-prompt, --max-prompt]`` in a seeded
random order, ``--output-len`` greedy tokens each with ``ignore_eos``.

Measured:
  1. kvbaton: one ``LLM.generate`` over all requests -> output and total (prompt+output) tok/s.
  2. HF transformers (same weights and dtype): ``model.generate`` in static, left-padded batches
     of each ``--hf-batch-sizes`` on a length-stratified subset; the best batch size is the
     baseline.
  3. TTFT of a 1,500-token prompt, cold (never seen) vs warm (same prompt again, prefix-cached).
  4. GEMM GFLOP/s at this model's layer shapes and at 2048^3, turned into a tokens/s ceiling
     with ``model_config.flops_per_token``; kvbaton's total tok/s is given as a fraction of it.
  Each phase also records how much CPU *other* processes used meanwhile (shared machines).

Targets: kvbaton >= 2x the best HF throughput; warm TTFT >= 10x faster than cold.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvbaton import LLM, SamplingParams

TTFT_PROMPT_LEN = 1500
TTFT_REPEATS = 3
WARMUP_PROMPTS = 4


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (synchronizing CUDA around it) and its result."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, result


def _busy_cpu_s() -> float | None:
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


class OtherLoad:
    """Share of the machine's CPU that *other* processes used while the block ran (Linux; None
    elsewhere). On a shared box this says whether a number can be trusted."""

    frac: float | None = None

    def __enter__(self) -> OtherLoad:
        self._start = (_busy_cpu_s(), sum(os.times()[:2]), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, own0, t0 = self._start
        busy1 = _busy_cpu_s()
        if busy0 is not None and busy1 is not None:
            other = busy1 - busy0 - (sum(os.times()[:2]) - own0)
            self.frac = max(other, 0.0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))


def make_prompts(tokenizer: Any, lengths: list[int]) -> list[list[int]]:
    """Distinct, consecutive (non-overlapping) windows of stdlib source of the given lengths."""
    need, ids = sum(lengths), []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in f.parts:
            continue
        text = f.read_text(encoding="utf-8", errors="replace") + "\n\n"
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
        if len(ids) >= need:
            ends = itertools.accumulate(lengths)
            return [ids[e - n : e] for e, n in zip(ends, lengths)]
    raise RuntimeError(f"the stdlib holds only {len(ids)} tokens; need {need}")


def gemm_gflops(shapes: list[tuple[int, int, int]], dtype: torch.dtype, device: str) -> float:
    """GFLOP/s of ``x @ w.T`` over ``shapes`` (m, k, n) in turn, as a model layer runs them."""
    pairs = [(torch.randn(m, k, dtype=dtype, device=device),
              torch.randn(n, k, dtype=dtype, device=device)) for m, k, n in shapes]
    run = lambda: [torch.nn.functional.linear(x, w) for x, w in pairs]  # noqa: E731
    for _ in range(3):
        run()
    reps, elapsed = 0, 0.0
    while elapsed < 1.0:
        dt, _ = timed(lambda: [run() for _ in range(5)], device)
        reps, elapsed = reps + 5, elapsed + dt
    return sum(2 * m * k * n for m, k, n in shapes) * reps / elapsed / 1e9


def measure_gemm(mcfg: Any, device: str) -> dict[str, float]:
    """fp32 and bf16 GFLOP/s: this model's per-layer projections at 512 tokens, and 2048^3."""
    h, q, kv = mcfg.hidden_size, mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    layer = [(512, h, q + 2 * kv), (512, q, h), (512, h, 2 * mcfg.intermediate_size),
             (512, mcfg.intermediate_size, h)]
    out: dict[str, float] = {}
    for name in ("float32", "bfloat16"):
        dt = getattr(torch, name)
        out[f"{name}_layer"] = gemm_gflops(layer, dt, device)
        out[f"{name}_square2048"] = gemm_gflops([(2048, 2048, 2048)], dt, device)
    return out


def run_kvbaton(
    llm: LLM, prompts: list[list[int]], warmup: list[list[int]], output_len: int, device: str
) -> dict[str, Any]:
    llm.generate(warmup, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    sp = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    preempted = llm.engine.stats()["num_preemptions"]
    with OtherLoad() as load:
        wall, outs = timed(lambda: llm.generate(prompts, sp), device)
    n_out, n_prompt = sum(len(o.token_ids) for o in outs), sum(len(p) for p in prompts)
    assert n_out == len(prompts) * output_len, f"kvbaton made {n_out} tokens"
    return {"wall_s": wall, "output_tok_s": n_out / wall, "total_tok_s": (n_out + n_prompt) / wall,
            "num_preemptions": llm.engine.stats()["num_preemptions"] - preempted,
            "num_cached_tokens": sum(o.num_cached_tokens for o in outs),
            "other_cpu_load": load.frac}


def run_ttft(llm: LLM, prompts: list[list[int]], device: str) -> dict[str, Any]:
    sp = SamplingParams(max_tokens=1, temperature=0)
    cold, warm, cached = [], [], []
    with OtherLoad() as load:
        for p in prompts:  # each is new to the cache (cold), then runs again (warm)
            cold.append(timed(lambda p=p: llm.generate(p, sp), device)[0])
            t_warm, outs = timed(lambda p=p: llm.generate(p, sp), device)
            warm.append(t_warm)
            cached.append(outs[0].num_cached_tokens)
    c, w = statistics.median(cold), statistics.median(warm)
    return {"prompt_len": len(prompts[0]), "repeats": len(prompts), "cold_s": c, "warm_s": w,
            "speedup": c / w, "warm_num_cached_tokens": int(statistics.median(cached)),
            "cold_all_s": cold, "warm_all_s": warm, "other_cpu_load": load.frac}


def load_hf_model(model: str, load_format: str, dtype: torch.dtype, device: str) -> Any:
    """The same model in HF transformers: the converted weights, or for ``--load-format dummy``
    a random init of the same config (throughput does not depend on the values)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if load_format == "dummy":
        from kvbaton.models.registry import DUMMY_CONFIGS

        cfg = dict(DUMMY_CONFIGS[model])
        cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    from kvbaton.models.sources import resolve_model_dir

    path = str(resolve_model_dir(model))
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def run_hf(model: Any, prompts: list[list[int]], output_len: int, batch_sizes: list[int],
           device: str) -> dict[str, Any]:
    pad_id = 0  # left padding, masked out: its value does not matter

    def generate(batch: list[list[int]], new: int) -> int:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=pad_id)
        return int(out.shape[0] * (out.shape[1] - width))

    generate([p[:64] for p in prompts[:2]], 8)  # warm-up
    n_prompt = sum(len(p) for p in prompts)
    runs: dict[str, Any] = {}
    for bs in batch_sizes:
        batches = [prompts[i : i + bs] for i in range(0, len(prompts), bs)]
        with OtherLoad() as load:
            wall, n_out = timed(lambda batches=batches: sum(generate(b, output_len) for b in batches), device)
        assert n_out == len(prompts) * output_len, f"HF made {n_out} tokens"
        runs[str(bs)] = {"wall_s": wall, "output_tok_s": n_out / wall,
                         "total_tok_s": (n_out + n_prompt) / wall, "other_cpu_load": load.frac}
        print(f"  HF batch {bs:>3}: {n_out / wall:8.1f} output tok/s ({wall:.1f} s)", flush=True)
    best = max(runs, key=lambda b: runs[b]["output_tok_s"])
    return {"num_requests": len(prompts), "mean_prompt_len": n_prompt / len(prompts),
            "batches": runs, "best_batch_size": int(best), **runs[best]}


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                         cwd=Path(__file__).parent).stdout.strip()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "kvbaton_git": git}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def report(r: dict[str, Any]) -> None:
    """Print the side-by-side table, TTFT, the load warnings and the verdict."""
    kv, hf, ttft, n = r["kvbaton"], r["hf"], r["ttft"], r["workload"]["num_requests"]
    ceil, dt = r["ceiling_tok_s"], r["args"]["dtype"]
    rows = [("", "output tok/s", "total tok/s"),
            (f"kvbaton (all {n} at once)", f"{kv['output_tok_s']:.1f}", f"{kv['total_tok_s']:.1f}")]
    for bs, b in (hf["batches"] if hf else {}).items():
        rows.append((f"HF static batch {bs}", f"{b['output_tok_s']:.1f}", f"{b['total_tok_s']:.1f}"))
    if hf:
        rows.append(("kvbaton / HF best", f"{r['ratio_output_tok_s']:.2f}x",
                     f"{kv['total_tok_s'] / hf['total_tok_s']:.2f}x"))
    rows += [(f"ceiling ({dt} layer GEMMs, 512 tokens)", "", f"{ceil['layer_gemm']:.1f}"),
             (f"ceiling ({dt} GEMM 2048^3)", "", f"{ceil['peak_gemm']:.1f}"),
             ("kvbaton total / ceiling (layer, 2048^3)", "",
              f"{kv['total_tok_s'] / ceil['layer_gemm']:.0%}, {kv['total_tok_s'] / ceil['peak_gemm']:.0%}")]
    print()
    for a, b, c in rows:
        print(f"{a:<44}{b:>14}{c:>14}")
    if hf:
        print(f"(HF timed on {hf['num_requests']} of {n} requests, mean prompt "
              f"{hf['mean_prompt_len']:.0f} vs {r['workload']['mean_prompt_len']:.0f}; "
              f"best batch {hf['best_batch_size']})")
    print(f"\nTTFT, {ttft['prompt_len']}-token prompt, median of {ttft['repeats']}: cold "
          f"{ttft['cold_s'] * 1e3:.1f} ms, warm {ttft['warm_s'] * 1e3:.1f} ms -> "
          f"{ttft['speedup']:.1f}x (warm num_cached_tokens={ttft['warm_num_cached_tokens']})")
    loads = {"kvbaton": kv["other_cpu_load"], "TTFT": ttft["other_cpu_load"]}
    loads.update({f"HF batch {bs}": b["other_cpu_load"] for bs, b in (hf["batches"] if hf else {}).items()})
    busy = [f"{k} ({v:.0%} of the machine)" for k, v in loads.items() if v is not None and v > 0.05]
    if busy:
        print("WARNING: other processes used CPU during " + ", ".join(busy))
    verdict = [] if not hf else [
        f"throughput >= 2x HF: {'MET' if r['ratio_output_tok_s'] >= 2 else 'NOT MET'}"]
    verdict.append(f"warm TTFT >= 10x faster: {'MET' if ttft['speedup'] >= 10 else 'NOT MET'}")
    print("; ".join(verdict))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="4,8,16")
    ap.add_argument("--hf-num-requests", type=int, default=32,
                    help="size of the length-stratified subset that HF is timed on")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--skip-hf", action="store_true", help="measure kvbaton only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="results/engine_throughput.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, load_format=args.load_format,
              num_threads=args.threads, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    mcfg, n = llm.engine.model_config, args.num_requests
    step = (args.max_prompt - args.min_prompt) / max(n - 1, 1)
    lengths = [round(args.min_prompt + i * step) for i in range(n)]
    random.Random(args.seed).shuffle(lengths)
    # Workload, warm-up and TTFT prompts are all different text: no prefix is shared.
    windows = make_prompts(llm.tokenizer, lengths + [64] * WARMUP_PROMPTS + [TTFT_PROMPT_LEN] * TTFT_REPEATS)
    prompts, warmup, ttft_prompts = windows[:n], windows[n : n + WARMUP_PROMPTS], windows[n + WARMUP_PROMPTS :]
    print(f"model {args.model} ({mcfg.num_params / 1e6:.1f}M params, {mcfg.flops_per_token / 1e9:.3f} "
          f"GFLOP/token), {args.device}, {args.dtype}, {torch.get_num_threads()} threads\n"
          f"workload: {n} requests, prompts {min(lengths)}-{max(lengths)} tokens "
          f"(mean {sum(lengths) / n:.0f}), {args.output_len} output tokens each", flush=True)

    gemm_start = measure_gemm(mcfg, args.device)
    print("GEMM GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in gemm_start.items()), flush=True)
    kv = run_kvbaton(llm, prompts, warmup, args.output_len, args.device)
    print(f"kvbaton: {kv['output_tok_s']:.1f} output tok/s, {kv['total_tok_s']:.1f} total tok/s "
          f"({kv['wall_s']:.1f} s, {kv['num_preemptions']} preemptions)", flush=True)
    ttft = run_ttft(llm, ttft_prompts, args.device)
    print(f"TTFT: cold {ttft['cold_s'] * 1e3:.1f} ms, warm {ttft['warm_s'] * 1e3:.1f} ms", flush=True)
    del llm
    gc.collect()

    hf = None
    if not args.skip_hf:
        k = min(args.hf_num_requests, n)
        # Every (n/k)-th request by length: the subset's lengths are spread like the full set's.
        by_len = sorted(range(n), key=lambda i: lengths[i])
        picked = sorted(by_len[round((j + 0.5) * n / k - 0.5)] for j in range(k))
        print(f"HF transformers on {k} of {n} requests:", flush=True)
        hf_model = load_hf_model(args.model, args.load_format, getattr(torch, args.dtype), args.device)
        hf = run_hf(hf_model, [prompts[i] for i in picked], args.output_len,
                    [int(b) for b in args.hf_batch_sizes.split(",")], args.device)
        del hf_model

    # Shared or throttled hosts drift during a long run: measure again, keep the best.
    gemm_end = measure_gemm(mcfg, args.device)
    gemm = {k: max(v, gemm_end[k]) for k, v in gemm_start.items()}
    key = "bfloat16" if args.dtype == "bfloat16" else "float32"
    gflop_per_token = mcfg.flops_per_token / 1e9
    ceiling = {"layer_gemm": gemm[f"{key}_layer"] / gflop_per_token,
               "peak_gemm": gemm[f"{key}_square2048"] / gflop_per_token}
    result = {
        "args": vars(args), "machine": machine_info(args.device),
        "model": {"name": args.model, "num_params": mcfg.num_params,
                  "flops_per_token": mcfg.flops_per_token},
        "workload": {"num_requests": n, "prompt_lens": lengths, "mean_prompt_len": sum(lengths) / n,
                     "output_len": args.output_len,
                     "text": "stdlib *.py in sorted order, distinct token windows"},
        "kvbaton": kv, "hf": hf, "ttft": ttft,
        "gemm_gflops": {"start": gemm_start, "end": gemm_end, "best": gemm},
        "ceiling_tok_s": ceiling,
        "kvbaton_fraction_of_ceiling": {k: kv["total_tok_s"] / v for k, v in ceiling.items()},
        "ratio_output_tok_s": kv["output_tok_s"] / hf["output_tok_s"] if hf else None,
    }
    report(result)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
