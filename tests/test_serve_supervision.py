"""`kvbaton serve` supervises what it starts: its workers answer only the router (a key of
their own), a worker that dies is restarted on its port (and counted in the router's metrics)
and the cluster serves again, and a `kill -9` of serve itself takes its workers down with it
(they used to keep running, holding memory and shared-memory files)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from conftest import free_port, wait_until


def _children(pid: int) -> list[int]:
    """Live `kvbaton worker` processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z" and b"worker" in cmdline:
            found.append(int(d.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _serves(url: str) -> bool:
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}, timeout=30)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def test_serve_restarts_a_dead_worker_and_its_workers_die_with_it() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvbaton.cli", "serve", "--model", "tiny-random", "--colocated", "1",
         "--threads-per-worker", "1", "--num-kv-blocks", "64", "--port", str(port), "--no-kv-events",
         "--drain-timeout", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    workers: list[int] = []
    try:
        wait_until(lambda: _serves(url), 120, "serve to answer")
        # Only the router can use the workers it started: they hold a key of their own.
        worker_url = httpx.get(f"{url}/health", timeout=10).json()["workers"][0]["url"]
        direct = httpx.post(f"{worker_url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 1}, timeout=10)
        assert direct.status_code == 401
        assert httpx.get(f"{worker_url}/debug/engine", timeout=10).status_code == 401
        workers = _children(proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        wait_until(lambda: _children(proc.pid) not in ([], workers), 60, "a new worker process")
        wait_until(lambda: _serves(url), 120, "serve to answer after the restart")
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'kvbaton:router_worker_restarts_total{role="both"} 1.0' in metrics
        workers = _children(proc.pid)
        assert len(workers) == 1
        proc.kill()  # no chance to stop its children itself
        proc.wait(10)
        wait_until(lambda: not _alive(workers[0]), 60, "the worker to exit after serve was killed")
    finally:
        # Whatever failed, leave no worker behind (find them before serve goes).
        leftovers = set(workers) | set(_children(proc.pid))
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pid in leftovers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
