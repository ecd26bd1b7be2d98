"""Uvicorn wiring: run a worker in the foreground (CLI) or on a background thread (tests).

Shutdown on SIGTERM / Ctrl-C: uvicorn stops accepting connections, the app reports
``draining`` (``/health`` 503, new requests 503), in-flight requests get ``drain_timeout_s``
to finish, then the rest are aborted (streams end with finish_reason ``abort`` and
``[DONE]``), and the app's lifespan stops the engine thread. The process then exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from types import FrameType
from typing import Callable

import uvicorn
from fastapi import FastAPI

from kvbaton.engine.config import EngineConfig
from kvbaton.engine.engine import LLMEngine
from kvbaton.worker.api import WorkerState, create_app
from kvbaton.worker.config import WorkerConfig

log = logging.getLogger(__name__)


class _WorkerServer(uvicorn.Server):
    """uvicorn.Server that tells the app it is draining as soon as a signal arrives."""

    def __init__(self, config: uvicorn.Config, state: WorkerState) -> None:
        super().__init__(config)
        self.worker_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.worker_state.begin_drain()
        super().handle_exit(sig, frame)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one), so the port is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _make_server(app: FastAPI, config: WorkerConfig) -> _WorkerServer:
    level = config.log_level.upper()
    ucfg = uvicorn.Config(
        app,
        log_config=None,  # keep the process's logging setup
        log_level=level.lower() if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "warning",
        access_log=level == "DEBUG",
        # A backstop: the app aborts in-flight requests itself after drain_timeout_s, so
        # their streams end cleanly; uvicorn cancels whatever still hangs on after that.
        timeout_graceful_shutdown=int(config.drain_timeout_s) + 3,
        lifespan="on",
    )
    return _WorkerServer(ucfg, app.state.worker)


def endpoint(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def run_worker(
    engine_config: EngineConfig,
    config: WorkerConfig,
    announce: Callable[[str], None] = print,
) -> int:
    """Build the engine, serve until SIGTERM/SIGINT, shut down gracefully; the exit code."""
    engine = LLMEngine(engine_config)
    app = create_app(engine, config)
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    server = _make_server(app, config)
    # uvicorn re-raises the signal that stopped it once it is done; make that a no-op so a
    # graceful shutdown exits 0 instead of dying by the signal's default action.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    state: WorkerState = app.state.worker
    announce(
        f"kvbaton worker ({config.role}) serving {', '.join(state.model_names)} at "
        f"{endpoint(config.host, port)}/v1"
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started and state.engine.error is None else 1


class WorkerThread:
    """A worker served from a background thread of this process (tests, notebooks).

    ``start()`` returns once the server accepts connections; ``stop()`` shuts it down as
    SIGTERM would. Usable as a context manager.
    """

    def __init__(self, engine: LLMEngine, config: WorkerConfig | None = None) -> None:
        self.config = config or WorkerConfig(port=0)
        self.app = create_app(engine, self.config)
        self.state: WorkerState = self.app.state.worker
        self._sock = bind_socket(self.config.host, self.config.port)
        self.port: int = self._sock.getsockname()[1]
        self._server = _make_server(self.app, self.config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="kvbaton-worker-http",
            daemon=True,
        )

    @property
    def url(self) -> str:
        return endpoint(self.config.host, self.port)

    def start(self, timeout_s: float = 30.0) -> WorkerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("worker server failed to start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Shut down like SIGTERM does; True if the server thread ended in time."""
        self.state.begin_drain()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()
        return not self._thread.is_alive()

    def __enter__(self) -> WorkerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
