"""From an OpenAI request to the engine's SamplingParams, and engine errors to OpenAI 400s.

Shared by the worker, which runs the request, and the router, which validates it before any
worker sees it, so both answer a bad field with the same message.
"""

from __future__ import annotations

from kvbaton.engine.sampling_params import SamplingParams
from kvbaton.worker.protocol import ApiError, SamplingFields

_SAMPLING_FIELDS = frozenset({
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "logprobs",
})



def value_error(e: ValueError, aliases: dict[str, str], prompt_param: str) -> ApiError:
    """Map an engine/SamplingParams ValueError (message starts with the field) to a 400."""
    msg = str(e)
    first = msg.split(" ", 1)[0].rstrip(":,")
    code = "context_length_exceeded" if "context" in msg else "invalid_value"
    if first == "prompt":
        param: str | None = prompt_param
    elif first.startswith("messages"):
        param = "messages"
    elif msg.startswith("request needs"):
        param = aliases.get("max_tokens", "max_tokens")
    elif first in _SAMPLING_FIELDS:
        param = aliases.get(first, first)
    elif "chat template" in msg:
        param = "messages"
    else:
        param = None
    if param and param != first and first in _SAMPLING_FIELDS:
        msg = param + msg[len(first):]  # name the field the client actually sent
    return ApiError(400, msg, param, code)


def request_sampling_params(
    body: SamplingFields, max_tokens: int, logprobs: int | None, aliases: dict[str, str],
    prompt_param: str,
) -> SamplingParams:
    """The engine's SamplingParams for ``body``; a 400 naming the field the client sent."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            seed=body.seed,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )
    except ValueError as e:
        raise value_error(e, aliases, prompt_param) from None
