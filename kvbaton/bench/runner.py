"""Orchestration: one run, a concurrency sweep, or an interleaved comparison of endpoints.

Each returns a JSON-ready dict (see docs/bench.md for the keys); printing and files are the
caller's (``report`` and ``cli``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvbaton.bench.client import BenchError, Endpoint, api_root, list_models, scrape_prefix_cache, send_turn
from kvbaton.bench.load import LoadConfig, LoadResult, drive
from kvbaton.bench.metrics import RequestRecord, find_knee, per_tag, summarize
from kvbaton.models.registry import BUNDLED_SMOLLM2

CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run needs besides the server's address."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint_type: str = "completions"
    model: str | None = None              # None: the first model of /v1/models
    api_key: str | None = None
    temperature: float = 0.0
    workload: str = "random"
    workload_options: Mapping[str, Any] = field(default_factory=dict)
    num_prompts: int = 1000               # sessions the workload generates
    seed: int = 0
    tokenizer: str | None = None          # None: the bundled SmolLM2 tokenizer
    load: LoadConfig = LoadConfig()
    slo: Mapping[str, float] | None = None
    request_timeout_s: float = 300.0      # longest silence from the server before a request fails
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout_s}")


class WorkloadOptionError(ValueError):
    """The workload name or one of its options is invalid (the message names it)."""


def make_bench_workload(cfg: BenchConfig, seed: int | None = None, tokenizer: Any = None) -> Any:
    """The configured workload for ``seed`` (default ``cfg.seed``); its options are checked
    here, the sessions are only built by ``workload_sessions``."""
    from kvbaton.bench.workloads import make_workload

    tok = tokenizer if tokenizer is not None else load_bench_tokenizer(cfg)
    try:
        return make_workload(cfg.workload, tokenizer=tok, seed=cfg.seed if seed is None else seed,
                             num_sessions=cfg.num_prompts, **dict(cfg.workload_options))
    except ValueError as e:
        raise WorkloadOptionError(str(e)) from None


def workload_sessions(workload: Any, ids_only: bool = False) -> list:
    """The workload's sessions (``ids_only``: see ``Workload.sessions``); WorkloadOptionError for
    what only building them finds (e.g. an unreadable or malformed trace file)."""
    try:
        return list(workload.sessions(ids_only=ids_only))
    except (ValueError, OSError) as e:
        raise WorkloadOptionError(str(e)) from None


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str | None) -> Any:
    # One object per name: the corpus caches its tokenized text per tokenizer object, so
    # repeated runs in one process (sweeps, tests) tokenize it once.
    from kvbaton.bench.workloads import load_tokenizer

    return load_tokenizer(name)


def load_bench_tokenizer(cfg: BenchConfig) -> Any:
    """The tokenizer the workload measures prompt lengths with (``--tokenizer``)."""
    try:
        return _tokenizer(cfg.tokenizer)
    except (ValueError, OSError) as e:
        raise WorkloadOptionError(f"--tokenizer {cfg.tokenizer}: {e}") from None


def check_servers(cfg: BenchConfig, urls: Sequence[str]) -> None:
    """Fail fast (BenchError) if a server is unreachable, before building the workload."""

    async def probe() -> None:
        async with _http_client(cfg) as client:
            for url in urls:
                await resolve_endpoint(client, cfg, url)

    asyncio.run(probe())


def _http_client(cfg: BenchConfig) -> httpx.AsyncClient:
    # Read timeout is per read: a stream that keeps sending never times out, a silent one does.
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=CONNECT_TIMEOUT_S, pool=None)
    # No connection cap: the load generator, not the HTTP pool, decides how many are in flight.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(timeout=timeout, limits=limits)


async def resolve_endpoint(client: httpx.AsyncClient, cfg: BenchConfig, base_url: str) -> Endpoint:
    """Check the server answers and pick the model (``cfg.model`` or its first listed one)."""
    models = await list_models(client, base_url, cfg.api_key)
    model = cfg.model or (models[0] if models else None)
    if model is None:
        raise BenchError(f"{api_root(base_url)}/v1/models lists no model; pass --model")
    return Endpoint(base_url=api_root(base_url), model=model, endpoint_type=cfg.endpoint_type,
                    api_key=cfg.api_key, temperature=cfg.temperature)


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=False)


async def _drive_one(client: httpx.AsyncClient, endpoint: Endpoint, sessions: Sequence,
                     load: LoadConfig, progress: bool, desc: str
                     ) -> tuple[LoadResult, tuple[float, float] | None]:
    """One load run; also the (queries, hits) delta of the server's prefix-cache counters."""
    before = await scrape_prefix_cache(client, endpoint.base_url)

    async def send(session, i, history, t0) -> RequestRecord:
        return await send_turn(client, endpoint, session, i, history, t0)

    bar = _progress(sum(len(s.turns) for s in sessions), progress, desc)
    try:
        result = await drive(sessions, send, load, on_record=lambda _: bar.update(1))
    finally:
        bar.close()
    after = await scrape_prefix_cache(client, endpoint.base_url) if before is not None else None
    delta = None if before is None or after is None else (after[0] - before[0], after[1] - before[1])
    return result, delta


def _hit_rate(delta: tuple[float, float] | None) -> float | None:
    return None if delta is None or delta[0] <= 0 else delta[1] / delta[0]


def usage_cached_rate(records: Sequence[RequestRecord]) -> float | None:
    """Prompt tokens the server reported as cached (``usage.prompt_tokens_details``) over all
    prompt tokens of the requests that reported it: the hit rate seen by clients, which works
    behind a router that has no prefix-cache counters of its own."""
    reported = [r for r in records if r.ok and r.cached_tokens is not None]
    total = sum(r.prompt_tokens for r in reported)
    return sum(r.cached_tokens or 0 for r in reported) / total if total > 0 else None


def _result(cfg: BenchConfig, endpoint: Endpoint, load: LoadConfig, seed: int,
            records: list[RequestRecord], duration_s: float, cache: tuple[float, float] | None,
            runs: Sequence[LoadResult]) -> dict:
    """The result JSON of one run (or of one compare target over all its rounds)."""
    out: dict[str, Any] = {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "backend": f"openai-{endpoint.endpoint_type}",
        "base_url": endpoint.base_url,
        "endpoint_type": endpoint.endpoint_type,
        "model_id": endpoint.model,
        "tokenizer_id": cfg.tokenizer or BUNDLED_SMOLLM2,
        "num_prompts": cfg.num_prompts,
        # As vLLM: an infinite rate is the string "inf" (JSON has no infinity).
        "request_rate": load.request_rate if math.isfinite(load.request_rate) else "inf",
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
    }
    out.update(summarize(records, duration_s, cfg.slo))
    out.update({
        "prefix_cache_hit_rate": _hit_rate(cache),
        "usage_cached_token_rate": usage_cached_rate(records),
        "per_tag": per_tag(records),
        "slo": dict(cfg.slo) if cfg.slo else None,
        "workload": {"name": cfg.workload, "options": dict(cfg.workload_options)},
        "seed": seed,
        "run": {
            "stopped_by": "duration" if any(r.stopped_by == "duration" for r in runs) else "completed",
            "duration_limit_s": load.duration_s,
            "drain_timeout_s": load.drain_timeout_s,
            "sessions_started": sum(r.sessions_started for r in runs),
            "sessions_not_started": sum(r.sessions_not_started for r in runs),
            "turns_not_sent": sum(r.turns_not_sent for r in runs),
            "cancelled": sum(r.cancelled for r in runs),
            "max_in_flight": max((r.max_in_flight for r in runs), default=0),
            "temperature": cfg.temperature,
            "time_scale": load.time_scale,
        },
    })
    return out


async def _run_async(cfg: BenchConfig, sessions: Sequence, seed: int, load: LoadConfig,
                     desc: str) -> dict:
    async with _http_client(cfg) as client:
        endpoint = await resolve_endpoint(client, cfg, cfg.base_url)
        res, cache = await _drive_one(client, endpoint, sessions, load, cfg.progress, desc)
    return _result(cfg, endpoint, load, seed, res.records, res.duration_s, cache, [res])


def run_bench(cfg: BenchConfig, sessions: Sequence | None = None) -> dict:
    """Run the configured workload once; the result dict (vLLM-style keys plus ours)."""
    if sessions is None:
        workload = make_bench_workload(cfg)
        check_servers(cfg, [cfg.base_url])
        sessions = workload_sessions(workload)
    return asyncio.run(_run_async(cfg, sessions, cfg.seed, cfg.load, "bench"))


def run_sweep(cfg: BenchConfig, concurrencies: Sequence[int]) -> dict:
    """Run the workload at each concurrency level and find the throughput knee.

    Each level gets fresh prompts (seed ``cfg.seed + level index``) so a later level does not
    find the earlier levels' prompts in the server's prefix cache.
    """
    if not concurrencies or any(c < 1 for c in concurrencies):
        raise ValueError("concurrency levels must be integers >= 1")
    tok = load_bench_tokenizer(cfg)
    workloads = [make_bench_workload(cfg, seed=cfg.seed + i, tokenizer=tok) for i in range(len(concurrencies))]
    check_servers(cfg, [cfg.base_url])
    levels = []
    for i, c in enumerate(concurrencies):
        seed = cfg.seed + i
        load = dataclasses.replace(cfg.load, max_concurrency=c, seed=seed)
        sessions = workload_sessions(workloads[i])
        levels.append(asyncio.run(_run_async(cfg, sessions, seed, load, f"concurrency {c}")))
    xs = [float(c) for c in concurrencies]
    knee = find_knee(xs, [lv["output_throughput"] or 0.0 for lv in levels])
    req_knee = find_knee(xs, [lv["request_throughput"] or 0.0 for lv in levels])
    return {
        "concurrency": list(concurrencies),
        "knee": knee.as_dict() if knee else None,
        "request_knee": req_knee.as_dict() if req_knee else None,
        "levels": levels,
    }


def split_rounds(sessions: Sequence, rounds: int) -> list[list]:
    """Contiguous, near-equal chunks; trace arrivals shifted so each round starts at 0."""
    rounds = max(1, min(rounds, len(sessions)))
    bounds = [i * len(sessions) // rounds for i in range(rounds + 1)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        chunk = list(sessions[a:b])
        times = [s.arrival_s for s in chunk if s.arrival_s is not None]
        if times:
            base = min(times)
            chunk = [s if s.arrival_s is None else dataclasses.replace(s, arrival_s=s.arrival_s - base)
                     for s in chunk]
        out.append(chunk)
    return out


async def _compare_async(cfg: BenchConfig, targets: Sequence[tuple[str, str]], sessions: Sequence,
                         rounds: int) -> dict:
    chunks = split_rounds(sessions, rounds)
    per_round_duration = None if cfg.load.duration_s is None else cfg.load.duration_s / len(chunks)
    load = dataclasses.replace(cfg.load, duration_s=per_round_duration)
    async with _http_client(cfg) as client:
        endpoints = {name: await resolve_endpoint(client, cfg, url) for name, url in targets}
        runs: dict[str, list[LoadResult]] = {name: [] for name, _ in targets}
        caches: dict[str, list[tuple[float, float] | None]] = {name: [] for name, _ in targets}
        order: list[list[str]] = []
        for r, chunk in enumerate(chunks):
            # ABBA: reversing the order every other round cancels a linear drift of the machine.
            names = [n for n, _ in targets]
            names = names if r % 2 == 0 else names[::-1]
            order.append(names)
            for name in names:
                res, cache = await _drive_one(client, endpoints[name], chunk, load, cfg.progress,
                                              f"round {r + 1}/{len(chunks)} {name}")
                runs[name].append(res)
                caches[name].append(cache)
    results = []
    for name, _ in targets:
        rs = runs[name]
        known = [c for c in caches[name] if c is not None]
        total = None if len(known) < len(caches[name]) else (
            sum(c[0] for c in known), sum(c[1] for c in known))
        summary = _result(cfg, endpoints[name], load, cfg.seed, [rec for x in rs for rec in x.records],
                          sum(x.duration_s for x in rs), total, rs)
        summary["run"]["duration_limit_s"] = cfg.load.duration_s
        results.append({"name": name, **summary})
    return {"rounds": len(chunks), "order": order, "targets": results,
            "ratios": compare_ratios(results)}


COMPARE_METRICS = (
    "request_throughput", "output_throughput", "request_goodput", "mean_ttft_ms",
    "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
    "p90_itl_ms", "mean_e2el_ms", "p90_e2el_ms", "prefix_cache_hit_rate", "usage_cached_token_rate",
)


def compare_ratios(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Each target's metrics divided by the first target's (None where either is missing or 0)."""
    base = results[0]
    out = {}
    for res in results:
        ratios: dict[str, float | None] = {}
        for key in COMPARE_METRICS:
            a, b = res.get(key), base.get(key)
            ratios[key] = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        out[res["name"]] = ratios
    return out


def run_compare(cfg: BenchConfig, targets: Sequence[tuple[str, str]], rounds: int = 4) -> dict:
    """Run the same sessions against every target, round by round in ABBA order."""
    if not targets:
        raise ValueError("at least one target is needed")
    names = [n for n, _ in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"target names must be distinct, got {names}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    workload = make_bench_workload(cfg)
    check_servers(cfg, [url for _, url in targets])
    return asyncio.run(_compare_async(cfg, targets, workload_sessions(workload), rounds))
