"""Engine outputs to OpenAI responses: whole bodies and SSE chunk streams.

Outputs are cumulative (all tokens and text so far), so every chunk is computed as the
difference from what was already sent; a consumer that falls behind simply sends bigger
chunks. Streams end with ``data: [DONE]``; with ``stream_options.include_usage`` a last
chunk with empty ``choices`` carries the usage, as OpenAI does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from kvbaton.api.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    TextDeltas,
    chat_logprobs,
    completion_logprobs,
    now_s,
    usage,
)
from kvbaton.api.sse import DONE_EVENT, sse
from kvbaton.engine.outputs import RequestOutput
from kvbaton.sampling_params import SamplingParams
from kvbaton.worker.stream import EngineDeadError, EngineStoppedError, RequestFailedError, RequestStream

if TYPE_CHECKING:
    from kvbaton.worker.api import WorkerState

def _usage(out: RequestOutput) -> dict[str, Any]:
    return usage(len(out.prompt_token_ids), len(out.token_ids), out.num_cached_tokens)


def _completion_lp(state: WorkerState, out: RequestOutput, start: int, text_offset: int) -> dict[str, Any]:
    ids = out.token_ids[start:]
    texts = [state.token_text(t) for t in ids]
    lps = (out.logprobs or [])[start:]
    tops = None
    if out.top_logprobs is not None:
        tops = []
        for i, d in enumerate(out.top_logprobs[start:]):
            entry = {texts[i]: lps[i]} if i < len(lps) else {}
            entry.update({state.token_text(t): v for t, v in d.items()})
            tops.append(entry)
    else:
        tops = [{t: lp} for t, lp in zip(texts, lps)]
    return completion_logprobs(texts, lps, tops, text_offset)


def _chat_lp(state: WorkerState, out: RequestOutput, start: int) -> dict[str, Any]:
    ids = out.token_ids[start:]
    texts = [state.token_text(t) for t in ids]
    lps = (out.logprobs or [])[start:]
    tops = [
        [(state.token_text(t), v) for t, v in d.items()]
        for d in (out.top_logprobs or [])[start:]
    ]
    return chat_logprobs(texts, lps, tops)


def _choice_extras(out: RequestOutput, return_token_ids: bool, start: int = 0) -> dict[str, Any]:
    extras: dict[str, Any] = {"stop_reason": out.stop_reason} if out.finished else {}
    if return_token_ids:
        extras["token_ids"] = out.token_ids[start:]
    return extras


# The error code of a request whose engine step raised (HTTP 500; the worker goes on serving).
ENGINE_STEP_FAILED = "engine_step_failed"


def request_failed_error(e: Exception) -> ApiError:
    """What a client gets for a request that failed inside the engine (RequestFailedError)."""
    return ApiError(500, str(e), None, ENGINE_STEP_FAILED)


def _error_event(e: Exception) -> str:
    if isinstance(e, RequestFailedError):
        return sse(request_failed_error(e).body())
    return sse(ApiError(503, str(e), None, "service_unavailable").body())


async def _stream_events(
    stream: RequestStream, obj: str, model: str, params: SamplingParams, include_usage: bool,
    per_token: bool, make_choice: Callable[[RequestOutput, str, int, int], dict[str, Any]],
    first_choice: dict[str, Any] | None = None, usage_extras: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """The SSE skeleton both endpoints share: one chunk per output that adds text (or tokens,
    when the client asked for per-token data), an error event if the engine dies, the usage
    chunk when asked, then ``[DONE]``. ``make_choice(out, text, sent_tokens, text_offset)``
    builds the endpoint's choice for one chunk; ``usage_extras`` are top-level fields of the
    usage chunk (the KV import report of a decode request)."""
    created = now_s()
    deltas = TextDeltas(params.stop)
    sent_tokens = 0
    last: RequestOutput | None = None

    def chunk(choices: list[dict[str, Any]]) -> str:
        c: dict[str, Any] = {
            "id": stream.request_id, "object": obj, "created": created, "model": model,
            "choices": choices,
        }
        if include_usage:
            c["usage"] = None
        return sse(c)

    if first_choice is not None:
        yield chunk([first_choice])
    try:
        async for out in stream:
            last = out
            offset = len(deltas.sent)
            text = deltas.delta(out.text, out.finished)
            if not (text or out.finished or (per_token and len(out.token_ids) > sent_tokens)):
                continue
            choice = make_choice(out, text, sent_tokens, offset)
            sent_tokens = len(out.token_ids)
            yield chunk([choice])
    except (EngineDeadError, EngineStoppedError, RequestFailedError) as e:
        yield _error_event(e)
    else:
        if include_usage and last is not None:
            yield sse({
                "id": stream.request_id, "object": obj, "created": created, "model": model,
                "choices": [], "usage": _usage(last), **(usage_extras or {}),
            })
    yield DONE_EVENT


# ---- completions ----------------------------------------------------------------------------


def completion_response(
    state: WorkerState, out: RequestOutput, body: CompletionRequest, model: str,
    extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "text": out.text,
        "logprobs": _completion_lp(state, out, 0, 0) if body.logprobs is not None else None,
        "finish_reason": out.finish_reason,
        **_choice_extras(out, body.return_token_ids),
    }
    return {
        "id": out.request_id, "object": "text_completion", "created": now_s(), "model": model,
        "choices": [choice], "usage": _usage(out), **(extras or {}),
    }


def completion_events(
    state: WorkerState, stream: RequestStream, body: CompletionRequest, model: str,
    params: SamplingParams, include_usage: bool, usage_extras: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    def choice(out: RequestOutput, text: str, sent: int, offset: int) -> dict[str, Any]:
        return {
            "index": 0, "text": text,
            "logprobs": _completion_lp(state, out, sent, offset) if body.logprobs is not None else None,
            "finish_reason": out.finish_reason if out.finished else None,
            **_choice_extras(out, body.return_token_ids, sent),
        }

    per_token = body.logprobs is not None or body.return_token_ids
    return _stream_events(stream, "text_completion", model, params, include_usage, per_token,
                          choice, usage_extras=usage_extras)


# ---- chat completions -----------------------------------------------------------------------


def chat_response(
    state: WorkerState, out: RequestOutput, body: ChatCompletionRequest, model: str
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": out.text},
        "logprobs": _chat_lp(state, out, 0) if body.logprobs else None,
        "finish_reason": out.finish_reason,
        **_choice_extras(out, body.return_token_ids),
    }
    return {
        "id": out.request_id, "object": "chat.completion", "created": now_s(), "model": model,
        "choices": [choice], "usage": _usage(out),
    }


def chat_events(
    state: WorkerState, stream: RequestStream, body: ChatCompletionRequest, model: str,
    params: SamplingParams, include_usage: bool,
) -> AsyncIterator[str]:
    def choice(out: RequestOutput, text: str, sent: int, offset: int) -> dict[str, Any]:
        c: dict[str, Any] = {
            "index": 0, "delta": {"content": text} if text or not out.finished else {},
            "logprobs": None, "finish_reason": out.finish_reason if out.finished else None,
            **_choice_extras(out, body.return_token_ids, sent),
        }
        if body.logprobs:
            c["logprobs"] = _chat_lp(state, out, sent)
        return c

    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}
    per_token = bool(body.logprobs or body.return_token_ids)
    return _stream_events(stream, "chat.completion.chunk", model, params, include_usage,
                          per_token, choice, first)
