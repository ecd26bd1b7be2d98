"""Helpers for the worker tests: an in-process worker on a free port, and polling helpers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx

from conftest import wait_until
from kvbaton.engine.config import EngineConfig
from kvbaton.engine.engine import LLMEngine
from kvbaton.router.config import RouterConfig
from kvbaton.router.server import RouterThread
from kvbaton.worker.config import WorkerConfig
from kvbaton.worker.server import WorkerThread

MODEL = "tiny-random"
# Engine settings every worker test uses; the references (conftest.make_llm) share the model
# and seed, so greedy outputs must match token for token.
ENGINE_DEFAULTS: dict[str, Any] = {"num_kv_blocks": 256}


def start_worker(worker: dict[str, Any] | None = None, **engine: Any) -> WorkerThread:
    """A tiny-random worker served from a thread on 127.0.0.1, on a free port."""
    ecfg = EngineConfig(model=MODEL, **{**ENGINE_DEFAULTS, **engine})
    wcfg = WorkerConfig(port=0, **(worker or {}))
    return WorkerThread(LLMEngine(ecfg), wcfg).start()


@contextmanager
def running_worker(worker: dict[str, Any] | None = None, **engine: Any) -> Iterator[WorkerThread]:
    """``start_worker`` for a fixture: always stopped, and the stop must succeed."""
    w = start_worker(worker, **engine)
    try:
        yield w
    finally:
        assert w.stop()


def engine_debug(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.get(f"{url}/debug/engine", headers=headers, timeout=10)
    r.raise_for_status()
    return r.json()


def wait_idle(url: str, baseline_blocks: int, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Wait until nothing runs or waits and used KV blocks are back to ``baseline_blocks``."""
    state: dict[str, Any] = {}

    def idle() -> bool:
        state.update(engine_debug(url, headers))
        s = state["stats"]
        return (
            s["num_running"] == 0 and s["num_waiting"] == 0
            and s["kv_blocks_used"] == baseline_blocks and state["num_streams"] == 0
        )

    wait_until(idle, what="the engine to become idle")
    assert state["integrity_error"] is None, state["integrity_error"]
    return state


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format to {'name{labels}': value} (comments dropped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the series of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, v in values.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


@contextmanager
def router_over_workers(disaggregated: bool, num_kv_blocks: int = 256) -> Iterator[str]:
    """A router over real tiny-random workers, yielding its URL: one colocated worker, or a
    prefill and a decode worker with every prompt disaggregated. Afterwards every worker must
    settle: nothing running, no block used, no lease held, integrity checks passing."""
    with ExitStack() as stack:
        if disaggregated:
            p = stack.enter_context(running_worker({"role": "prefill"}, num_kv_blocks=num_kv_blocks))
            d = stack.enter_context(running_worker({"role": "decode"}, num_kv_blocks=num_kv_blocks))
            cfg = RouterConfig(prefill_workers=(p.url,), decode_workers=(d.url,), model=MODEL, port=0,
                               disagg_min_tokens=1, health_interval_s=0.3)
            workers = [p, d]
        else:
            w = stack.enter_context(running_worker(num_kv_blocks=num_kv_blocks))
            cfg = RouterConfig(workers=(w.url,), model=MODEL, port=0, disagg_min_tokens=1 << 30,
                               health_interval_s=0.3)
            workers = [w]
        r = RouterThread(cfg).start()
        try:
            yield r.url
        finally:
            assert r.stop()
        for w in workers:
            wait_until(lambda w=w: wait_idle(w.url, 0)["stats"]["kv_leases_active"] == 0,
                       what="the workers to settle")
