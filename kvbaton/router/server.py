"""Uvicorn wiring: run the router in the foreground (CLI) or on a background thread (tests).

Shutdown on SIGTERM / Ctrl-C: uvicorn stops accepting connections (new ones are refused; a
request on a connection already open gets 503 and ``/health`` reports ``draining``),
in-flight responses get ``drain_timeout_s`` to finish; then streams still open end with an
error event and ``[DONE]``, and what is still running a little later is cancelled, which
closes its worker streams (the workers abort those requests) and releases unconsumed leases.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI
from prometheus_client.registry import Collector

from kvbaton.api.server import AppThread, DrainingServer, bind_socket, endpoint, make_server
from kvbaton.router.app import RouterState, create_app
from kvbaton.router.config import RouterConfig
from kvbaton.router.policies import PrefixOverlap


def make_router_server(app: FastAPI, log_level: str = "WARNING",
                       drain_timeout_s: float = 5.0) -> DrainingServer:
    state: RouterState | None = getattr(app.state, "router", None)
    header_timeout = state.config.request_header_timeout_s if state is not None else 10.0
    # A backstop: the app ends its open streams itself after drain_timeout_s (error event and
    # [DONE]); uvicorn cancels whatever still hangs on a little after that.
    return make_server(app, log_level, int(drain_timeout_s) + 2,
                       state.begin_drain if state is not None else None, header_timeout)


def run_router(
    config: RouterConfig,
    announce: Callable[[str], None] = print,
    tokenizer: Any | None = None,
    overlap: PrefixOverlap | None = None,
    collectors: Sequence[Collector] = (),
) -> int:
    """Serve the router until SIGTERM/SIGINT, shut down gracefully; the exit code.
    ``collectors`` join the router's ``/metrics`` (``kvbaton serve``'s worker restarts)."""
    app = create_app(config, tokenizer, overlap)
    for c in collectors:
        app.state.router.metrics.registry.register(c)
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    server = make_router_server(app, config.log_level, config.drain_timeout_s)
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


class RouterThread(AppThread):
    """A router served from a background thread of this process (tests, notebooks)."""

    def __init__(self, config: RouterConfig, tokenizer: Any | None = None,
                 overlap: PrefixOverlap | None = None) -> None:
        app = create_app(config, tokenizer, overlap)
        super().__init__(app, config.host, config.port,
                         make_router_server(app, config.log_level, config.drain_timeout_s))
        self.config = config
        self.state: RouterState = app.state.router
