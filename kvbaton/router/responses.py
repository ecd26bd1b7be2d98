"""The decode worker's completion chunks -> what the client asked for.

Workers always answer the router's ``/v1/completions`` legs; this module turns their chunks
into ``text_completion`` chunks (unchanged choices), ``chat.completion.chunk`` events (a
role delta first, content deltas, finish_reason, logprobs in the chat shape) or whole
non-streaming bodies, with the router's own request id. Streams end with ``data: [DONE]``;
a stream that breaks after it started sends ``data: {"error": {...}}`` and then ``[DONE]``,
as a worker does when its engine fails mid-stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from kvbaton.api.fanout import combined_usage, merge
from kvbaton.api.protocol import chat_logprobs, now_s, usage
from kvbaton.api.sse import DONE_EVENT, sse
from kvbaton.api.tools import ToolCallStream, assistant_message, finish_reason
from kvbaton.router.frontend import Prepared
from kvbaton.router.relay import MidStreamError, RelayStream

_EXTRAS = ("stop_reason", "token_ids", "prompt_logprobs")


def _extras(w: dict[str, Any]) -> dict[str, Any]:
    """The worker chunk's extra fields for the client. vLLM sends ``token_ids`` and
    ``prompt_logprobs`` as null when they were not asked for: absent, as ours leave them;
    ``stop_reason`` null is a value (no stop string matched)."""
    return {k: w[k] for k in _EXTRAS if k in w and (w[k] is not None or k == "stop_reason")}


def chat_lp(lp: Any, top_n: int) -> dict[str, Any] | None:
    """A completions ``logprobs`` object (tokens, token_logprobs, top_logprobs) in the chat
    shape. The worker's per-token dict lists the sampled token first, then the ``top_n``
    alternatives; the sampled one is dropped when it is not among them."""
    if not isinstance(lp, dict):
        return None
    tops: list[list[tuple[str, float]]] = []
    for d in lp.get("top_logprobs") or []:
        items = list(d.items())
        if len(items) > top_n:
            items = items[1:]
        tops.append(sorted(items, key=lambda kv: -kv[1])[:top_n])
    return chat_logprobs(list(lp.get("tokens") or []), list(lp.get("token_logprobs") or []), tops)


class _RunBroke(Exception):
    """A run's stream broke mid-way (which one, for the metrics)."""

    def __init__(self, stream: RelayStream, error: MidStreamError) -> None:
        super().__init__(str(error))
        self.stream = stream
        self.error = error


class ClientView:
    """Formats one request's chunks for its client."""

    def __init__(self, prep: Prepared) -> None:
        self.prep = prep
        self.created = now_s()
        self.object = "chat.completion.chunk" if prep.chat else "text_completion"

    def _chunk(self, choices: list[dict[str, Any]], usage_: dict[str, Any] | None = None,
               final: bool = False) -> dict[str, Any]:
        c: dict[str, Any] = {
            "id": self.prep.request_id, "object": self.object, "created": self.created,
            "model": self.prep.model, "choices": choices,
        }
        if self.prep.include_usage:
            c["usage"] = usage_ if final else None
        return c

    def chat_choice(self, w: dict[str, Any], parser: ToolCallStream | None = None) -> dict[str, Any]:
        finished = w.get("finish_reason") is not None
        text = w.get("text") or ""
        finish = w.get("finish_reason")
        if parser is not None:
            delta = parser.delta(text, finished)
            if finished:
                finish = finish_reason(finish, parser.num_calls > 0)
        else:
            delta = {"content": text} if text or not finished else {}
        c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if self.prep.chat_top_logprobs is not None:
            c["logprobs"] = chat_lp(w.get("logprobs"), self.prep.chat_top_logprobs)
        c.update(_extras(w))
        return c

    def usage_of(self, stream: RelayStream) -> dict[str, Any]:
        u = stream.usage
        if isinstance(u, dict) and "prompt_tokens" in u:
            return u
        # The worker finished without its usage chunk: count what we know (every chunk
        # carries at least one token), with no cache credit.
        return usage(len(self.prep.token_ids), stream.num_chunks, 0)

    def run_usage(self, stream: RelayStream) -> tuple[int, int, int]:
        u = self.usage_of(stream)
        details = u.get("prompt_tokens_details")
        cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
        return int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)), int(cached or 0)

    async def _choices(self, stream: RelayStream) -> AsyncIterator[dict[str, Any]]:
        """One run's choices for a streaming client (index 0: the caller numbers them)."""
        tools = self.prep.tools
        parser = ToolCallStream(tools) if tools else None
        try:
            async for chunk in stream:
                for w in chunk.get("choices") or ():
                    yield self.chat_choice(w, parser) if self.prep.chat else {**w, "index": 0}
        except MidStreamError as e:
            raise _RunBroke(stream, e) from None

    async def events(self, streams: list[RelayStream],
                     on_failure: Callable[[RelayStream, MidStreamError], None]) -> AsyncIterator[str]:
        """SSE events for a streaming client: run ``i``'s choices as choice ``i``."""
        if self.prep.chat:
            for i in range(len(streams)):
                yield sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]))
        try:
            async for i, choice in merge([self._choices(s) for s in streams]):
                choice["index"] = i
                yield sse(self._chunk([choice]))
        except _RunBroke as broke:
            on_failure(broke.stream, broke.error)
            yield sse(broke.error.error.body())
        else:
            if self.prep.include_usage:
                total = combined_usage(self.prep.fan, [self.run_usage(s) for s in streams])
                yield sse(self._chunk([], total, final=True))
        yield DONE_EVENT

    async def body(self, stream: RelayStream) -> tuple[dict[str, Any], float]:
        """One run's choice for a non-streaming client (index 0) and its cumulative logprob
        (0 without logprobs); MidStreamError if the stream broke."""
        text: list[str] = []
        lp: dict[str, list[Any]] | None = None
        token_ids: list[int] | None = None
        prompt_lp: Any = None
        last: dict[str, Any] = {}
        async for chunk in stream:
            for w in chunk.get("choices") or ():
                last = w
                text.append(w.get("text") or "")
                if isinstance(w.get("logprobs"), dict):
                    lp = lp or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                    for k in lp:
                        lp[k].extend(w["logprobs"].get(k) or [])
                extras = _extras(w)
                if "token_ids" in extras:
                    token_ids = (token_ids or []) + list(extras["token_ids"])
                if "prompt_logprobs" in extras:
                    prompt_lp = extras["prompt_logprobs"]
        cumulative = float(sum(x for x in (lp or {}).get("token_logprobs", ()) if isinstance(x, (int, float))))
        if not self.prep.logprobs:
            lp = None  # best_of asked the worker for them, the client did not
        choice: dict[str, Any] = {"index": 0}
        full = "".join(text)
        finish = last.get("finish_reason")
        if self.prep.chat:
            choice["message"], finish = assistant_message(full, finish, self.prep.tools)
            top = self.prep.chat_top_logprobs
            choice["logprobs"] = chat_lp(lp, top) if top is not None else None
        else:
            choice["text"] = full
            choice["logprobs"] = lp
        choice["finish_reason"] = finish
        if "stop_reason" in last:
            choice["stop_reason"] = last["stop_reason"]
        if token_ids is not None:
            choice["token_ids"] = token_ids
        if prompt_lp is not None:
            choice["prompt_logprobs"] = prompt_lp
        return choice, cumulative

    def response(self, runs: list[tuple[dict[str, Any], float]], usages: list[tuple[int, int, int]]) -> dict[str, Any]:
        """The whole response from every run's :meth:`body` and usage, in run order."""
        fan = self.prep.fan
        chosen = [runs[r][0] for r in fan.returned([lp for _, lp in runs])]
        return {
            "id": self.prep.request_id, "object": "chat.completion" if self.prep.chat else "text_completion",
            "created": self.created, "model": self.prep.model,
            "choices": [{**c, "index": i} for i, c in enumerate(chosen)],
            "usage": combined_usage(fan, usages),
        }
