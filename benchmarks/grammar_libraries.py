"""The structured-output library choice, measured: llguidance (what kvbaton uses) against
xgrammar (vLLM's default) on the bundled SmolLM2 tokenizer (49,152 tokens), in one run.

For each library and grammar (a JSON schema, any JSON object, a regex, a choice): the time to
compile, and the time to fill one token mask, over random walks through the grammar (each
step samples uniformly among the allowed tokens, EOS when allowed with p = 0.15, at most 64
tokens a walk), p50 and p99. Libraries alternate A B B A. Both run in one virtual
environment outside the repository (``$KVBATON_CACHE_DIR/peers/grammar-libs``: torch 2.13 CPU,
xgrammar, llguidance, transformers), made on first use; xgrammar brings triton (~290 MB).
This is a benchmark, not a test: CI never installs xgrammar.

    python benchmarks/grammar_libraries.py --out docs/results/grammar_libraries.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvbaton.models.gguf import kvbaton_cache_dir
from kvbaton.models.sources import tokenizer_for_model

# Run inside the peer environment: ``python - LIB TOKDIR STEPS`` prints one JSON object.
PROBE = r'''
import json, random, statistics, sys, time
import torch
from transformers import AutoTokenizer
torch.set_num_threads(1)
lib, tokdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
hf = AutoTokenizer.from_pretrained(tokdir)
V, EOS = len(hf), hf.eos_token_id
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age"]}
GRAMMARS = {"schema": ("json", SCHEMA), "json_object": ("json", {"type": "object"}),
            "regex": ("regex", r"[0-9]{3}-[0-9]{4}"), "choice": ("choice", ["apple", "banana", "cherry pie"])}
if lib == "llguidance":
    import llguidance, llguidance.hf, llguidance.torch as lt
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=V)
    def grammar(kind, spec):
        if kind == "json":
            return llguidance.grammar_from("json_schema", json.dumps(spec))
        return llguidance.grammar_from(kind, json.dumps(spec) if kind == "choice" else spec)
    def compile_(kind, spec):
        return llguidance.LLMatcher(tok, grammar(kind, spec), log_level=0)
    new = lambda compiled: compiled.deep_copy()
    alloc = lambda: lt.allocate_token_bitmask(1, V)
    fill = lambda m, bm: lt.fill_next_token_bitmask(m, bm, 0)
    accept = lambda m, t: m.consume_token(t)
    done = lambda m: m.is_stopped()
else:
    import xgrammar as xgr
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V)
    def compile_(kind, spec):
        c = xgr.GrammarCompiler(info)  # fresh: no cache hit
        if kind == "json":
            return c.compile_json_schema(json.dumps(spec))
        if kind == "regex":
            return c.compile_regex(spec)
        return c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in spec))
    new = lambda compiled: xgr.GrammarMatcher(compiled)
    alloc = lambda: xgr.allocate_token_bitmask(1, V)
    fill = lambda m, bm: m.fill_next_token_bitmask(bm, 0)
    accept = lambda m, t: m.accept_token(t)
    done = lambda m: m.is_terminated()
rng = random.Random(0)
out = {}
for name, (kind, spec) in GRAMMARS.items():
    compiles = []
    for _ in range(5):
        t = time.perf_counter(); compiled = compile_(kind, spec); compiles.append(time.perf_counter() - t)
    fills, bm = [], alloc()
    while len(fills) < steps:
        m = new(compiled)
        for _ in range(64):
            t = time.perf_counter(); fill(m, bm); fills.append(time.perf_counter() - t)
            bits = ((bm[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).reshape(-1)[:V]
            allowed = bits.nonzero().flatten().tolist()
            if not allowed:
                break
            t_ok = EOS if EOS in allowed and rng.random() < 0.15 else rng.choice(allowed)
            accept(m, t_ok)
            if t_ok == EOS or done(m):
                break
    us = sorted(x * 1e6 for x in fills)
    out[name] = {"compile_ms": statistics.median(compiles) * 1e3, "fill_p50_us": us[len(us) // 2],
                 "fill_p99_us": us[int(len(us) * 0.99)], "fills": len(us)}
print(json.dumps(out))
'''


def ensure_env(env: Path) -> Path:
    py = env / "bin" / "python"
    if not py.exists():
        print(f"creating {env} (torch 2.13 CPU, xgrammar, llguidance, transformers)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "xgrammar", "llguidance",
                        "transformers"], check=True)
    return py


def versions(py: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('xgrammar', 'llguidance', 'torch')}))")
    return json.loads(subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000, help="mask fills per grammar and round")
    ap.add_argument("--peer-env", type=Path, default=kvbaton_cache_dir() / "peers" / "grammar-libs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    py = ensure_env(args.peer_env)
    rounds: dict[str, list[dict[str, Any]]] = {"llguidance": [], "xgrammar": []}
    with tempfile.TemporaryDirectory() as tokdir:
        tokenizer_for_model("smollm2-135m").save_pretrained(tokdir)
        for lib in ("llguidance", "xgrammar", "xgrammar", "llguidance"):  # A B B A
            load = os.getloadavg()[0]
            r = subprocess.run([str(py), "-", lib, tokdir, str(args.steps)], input=PROBE, check=True,
                               capture_output=True, text=True)
            result = json.loads(r.stdout.strip().splitlines()[-1])
            result["load_average_1m"] = load
            rounds[lib].append(result)
            print(lib, json.dumps(result), file=sys.stderr, flush=True)
    keys = ("compile_ms", "fill_p50_us", "fill_p99_us")
    medians = {lib: {g: {k: statistics.median(r[g][k] for r in rs) for k in keys}
                     for g in rs[0] if g != "load_average_1m"} for lib, rs in rounds.items()}
    report = {"command": " ".join(sys.argv), "versions": versions(py), "rounds": rounds, "medians": medians}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
