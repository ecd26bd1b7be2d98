"""A router plus worker processes on this machine: what ``kvbaton serve`` starts.

Each worker is its own OS process (``kvbaton worker``) on 127.0.0.1 with a free port that it
announces on stdout; the router runs in this process in front of them. The workers share a
random KV-transfer secret, so even on one host only they can fetch each other's blocks.
Whatever ends the router (Ctrl-C, SIGTERM, an error), every worker is stopped: SIGTERM first
(they drain), then SIGKILL after a bound.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_ANNOUNCE = re.compile(r"kvbaton worker \((\w+)\) serving .* at (http://\S+)/v1")


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process to start: its role and its ``kvbaton worker`` flags."""

    role: str
    args: tuple[str, ...]


class WorkerProcess:
    """A ``kvbaton worker`` child process and the URL it announced."""

    def __init__(self, spec: WorkerSpec, env: dict[str, str]) -> None:
        self.spec = spec
        cmd = [sys.executable, "-m", "kvbaton.cli", "worker", "--role", spec.role,
               "--host", "127.0.0.1", "--port", "0", *spec.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True, name=f"kvbaton-{spec.role}-out")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # drained to the end so the child never blocks on a pipe
            m = _ANNOUNCE.search(line)
            if m and self.url is None:
                self.url = m.group(2)
                self._ready.set()
        self._ready.set()  # EOF: the process ended (wait_ready reports it)

    def wait_ready(self, deadline: float) -> str:
        while not self._ready.wait(0.2):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.role} worker did not start in time")
        if self.url is None:
            code = self.proc.wait()
            raise RuntimeError(f"{self.spec.role} worker exited with code {code} before serving")
        return self.url

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_or_kill(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class LocalCluster:
    """Start worker processes, hand their URLs to ``run``, and always stop them after."""

    def __init__(
        self, specs: Sequence[WorkerSpec], kv_secret: str | None = None,
        start_timeout_s: float = 600.0, stop_timeout_s: float = 15.0,
    ) -> None:
        if not specs:
            raise ValueError("a local cluster needs at least one worker")
        self.specs = list(specs)
        self.kv_secret = kv_secret or secrets.token_hex(16)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.workers: list[WorkerProcess] = []

    def run(self, serve: Callable[[list[tuple[str, str]]], int]) -> int:
        """Start every worker, call ``serve([(role, url), ...])`` (blocking), stop workers."""
        env = {**os.environ, "KVBATON_KV_SECRET": self.kv_secret}
        try:
            self.workers = [WorkerProcess(s, env) for s in self.specs]
            deadline = time.monotonic() + self.start_timeout_s
            urls = [(w.spec.role, w.wait_ready(deadline)) for w in self.workers]
            return serve(urls)
        finally:
            self.stop()

    def stop(self) -> None:
        for w in self.workers:
            w.terminate()
        for w in self.workers:
            w.wait_or_kill(self.stop_timeout_s)


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
