"""Uvicorn wiring: run a worker in the foreground (CLI) or on a background thread (tests).

Shutdown on SIGTERM / Ctrl-C: uvicorn stops accepting connections, the app reports
``draining`` (``/health`` 503, new requests 503), in-flight requests get ``drain_timeout_s``
to finish, then the rest are aborted (streams end with finish_reason ``abort`` and
``[DONE]``), and the app's lifespan stops the engine thread. The process then exits 0.

Startup: once the socket is bound, the worker prints a line for people on stdout and, with
``announce_fd`` (``kvbaton worker --announce-fd N``), writes one JSON line for programs to
that descriptor and closes it (``write_announcement``); nothing should parse the stdout line.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from fastapi import FastAPI

from kvbaton.api.server import AppThread, DrainingServer, bind_socket, endpoint, make_server
from kvbaton.engine.config import EngineConfig
from kvbaton.engine.engine import LLMEngine, build_engine_on_own_thread
from kvbaton.worker.api import WorkerState, create_app
from kvbaton.worker.config import WorkerConfig

log = logging.getLogger(__name__)


def _make_worker_server(app: FastAPI, config: WorkerConfig) -> DrainingServer:
    # A backstop: the app aborts in-flight requests itself after drain_timeout_s, so their
    # streams end cleanly; uvicorn cancels whatever still hangs on after that.
    return make_server(app, config.log_level, int(config.drain_timeout_s) + 3,
                       app.state.worker.begin_drain, config.request_header_timeout_s)


def write_announcement(fd: int, info: dict[str, Any]) -> None:
    """Write ``info`` as one JSON line to ``fd``, then close it (the reader sees EOF).

    A reader that went away is no reason to stop serving: that is logged, not raised.
    """
    data = (json.dumps(info, separators=(",", ":")) + "\n").encode()
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        log.warning("could not write the ready announcement to fd %d: %s", fd, e)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass


def run_worker(
    engine_config: EngineConfig,
    config: WorkerConfig,
    announce: Callable[[str], None] = print,
    announce_fd: int | None = None,
) -> int:
    """Build the engine, serve until SIGTERM/SIGINT, shut down gracefully; the exit code.

    ``announce`` gets the human-readable startup line; ``announce_fd``, if given, gets the
    machine-readable one: ``{"event": "ready", "url", "role", "worker_id", "pid", "models"}``
    (``url`` without ``/v1``), written once the socket is bound, just before serving.
    """
    engine = build_engine_on_own_thread(engine_config)
    app = create_app(engine, config)
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    server = _make_worker_server(app, config)
    # From here on a signal means a graceful stop. Until uvicorn installs its own handlers
    # (inside server.run), one that arrives -- say the parent stops the worker right after its
    # announcement -- is handed to the server, which then starts and shuts down at once
    # instead of losing it. uvicorn re-raises the signal that stopped it once it is done;
    # by then should_exit is set, so that is a no-op and a graceful shutdown exits 0 instead
    # of dying by the signal's default action.
    def _stop(sig: int, frame: FrameType | None) -> None:
        if not server.should_exit:
            server.handle_exit(sig, frame)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop)
    state: WorkerState = app.state.worker

    def _engine_died(exc: BaseException) -> None:
        log.error("the engine loop died (%r): shutting the worker down", exc)
        server.should_exit = True

    state.engine.on_death = _engine_died
    url = endpoint(config.host, port)
    announce(f"kvbaton worker ({config.role}) serving {', '.join(state.model_names)} at {url}/v1")
    if announce_fd is not None:
        write_announcement(announce_fd, {
            "event": "ready", "url": url, "role": config.role, "worker_id": state.worker_id,
            "pid": os.getpid(), "models": state.model_names,
        })
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        engine.close()  # the engine thread has stopped: finish the tiered store's copies
    return 0 if server.started and state.engine.error is None else 1


class WorkerThread(AppThread):
    """A worker served from a background thread of this process (tests, notebooks)."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig | None = None) -> None:
        self.config = config or WorkerConfig(port=0)
        app = create_app(engine, self.config)
        self.state: WorkerState = app.state.worker
        super().__init__(app, self.config.host, self.config.port,
                         _make_worker_server(app, self.config))

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Shut down as SIGTERM does, then close the engine's tiered store (finish its queued
        copies, release its disk directory), as ``run_worker`` does at exit."""
        stopped = super().stop(timeout_s)
        if stopped:
            self.state.engine.engine.close()
        return stopped
