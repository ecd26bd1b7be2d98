"""Workers announce themselves with one JSON line on a pipe (``kvbaton worker --announce-fd``),
and ``kvbaton serve`` (LocalCluster / WorkerProcess) takes their URLs from it, never from the
human-readable stdout line; a worker that dies or stalls before announcing is a clear error."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from kvbaton.router.local_cluster import LocalCluster, WorkerProcess, WorkerSpec, worker_specs

MODEL = "tiny-random"
WORKER_ARGS = ("--model", MODEL, "--num-kv-blocks", "256", "--threads", "1")


def _read_until_eof(fd: int, timeout_s: float) -> bytes:
    """Everything written to the pipe until its write end closes; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no EOF on the announce pipe after {timeout_s}s (got {data!r})")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return data
            data += chunk


def test_worker_writes_one_json_ready_line_then_closes_the_fd() -> None:
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "kvbaton.cli", "worker", *WORKER_ARGS, "--role", "decode",
           "--port", "0", "--announce-fd", str(write_fd), "--kv-secret", "s3cret"]
    proc = subprocess.Popen(cmd, pass_fds=(write_fd,), stdout=subprocess.DEVNULL)
    os.close(write_fd)
    try:
        data = _read_until_eof(read_fd, 120)  # EOF: the worker closed its end after announcing
        assert proc.poll() is None, "the worker exited instead of serving"
        assert data.endswith(b"\n") and data.count(b"\n") == 1, data
        info = json.loads(data)
        assert set(info) == {"event", "url", "role", "worker_id", "pid", "models"}
        assert info["event"] == "ready" and info["role"] == "decode"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", info["url"]), info["url"]
        assert info["pid"] == proc.pid and info["models"] == [MODEL]
        health = httpx.get(f"{info['url']}/health", timeout=30)
        assert health.status_code == 200
        assert health.json()["worker_id"] == info["worker_id"]
        assert health.json()["role"] == "decode"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(read_fd)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("how", ["closed", "read_only", "stdout"])
def test_a_bad_announce_fd_is_a_cli_error_before_the_model_loads(how: str) -> None:
    read_fd, write_fd = os.pipe()
    os.close(write_fd)
    fd = {"closed": write_fd, "read_only": read_fd, "stdout": 1}[how]
    try:
        out = subprocess.run(
            [sys.executable, "-m", "kvbaton.cli", "worker", *WORKER_ARGS, "--port", "0",
             "--announce-fd", str(fd)],
            pass_fds=(read_fd,) if how == "read_only" else (), capture_output=True, text=True,
            timeout=120,
        )
    finally:
        os.close(read_fd)
    assert out.returncode == 2, out.stderr
    assert "--announce-fd" in out.stderr.splitlines()[-1], out.stderr
    assert "serving" not in out.stdout


def test_the_url_comes_from_the_announcement_not_the_log_line(tmp_path: Path, monkeypatch, capfd) -> None:
    # Every child Python rewrites whatever the worker prints on stdout: serve must not care.
    (tmp_path / "sitecustomize.py").write_text(
        "import builtins\n"
        "_print = builtins.print\n"
        "def _reworded(*args, **kwargs):\n"
        "    if any('kvbaton worker' in str(a) for a in args):\n"
        "        args = ('this worker says something else entirely',)\n"
        "    _print(*args, **kwargs)\n"
        "builtins.print = _reworded\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    cluster = LocalCluster(worker_specs(1, 1, 0, WORKER_ARGS[:-2], 1), start_timeout_s=120)
    seen: list[tuple[str, str]] = []
    ids: list[str] = []

    def serve(urls: list[tuple[str, str]]) -> int:
        seen.extend(urls)
        for role, url in urls:
            health = httpx.get(f"{url}/health", timeout=30).json()
            assert health["role"] == role and health["status"] == "ok"
            ids.append(health["worker_id"])
        return 7

    assert cluster.run(serve) == 7
    assert [role for role, _ in seen] == ["prefill", "decode"]
    assert [(w.announcement or {}).get("worker_id") for w in cluster.workers] == ids
    assert [w.proc.returncode for w in cluster.workers] == [0, 0]  # stopped, gracefully
    out = capfd.readouterr().out
    assert out.count("this worker says something else entirely") == 2
    assert "serving" not in out


def test_a_worker_that_dies_before_announcing_is_a_runtime_error() -> None:
    cluster = LocalCluster([WorkerSpec("both", ("--model", "no-such-model", "--threads", "1"))],
                           start_timeout_s=120)
    served: list[object] = []
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"both worker exited with code 1 before serving"):
        cluster.run(served.append)
    assert time.monotonic() - start < 60  # as soon as it exits, not at the deadline
    assert served == []
    assert cluster.workers[0].proc.returncode == 1


def test_a_worker_that_does_not_announce_in_time_is_a_runtime_error_and_is_stopped() -> None:
    cluster = LocalCluster([WorkerSpec("both", WORKER_ARGS)], start_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="both worker did not start in time"):
        cluster.run(lambda urls: 0)
    assert time.monotonic() - start < 20
    assert cluster.workers[0].proc.poll() is not None  # stopped, not left behind


def test_a_worker_stopped_right_after_announcing_exits_zero() -> None:
    # Its stdout is discarded (the URL never came from there); SIGTERM comes at once, before
    # uvicorn may have installed its handlers: the worker must still stop gracefully, not ignore it.
    worker = WorkerProcess(WorkerSpec("both", WORKER_ARGS), dict(os.environ), stdout=subprocess.DEVNULL)
    try:
        url = worker.wait_ready(time.monotonic() + 120)
        worker.terminate()
        assert worker.wait_ready(time.monotonic()) == url  # read once, then remembered
        assert worker.announcement is not None and worker.announcement["pid"] == worker.proc.pid
        assert worker.proc.wait(timeout=30) == 0
    finally:
        worker.proc.kill()
        worker.wait_or_kill(10)
