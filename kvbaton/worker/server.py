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
from typing import Callable, Self

import uvicorn
from fastapi import FastAPI

from kvbaton.engine.config import EngineConfig
from kvbaton.engine.engine import LLMEngine
from kvbaton.worker.api import WorkerState, create_app
from kvbaton.worker.config import WorkerConfig

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server that tells the app it is draining (``on_drain``) as soon as a signal
    arrives, before uvicorn stops accepting connections."""

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None] | None) -> None:
        super().__init__(config)
        self.on_drain = on_drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.on_drain is not None:
            self.on_drain()
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


def make_server(app: FastAPI, log_level: str, graceful_timeout_s: int,
                on_drain: Callable[[], None] | None = None) -> DrainingServer:
    """The uvicorn server of a worker or router app; ``graceful_timeout_s`` is how long
    uvicorn lets in-flight responses run after a shutdown signal before cancelling them."""
    level = log_level.upper()
    ucfg = uvicorn.Config(
        app,
        log_config=None,  # keep the process's logging setup
        log_level=level.lower() if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "warning",
        access_log=level == "DEBUG",
        timeout_graceful_shutdown=graceful_timeout_s,
        lifespan="on",
    )
    return DrainingServer(ucfg, on_drain)


def _make_worker_server(app: FastAPI, config: WorkerConfig) -> DrainingServer:
    # A backstop: the app aborts in-flight requests itself after drain_timeout_s, so their
    # streams end cleanly; uvicorn cancels whatever still hangs on after that.
    return make_server(app, config.log_level, int(config.drain_timeout_s) + 3,
                       app.state.worker.begin_drain)


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
    server = _make_worker_server(app, config)
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


class AppThread:
    """Any ASGI app served by uvicorn from a background thread on a bound socket (tests,
    notebooks; fake workers in the router's tests).

    ``start()`` returns once the server accepts connections (and its lifespan ran);
    ``stop()`` shuts it down as SIGTERM would. Usable as a context manager.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 server: DrainingServer | None = None) -> None:
        self.app = app
        self.host = host
        self._sock = bind_socket(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._server = server or make_server(app, "WARNING", 1)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="kvbaton-app-http", daemon=True)

    @property
    def url(self) -> str:
        return endpoint(self.host, self.port)

    def start(self, timeout_s: float = 30.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{type(self).__name__}: server failed to start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Shut down like SIGTERM does; True if the server thread ended in time."""
        if self._server.on_drain is not None:
            self._server.on_drain()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()
        return not self._thread.is_alive()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerThread(AppThread):
    """A worker served from a background thread of this process (tests, notebooks)."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig | None = None) -> None:
        self.config = config or WorkerConfig(port=0)
        app = create_app(engine, self.config)
        self.state: WorkerState = app.state.worker
        super().__init__(app, self.config.host, self.config.port,
                         _make_worker_server(app, self.config))
