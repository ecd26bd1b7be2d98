"""The decode worker's token stream as the router relays it, and the errors of a leg.

A :class:`RelayStream` is opened only once the decode worker's first chunk is in hand, so
everything that can fail before a token reaches the client fails in the orchestrator (where
it can be retried or answered with a plain HTTP error) and a RelayStream only ever fails
mid-stream (:class:`MidStreamError`, which the client sees as an SSE error event).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx

from kvbaton.api.protocol import ApiError
from kvbaton.router.pool import InFlight, Worker

DONE = "[DONE]"
# Closing a worker stream or answering a control call must not hold up the client for long,
# even while the task is being cancelled.
CLEANUP_TIMEOUT_S = 2.0


class WorkerApiError(ApiError):
    """A worker's own error answer, passed to the client unchanged (status and body)."""

    def __init__(self, status: int, body: Any) -> None:
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            body = ApiError(status, f"worker answered {status}: {str(body)[:200]}").body()
        err = body["error"]
        super().__init__(status, str(err.get("message", "")), err.get("param"), err.get("code"), err.get("type"))
        self._body = body

    def body(self) -> dict[str, Any]:
        return self._body


class LegFailure(Exception):
    """A leg failed before any token reached the client.

    ``kind`` labels metrics and retries (connect, timeout, http_5xx, transfer_failed,
    error_event, dropped, bad_response); ``handle_intact`` is True only when the request never
    reached the worker, so a KV handle sent with it is certainly unconsumed and reusable;
    ``client_error`` is what the client gets if nothing else can be tried.
    """

    def __init__(self, kind: str, client_error: ApiError, handle_intact: bool = False) -> None:
        super().__init__(client_error.message)
        self.kind = kind
        self.client_error = client_error
        self.handle_intact = handle_intact


class MidStreamError(Exception):
    """The decode stream broke after its first chunk; ``error`` is the event to send."""

    def __init__(self, kind: str, error: ApiError) -> None:
        super().__init__(error.message)
        self.kind = kind
        self.error = error


def transport_failure(worker: Worker, e: httpx.HTTPError, leg: str) -> LegFailure:
    """Map an httpx exception to a LegFailure with the client's error."""
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        return LegFailure("connect", ApiError(
            503, f"{leg} worker {worker.url} is unreachable: {type(e).__name__}", None,
            "service_unavailable"), handle_intact=True)
    if isinstance(e, httpx.TimeoutException):
        return LegFailure("timeout", ApiError(
            504, f"{leg} worker {worker.url} timed out ({type(e).__name__})", None, "timeout"))
    return LegFailure("dropped", ApiError(
        502, f"{leg} worker {worker.url} failed: {type(e).__name__}: {e}", None, "upstream_error"))


async def sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any] | str]:
    """Parsed ``data:`` payloads of an SSE response; ``DONE`` for ``[DONE]``, then stop."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == DONE:
            yield DONE
            return
        try:
            event = json.loads(payload)
        except ValueError:
            raise httpx.DecodingError(f"malformed SSE event: {payload[:100]!r}") from None
        if not isinstance(event, dict):
            raise httpx.DecodingError(f"SSE event is not an object: {payload[:100]!r}")
        yield event


async def close_quietly(response: httpx.Response | None) -> None:
    """Close a worker response even from a cancelled task (closing aborts the worker's
    request), never waiting more than CLEANUP_TIMEOUT_S."""
    if response is None:
        return
    with anyio.move_on_after(CLEANUP_TIMEOUT_S, shield=True):
        try:
            await response.aclose()
        except Exception:  # the connection is already gone: nothing to abort
            pass


class RelayStream:
    """One request's completion chunks from its decode worker (or from the prefill answer).

    Iterating yields the worker's chunk objects (``choices`` chunks, then one usage chunk)
    starting with the first one, already received; it raises :class:`MidStreamError` if the
    stream breaks before a ``finish_reason``. ``aclose()`` (idempotent) closes the worker
    stream, which aborts the request there, ends its in-flight charge and runs ``on_close``.
    """

    def __init__(
        self,
        worker: Worker,
        path: str,
        first: dict[str, Any],
        rest: AsyncIterator[dict[str, Any] | str] | None = None,
        response: httpx.Response | None = None,
        in_flight: InFlight | None = None,
        on_usage: Callable[[dict[str, Any]], None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.worker = worker
        self.path = path
        self.usage: dict[str, Any] | None = None
        self.finished = False
        self.num_chunks = 0
        self.started = time.monotonic()
        self._first: dict[str, Any] | None = first
        self._rest = rest
        self._response = response
        self._in_flight = in_flight
        self._on_usage = on_usage
        self._on_close = on_close
        self._closed = False

    def _take(self, chunk: dict[str, Any]) -> dict[str, Any]:
        if chunk.get("usage"):
            self.usage = chunk["usage"]
            if self._on_usage is not None:
                self._on_usage(chunk)
        for choice in chunk.get("choices") or ():
            self.num_chunks += 1
            if choice.get("finish_reason") is not None:
                self.finished = True
        return chunk

    def _broken(self, kind: str, detail: str) -> MidStreamError:
        return MidStreamError(kind, ApiError(
            502, f"decode worker {self.worker.url} {detail} after the response started", None,
            "upstream_error"))

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        if self._first is not None:
            first, self._first = self._first, None
            yield self._take(first)
        if self._rest is not None:
            try:
                async for event in self._rest:
                    if event == DONE:
                        break
                    assert isinstance(event, dict)
                    if "error" in event:
                        raise MidStreamError("error_event", WorkerApiError(502, event))
                    yield self._take(event)
            except httpx.TimeoutException as e:
                raise self._broken("timeout", f"timed out ({type(e).__name__})") from None
            except httpx.HTTPError as e:
                raise self._broken("dropped", f"dropped the stream ({type(e).__name__})") from None
        if not self.finished:
            raise self._broken("dropped", "ended the stream without a finish_reason")

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await close_quietly(self._response)
        if self._in_flight is not None:
            self._in_flight.done()
        if self._on_close is not None:
            self._on_close()
