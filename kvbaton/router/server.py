"""Uvicorn wiring: run the router in the foreground (CLI) or on a background thread (tests).

Shutdown on SIGTERM / Ctrl-C: uvicorn stops accepting connections, ``/health`` turns 503
``draining`` and new requests get 503, in-flight responses get ``drain_timeout_s`` to finish
(uvicorn's graceful-shutdown timeout); what is still running then is cancelled, which closes
its worker streams (the workers abort those requests) and releases unconsumed leases.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI

from kvbaton.router.app import RouterState, create_app
from kvbaton.router.config import RouterConfig
from kvbaton.router.policies import PrefixOverlap
from kvbaton.worker.server import bind_socket, endpoint


class _RouterServer(uvicorn.Server):
    """uvicorn.Server that tells the app it is draining as soon as a signal arrives."""

    def __init__(self, config: uvicorn.Config, state: RouterState | None) -> None:
        super().__init__(config)
        self.router_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.router_state is not None:
            self.router_state.begin_drain()
        super().handle_exit(sig, frame)


def make_server(app: FastAPI, log_level: str = "WARNING", drain_timeout_s: float = 5.0) -> _RouterServer:
    level = log_level.upper()
    ucfg = uvicorn.Config(
        app,
        log_config=None,  # keep the process's logging setup
        log_level=level.lower() if level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else "warning",
        access_log=level == "DEBUG",
        timeout_graceful_shutdown=max(1, int(round(drain_timeout_s))),
        lifespan="on",
    )
    return _RouterServer(ucfg, getattr(app.state, "router", None))


def run_router(
    config: RouterConfig,
    announce: Callable[[str], None] = print,
    tokenizer: Any | None = None,
    overlap: PrefixOverlap | None = None,
) -> int:
    """Serve the router until SIGTERM/SIGINT, shut down gracefully; the exit code."""
    app = create_app(config, tokenizer, overlap)
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    server = make_server(app, config.log_level, config.drain_timeout_s)
    # uvicorn re-raises the signal that stopped it; make that a no-op so a graceful shutdown
    # exits 0 instead of dying by the signal's default action.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    state: RouterState = app.state.router
    workers = ", ".join(f"{w.url} ({w.declared_role or 'any'})" for w in state.pool.workers)
    announce(
        f"kvbaton router serving {', '.join(config.model_names)} at {endpoint(config.host, port)}/v1 "
        f"over {workers}"
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


class AppThread:
    """Any ASGI app served by uvicorn from a background thread on a bound socket.

    ``start()`` returns once the server accepts connections (and its lifespan ran);
    ``stop()`` shuts it down as SIGTERM would. Usable as a context manager.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "WARNING", drain_timeout_s: float = 1.0) -> None:
        self.app = app
        self.host = host
        self._sock = bind_socket(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._server = make_server(app, log_level, drain_timeout_s)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="kvbaton-app-http", daemon=True)

    @property
    def url(self) -> str:
        return endpoint(self.host, self.port)

    def start(self, timeout_s: float = 30.0) -> AppThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server failed to start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Shut down like SIGTERM does; True if the server thread ended in time."""
        if self._server.router_state is not None:
            self._server.router_state.begin_drain()
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()
        return not self._thread.is_alive()

    def __enter__(self) -> AppThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RouterThread(AppThread):
    """A router served from a background thread of this process (tests, notebooks)."""

    def __init__(self, config: RouterConfig, tokenizer: Any | None = None,
                 overlap: PrefixOverlap | None = None) -> None:
        app = create_app(config, tokenizer, overlap)
        super().__init__(app, config.host, config.port, config.log_level, config.drain_timeout_s)
        self.config = config
        self.state: RouterState = app.state.router
