"""Slow or stalled clients cannot hold a server's connections: a connection whose first
request's headers never finish is closed, and a body that stops arriving gets a 408 (a
thousand half-sent requests used to hold a router's connections for ever)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from kvbaton.router.config import RouterConfig
from kvbaton.router.server import RouterThread
from router_fakes import ROUTER_DEFAULTS, FakeWorker, tokenizer
from worker_support import running_worker

TIMEOUTS = {"request_header_timeout_s": 0.5, "request_body_timeout_s": 0.5}


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (at most 20 s of waiting)."""
    sock.settimeout(20)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.fixture(params=["worker", "router"])
def server_port(request: pytest.FixtureRequest) -> Iterator[int]:
    if request.param == "worker":
        with running_worker(TIMEOUTS) as w:
            yield w.port
    else:
        d = FakeWorker("both", "d")
        with d.thread:
            cfg = RouterConfig(**{**ROUTER_DEFAULTS, **TIMEOUTS, "workers": (d.url,)})
            r = RouterThread(cfg, tokenizer=tokenizer()).start()
            try:
                yield r.port
            finally:
                assert r.stop()


def test_half_sent_headers_are_closed(server_port: int) -> None:
    with socket.create_connection(("127.0.0.1", server_port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: applica")
        assert _read_all(s) == b""  # closed without an answer, instead of waiting for ever


def test_a_stalled_body_is_a_408(server_port: int) -> None:
    with socket.create_connection(("127.0.0.1", server_port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer
