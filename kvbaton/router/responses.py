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

from kvbaton.api.protocol import chat_logprobs, now_s, usage
from kvbaton.api.sse import DONE_EVENT, sse
from kvbaton.router.frontend import Prepared
from kvbaton.router.relay import MidStreamError, RelayStream

_EXTRAS = ("stop_reason", "token_ids")


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

    def chat_choice(self, w: dict[str, Any]) -> dict[str, Any]:
        finished = w.get("finish_reason") is not None
        text = w.get("text") or ""
        c: dict[str, Any] = {
            "index": 0, "delta": {"content": text} if text or not finished else {},
            "logprobs": None, "finish_reason": w.get("finish_reason"),
        }
        if self.prep.chat_top_logprobs is not None:
            c["logprobs"] = chat_lp(w.get("logprobs"), self.prep.chat_top_logprobs)
        c.update({k: w[k] for k in _EXTRAS if k in w})
        return c

    def usage_of(self, stream: RelayStream) -> dict[str, Any]:
        u = stream.usage
        if isinstance(u, dict) and "prompt_tokens" in u:
            return u
        # The worker finished without its usage chunk: count what we know (every chunk
        # carries at least one token), with no cache credit.
        return usage(len(self.prep.token_ids), stream.num_chunks, 0)

    async def events(self, stream: RelayStream, on_failure: Callable[[MidStreamError], None]) -> AsyncIterator[str]:
        """SSE events for a streaming client."""
        first = self.prep.chat
        try:
            async for chunk in stream:
                for w in chunk.get("choices") or ():
                    if first:
                        first = False
                        yield sse(self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]))
                    choice = self.chat_choice(w) if self.prep.chat else {**w, "index": 0}
                    yield sse(self._chunk([choice]))
        except MidStreamError as e:
            on_failure(e)
            yield sse(e.error.body())
        else:
            if self.prep.include_usage:
                yield sse(self._chunk([], self.usage_of(stream), final=True))
        yield DONE_EVENT

    async def body(self, stream: RelayStream) -> dict[str, Any]:
        """The whole response for a non-streaming client; MidStreamError if the stream broke."""
        text: list[str] = []
        lp: dict[str, list[Any]] | None = None
        token_ids: list[int] | None = None
        last: dict[str, Any] = {}
        async for chunk in stream:
            for w in chunk.get("choices") or ():
                last = w
                text.append(w.get("text") or "")
                if isinstance(w.get("logprobs"), dict):
                    lp = lp or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                    for k in lp:
                        lp[k].extend(w["logprobs"].get(k) or [])
                if "token_ids" in w:
                    token_ids = (token_ids or []) + list(w["token_ids"])
        choice: dict[str, Any] = {"index": 0}
        full = "".join(text)
        if self.prep.chat:
            choice["message"] = {"role": "assistant", "content": full}
            top = self.prep.chat_top_logprobs
            choice["logprobs"] = chat_lp(lp, top) if top is not None else None
        else:
            choice["text"] = full
            choice["logprobs"] = lp
        choice["finish_reason"] = last.get("finish_reason")
        if "stop_reason" in last:
            choice["stop_reason"] = last["stop_reason"]
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {
            "id": self.prep.request_id, "object": "chat.completion" if self.prep.chat else "text_completion",
            "created": self.created, "model": self.prep.model, "choices": [choice],
            "usage": self.usage_of(stream),
        }
