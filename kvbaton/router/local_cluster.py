"""A router plus worker processes on this machine: what ``kvbaton serve`` starts.

Each worker is its own OS process (``kvbaton worker``) on 127.0.0.1 with a free port; it
announces its URL as one JSON line on a pipe (``--announce-fd``), and the router runs in this
process in front of them. The workers' stdout and stderr are this process's, so their logs show
where ``kvbaton serve`` runs. The workers share a random KV-transfer secret, so even on one
host only they can fetch each other's blocks. Whatever ends the router (Ctrl-C, SIGTERM, an
error), every worker is stopped: SIGTERM first (they drain), then SIGKILL after a bound; and
if this process itself is killed (``kill -9``), each worker gets SIGTERM from the kernel (a
parent-death signal), so none outlives it.

Supervision: a worker that exits while the cluster serves is restarted on the same port (so
the router's URL for it stays valid; it sees a new ``worker_id`` and an empty cache), after a
backoff that doubles from 1 s to 30 s while it keeps dying and resets once it has stayed up a
minute. Restarts are printed and counted (``LocalCluster.restarts``; ``kvbaton serve``
exports them as ``kvbaton:router_worker_restarts_total``).
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

from prometheus_client.core import CounterMetricFamily, Metric

from kvbaton.cli_args import KV_SECRET_ENV, PARENT_PID_ENV, WORKER_API_KEY_ENV

# The longest announce line accepted; a real one is a few hundred bytes.
_MAX_ANNOUNCE_BYTES = 64 << 10


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process to start: its role and its ``kvbaton worker`` flags."""

    role: str
    args: tuple[str, ...]


class WorkerProcess:
    """A ``kvbaton worker`` child process and the URL it announced.

    The worker announces on a pipe (``--announce-fd``), not in a file (``--announce-file``):
    the child holds the pipe's only write end, so this side sees EOF as soon as the child has
    announced and closed it, or has died, whichever comes first. No polling for a file, no
    temporary files to clean up, no atomic rename, and a dead child can never leave us
    waiting. ``wait_ready`` polls the pipe with a timeout, so a live child that never
    announces cannot block it past the deadline either.

    ``stdout`` is the child's stdout (default: this process's, so people see the worker's
    startup line and logs); nothing reads it, so any value works (``subprocess.DEVNULL``, a
    file). The child's stderr is always this process's.
    """

    def __init__(
        self, spec: WorkerSpec, env: dict[str, str], stdout: int | IO[Any] | None = None,
        port: int = 0,
    ) -> None:
        self.spec = spec
        self.url: str | None = None
        self.announcement: dict[str, Any] | None = None  # the whole JSON object, once read
        read_fd, write_fd = os.pipe()  # both non-inheritable; pass_fds hands the child one
        cmd = [sys.executable, "-m", "kvbaton.cli", "worker", "--role", spec.role,
               "--host", "127.0.0.1", "--port", str(port), "--announce-fd", str(write_fd), *spec.args]
        try:
            self.proc = subprocess.Popen(cmd, stdout=stdout, env=env, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child's copy must be the only one, or EOF never comes
        self._read_fd: int | None = read_fd
        self._buf = bytearray()
        self._failure: str | None = None  # why wait_ready failed for good

    def wait_ready(self, deadline: float) -> str:
        """The announced URL; RuntimeError if the worker exits first or ``deadline``
        (``time.monotonic()``) passes (then it may be called again with a later one)."""
        if self.url is not None:
            return self.url
        if self._read_fd is None:
            raise RuntimeError(self._failure or f"{self.spec.role} worker was stopped")
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{self.spec.role} worker did not start in time")
            if not poller.poll(min(remaining, 0.5) * 1000):
                # Belt and braces: EOF covers a dead child unless something else inherited
                # the write end; an exited child with nothing left in the pipe is done.
                if self.proc.poll() is None or poller.poll(0):
                    continue
                break
            chunk = os.read(self._read_fd, 4096)
            if not chunk:  # EOF: the worker closed the pipe (announced) or exited
                break
            self._buf += chunk
            if len(self._buf) > _MAX_ANNOUNCE_BYTES:
                return self._fail(f"{self.spec.role} worker sent an oversized announcement")
        self._close_pipe()
        line = bytes(self._buf).partition(b"\n")[0]
        if not line:
            return self._fail(self._no_announcement(deadline))
        self.announcement = self._parse(line)
        self.url = self.announcement["url"]
        return self.url

    def _fail(self, message: str) -> NoReturn:
        self._close_pipe()
        self._failure = message
        raise RuntimeError(message)

    def _parse(self, line: bytes) -> dict[str, Any]:
        try:
            info = json.loads(line)
        except ValueError:
            info = None
        if (not isinstance(info, dict) or info.get("event") != "ready"
                or not isinstance(info.get("url"), str) or not info["url"].startswith("http")):
            self._fail(f"{self.spec.role} worker sent a bad announcement: {line[:200]!r}")
        return info

    def _no_announcement(self, deadline: float) -> str:
        """Why the pipe ended without a line: the worker exited (almost always: then it is
        reaped at once), or it closed the pipe and lives on (a bug), told apart by the deadline."""
        try:
            code = self.proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return f"{self.spec.role} worker closed its announce pipe without announcing"
        return f"{self.spec.role} worker exited with code {code} before serving"

    def _close_pipe(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout_s: float) -> int:
        self._close_pipe()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class LocalCluster:
    """Start worker processes, hand their URLs to ``run``, restart any that dies meanwhile,
    and always stop them after."""

    def __init__(
        self, specs: Sequence[WorkerSpec], kv_secret: str | None = None,
        start_timeout_s: float = 600.0, stop_timeout_s: float = 15.0,
        restart_backoff_s: tuple[float, float] = (1.0, 30.0), healthy_after_s: float = 60.0,
        announce: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
        worker_api_key: str | None = None, env: Mapping[str, str] | None = None,
    ) -> None:
        if not specs:
            raise ValueError("a local cluster needs at least one worker")
        self.specs = list(specs)
        self.kv_secret = kv_secret or secrets.token_hex(16)
        self.worker_api_key = worker_api_key  # the workers' --api-key, passed in their environment
        self.extra_env = dict(env or {})  # more of it (the remote KV tier's password)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.restart_backoff_s = restart_backoff_s
        self.healthy_after_s = healthy_after_s
        self.announce = announce
        self.workers: list[WorkerProcess] = []
        self.restarts: dict[str, int] = {role: 0 for role in ("prefill", "decode", "both")}
        self._env: dict[str, str] = {}
        self._ports: list[int] = []  # each worker's port, kept across restarts
        self._lock = threading.Lock()  # self.workers, against stop() from another thread
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    def run(self, serve: Callable[[list[tuple[str, str]]], int]) -> int:
        """Start every worker, call ``serve([(role, url), ...])`` (blocking) while a thread
        restarts workers that die, then stop them all."""
        self._env = {**os.environ, **self.extra_env, KV_SECRET_ENV: self.kv_secret, PARENT_PID_ENV: str(os.getpid())}
        if self.worker_api_key:
            self._env[WORKER_API_KEY_ENV] = self.worker_api_key
        try:
            self.workers = [WorkerProcess(s, self._env) for s in self.specs]
            deadline = time.monotonic() + self.start_timeout_s
            urls = [(w.spec.role, w.wait_ready(deadline)) for w in self.workers]
            self._ports = [urlsplit(u).port or 0 for _, u in urls]
            self._supervisor = threading.Thread(target=self._supervise, name="kvbaton-supervisor", daemon=True)
            self._supervisor.start()
            return serve(urls)
        finally:
            self.stop()

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            # It may be starting a replacement: let it finish (bounded), so none is left behind.
            self._supervisor.join(self.stop_timeout_s + 5)
        with self._lock:
            workers = list(self.workers)
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait_or_kill(self.stop_timeout_s)

    def collect(self) -> list[Metric]:
        """A Prometheus collector of the restarts (``kvbaton serve`` registers it with the
        router's metrics): ``kvbaton:router_worker_restarts_total{role}``."""
        c = CounterMetricFamily("kvbaton:router_worker_restarts",
                                "Worker processes kvbaton serve restarted after they exited.", labels=["role"])
        for role, n in self.restarts.items():
            c.add_metric([role], float(n))
        return [c]

    # ---- supervision ---------------------------------------------------------------------

    def _supervise(self) -> None:
        started = {i: time.monotonic() for i in range(len(self.workers))}
        backoff = {i: self.restart_backoff_s[0] for i in range(len(self.workers))}
        while not self._stopping.wait(0.2):
            for i, w in enumerate(list(self.workers)):
                code = w.proc.poll()
                if code is None:
                    continue
                if time.monotonic() - started[i] >= self.healthy_after_s:
                    backoff[i] = self.restart_backoff_s[0]  # it had been fine: a fresh failure
                delay = backoff[i]
                self.announce(f"kvbaton serve: {w.spec.role} worker on port {self._ports[i]} exited with code {code}; "
                              f"restarting it in {delay:g} s")
                if self._stopping.wait(delay):
                    return
                w.wait_or_kill(0)
                replacement = WorkerProcess(w.spec, self._env, port=self._ports[i])
                with self._lock:
                    self.workers[i] = replacement
                started[i] = time.monotonic()
                backoff[i] = min(delay * 2, self.restart_backoff_s[1])
                self.restarts[w.spec.role] += 1
                try:
                    url = replacement.wait_ready(time.monotonic() + self.start_timeout_s)
                except RuntimeError as e:
                    self.announce(f"kvbaton serve: restarting the {w.spec.role} worker failed: {e}")
                    continue  # the next pass sees it dead and tries again, later
                self.announce(f"kvbaton serve: {w.spec.role} worker restarted at {url}")


def worker_specs(
    prefill: int, decode: int, colocated: int, common_args: Sequence[str], threads_per_worker: int | None
) -> list[WorkerSpec]:
    """Worker specs for a topology; threads default to an even share of this machine's cores."""
    n = prefill + decode + colocated
    if prefill < 0 or decode < 0 or colocated < 0:
        raise ValueError("--prefill/--decode/--colocated: counts must be >= 0")
    if decode + colocated == 0:
        raise ValueError("--decode: at least one decode or colocated worker is required")
    if prefill and not decode and not colocated:
        raise ValueError("--decode: prefill workers need a decode worker")
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // n)
    if threads < 1:
        raise ValueError("--threads-per-worker: must be >= 1")
    args = (*common_args, "--threads", str(threads))
    return (
        [WorkerSpec("prefill", args)] * prefill
        + [WorkerSpec("decode", args)] * decode
        + [WorkerSpec("both", args)] * colocated
    )
