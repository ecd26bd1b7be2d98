"""The OpenAI wire format: request models (pydantic), errors, and response/chunk builders.

Only what the engine can honour is accepted: parameters it cannot (``n > 1``, batched
prompts, ``echo``, penalties, tools...) are rejected with a 400 naming the field rather than
silently ignored. Unknown extra fields are ignored, as OpenAI clients send many.
"""

from __future__ import annotations

import math
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

SEED_RANGE = Field(default=None, ge=-(2**63), lt=2**63)
# The error code of a decode request whose KV transfer failed under the "fail" policy: the
# router retries it elsewhere (a 502 with this code, or an SSE error event carrying it).
KV_TRANSFER_FAILED = "kv_transfer_failed"


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message} (unsupported)", param, "unsupported_value")


# ---- text that can be encoded ---------------------------------------------------------------

# The pydantic error type of a string holding a lone surrogate. JSON may spell one
# ("\ud800"), Python's json decodes it into a str holding U+D800, and such a str cannot be
# encoded as UTF-8: tokenizers, chat templates, cache-salt hashing and the router's forwarded
# body would all fail on it (a 500). The request models reject it instead, so the worker and
# the router answer the same 400. The error's ctx carries ``field_path`` (e.g.
# ``messages[0].content[1].text``), which :func:`kvbaton.api.guard.validation_error` names in
# the message; ``param`` stays the top-level field.
UNPAIRED_SURROGATE = "unpaired_surrogate"


def surrogate_index(text: str) -> int | None:
    """Index of the first UTF-16 surrogate code point in ``text`` (None if there is none).

    A properly paired escape (``"\\ud83d\\ude00"``) is decoded by JSON into one non-BMP
    character, so any surrogate left in a decoded string is unpaired."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def _unpaired(path: str, text: str, index: int) -> PydanticCustomError:
    return PydanticCustomError(
        UNPAIRED_SURROGATE,
        "contains an unpaired UTF-16 surrogate ({char} at index {index}); send valid Unicode",
        {"field_path": path, "char": f"\\u{ord(text[index]):04x}", "index": index},
    )


def check_text(value: Any, path: str) -> None:
    """Raise the pydantic error for the first string in ``value`` (a string, or lists and
    dicts of them, keys included) that holds a lone surrogate; ``path`` names ``value``."""
    if isinstance(value, str):
        i = surrogate_index(value)
        if i is not None:
            raise _unpaired(path, value, i)
    elif isinstance(value, (list, tuple)):
        for k, item in enumerate(value):
            check_text(item, f"{path}[{k}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"{path} (a key)")
            check_text(item, f"{path}.{key}")


# ---- requests -------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = SEED_RANGE
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    cache_salt: str | None = None
    # vLLM extension: return the generated token ids (choices[].token_ids).
    return_token_ids: bool = False
    # vLLM/llm-d disaggregation: {"do_remote_decode": true} asks for a prefill-only run that
    # answers with a KV handle; a handle (do_remote_prefill) makes this a decode request.
    kv_transfer_params: dict[str, Any] | None = None

    # ``user`` is not checked: it is accepted and ignored, never encoded.
    @field_validator("model", "stop", "cache_salt", "kv_transfer_params", mode="after")
    @classmethod
    def _encodable(cls, value: Any, info: ValidationInfo) -> Any:
        check_text(value, str(info.field_name))
        return value

    def check_supported(self) -> None:
        if self.n != 1:
            raise unsupported("n", "only n=1 is supported")
        if self.presence_penalty or self.frequency_penalty:
            which = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            raise unsupported(which, "penalties are not implemented")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not implemented")
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "stream_options: only allowed when stream is true", "stream_options", "invalid_value"
            )


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: ``prompt`` is one string or one list of token ids."""

    prompt: Any
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="after")
    @classmethod
    def _encodable_prompt(cls, value: Any) -> Any:
        # Only a string prompt is ever encoded; token ids (what the router sends, possibly
        # many thousands) are not walked, and a batch of strings is refused as unsupported.
        if isinstance(value, str):
            check_text(value, "prompt")
        return value

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise unsupported("echo", "echo is not implemented")
        if self.suffix:
            raise unsupported("suffix", "suffix is not implemented")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "only best_of=1 is supported")

    def prompt_input(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str):
            return p
        if isinstance(p, list):
            if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                return list(p)
            if all(isinstance(t, str) for t in p) or all(isinstance(t, list) for t in p):
                raise unsupported("prompt", "a batch of prompts is not supported; send one per request")
        raise ApiError(400, "prompt: must be a string or a list of token ids", "prompt", "invalid_type")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None

    def as_template_input(self, index: int) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise unsupported(
                        "messages", f"messages[{index}]: only text content parts are supported"
                    )
                texts.append(part.text)
            content = "".join(texts)
        return {"role": self.role, "content": content or ""}


def check_messages(messages: list[ChatMessage]) -> None:
    """:func:`check_text` over every string of a chat that reaches the template."""
    for i, m in enumerate(messages):
        check_text(m.role, f"messages[{i}].role")
        if isinstance(m.content, list):
            for j, part in enumerate(m.content):
                check_text(part.type, f"messages[{i}].content[{j}].type")
                check_text(part.text, f"messages[{i}].content[{j}].text")
        else:
            check_text(m.content, f"messages[{i}].content")


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages", mode="after")
    @classmethod
    def _encodable_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        check_messages(value)
        return value

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise unsupported("tools", "tool calling is not implemented")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format", "only text responses are supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs: requires logprobs to be true", "top_logprobs", "invalid_value")
        if not self.messages:
            raise ApiError(400, "messages: must be a non-empty list", "messages", "invalid_value")

    def limits(self, max_logprobs: int) -> tuple[int | None, int | None, dict[str, str]]:
        """``(max_tokens, logprobs, aliases)`` as the engine takes them: ``max_completion_tokens``
        wins over ``max_tokens``, ``top_logprobs`` (at most ``max_logprobs``) counts only with
        ``logprobs``; ``aliases`` name the fields the client actually sent, for error messages."""
        aliases = {"logprobs": "top_logprobs"}
        max_tokens = self.max_tokens
        if self.max_completion_tokens is not None:
            max_tokens = self.max_completion_tokens
            aliases["max_tokens"] = "max_completion_tokens"
        top = self.top_logprobs or 0
        if top > max_logprobs:
            raise ApiError(400, f"top_logprobs: at most {max_logprobs}", "top_logprobs", "invalid_value")
        return max_tokens, (top if self.logprobs else None), aliases

    def template_input(self) -> list[dict[str, str]]:
        return [m.as_template_input(i) for i, m in enumerate(self.messages)]


class KVPinRequest(BaseModel):
    """``POST /kv/pin`` and ``POST /kv/unpin``: a prefix of this worker's KV tiers.

    Exactly one of ``prompt`` (a string or token ids, tokenized as completions do) and
    ``messages`` (a chat, templated as chat completions do) names the prefix; ``cache_salt``
    the tenant, as in the generation routes. ``ttl_s`` (pin only) is how long the pin lasts;
    its upper bound is the worker's setting, so the route checks it (:meth:`pin_ttl`).
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    prompt: Any = None
    messages: list[ChatMessage] | None = None
    cache_salt: str | None = None
    # Strict: a JSON number (an integer too), never a bool or a numeric string.
    ttl_s: float | None = Field(default=None, strict=True)

    @field_validator("model", "cache_salt", mode="after")
    @classmethod
    def _encodable(cls, value: Any, info: ValidationInfo) -> Any:
        check_text(value, str(info.field_name))
        return value

    @field_validator("prompt", mode="after")
    @classmethod
    def _encodable_prompt(cls, value: Any) -> Any:
        if isinstance(value, str):  # token ids are not walked (see CompletionRequest)
            check_text(value, "prompt")
        return value

    @field_validator("messages", mode="after")
    @classmethod
    def _encodable_messages(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if value is not None:
            check_messages(value)
        return value

    @property
    def prompt_param(self) -> str:
        """The field that holds the prefix (errors about it name this one)."""
        return "messages" if self.messages is not None else "prompt"

    def prefix(self) -> tuple[str | list[int] | None, list[dict[str, str]] | None]:
        """``(prompt, None)`` with text or token ids, or ``(None, messages)`` with the chat's
        template input; a 400 unless exactly one of them is set and well formed."""
        if (self.prompt is None) == (self.messages is None):
            both = self.prompt is not None
            raise ApiError(400, "prompt: send exactly one of prompt and messages"
                           + (", not both" if both else ""), "prompt",
                           "invalid_value" if both else "missing_required_parameter")
        if self.messages is not None:
            if not self.messages:
                raise ApiError(400, "messages: must be a non-empty list", "messages", "invalid_value")
            return None, [m.as_template_input(i) for i, m in enumerate(self.messages)]
        p = self.prompt
        if isinstance(p, str):
            return p, None
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p), None
        raise ApiError(400, "prompt: must be a string or a list of token ids", "prompt", "invalid_type")

    def pin_ttl(self, max_ttl_s: float) -> float:
        """``ttl_s`` of a pin: required, in (0, ``max_ttl_s``]."""
        if self.ttl_s is None:
            raise ApiError(400, "ttl_s: required (seconds the pin lasts)", "ttl_s", "missing_required_parameter")
        if not 0 < self.ttl_s <= max_ttl_s:
            raise ApiError(400, f"ttl_s: must be > 0 and <= {max_ttl_s:g} (this worker's --kv-pin-max-ttl), "
                           f"got {self.ttl_s:g}", "ttl_s", "invalid_value")
        return self.ttl_s


# ---- streaming text -------------------------------------------------------------------------


class TextDeltas:
    """Turns the engine's cumulative text into deltas that never need taking back.

    While a request runs, the tail that could still become a stop string (which the engine
    would cut off) and a trailing partial UTF-8 character (decoded as U+FFFD until its last
    byte arrives) are held back; everything is released when the request finishes.
    """

    def __init__(self, stop: list[str] | None) -> None:
        self.holdback = max((len(s) for s in stop or ()), default=1) - 1
        self.sent = ""

    def delta(self, text: str, finished: bool) -> str:
        if finished:
            safe = text
        else:
            safe = text[: max(0, len(text) - self.holdback)].rstrip("\ufffd")
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        out = safe[len(self.sent):]
        self.sent = safe
        return out


# ---- responses ------------------------------------------------------------------------------


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(
    token_text: list[str],
    logprobs: list[float],
    tops: list[dict[str, float]] | None,
    text_offset: int,
) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object for a run of tokens."""
    offsets = []
    pos = text_offset
    for t in token_text:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": token_text,
        "token_logprobs": [_finite(x) for x in logprobs],
        "top_logprobs": [{k: _finite(v) for k, v in d.items()} for d in tops] if tops is not None else None,
        "text_offset": offsets,
    }


def chat_logprobs(
    token_text: list[str], logprobs: list[float], tops: list[list[tuple[str, float]]]
) -> dict[str, Any]:
    """The chat ``logprobs`` object (``{"content": [...]}``) for a run of tokens."""
    content = []
    for i, (tok, lp) in enumerate(zip(token_text, logprobs)):
        content.append({
            "token": tok,
            "logprob": _finite(lp),
            "bytes": list(tok.encode("utf-8")),
            "top_logprobs": [
                {"token": t, "logprob": _finite(v), "bytes": list(t.encode("utf-8"))}
                for t, v in (tops[i] if i < len(tops) else [])
            ],
        })
    return {"content": content}
