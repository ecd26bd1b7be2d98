"""`kvbaton` command line: wiring only; the logic lives in the packages."""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from kvbaton import __version__
from kvbaton.cli_args import (
    KV_SECRET_ENV,
    PARENT_PID_ENV,
    WORKER_API_KEY_ENV,
    HelpFormatter,
    add_log_level_arg,
    add_request_timeout_args,
)
from kvbaton.errors import ConfigError, InvalidRequestError

if TYPE_CHECKING:
    from kvbaton.router.local_cluster import WorkerSpec


# Host tier of `kvbaton worker` and `kvbaton serve` by default: min(AUTO_HOST_CACHE_MAX,
# AUTO_HOST_CACHE_FRACTION of the memory available now) per machine (serve splits it).
AUTO_HOST_CACHE_MAX = 2 << 30
AUTO_HOST_CACHE_FRACTION = 0.10
# Commands whose "auto" host tier is 0: a one-shot run ends before anything could be reused.
_NO_AUTO_TIERS = frozenset({"generate"})


def _gib_or_auto(text: str) -> float | str:
    """``--kv-host-cache-gib``: "auto" or a finite number of GiB (a negative one is left to
    EngineConfig, whose error names the flag like any other)."""
    if text.strip().lower() == "auto":
        return "auto"
    return _gib(text)


def _gib(text: str) -> float:
    return _finite(text, "GiB")


def _seconds(text: str) -> float:
    # EngineConfig's range checks let NaN through (every comparison with it is false).
    return _finite(text, "seconds")


def _finite(text: str, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number of {unit}, got {text!r}")
    return value


def _add_engine_args(p: argparse.ArgumentParser, command: str = "worker") -> None:
    """The engine's flags (``command``: whose parser it is; only the help text depends on it)."""
    from kvbaton.engine.config import EngineConfig  # light: the config module imports no torch

    p.add_argument("--model", default="smollm2-135m",
                   help="built-in name (smollm2-135m, tiny-random), .gguf file or HF directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens,
                   help="most tokens one engine step computes (default: %(default)s)")
    p.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="most tokens one request prefills per step, so short prompts get "
                        "through beside long ones (0: no cap)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-inflight-prefix-sharing", action="store_true",
                   help="admit a request at once even when another request is prefilling its "
                        "prefix (both compute it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads for this process")
    p.add_argument("--linear-backend", default="auto", choices=["auto", "torch", "onednn"],
                   help="matmuls: onednn packs the weights once for oneDNN (CPU, float32 or bfloat16; "
                        "1.6-2.3x faster SmolLM2 decode steps on 2 cores), torch keeps nn.Linear; "
                        "auto (default): onednn where it runs")
    if command == "serve":
        p.add_argument("--step-trace", default=None, metavar="DIR",
                       help="each worker appends one JSON line per engine step to DIR/<role>-<n>.jsonl "
                            "(its batch and duration; `kvbaton profile --from-steps` fits a cost model to them)")
    else:
        p.add_argument("--step-trace", default=None, metavar="FILE",
                       help="append one JSON line per engine step to FILE (its batch and duration; "
                            "`kvbaton profile --from-steps` fits a cost model to them)")
    add_log_level_arg(p)
    _add_kv_store_args(p, command)


def _add_kv_store_args(p: argparse.ArgumentParser, command: str) -> None:
    """The tiered KV store's flags (EngineConfig's ``kv_*`` fields; ``--kv-host-cache-gib``'s
    "auto" is resolved by ``_host_cache_bytes``)."""
    from kvbaton.engine.config import OFFLOAD_MODES, EngineConfig
    from kvbaton.kv.store.policies import POLICIES

    d = EngineConfig  # the flags' defaults are the engine's (a frozen dataclass: class attributes)
    if command in _NO_AUTO_TIERS:
        auto = ("auto (default) is 0 here: a one-shot run ends before anything it caches could "
                "be reused; give a size to try the tier")
    elif command == "serve":
        auto = (f"auto (default): min({AUTO_HOST_CACHE_MAX >> 30} GiB, "
                f"{AUTO_HOST_CACHE_FRACTION * 100:.0f}%% of available memory) split evenly over the "
                "workers; a number is per worker")
    else:
        auto = (f"auto (default): min({AUTO_HOST_CACHE_MAX >> 30} GiB, "
                f"{AUTO_HOST_CACHE_FRACTION * 100:.0f}%% of available memory)")
    t = p.add_argument_group("tiered KV store (device -> host -> disk; docs/kv-store.md)")
    t.add_argument("--kv-host-cache-gib", type=_gib_or_auto, default="auto", metavar="GIB",
                   help=f"host-memory tier under the device KV cache, in GiB (0: none); {auto}")
    where = {"serve": "; each worker gets DIR/<role>-<n>", "worker": "; one worker per directory"}
    t.add_argument("--kv-disk-cache-dir", default=None, metavar="DIR",
                   help=f"directory of a disk tier that survives restarts (default: none{where.get(command, '')})")
    t.add_argument("--kv-disk-cache-gib", type=_gib, default=None, metavar="GIB",
                   help="size of the disk tier in GiB (default "
                        f"{_default_disk_gib():g}; needs --kv-disk-cache-dir)")
    t.add_argument("--kv-eviction-policy", default=d.kv_eviction_policy, choices=sorted(POLICIES),
                   help="what the device cache and every tier evict first")
    t.add_argument("--kv-offload-mode", default=d.kv_offload_mode, choices=list(OFFLOAD_MODES),
                   help="write-back: blocks leave the device when evicted (copied ahead of "
                        "need); write-through: as soon as they are computed")
    t.add_argument("--kv-offload-min-hits", type=int, default=d.kv_offload_min_hits, metavar="N",
                   help="offload a block only once this many requests used it (1: every block)")
    t.add_argument("--kv-host-ttl", type=_seconds, default=d.kv_host_ttl_s, metavar="S",
                   help="seconds a host-tier block may stay unused before it is dropped (0: no TTL)")
    t.add_argument("--kv-disk-ttl", type=_seconds, default=d.kv_disk_ttl_s, metavar="S",
                   help="the same for the disk tier (0: no TTL)")
    t.add_argument("--kv-pin-max-ttl", type=_seconds, default=d.kv_pin_max_ttl_s, metavar="S",
                   help="longest ttl_s a POST /kv/pin may ask for")
    t.add_argument("--kv-load-timeout", type=_seconds, default=d.kv_load_timeout_s, metavar="S",
                   help="seconds a prefix load from a tier may take before the request "
                        "computes its prompt instead")
    t.add_argument("--kv-load-grace", type=_seconds, default=d.kv_load_grace_s, metavar="S",
                   help="seconds a step waits for the prefix loads it just started, so they "
                        "join that step instead of the next (0: never wait)")
    r = p.add_argument_group("remote KV tier (a Redis/Valkey server the cluster shares; docs/kv-store.md)")
    if command == "serve":
        r.add_argument("--kv-remote", choices=["redis"], default=None,
                       help="start a local redis-server on a free port for the workers to share "
                            "(stopped with the cluster); --kv-remote-url names an existing one instead")
        r.add_argument("--kv-remote-maxmemory-gib", type=_gib, default=None, metavar="GIB",
                       help="maxmemory of the redis-server --kv-remote starts (default "
                            f"{_default_remote_maxmemory_gib():g}; it evicts least recently used keys)")
    r.add_argument("--kv-remote-url", default=None, metavar="URL",
                   help="redis://[:PASSWORD@]HOST:PORT/DB or rediss:// (TLS) of the shared server "
                        f"(default: none); the password can instead come from ${_remote_password_env()}")
    r.add_argument("--kv-remote-namespace", default=d.kv_remote_namespace, metavar="NS",
                   help="key prefix, so clusters can share one server")
    r.add_argument("--kv-remote-ttl", type=_seconds, default=d.kv_remote_ttl_s, metavar="S",
                   help="TTL of every key, refreshed on each hit")
    r.add_argument("--kv-remote-min-hits", type=int, default=d.kv_remote_min_hits, metavar="N",
                   help="put a block in the remote tier once this many requests used it")
    r.add_argument("--kv-remote-timeout", type=_seconds, default=d.kv_remote_timeout_s, metavar="S",
                   help="seconds one server call may take before the tier counts it as down "
                        "(it then serves from the local tiers and retries with backoff)")


def _default_remote_maxmemory_gib() -> float:
    from kvbaton.kv.store.redis_server import DEFAULT_MAXMEMORY_BYTES

    return DEFAULT_MAXMEMORY_BYTES / 2**30


def _remote_password_env() -> str:
    from kvbaton.kv.store.remote_url import REMOTE_PASSWORD_ENV

    return REMOTE_PASSWORD_ENV


def _default_disk_gib() -> float:
    from kvbaton.engine.config import DEFAULT_DISK_CACHE_BYTES

    return DEFAULT_DISK_CACHE_BYTES / 2**30


def available_memory_bytes() -> int:
    """Memory this machine can give now: MemAvailable from /proc/meminfo, else its total
    (0 when neither is known)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    from kvbaton.engine.config import machine_memory_bytes

    return machine_memory_bytes()


def auto_host_cache_bytes(workers: int = 1) -> int:
    """The "auto" host tier of one of ``workers`` workers on this machine: min(2 GiB, 10% of
    available memory), split evenly, rounded down to a MiB (0 when memory is unknown)."""
    total = min(AUTO_HOST_CACHE_MAX, int(available_memory_bytes() * AUTO_HOST_CACHE_FRACTION))
    return (total // max(1, workers)) >> 20 << 20


def _host_cache_bytes(args: argparse.Namespace, workers: int = 1) -> int:
    """``--kv-host-cache-gib`` in bytes for one of ``workers`` workers ("auto" resolved)."""
    value = args.kv_host_cache_gib
    if value == "auto":
        # Tiers hold prefix-cache blocks: without prefix caching the engine builds none, so
        # "auto" claims no memory for them either.
        if getattr(args, "command", None) in _NO_AUTO_TIERS or args.no_prefix_caching:
            return 0
        return auto_host_cache_bytes(workers)
    return int(value * 2**30)


def _engine_kwargs(args: argparse.Namespace, workers: int = 1) -> dict:
    """EngineConfig fields from the engine flags; ``workers``: how many engines share this
    machine's "auto" host tier (serve)."""
    disk_gib = args.kv_disk_cache_gib
    return dict(
        dtype=args.dtype, device=args.device, load_format=args.load_format,
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching, num_threads=args.threads,
        linear_backend=args.linear_backend,
        share_inflight_prefill=not args.no_inflight_prefix_sharing,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        kv_host_cache_bytes=_host_cache_bytes(args, workers), kv_disk_cache_dir=args.kv_disk_cache_dir,
        kv_disk_cache_bytes=0 if disk_gib is None else int(disk_gib * 2**30),
        kv_eviction_policy=args.kv_eviction_policy, kv_offload_mode=args.kv_offload_mode,
        kv_offload_min_hits=args.kv_offload_min_hits, kv_host_ttl_s=args.kv_host_ttl,
        kv_disk_ttl_s=args.kv_disk_ttl, kv_pin_max_ttl_s=args.kv_pin_max_ttl,
        kv_load_timeout_s=args.kv_load_timeout,
        kv_load_grace_s=args.kv_load_grace,
        kv_remote_url=args.kv_remote_url, kv_remote_namespace=args.kv_remote_namespace,
        kv_remote_ttl_s=args.kv_remote_ttl, kv_remote_min_hits=args.kv_remote_min_hits,
        kv_remote_timeout_s=args.kv_remote_timeout,
        step_trace_path=args.step_trace,
    )


def _check_kv_store_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What EngineConfig cannot tell: its disk size 0 means "the default", so a flag asking
    for 0 GiB, or a size with no directory, is a mistake of the command line."""
    gib = args.kv_disk_cache_gib
    if gib is None:
        return
    if args.kv_disk_cache_dir is None:
        parser.error("--kv-disk-cache-gib: needs --kv-disk-cache-dir (there is no disk tier without one)")
    if gib <= 0:
        parser.error(f"--kv-disk-cache-gib: must be > 0, got {gib:g} (leave --kv-disk-cache-dir "
                     "out for no disk tier)")


# Config fields whose flag is not the field's name (with a trailing ``_s`` dropped).
_FIELD_FLAGS = {
    "lease_ttl_s": "--kv-lease-ttl", "num_threads": "--threads",
    "kv_host_cache_bytes": "--kv-host-cache-gib", "kv_disk_cache_bytes": "--kv-disk-cache-gib",
}


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

    _check_kv_store_args(parser, args)
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
    with llm:
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
                   help="require 'Authorization: Bearer KEY' (/health and /metrics stay open); worker: "
                        f"default ${WORKER_API_KEY_ENV}; serve: the router's key (its workers always "
                        "get one of their own, --worker-api-key or a random one)")
    p.add_argument("--served-model-name", default=None,
                   help="another name the API accepts in the 'model' field")
    p.add_argument("--max-request-bytes", type=int, default=8 << 20)
    p.add_argument("--drain-timeout", type=float, default=5.0,
                   help="seconds in-flight requests may finish after SIGTERM before being aborted")
    add_request_timeout_args(p)
    k = p.add_argument_group("KV transfer (disaggregated prefill/decode)")
    k.add_argument("--kv-port", type=int, default=0,
                   help="port of this worker's KV transfer server (prefill roles; 0 = any free)")
    k.add_argument("--kv-secret", default=os.environ.get(KV_SECRET_ENV),
                   help="shared secret that authenticates transfer peers (HMAC); default "
                        "$KVBATON_KV_SECRET. A prefill or decode worker needs one (serve gives "
                        "its workers a random one); a 'both' worker without one makes up its own, "
                        "so it transfers KV with no other worker")
    k.add_argument("--insecure-transfer", action="store_true",
                   help="run a prefill or decode worker's KV transfer plane without a secret: any "
                        "process that reaches it can fetch this worker's KV or feed it blocks")
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
    e.add_argument("--kv-events-token-ids", action="store_true",
                   help="include each block's token ids in BlockStored events, as vLLM does (off: "
                        "the event port is unauthenticated and the tokens are the prompts)")


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


def _die_with_parent() -> None:
    """A worker that ``kvbaton serve`` started (PARENT_PID_ENV set) gets SIGTERM from the
    kernel when serve dies, even by ``kill -9``, so it never outlives it (Linux prctl; a no-op
    elsewhere). If serve is already gone, stop now."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:  # it died before the signal was armed
        raise SystemExit(1)


def _transfer_secret(args: argparse.Namespace, parser: argparse.ArgumentParser, role: str) -> str | None:
    """The KV transfer secret a worker runs with. Without one, a decode worker would store
    blocks from any server a KV handle names, and a prefill worker would hand its KV to anyone:
    a prefill or decode worker refuses to start (a usage error naming --kv-secret) unless
    --insecure-transfer says so, loudly; a 'both' worker makes up a random one, so it serves
    alone (transfers with other workers fail and are recomputed)."""
    if args.kv_secret:
        return str(args.kv_secret)
    if role == "both":
        return secrets.token_hex(16)
    if not args.insecure_transfer:
        parser.error(f"--kv-secret: a {role} worker needs the cluster's KV transfer secret (or "
                     f"${KV_SECRET_ENV}), so that only its peers can send or fetch KV; "
                     "--insecure-transfer runs without one")
    print(f"kvbaton worker ({role}): WARNING: --insecure-transfer: the KV transfer plane accepts any "
          "peer; anything that can reach it can read this worker's KV or poison its prefix cache",
          file=sys.stderr, flush=True)
    return None


def _run_worker(args: argparse.Namespace, parser: argparse.ArgumentParser, role: str) -> int:
    _die_with_parent()
    _check_announce_fd(parser, getattr(args, "announce_fd", None))
    _check_kv_store_args(parser, args)
    from kvbaton.engine.config import EngineConfig
    from kvbaton.worker.config import WorkerConfig
    from kvbaton.worker.server import run_worker

    kv_secret = _transfer_secret(args, parser, role)
    try:
        wcfg = WorkerConfig(
            host=args.host, port=args.port, role=role,
            api_key=args.api_key or os.environ.get(WORKER_API_KEY_ENV) or None,
            served_model_name=args.served_model_name, max_request_bytes=args.max_request_bytes,
            drain_timeout_s=args.drain_timeout, log_level=args.log_level, kv_port=args.kv_port,
            request_header_timeout_s=args.request_header_timeout,
            request_body_timeout_s=args.request_body_timeout,
            kv_secret=kv_secret, kv_transfer_timeout_s=args.kv_transfer_timeout,
            kv_transfer_failure=args.kv_transfer_failure, kv_events=not args.no_kv_events,
            kv_events_token_ids=args.kv_events_token_ids, kv_events_secret=args.kv_secret or None,
            kv_events_port=args.kv_events_port, kv_events_replay_port=args.kv_events_replay_port,
        )
        ecfg = EngineConfig(model=args.model, max_model_len=args.max_model_len,
                            lease_ttl_s=args.kv_lease_ttl, shared_kv=role in ("prefill", "both"),
                            **_engine_kwargs(args))
    except ValueError as e:
        _config_error(parser, e)
    # Loading a model takes up to a minute on a small machine: say so instead of sitting silent.
    print(f"kvbaton worker ({role}): loading model {args.model} ...", file=sys.stderr, flush=True)
    try:
        return run_worker(ecfg, wcfg, announce=lambda line: print(line, flush=True),
                          announce_fd=getattr(args, "announce_fd", None))
    except KeyboardInterrupt:  # Ctrl-C while the model was still loading
        return 130
    except ConfigError as e:  # found once the engine is built (a server refused the password, say)
        flag = _flag_of(parser, e.field)
        print(f"kvbaton: error: {flag + ': ' + e.reason if flag else e}", file=sys.stderr, flush=True)
        return 1
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
    "max_num_batched_tokens", "max_model_len", "served_model_name", "log_level", "linear_backend",
    "kv_transfer_timeout", "kv_transfer_failure", "kv_lease_ttl", "max_request_bytes",
    "drain_timeout", "long_prefill_token_threshold", "kv_disk_cache_gib", "kv_eviction_policy",
    "kv_offload_mode", "kv_offload_min_hits", "kv_host_ttl", "kv_disk_ttl", "kv_pin_max_ttl",
    "kv_load_timeout", "kv_load_grace", "request_header_timeout", "request_body_timeout",
    "kv_remote_namespace", "kv_remote_ttl", "kv_remote_min_hits", "kv_remote_timeout",
)
# Not passed through as given: --kv-host-cache-gib (serve resolves "auto" to each worker's
# share and passes that number), --kv-disk-cache-dir (each worker gets a subdirectory: a
# disk tier's directory belongs to one process) and --kv-remote-url (its password, if any,
# goes in the workers' environment, not on their command lines).


def _check_serve_host_memory(parser: argparse.ArgumentParser, per_worker: int, workers: int) -> None:
    """Each worker's EngineConfig checks its own host tier; serve checks what they add up to."""
    from kvbaton.engine.config import machine_memory_bytes

    memory = machine_memory_bytes()
    if memory and workers > 1 and per_worker * workers > memory:
        parser.error(f"--kv-host-cache-gib: {workers} workers x {per_worker / 2**30:.1f} GiB is more "
                     f"than this machine's {memory / 2**30:.1f} GiB of memory (the size is per worker)")


def _with_per_worker_args(specs: Sequence[WorkerSpec], host_bytes: int, disk_dir: str | None,
                          step_trace_dir: str | None = None) -> list[WorkerSpec]:
    """Each worker's own flags: its host tier as a number (repr of bytes / 2**30 is exact, so
    the worker gets exactly ``host_bytes``), its own disk directory and step trace file, named
    by role and index so a restarted serve finds every worker's blocks (and trace) again."""
    from kvbaton.router.local_cluster import WorkerSpec

    out: list[WorkerSpec] = []
    seen: dict[str, int] = {}
    for spec in specs:
        extra = ["--kv-host-cache-gib", repr(host_bytes / 2**30)]
        n = seen.get(spec.role, 0)
        seen[spec.role] = n + 1
        if disk_dir is not None:
            extra += ["--kv-disk-cache-dir", os.path.join(disk_dir, f"{spec.role}-{n}")]
        if step_trace_dir is not None:
            extra += ["--step-trace", os.path.join(step_trace_dir, f"{spec.role}-{n}.jsonl")]
        out.append(WorkerSpec(spec.role, (*spec.args, *extra)))
    return out


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """A router on --host/--port in front of worker processes on 127.0.0.1."""
    from kvbaton.engine.config import EngineConfig
    from kvbaton.router.config import router_config_from_args
    from kvbaton.router.local_cluster import LocalCluster, WorkerSpec, worker_specs
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
    if args.kv_events_token_ids:
        passthrough.append("--kv-events-token-ids")
    try:
        for flag in ("kv_events_port", "kv_events_replay_port"):
            if getattr(args, flag):
                raise ValueError(f"--{flag.replace('_', '-')}: serve starts its workers on free "
                                 "ports (they advertise them in /kv/info); set it per `kvbaton worker`")
        specs = worker_specs(prefill, decode, colocated, passthrough,
                             args.threads_per_worker or args.threads)
        _check_kv_store_args(parser, args)
        host_bytes = _host_cache_bytes(args, len(specs))
        _check_serve_host_memory(parser, host_bytes, len(specs))
        specs = _with_per_worker_args(specs, host_bytes, args.kv_disk_cache_dir, args.step_trace)
        remote_env = _check_serve_remote(parser, args, host_bytes)
        # Validate the engine's and the router's flags before starting anything.
        EngineConfig(model=args.model, max_model_len=args.max_model_len, **_engine_kwargs(args, len(specs)))
        router_config_from_args(args, workers=("http://127.0.0.1:1",), prefill_workers=(), decode_workers=())
    except ValueError as e:
        _config_error(parser, e)

    def serve(urls: list[tuple[str, str]]) -> int:
        cfg = router_config_from_args(
            args, worker_api_key=worker_key, kv_secret=cluster.kv_secret,
            prefill_workers=tuple(u for r, u in urls if r == "prefill"),
            decode_workers=tuple(u for r, u in urls if r == "decode"),
            workers=tuple(u for r, u in urls if r == "both"),
        )
        return run_router(cfg, announce=lambda line: print(line, flush=True), collectors=[cluster])

    # Workers always need a key under serve (the router holds it), so nothing but the router can
    # reach their generation, lease and debug routes: the user's --worker-api-key, else a random one.
    worker_key = args.worker_api_key or secrets.token_hex(16)
    redis_server = None
    if args.kv_remote == "redis":
        from kvbaton.kv.store.redis_server import DEFAULT_MAXMEMORY_BYTES, RedisServer, RedisServerError

        gib = args.kv_remote_maxmemory_gib
        # A random password: only the workers (which get it in their environment) can use it.
        redis_server = RedisServer(DEFAULT_MAXMEMORY_BYTES if gib is None else int(gib * 2**30),
                                   password=secrets.token_hex(16))
        try:
            redis_server.start()
        except RedisServerError as e:
            print(f"kvbaton: error: --kv-remote redis: {e}", file=sys.stderr, flush=True)
            return 1
        remote_env[_remote_password_env()] = redis_server.password or ""
        print(f"kvbaton serve: shared remote KV tier: redis-server on {redis_server.url} "
              f"({redis_server.maxmemory_bytes / 2**30:g} GiB, {redis_server.policy})", flush=True)
    remote_url = redis_server.url if redis_server is not None else remote_env.pop(_REMOTE_URL_ENV, None)
    if remote_url:
        specs = [WorkerSpec(spec.role, (*spec.args, "--kv-remote-url", remote_url)) for spec in specs]
    cluster = LocalCluster(specs, kv_secret=args.kv_secret, worker_api_key=worker_key, env=remote_env)
    threads = specs[0].args[specs[0].args.index("--threads") + 1]
    tier = f" and a {host_bytes / 2**30:.2f} GiB host KV tier" if host_bytes else ""
    print(f"kvbaton serve: starting {prefill} prefill, {decode} decode and {colocated} colocated "
          f"worker(s) with {threads} thread(s){tier} each", flush=True)
    try:
        return cluster.run(serve)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, ValueError, OSError) as e:
        print(f"kvbaton: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if redis_server is not None:
            redis_server.stop()


_REMOTE_URL_ENV = "_url"  # a key of _check_serve_remote's answer, never exported


def _check_serve_remote(parser: argparse.ArgumentParser, args: argparse.Namespace, host_bytes: int) -> dict[str, str]:
    """serve's remote-tier flags: what the workers' environment needs (the password of a
    ``--kv-remote-url``, which then leaves the URL the workers get on their command lines),
    with the URL itself under ``_REMOTE_URL_ENV``; {} without a remote tier."""
    from kvbaton.kv.store.remote_url import parse_remote_url

    if args.kv_remote_maxmemory_gib is not None:
        if args.kv_remote != "redis":
            parser.error("--kv-remote-maxmemory-gib: needs --kv-remote redis (serve sizes only the server it starts)")
        if args.kv_remote_maxmemory_gib * 2**30 < 1 << 20:
            parser.error(f"--kv-remote-maxmemory-gib: must be at least 1 MiB, got {args.kv_remote_maxmemory_gib:g}")
    if args.kv_remote and args.kv_remote_url:
        parser.error("--kv-remote-url: give either --kv-remote redis (serve starts a server) or "
                     "--kv-remote-url (an existing one), not both")
    if args.kv_remote and not host_bytes:
        parser.error("--kv-host-cache-gib: the remote tier needs a host tier (blocks reach the server from it)")
    if args.kv_remote or not args.kv_remote_url:
        return {}
    url = parse_remote_url(args.kv_remote_url)
    env = {_REMOTE_URL_ENV: url.without_password()}
    if url.password:
        env[_remote_password_env()] = url.password
    return env


def build_parser() -> argparse.ArgumentParser:
    from kvbaton.router.config import add_router_args

    parser = argparse.ArgumentParser(prog="kvbaton", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvbaton {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for one or more prompts (offline)",
                       formatter_class=HelpFormatter)
    g.add_argument("prompt", nargs="+")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template")
    _add_engine_args(g, "generate")
    g.set_defaults(func=_cmd_generate, parser=g)
    w = sub.add_parser("worker", help="run one engine behind an OpenAI-compatible HTTP API",
                       formatter_class=HelpFormatter)
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
    r = sub.add_parser("router", help="the OpenAI front door for prefill/decode/colocated workers",
                       formatter_class=HelpFormatter)
    add_router_args(r)
    r.set_defaults(func=_cmd_router, parser=r)
    s = sub.add_parser(
        "serve", help="a router plus prefill and decode worker processes on this machine "
                      "(default: 1 prefill + 1 decode, the bundled model)", formatter_class=HelpFormatter)
    _add_engine_args(s, "serve")
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
    from kvbaton.sim.cli import add_sim_parsers

    add_bench_parser(sub)
    add_sim_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args, args.parser) or 0)


if __name__ == "__main__":
    sys.exit(main())
