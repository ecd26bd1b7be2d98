"""Server-sent events and client disconnects, as the worker and the router both serve them.

:class:`EventStreamResponse` runs a cleanup however the response ends (finished, client gone,
server shutting down, or never started), so an aborted stream always aborts its request.
:func:`until_disconnect` awaits some work unless the client leaves first, in which case the
work is cancelled (and a result it produced anyway is handed to ``orphan`` for cleanup).
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

T = TypeVar("T")

DONE_EVENT = "data: [DONE]\n\n"


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event in OpenAI's framing."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


class EventStreamResponse(StreamingResponse):
    """An SSE response that calls ``on_close`` (sync or async) however the response ends."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Any]) -> None:
        super().__init__(
            content, media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            result = self._on_close()
            if inspect.isawaitable(result):
                await result


async def wait_disconnect(request: Request) -> None:
    """Return when the client closes its connection."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(
    request: Request, work: Awaitable[T], orphan: Callable[[T], Awaitable[None]] | None = None
) -> T | None:
    """``await work``, or cancel it and return None if the client leaves first. A result the
    work produced anyway while being cancelled goes to ``orphan`` (to close it)."""
    return await unless(wait_disconnect(request), work, orphan)


async def unless(
    stop: Awaitable[Any], work: Awaitable[T], orphan: Callable[[T], Awaitable[None]] | None = None
) -> T | None:
    """``await work``, or cancel it and return None if ``stop`` completes first (the client
    left, the worker went down). A result the work produced anyway while being cancelled goes
    to ``orphan`` (to close it)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(stop)
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        return None
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if orphan is not None and not task.cancelled() and task.exception() is None:
                await orphan(task.result())


async def until_stopped(events: AsyncIterator[str], stop: asyncio.Event, final: str) -> AsyncIterator[str]:
    """Relay ``events`` until they end or ``stop`` is set; then send ``final`` (an error event)
    and ``[DONE]`` and close ``events``, so a stream cut short by a shutdown still ends the way
    clients expect instead of as a dropped connection."""
    it = events.__aiter__()
    stopped = asyncio.ensure_future(stop.wait())
    nxt: asyncio.Future[str] | None = None
    try:
        while True:
            nxt = asyncio.ensure_future(it.__anext__())
            await asyncio.wait({nxt, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                yield final
                yield DONE_EVENT
                return
            try:
                chunk = nxt.result()
            except StopAsyncIteration:
                return
            nxt = None
            yield chunk
    finally:
        stopped.cancel()
        if nxt is not None and not nxt.done():
            # A step is still waiting on the upstream (we stopped, or the client left and we are
            # being cancelled). Cancelling that read would leave the upstream connection open;
            # the response's on_close closes it instead, which ends the step with an error:
            # collect that error then. The generator is busy in that step, so it cannot be
            # closed here; it ends with the step.
            nxt.add_done_callback(_consume)
        else:
            aclose = getattr(it, "aclose", None)
            if aclose is not None:
                await aclose()


def _consume(fut: asyncio.Future[Any]) -> None:
    """Retrieve a finished future's exception, so asyncio does not report it as lost."""
    if not fut.cancelled():
        fut.exception()
