"""Disconnects free their blocks, shutdown is graceful (SIGTERM exits 0), a dead engine
loop shows in /health."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import pytest

from conftest import wait_until
from kvbaton.router.local_cluster import WorkerProcess, WorkerSpec
from worker_support import (
    MODEL,
    engine_debug,
    metric,
    parse_metrics,
    running_worker,
    start_worker,
    wait_idle,
)

LONG = {"model": MODEL, "prompt": [1, 2, 3, 4, 5], "max_tokens": 2000, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def worker():
    with running_worker() as w:
        yield w


def _events(lines):
    for line in lines:
        if line.startswith("data: "):
            yield line[6:]


def test_stream_disconnect_aborts_and_frees_blocks(worker):
    baseline = engine_debug(worker.url)["stats"]["kv_blocks_used"]
    with httpx.stream("POST", f"{worker.url}/v1/completions", json={**LONG, "stream": True},
                      timeout=30) as r:
        assert r.status_code == 200
        # Keep a reference: an abandoned httpx line iterator closes the connection by itself.
        events = _events(r.iter_lines())
        for _ in range(3):
            assert json.loads(next(events))["choices"][0]["finish_reason"] is None
        busy = engine_debug(worker.url)
        assert busy["stats"]["num_running"] == 1 and busy["num_streams"] == 1
        assert busy["stats"]["kv_blocks_used"] > baseline
    # Leaving the block closed the connection mid-stream.
    wait_idle(worker.url, baseline)
    assert _finished(worker.url, "abort") == 1


def _finished(url: str, reason: str) -> float:
    values = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    return metric(values, "kvbaton:request_success_total", finished_reason=reason)


def test_non_stream_disconnect_aborts(worker):
    baseline = engine_debug(worker.url)["stats"]["kv_blocks_used"]
    aborted = _finished(worker.url, "abort")
    with pytest.raises(httpx.ReadTimeout):
        # The client gives up (and closes the connection) long before 2000 tokens are done.
        httpx.post(f"{worker.url}/v1/completions", json=LONG, timeout=httpx.Timeout(10, read=0.5))
    wait_idle(worker.url, baseline)
    assert _finished(worker.url, "abort") == aborted + 1


def test_stop_with_request_in_flight_ends_stream_cleanly():
    # Its own worker: stopping it is the test. Drain timeout 0.5 s, the request needs longer.
    w = start_worker(worker={"drain_timeout_s": 0.5})
    events: list[str] = []
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", f"{w.url}/v1/completions", json={**LONG, "stream": True},
                          timeout=60) as r:
            for event in _events(r.iter_lines()):
                events.append(event)
                started.set()

    t = threading.Thread(target=consume)
    t.start()
    try:
        assert started.wait(30)
        assert w.stop()
    finally:
        t.join(30)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    assert not w.state.engine.thread_alive
    stats = w.state.engine.engine.stats()
    assert stats["num_running"] == 0 and stats["kv_blocks_used"] == 0
    w.state.engine.engine.check_integrity()


def test_dead_engine_loop_fails_health_and_requests():
    w = start_worker()
    try:
        assert httpx.get(f"{w.url}/health", timeout=10).status_code == 200

        def boom():
            raise RuntimeError("injected engine failure")

        w.state.engine.engine.step = boom  # the next step crashes the engine loop
        r = httpx.post(f"{w.url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 3}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        health = httpx.get(f"{w.url}/health", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        r = httpx.post(f"{w.url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 3}, timeout=30)
        assert r.status_code == 503
    finally:
        assert w.stop()


def _spawn_worker(*extra: str) -> tuple[subprocess.Popen, str]:
    worker = WorkerProcess(
        WorkerSpec("both", ("--model", MODEL, "--num-kv-blocks", "256", "--threads", "1", *extra)),
        {**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = worker.wait_ready(time.monotonic() + 120)
    except RuntimeError:
        worker.proc.kill()
        worker.wait_or_kill(10)
        raise
    wait_until(lambda: _healthy(url), what="the worker to become healthy")
    return worker.proc, url


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_exits_zero():
    proc, url = _spawn_worker()
    try:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert models["data"][0]["role"] == "both"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_with_stream_in_flight_exits_zero():
    # No drain time: the 2000-token stream is aborted as soon as the worker starts draining.
    proc, url = _spawn_worker("--drain-timeout", "0")
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True},
                          timeout=60) as r:
            events = _events(r.iter_lines())
            next(events)
            proc.send_signal(signal.SIGTERM)
            rest = list(events)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
