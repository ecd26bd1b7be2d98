"""Uvicorn wiring shared by the worker and the router: a server that reports a shutdown
signal to its app before it stops accepting connections, a bound listening socket (so the port
is known before serving), and an app served from a background thread (tests, notebooks).

Shutdown on SIGTERM / Ctrl-C: uvicorn stops accepting connections, the app's ``on_drain``
hook runs first (``/health`` turns 503 ``draining``, new requests get 503), in-flight responses
get the graceful timeout, then whatever still runs is cancelled.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Self

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvbaton.cli_args import LOG_LEVELS


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


def call_later_threadsafe(loop: asyncio.AbstractEventLoop | None, delay_s: float, fn: Callable[[], object]) -> None:
    """From any thread (a SIGTERM handler beginning a drain): run ``fn`` on ``loop`` after
    ``delay_s``. Nothing happens if there is no loop yet or it already closed (then nothing is
    in flight to act on)."""
    if loop is None:
        return
    try:
        loop.call_soon_threadsafe(lambda: loop.call_later(delay_s, fn))
    except RuntimeError:
        pass


def _header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a new connection whose first request's headers have not
    all arrived after ``header_timeout_s``. uvicorn arms its keep-alive timer only after a
    response, so a client that opens a connection and sends half a request would hold it for
    ever (a thousand of them held a router's connections); later requests on the connection
    are covered by uvicorn's own keep-alive timeout. The body has its own bound
    (``RequestGuard``)."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def connection_lost(self, exc: Exception | None) -> None:
            self._header_timer.cancel()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            # A request cycle exists once the first request's headers are parsed. (Not
            # uvicorn's keep-alive timer: any byte received cancels that one.)
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def make_server(app: FastAPI, log_level: str, graceful_timeout_s: int,
                on_drain: Callable[[], None] | None = None,
                header_timeout_s: float = 10.0) -> DrainingServer:
    """The uvicorn server of a worker or router app; ``graceful_timeout_s`` is how long
    uvicorn lets in-flight responses run after a shutdown signal before cancelling them, and
    ``header_timeout_s`` how long a new connection may take to send its first request's
    headers."""
    level = log_level.upper()
    ucfg = uvicorn.Config(
        app,
        log_config=None,  # keep the process's logging setup
        log_level=level.lower() if level in LOG_LEVELS else "warning",
        access_log=level == "DEBUG",
        timeout_graceful_shutdown=graceful_timeout_s,
        lifespan="on",
        http=_header_timeout_protocol(header_timeout_s),
    )
    return DrainingServer(ucfg, on_drain)


def endpoint(host: str, port: int) -> str:
    """``http://host:port``, with an IPv6 host in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


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
