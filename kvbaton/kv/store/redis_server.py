"""A local ``redis-server`` for the remote KV tier: what ``kvbaton serve --kv-remote redis``,
the tests and the benchmarks start, so each runs against the real server users deploy.

The binary is the distribution's (Debian's ``redis-server`` package; ``scripts/setup.sh``
installs it when missing). The server binds 127.0.0.1 only, on a free port, keeps nothing on
disk (no RDB snapshots, no AOF: the KV it holds is a cache, recomputable), is bounded by
``maxmemory`` with an evicting ``maxmemory-policy``, and requires a password when one is given.
Its configuration, password included, goes in on stdin, so no password shows in ``ps``.
On Linux the server gets SIGTERM when the process that started it dies (even by ``kill -9``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

REDIS_BINARY_ENV = "KVBATON_REDIS_SERVER"  # path of the redis-server binary, if not on PATH
DEFAULT_MAXMEMORY_BYTES = 1 << 30
MAXMEMORY_POLICIES = ("allkeys-lru", "allkeys-lfu", "volatile-lru", "volatile-lfu", "volatile-ttl",
                      "allkeys-random", "volatile-random", "noeviction")


def find_redis_server() -> str | None:
    """The redis-server binary: ``$KVBATON_REDIS_SERVER``, else PATH, else the Debian paths."""
    given = os.environ.get(REDIS_BINARY_ENV)
    if given:
        return given if os.access(given, os.X_OK) else None
    found = shutil.which("redis-server")
    if found:
        return found
    for path in ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server"):
        if os.access(path, os.X_OK):
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start and answer."""


class RedisServer:
    """One redis-server child process (see the module docstring); a context manager.

    ``url`` has no password in it (pass ``password`` to the client separately: it never goes
    in a URL that could be logged).
    """

    def __init__(self, maxmemory_bytes: int = DEFAULT_MAXMEMORY_BYTES, policy: str = "allkeys-lru",
                 password: str | None = None, port: int | None = None, binary: str | None = None) -> None:
        if maxmemory_bytes < 1 << 20:
            raise ValueError(f"maxmemory must be at least 1 MiB, got {maxmemory_bytes} bytes")
        if policy not in MAXMEMORY_POLICIES:
            raise ValueError(f"maxmemory-policy must be one of {', '.join(MAXMEMORY_POLICIES)}, got {policy!r}")
        if password is not None and (not password or any(c.isspace() or c == '"' for c in password)):
            raise ValueError("the Redis password must be non-empty, with no spaces or quotes")
        self.maxmemory_bytes = maxmemory_bytes
        self.policy = policy
        self.password = password
        self.port = port or 0
        self.binary = binary
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        """Start the server and wait until it answers PING; RedisServerError if it cannot."""
        binary = self.binary or find_redis_server()
        if binary is None:
            raise RedisServerError("redis-server not found: install the distribution's redis-server package "
                                   f"(scripts/setup.sh does), or set {REDIS_BINARY_ENV}")
        fixed_port = bool(self.port)
        for attempt in range(3):  # a free port can be taken between the probe and the bind
            if not fixed_port:
                self.port = _free_port()
            self._dir = tempfile.TemporaryDirectory(prefix="kvbaton-redis-")
            config = "\n".join([
                f"port {self.port}", "bind 127.0.0.1", "protected-mode yes", 'save ""', "appendonly no",
                f"dir {self._dir.name}", f"maxmemory {self.maxmemory_bytes}", f"maxmemory-policy {self.policy}",
                "loglevel warning", "logfile \"\"", "daemonize no",
                *([f'requirepass "{self.password}"'] if self.password else []),
            ]) + "\n"
            self.proc = subprocess.Popen([binary, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
            assert self.proc.stdin is not None
            self.proc.stdin.write(config.encode())
            self.proc.stdin.close()
            if self._wait_ready(timeout_s):
                return self
            err = self._stop_proc()
            if fixed_port or attempt == 2 or "Address already in use" not in err:
                raise RedisServerError(f"redis-server on 127.0.0.1:{self.port} did not start: {err.strip()[-500:]}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout_s: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                    # An unauthenticated PING is answered (NOAUTH when a password is set) once
                    # the server accepts commands.
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _stop_proc(self) -> str:
        """Stop the process (SIGTERM, then SIGKILL); its stderr."""
        err = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            if self.proc.stderr is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                self.proc.stderr.close()
            self.proc = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        return err

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the server (fault tests); ``start`` again brings up a fresh one on the same port."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self._stop_proc()

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        self._stop_proc()

    def __enter__(self) -> RedisServer:
        return self.start() if self.proc is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
