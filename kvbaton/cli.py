"""`kvbaton` command line: wiring only; the logic lives in the packages."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from kvbaton.errors import ConfigError, InvalidRequestError


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, tiny-random), .gguf file or HF directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="most tokens one request prefills per step, so short prompts get "
                        "through beside long ones (0: no cap)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-inflight-prefix-sharing", action="store_true",
                   help="admit a request at once even when another request is prefilling its "
                        "prefix (both compute it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for this process")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, device=args.device, load_format=args.load_format,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching, num_threads=args.threads,
        share_inflight_prefill=not args.no_inflight_prefix_sharing,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
    )


# Config fields whose flag is not the field's name (with a trailing ``_s`` dropped).
_FIELD_FLAGS = {"lease_ttl_s": "--kv-lease-ttl", "num_threads": "--threads"}


def _flag_of(parser: argparse.ArgumentParser, name: str | None) -> str | None:
    """The flag of config field or sampling parameter ``name``, if ``parser`` has one."""
    if not name:
        return None
    known = {opt for action in parser._actions for opt in action.option_strings}
    base = name[:-2] if name.endswith("_s") else name
    for flag in (_FIELD_FLAGS.get(name), "--" + name.replace("_", "-"), "--" + base.replace("_", "-")):
        if flag in known:
            return flag
    return None


def _config_error(parser: argparse.ArgumentParser, e: ValueError) -> NoReturn:
    """Exit with a config error naming the flag of the field it is about (typed errors carry
    the field: ConfigError for settings, InvalidRequestError for sampling parameters)."""
    name = e.field if isinstance(e, ConfigError) else e.param if isinstance(e, InvalidRequestError) else None
    flag = _flag_of(parser, name)
    parser.error(f"{flag}: {e}" if flag else str(e))


def _cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvbaton import LLM, SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=args.stop or [], ignore_eos=args.ignore_eos,
        )
    except ValueError as e:
        _config_error(parser, e)
    try:
        llm = LLM(args.model, **_engine_kwargs(args))
    except ValueError as e:
        _config_error(parser, e)
    for prompt in args.prompt:
        if args.chat:
            out = llm.chat([{"role": "user", "content": prompt}], params)[0]
        else:
            out = llm.generate(prompt, params)[0]
        print(out.text, flush=True)
    return 0


def _add_worker_args(p: argparse.ArgumentParser, default_port: int) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length to serve (default: the model's)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (/health and /metrics stay open)")
    p.add_argument("--served-model-name", default=None,
                   help="another name the API accepts in the 'model' field")
    p.add_argument("--max-request-bytes", type=int, default=8 << 20)
    p.add_argument("--drain-timeout", type=float, default=5.0,
                   help="seconds in-flight requests may finish after SIGTERM before being aborted")
    k = p.add_argument_group("KV transfer (disaggregated prefill/decode)")
    k.add_argument("--kv-port", type=int, default=0,
                   help="port of this worker's KV transfer server (prefill roles; 0 = any free)")
    k.add_argument("--kv-secret", default=os.environ.get("KVBATON_KV_SECRET"),
                   help="shared secret that authenticates transfer peers (HMAC); default "
                        "$KVBATON_KV_SECRET; use it whenever workers span hosts")
    k.add_argument("--kv-transfer-timeout", type=float, default=10.0,
                   help="seconds one KV fetch may take before it counts as failed")
    k.add_argument("--kv-transfer-failure", default="recompute", choices=["recompute", "fail"],
                   help="what a decode request does when its KV fetch fails")
    k.add_argument("--kv-lease-ttl", type=float, default=30.0,
                   help="seconds a prefill worker keeps a prompt's KV pinned for the decode side")
    e = p.add_argument_group("KV events (what the router's prefix index follows)")
    e.add_argument("--kv-events-port", type=int, default=0,
                   help="ZMQ PUB port of this worker's KV events (0 = any free; see /kv/info)")
    e.add_argument("--kv-events-replay-port", type=int, default=0,
                   help="ZMQ ROUTER port that replays missed event batches (0 = any free)")
    e.add_argument("--no-kv-events", action="store_true",
                   help="publish no KV events (routers then cannot see this worker's cache); "
                        "with serve, the router also indexes nothing")


def _check_announce_fd(parser: argparse.ArgumentParser, fd: int | None) -> None:
    """``--announce-fd`` must be an open, writable descriptor of its own (not 0-2: the JSON
    line would mix with what people read); checked before the model loads."""
    if fd is None:
        return
    if fd < 3:
        parser.error(f"--announce-fd: {fd} is stdin/stdout/stderr; pass a descriptor of its "
                     "own (>= 3), e.g. `--announce-fd 3 3>ready.json`")
    import fcntl

    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        parser.error(f"--announce-fd: {fd} is not an open file descriptor")
    if mode == os.O_RDONLY:
        parser.error(f"--announce-fd: {fd} is not open for writing")
    # Nothing this worker starts may hold the descriptor: the reader's EOF must mean
    # "announced or exited".
    os.set_inheritable(fd, False)


def _run_worker(args: argparse.Namespace, parser: argparse.ArgumentParser, role: str) -> int:
    _check_announce_fd(parser, getattr(args, "announce_fd", None))
    from kvbaton.engine.config import EngineConfig
    from kvbaton.worker.config import WorkerConfig
    from kvbaton.worker.server import run_worker

    try:
        wcfg = WorkerConfig(
            host=args.host, port=args.port, role=role, api_key=args.api_key,
            served_model_name=args.served_model_name, max_request_bytes=args.max_request_bytes,
            drain_timeout_s=args.drain_timeout, log_level=args.log_level, kv_port=args.kv_port,
            kv_secret=args.kv_secret, kv_transfer_timeout_s=args.kv_transfer_timeout,
            kv_transfer_failure=args.kv_transfer_failure, kv_events=not args.no_kv_events,
            kv_events_port=args.kv_events_port, kv_events_replay_port=args.kv_events_replay_port,
        )
        ecfg = EngineConfig(model=args.model, max_model_len=args.max_model_len,
                            lease_ttl_s=args.kv_lease_ttl, shared_kv=role in ("prefill", "both"),
                            **_engine_kwargs(args))
    except ValueError as e:
        _config_error(parser, e)
    try:
        return run_worker(ecfg, wcfg, announce=lambda line: print(line, flush=True),
                          announce_fd=getattr(args, "announce_fd", None))
    except KeyboardInterrupt:  # Ctrl-C while the model was still loading
        return 130
    except (ValueError, OSError) as e:
        print(f"kvbaton: error: {e}", file=sys.stderr, flush=True)
        return 1


def _cmd_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return _run_worker(args, parser, args.role)


def _cmd_router(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from kvbaton.router.config import router_config_from_args
    from kvbaton.router.server import run_router

    try:
        cfg = router_config_from_args(args)
    except ValueError as e:
        _config_error(parser, e)
    try:
        return run_router(cfg, announce=lambda line: print(line, flush=True))
    except (ValueError, OSError) as e:
        print(f"kvbaton: error: {e}", file=sys.stderr, flush=True)
        return 1


# Flags of `serve` that each worker process gets unchanged.
_WORKER_PASSTHROUGH = (
    "model", "dtype", "device", "load_format", "block_size", "num_kv_blocks", "max_num_seqs",
    "max_num_batched_tokens", "max_model_len", "served_model_name", "log_level",
    "kv_transfer_timeout", "kv_transfer_failure", "kv_lease_ttl", "max_request_bytes",
    "drain_timeout", "long_prefill_token_threshold",
)


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """A router on --host/--port in front of worker processes on 127.0.0.1."""
    from kvbaton.engine.config import EngineConfig
    from kvbaton.router.config import router_config_from_args
    from kvbaton.router.local_cluster import LocalCluster, worker_specs
    from kvbaton.router.server import run_router

    colocated = args.colocated or 0
    default = 0 if colocated else 1
    prefill = default if args.prefill is None else args.prefill
    decode = default if args.decode is None else args.decode
    passthrough: list[str] = []
    for name in _WORKER_PASSTHROUGH:
        value = getattr(args, name)
        if value is not None:
            passthrough += [f"--{name.replace('_', '-')}", str(value)]
    for flag in ("no_prefix_caching", "no_inflight_prefix_sharing"):
        if getattr(args, flag):
            passthrough.append(f"--{flag.replace('_', '-')}")
    if args.no_kv_events:
        passthrough.append("--no-kv-events")
    try:
        for flag in ("kv_events_port", "kv_events_replay_port"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')}: serve starts its workers on free "
                                 "ports (they advertise them in /kv/info); set it per `kvbaton worker`")
        specs = worker_specs(prefill, decode, colocated, passthrough,
                             args.threads_per_worker or args.threads)
        # Validate the engine's and the router's flags before starting anything.
        EngineConfig(model=args.model, max_model_len=args.max_model_len, **_engine_kwargs(args))
        router_config_from_args(args, workers=("http://127.0.0.1:1",), prefill_workers=(), decode_workers=())
    except ValueError as e:
        _config_error(parser, e)

    def serve(urls: list[tuple[str, str]]) -> int:
        cfg = router_config_from_args(
            args,
            prefill_workers=tuple(u for r, u in urls if r == "prefill"),
            decode_workers=tuple(u for r, u in urls if r == "decode"),
            workers=tuple(u for r, u in urls if r == "both"),
        )
        return run_router(cfg, announce=lambda line: print(line, flush=True))

    cluster = LocalCluster(specs, kv_secret=args.kv_secret)
    print(f"kvbaton serve: starting {prefill} prefill, {decode} decode and {colocated} colocated "
          f"worker(s) with {specs[0].args[-1]} thread(s) each", flush=True)
    try:
        return cluster.run(serve)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"kvbaton: error: {e}", file=sys.stderr, flush=True)
        return 1


def build_parser() -> argparse.ArgumentParser:
    from kvbaton.router.config import add_router_args

    parser = argparse.ArgumentParser(prog="kvbaton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts (offline)")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    _add_engine_args(g)
    g.set_defaults(func=_cmd_generate, parser=g)
    w = sub.add_parser("worker", help="run one engine behind an OpenAI-compatible HTTP API")
    w.add_argument("--role", default="both", choices=["prefill", "decode", "both"],
                   help="prefill: answers prefill-only requests with a KV handle; decode: "
                        "imports KV by handle; both: either (every role serves whole requests)")
    _add_engine_args(w)
    _add_worker_args(w, default_port=8100)
    w.add_argument("--announce-fd", type=int, default=None, metavar="N",
                   help="once listening, write one JSON line {\"event\": \"ready\", \"url\", "
                        "\"role\", \"worker_id\", \"pid\", \"models\"} to open file descriptor "
                        "N (>= 3) and close it: what programs (kvbaton serve) read instead of "
                        "the stdout line")
    w.set_defaults(func=_cmd_worker, parser=w)
    r = sub.add_parser("router", help="the OpenAI front door for prefill/decode/colocated workers")
    add_router_args(r)
    r.set_defaults(func=_cmd_router, parser=r)
    s = sub.add_parser(
        "serve", help="a router plus prefill and decode worker processes on this machine "
                      "(default: 1 prefill + 1 decode, the bundled model)")
    _add_engine_args(s)
    _add_worker_args(s, default_port=8000)
    t = s.add_argument_group("topology")
    t.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1; 0 with --colocated)")
    t.add_argument("--decode", type=int, default=None, help="decode workers (default 1; 0 with --colocated)")
    t.add_argument("--colocated", type=int, default=None, help="workers that do both (role 'both')")
    t.add_argument("--threads-per-worker", type=int, default=None,
                   help="torch threads of each worker (default: cores / workers)")
    add_router_args(s, common=False)
    s.set_defaults(func=_cmd_serve, parser=s)
    from kvbaton.bench.cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args, args.parser) or 0)


if __name__ == "__main__":
    sys.exit(main())
