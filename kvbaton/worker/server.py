"""Uvicorn wiring: run a worker in the foreground (CLI) or on a background thread (tests).

Shutdown on SIGTERM / Ctrl-C: uvicorn stops accepting connections, the app reports
``draining`` (``/health`` 503, new requests 503), in-flight requests get ``drain_timeout_s``
to finish, then the rest are aborted (streams end with finish_reason ``abort`` and
``[DONE]``), and the app's lifespan stops the engine thread. The process then exits 0.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

from fastapi import FastAPI

from kvbaton.api.server import AppThread, DrainingServer, bind_socket, endpoint, make_server
from kvbaton.engine.config import EngineConfig
from kvbaton.engine.engine import LLMEngine
from kvbaton.worker.api import WorkerState, create_app
from kvbaton.worker.config import WorkerConfig

log = logging.getLogger(__name__)


def _make_worker_server(app: FastAPI, config: WorkerConfig) -> DrainingServer:
    # A backstop: the app aborts in-flight requests itself after drain_timeout_s, so their
    # streams end cleanly; uvicorn cancels whatever still hangs on after that.
    return make_server(app, config.log_level, int(config.drain_timeout_s) + 3,
                       app.state.worker.begin_drain)


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


class WorkerThread(AppThread):
    """A worker served from a background thread of this process (tests, notebooks)."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig | None = None) -> None:
        self.config = config or WorkerConfig(port=0)
        app = create_app(engine, self.config)
        self.state: WorkerState = app.state.worker
        super().__init__(app, self.config.host, self.config.port,
                         _make_worker_server(app, self.config))
