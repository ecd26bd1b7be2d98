"""The asyncio side of a request: what the API hands the engine thread and what it gets back.

Kept apart from :mod:`kvbaton.worker.async_engine` (which drives the engine thread) so the
API, streaming and metrics modules depend only on these small types.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

from kvbaton.engine.outputs import RequestOutput
from kvbaton.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop crashed; the worker cannot serve requests any more."""


class EngineStoppedError(RuntimeError):
    """The engine is stopping or stopped and accepts no new work."""


class RequestFailedError(RuntimeError):
    """The engine step running this request raised: the request failed (HTTP 500), its blocks
    are freed, and the engine serves the others (``LLMEngine._fail_step``)."""


@dataclass
class GenerationRequest:
    """One request as the API hands it to the engine thread.

    Exactly one of ``prompt`` (text or token ids) and ``messages`` (a chat) is set; the
    AsyncEngine turns text and chats into token ids on its tokenizer thread before the engine
    thread sees them. When ``default_max_tokens`` is
    set, ``params.max_tokens`` is replaced by it, capped by the room left in the context and in
    the whole KV cache after the prompt.
    """

    params: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None  # declarations for a template that renders them
    cache_salt: str | None = None
    default_max_tokens: int | None = None
    # Disaggregation: keep the prompt's KV under a lease of this many seconds (prefill side);
    # continue after a first token sampled elsewhere; commit the KV import reserved under
    # this request's id (decode side).
    lease_ttl_s: float | None = None
    first_token: tuple[int, float | None] | None = None
    imported: bool = False


class RequestStream:
    """The asyncio side of one request: its outputs, in order, and its timing.

    Iterating yields the latest state after each wake-up; outputs are cumulative, so when a
    consumer falls behind, intermediate ones are skipped rather than queued.
    """

    def __init__(self, request_id: str, arrival_time: float) -> None:
        self.request_id = request_id
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.num_output_tokens = 0
        self.finished = False
        self.finish_reason: str | None = None
        self.last: RequestOutput | None = None  # the latest output the consumer took
        self.latest: RequestOutput | None = None  # the latest output the engine produced
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

    def _push(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.last is not None and self.last.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            raise item
        self.last = item
        return item


class StreamObserver(Protocol):
    """Gets every output and client abort on the event loop (metrics use this)."""

    def on_output(self, stream: RequestStream, output: RequestOutput, now: float) -> None: ...

    def on_abort(self, stream: RequestStream, now: float) -> None: ...
