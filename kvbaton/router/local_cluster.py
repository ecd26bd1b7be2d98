"""A router plus worker processes on this machine: what ``kvbaton serve`` starts.

Each worker is its own OS process (``kvbaton worker``) on 127.0.0.1 with a free port; it
announces its URL as one JSON line on a pipe (``--announce-fd``), and the router runs in this
process in front of them. The workers' stdout and stderr are this process's, so their logs show
where ``kvbaton serve`` runs. The workers share a random KV-transfer secret, so even on one
host only they can fetch each other's blocks. Whatever ends the router (Ctrl-C, SIGTERM, an
error), every worker is stopped: SIGTERM first (they drain), then SIGKILL after a bound.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn

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
    ) -> None:
        self.spec = spec
        self.url: str | None = None
        self.announcement: dict[str, Any] | None = None  # the whole JSON object, once read
        read_fd, write_fd = os.pipe()  # both non-inheritable; pass_fds hands the child one
        cmd = [sys.executable, "-m", "kvbaton.cli", "worker", "--role", spec.role,
               "--host", "127.0.0.1", "--port", "0", "--announce-fd", str(write_fd), *spec.args]
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
