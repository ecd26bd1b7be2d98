"""Engine outputs to OpenAI responses: whole bodies and SSE chunk streams.

Outputs are cumulative (all tokens and text so far), so every chunk is computed as the
difference from what was already sent; a consumer that falls behind simply sends bigger
chunks. Streams end with ``data: [DONE]``; with ``stream_options.include_usage`` a last
chunk with empty ``choices`` carries the usage, as OpenAI does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from kvbaton.api.fanout import Fanout, combined_usage, merge
from kvbaton.api.protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    TextDeltas,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    now_s,
    prompt_logprobs_field,
)
from kvbaton.api.sse import DONE_EVENT, sse
from kvbaton.api.tools import Tool, ToolCallStream, assistant_message, finish_reason
from kvbaton.engine.outputs import RequestOutput
from kvbaton.sampling_params import SamplingParams
from kvbaton.worker.stream import EngineDeadError, EngineStoppedError, RequestFailedError, RequestStream

if TYPE_CHECKING:
    from kvbaton.worker.api import WorkerState

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


def without_generated(out: RequestOutput) -> RequestOutput:
    """``out`` as if nothing had been generated (echo with max_tokens 0: the one token the
    engine ran is not the client's)."""
    return dataclasses.replace(
        out, token_ids=[], text="", new_token_ids=[], finish_reason="length", stop_reason=None,
        logprobs=[] if out.logprobs is not None else None,
        top_logprobs=[] if out.top_logprobs is not None else None)


async def _choice_chunks(
    stream: RequestStream, params: SamplingParams, per_token: bool,
    make_choice: Callable[[RequestOutput, str, int, int], dict[str, Any]], trim: bool = False,
) -> AsyncIterator[tuple[dict[str, Any], RequestOutput]]:
    """One run's choices, one per output that adds text (or tokens, when the client asked
    for per-token data), each with the output it came from (``trim``: without what was
    generated, see :func:`without_generated`)."""
    deltas = TextDeltas(params.stop)
    sent_tokens = 0
    async for out in stream:
        if trim:
            out = without_generated(out)
        offset = len(deltas.sent)
        text = deltas.delta(out.text, out.finished)
        if not (text or out.finished or (per_token and len(out.token_ids) > sent_tokens)):
            continue
        choice = make_choice(out, text, sent_tokens, offset)
        sent_tokens = len(out.token_ids)
        yield choice, out


def _run_usage(outs: list[RequestOutput]) -> list[tuple[int, int, int]]:
    return [(len(o.prompt_token_ids), len(o.token_ids), o.num_cached_tokens) for o in outs]


async def _stream_events(
    request_id: str, streams: list[RequestStream], fan: Fanout, obj: str, model: str,
    params: SamplingParams, include_usage: bool, per_token: bool,
    make_choice: Callable[[RequestOutput, str, int, int], dict[str, Any]],
    first_choice: dict[str, Any] | None = None, usage_extras: dict[str, Any] | None = None,
    trim: bool = False,
) -> AsyncIterator[str]:
    """The SSE skeleton both endpoints share: the runs' choices as they come (choice ``i`` is
    ``streams[i]``), an error event if the engine dies, the usage chunk when asked, then
    ``[DONE]``. ``make_choice(out, text, sent_tokens, text_offset)`` builds the endpoint's
    choice for one chunk; ``first_choice`` opens every choice (chat's role delta);
    ``usage_extras`` are top-level fields of the usage chunk (the KV import report of a
    decode request)."""
    created = now_s()
    last: list[RequestOutput | None] = [None] * len(streams)

    def chunk(choices: list[dict[str, Any]]) -> str:
        c: dict[str, Any] = {
            "id": request_id, "object": obj, "created": created, "model": model, "choices": choices,
        }
        if include_usage:
            c["usage"] = None
        return sse(c)

    if first_choice is not None:
        for i in range(len(streams)):
            yield chunk([{**first_choice, "index": i}])
    try:
        async for i, (choice, out) in merge([_choice_chunks(s, params, per_token, make_choice, trim)
                                             for s in streams]):
            last[i] = out
            choice["index"] = i
            yield chunk([choice])
    except (EngineDeadError, EngineStoppedError, RequestFailedError) as e:
        yield _error_event(e)
    else:
        finals = [o for o in last if o is not None]
        if include_usage and len(finals) == len(streams):
            yield sse({
                "id": request_id, "object": obj, "created": created, "model": model,
                "choices": [], "usage": combined_usage(fan, _run_usage(finals)), **(usage_extras or {}),
            })
    yield DONE_EVENT


def _response(request_id: str, obj: str, model: str, fan: Fanout, finals: list[RequestOutput],
              make_choice: Callable[[RequestOutput], dict[str, Any]],
              extras: dict[str, Any] | None) -> dict[str, Any]:
    order = fan.returned([sum(o.logprobs or ()) for o in finals])
    choices = [{"index": i, **make_choice(finals[r])} for i, r in enumerate(order)]
    return {
        "id": request_id, "object": obj, "created": now_s(), "model": model, "choices": choices,
        "usage": combined_usage(fan, _run_usage(finals)), **(extras or {}),
    }


# ---- completions ----------------------------------------------------------------------------


def _prompt_text(state: WorkerState, out: RequestOutput) -> str:
    """The prompt as ``echo`` returns it: the text sent, or what its token ids decode to."""
    if out.prompt is not None:
        return out.prompt
    return str(state.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False))


def _prompt_extras(state: WorkerState, out: RequestOutput, body: CompletionRequest | ChatCompletionRequest,
                   first: bool) -> dict[str, Any]:
    """vLLM's ``prompt_logprobs`` choice field, in a run's first chunk (or whole choice)."""
    if body.prompt_logprobs is None or not first or out.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": prompt_logprobs_field(out.prompt_token_ids, out.prompt_logprobs,
                                                     body.prompt_logprobs, state.token_text)}


def _completion_part(state: WorkerState, out: RequestOutput, body: CompletionRequest, text: str,
                     sent: int, offset: int) -> tuple[str, dict[str, Any] | None]:
    """A completions choice's text and logprobs from token ``sent`` on, ``offset`` the text
    offset of that token (the echoed prompt counted); with ``echo`` the run's first part
    (``sent`` 0) starts with the prompt and its logprobs."""
    if not body.echo or sent:
        return text, _completion_lp(state, out, sent, offset) if body.logprobs is not None else None
    echo = _prompt_text(state, out)
    if body.logprobs is None:
        return echo + text, None
    head = echo_logprobs(out.prompt_token_ids, out.prompt_logprobs or [None] * len(out.prompt_token_ids),
                         state.token_text)
    lp = _completion_lp(state, out, 0, len(echo))
    return echo + text, {k: head[k] + (lp[k] or []) for k in head}


def _end_offset(lp: dict[str, Any], start: int) -> int:
    """The text offset just past a logprobs object's last token (``start`` when it has none)."""
    tokens, offsets = lp["tokens"], lp["text_offset"]
    return offsets[-1] + len(tokens[-1]) if tokens else start


def completion_response(
    state: WorkerState, request_id: str, finals: list[RequestOutput], body: CompletionRequest,
    model: str, fan: Fanout, extras: dict[str, Any] | None = None,
) -> dict[str, Any]:
    def choice(out: RequestOutput) -> dict[str, Any]:
        text, lp = _completion_part(state, out, body, out.text, 0, 0)
        return {
            "text": text, "logprobs": lp, "finish_reason": out.finish_reason,
            **_choice_extras(out, body.return_token_ids), **_prompt_extras(state, out, body, True),
        }

    return _response(request_id, "text_completion", model, fan, finals, choice, extras)


def completion_events(
    state: WorkerState, request_id: str, streams: list[RequestStream], body: CompletionRequest,
    model: str, fan: Fanout, params: SamplingParams, include_usage: bool,
    usage_extras: dict[str, Any] | None = None, prompt_only: bool = False,
) -> AsyncIterator[str]:
    # Each run's text offset for logprobs: past its sent tokens' text (and the echoed prompt),
    # as a whole response counts it (the text sent so far lags it by any held-back partial
    # character).
    token_chars: dict[str, int] = {}

    def choice(out: RequestOutput, text: str, sent: int, offset: int) -> dict[str, Any]:
        # (Every chunk carries a token, so a run's first chunk is the one with sent == 0.)
        base = token_chars.get(out.request_id, 0)
        text, lp = _completion_part(state, out, body, text, sent, base)
        if lp is not None:
            token_chars[out.request_id] = _end_offset(lp, base)
        return {
            "index": 0, "text": text, "logprobs": lp,
            "finish_reason": out.finish_reason if out.finished else None,
            **_choice_extras(out, body.return_token_ids, sent), **_prompt_extras(state, out, body, sent == 0),
        }

    per_token = body.logprobs is not None or body.return_token_ids
    return _stream_events(request_id, streams, fan, "text_completion", model, params, include_usage,
                          per_token, choice, usage_extras=usage_extras, trim=prompt_only)


# ---- chat completions -----------------------------------------------------------------------


def chat_response(
    state: WorkerState, request_id: str, finals: list[RequestOutput], body: ChatCompletionRequest,
    model: str, fan: Fanout, tools: list[Tool] | None = None,
) -> dict[str, Any]:
    """The whole chat response; ``tools``: parse each choice's tool calls."""
    def choice(out: RequestOutput) -> dict[str, Any]:
        message, finish = assistant_message(out.text, out.finish_reason, tools)
        return {
            "message": message,
            "logprobs": _chat_lp(state, out, 0) if body.logprobs else None,
            "finish_reason": finish,
            **_choice_extras(out, body.return_token_ids), **_prompt_extras(state, out, body, True),
        }

    return _response(request_id, "chat.completion", model, fan, finals, choice, None)


def chat_events(
    state: WorkerState, request_id: str, streams: list[RequestStream], body: ChatCompletionRequest,
    model: str, fan: Fanout, params: SamplingParams, include_usage: bool,
    tools: list[Tool] | None = None,
) -> AsyncIterator[str]:
    """The chat SSE stream; ``tools``: tool calls streamed as ``tool_calls`` deltas."""
    parsers = {s.request_id: ToolCallStream(tools) for s in streams} if tools else {}

    def choice(out: RequestOutput, text: str, sent: int, offset: int) -> dict[str, Any]:
        finish = out.finish_reason if out.finished else None
        parser = parsers.get(out.request_id)
        if parser is not None:
            delta = parser.delta(text, out.finished)
            if out.finished:
                finish = finish_reason(finish, parser.num_calls > 0)
        else:
            delta = {"content": text} if text or not out.finished else {}
        c: dict[str, Any] = {
            "index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
            **_choice_extras(out, body.return_token_ids, sent), **_prompt_extras(state, out, body, sent == 0),
        }
        if body.logprobs:
            c["logprobs"] = _chat_lp(state, out, sent)
        return c

    first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}
    per_token = bool(body.logprobs or body.return_token_ids)
    return _stream_events(request_id, streams, fan, "chat.completion.chunk", model, params,
                          include_usage, per_token, choice, first)
