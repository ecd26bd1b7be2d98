"""The OpenAI wire format: request models (pydantic), errors, and response/chunk builders.

Only what the engine can honour is accepted: parameters it cannot (``suffix``, non-text
content parts...) are rejected with a 400 naming the field rather than silently ignored.
Unknown extra fields are ignored, as OpenAI clients send many.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from kvbaton.errors import InvalidRequestError
from kvbaton.sampling_params import StructuredOutput

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
    # vLLM extras: a multiplicative penalty over prompt and output tokens, and a floor on
    # the output length before EOS, stop_token_ids or stop strings may end it.
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extra: each prompt token's logprob and the top alternatives there (choices[].
    # prompt_logprobs, vLLM's shape).
    prompt_logprobs: int | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields (see structured_output()).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None
    cache_salt: str | None = None
    # vLLM extension: return the generated token ids (choices[].token_ids).
    return_token_ids: bool = False
    # vLLM/llm-d disaggregation: {"do_remote_decode": true} asks for a prefill-only run that
    # answers with a KV handle; a handle (do_remote_prefill) makes this a decode request.
    kv_transfer_params: dict[str, Any] | None = None

    # ``user`` is not checked: it is accepted and ignored, never encoded.
    @field_validator("model", "stop", "cache_salt", "kv_transfer_params", "response_format",
                     "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", mode="after")
    @classmethod
    def _encodable(cls, value: Any, info: ValidationInfo) -> Any:
        check_text(value, str(info.field_name))
        return value

    def structured_output(self) -> StructuredOutput | None:
        """The output constraint the request asks for, from whichever field holds it (at most
        one may): ``response_format`` (``json_object``, ``json_schema``; ``text`` is none),
        ``structured_outputs`` (``{"json" | "regex" | "choice" | "grammar" | "json_object":
        ...}``), or ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``.
        Whether the constraint compiles is checked later, against the tokenizer."""
        found: list[StructuredOutput] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                found.append(StructuredOutput("json", '{"type": "object"}', "response_format"))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                schema = js.get("schema") if isinstance(js, dict) else None
                if not isinstance(schema, (dict, bool)):
                    raise ApiError(400, "response_format: json_schema.schema is required (a JSON schema "
                                   "object)", "response_format", "invalid_value")
                found.append(StructuredOutput("json", json.dumps(schema), "response_format"))
            elif kind != "text":
                raise unsupported("response_format", f"type {kind!r}: one of text, json_object, json_schema")
        if self.structured_outputs is not None:
            found.extend(_structured_outputs(self.structured_outputs))
        if self.guided_json is not None:
            spec = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            found.append(_constraint("json", spec, "guided_json"))
        for name, kind in (("guided_regex", "regex"), ("guided_grammar", "grammar")):
            value = getattr(self, name)
            if value is not None:
                found.append(_constraint(kind, value, name))
        if self.guided_choice is not None:
            found.append(_constraint("choice", json.dumps(self.guided_choice), "guided_choice"))
        if len(found) > 1:
            names = ", ".join(dict.fromkeys(f.param for f in found))
            raise ApiError(400, f"{found[1].param}: give one output constraint, not several ({names})",
                           found[1].param, "invalid_value")
        return found[0] if found else None

    def check_supported(self, max_n: int) -> None:
        if not 1 <= self.n <= max_n:
            raise ApiError(400, f"n: must be an integer in [1, {max_n}] (this server's maximum), "
                           f"got {self.n}", "n", "invalid_value")
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "stream_options: only allowed when stream is true", "stream_options", "invalid_value"
            )


    def logit_bias_ids(self) -> dict[int, float]:
        """``logit_bias`` with its keys as token ids (JSON keys are strings); a 400 for a key
        that is not a non-negative integer. Values are checked with the other sampling
        fields, and ids beyond the vocabulary by the engine."""
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or not key.isascii():
                raise ApiError(400, f"logit_bias: keys must be token ids (non-negative integers), "
                               f"got {key!r}", "logit_bias", "invalid_value")
            out[int(key)] = value
        return out


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
        # Only string prompts are ever encoded; token ids (what the router sends, possibly
        # many thousands) are not walked.
        if isinstance(value, str):
            check_text(value, "prompt")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, str):
                    check_text(item, f"prompt[{i}]")
        return value

    def check_supported(self, max_n: int) -> None:
        super().check_supported(max_n)
        if self.suffix:
            raise unsupported("suffix", "suffix is not implemented")
        if self.best_of is not None:
            if not self.n <= self.best_of <= max_n:
                raise ApiError(400, f"best_of: must be an integer in [n, {max_n}] (n={self.n}; "
                               f"{max_n} is this server's maximum), got {self.best_of}", "best_of",
                               "invalid_value")
            if self.stream and self.best_of > self.n:
                raise ApiError(400, "best_of: a request with best_of > n cannot be streamed (the "
                               "best candidates are only known at the end); set stream to false",
                               "best_of", "invalid_value")

    def prompt_inputs(self, max_prompts: int) -> list[str | list[int]]:
        """The prompts: one string or one list of token ids, or a batch (a list of strings or
        a list of token-id lists, at most ``max_prompts``)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p, list):
            if all(_is_token_id(t) for t in p):  # (empty: the engine's "empty prompt" 400)
                return [list(p)]
            batch: list[str | list[int]] = []
            text = isinstance(p[0], str)  # a batch is all strings or all token-id lists
            for i, item in enumerate(p):
                if text and isinstance(item, str):
                    batch.append(item)
                elif (not text and isinstance(item, list) and item
                      and all(_is_token_id(t) for t in item)):
                    batch.append(list(item))
                else:
                    raise ApiError(400, f"prompt[{i}]: a batch holds strings only or non-empty "
                                   "lists of token ids only", "prompt", "invalid_type")
            if len(batch) > max_prompts:
                raise ApiError(400, f"prompt: a batch of at most {max_prompts} prompts, got "
                               f"{len(batch)}", "prompt", "invalid_value")
            return batch
        raise ApiError(400, "prompt: must be a string or a list of token ids (or a non-empty batch "
                       "of them)", "prompt", "invalid_type")


def _constraint(kind: str, spec: str, param: str) -> StructuredOutput:
    try:
        return StructuredOutput(kind, spec, param)
    except InvalidRequestError as e:
        raise ApiError(400, e.message_for(param), param, "invalid_value") from None


_STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def _structured_outputs(value: dict[str, Any]) -> list[StructuredOutput]:
    """vLLM's ``structured_outputs`` object: one constraint key (options vLLM has that kvbaton
    does not are refused, not ignored: an output must not silently lose its constraint)."""
    out = []
    for key, spec in value.items():
        if key == "json_object":
            if spec:
                out.append(StructuredOutput("json", '{"type": "object"}', "structured_outputs"))
        elif key in _STRUCTURED_KEYS:
            if key == "json" and isinstance(spec, (dict, bool)):
                spec = json.dumps(spec)
            elif key == "choice":
                if not isinstance(spec, list):
                    raise ApiError(400, "structured_outputs: choice must be a list of strings",
                                   "structured_outputs", "invalid_value")
                spec = json.dumps(spec)
            if not isinstance(spec, str):
                raise ApiError(400, f"structured_outputs: {key} must be a string", "structured_outputs",
                               "invalid_value")
            out.append(_constraint(_STRUCTURED_KEYS[key], spec, "structured_outputs"))
        else:
            raise unsupported("structured_outputs", f"{key!r}: kvbaton takes json, json_object, regex, "
                              "choice or grammar")
    return out


def _is_token_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None
    # An assistant turn's calls (OpenAI's shape) and a tool turn's answer to one of them.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def as_template_input(self, index: int) -> dict[str, Any]:
        """``{"role", "content"}`` (content parts joined), plus an assistant turn's
        ``tool_calls`` as ``[{"name", "arguments"}]`` (arguments decoded from their JSON text);
        :func:`kvbaton.api.tools.render` turns those into text."""
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
        out: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            out["tool_calls"] = [_call_input(c, index, k) for k, c in enumerate(self.tool_calls)]
        return out


def _call_input(call: dict[str, Any], index: int, k: int) -> dict[str, Any]:
    fn = call.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    args = fn.get("arguments", "{}") if isinstance(fn, dict) else None
    where = f"messages[{index}].tool_calls[{k}]"
    if not isinstance(name, str) or not isinstance(args, (str, dict)):
        raise ApiError(400, f"{where}: must be {{\"function\": {{\"name\": ..., \"arguments\": ...}}}}",
                       "messages", "invalid_value")
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            raise ApiError(400, f"{where}.function.arguments: not valid JSON", "messages", "invalid_value") from None
    return {"name": name, "arguments": args}


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
        check_text(m.tool_calls, f"messages[{i}].tool_calls")


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages", mode="after")
    @classmethod
    def _encodable_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        check_messages(value)
        return value

    @field_validator("tools", "tool_choice", mode="after")
    @classmethod
    def _encodable_tools(cls, value: Any, info: ValidationInfo) -> Any:
        check_text(value, str(info.field_name))
        return value

    def check_supported(self, max_n: int) -> None:
        super().check_supported(max_n)
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

    def template_input(self) -> list[dict[str, Any]]:
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

    def prefix(self, native_tools: bool = False) -> tuple[str | list[int] | None, list[dict[str, Any]] | None]:
        """``(prompt, None)`` with text or token ids, or ``(None, messages)`` with the chat's
        template input, rendered as a chat request without tools is (``native_tools``: the
        template renders tool calls itself); a 400 unless exactly one of them is set and well
        formed."""
        if (self.prompt is None) == (self.messages is None):
            both = self.prompt is not None
            raise ApiError(400, "prompt: send exactly one of prompt and messages"
                           + (", not both" if both else ""), "prompt",
                           "invalid_value" if both else "missing_required_parameter")
        if self.messages is not None:
            if not self.messages:
                raise ApiError(400, "messages: must be a non-empty list", "messages", "invalid_value")
            from kvbaton.api.tools import render  # (tools imports this module)

            # Rendered as a chat request without tools is, so a pinned prefix hashes alike.
            return None, render([m.as_template_input(i) for i, m in enumerate(self.messages)], [], "none",
                                native_tools)
        p = self.prompt
        if isinstance(p, str):
            return p, None
        if isinstance(p, list) and all(_is_token_id(t) for t in p):
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
    return {
        "tokens": token_text,
        "token_logprobs": [_finite(x) for x in logprobs],
        "top_logprobs": [{k: _finite(v) for k, v in d.items()} for d in tops] if tops is not None else None,
        "text_offset": _text_offsets(token_text, text_offset),
    }


def _text_offsets(texts: list[str], start: int) -> list[int]:
    """Where each of ``texts`` starts when they follow one another from ``start``."""
    offsets, pos = [], start
    for t in texts:
        offsets.append(pos)
        pos += len(t)
    return offsets


def prompt_logprobs_field(
    prompt_ids: list[int], entries: list[dict[int, float] | None], k: int,
    token_text: Callable[[int], str],
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs`` choice field: per prompt position None (the first) or
    ``{token_id: {"logprob", "rank", "decoded_token"}}`` for the prompt token and the ``k``
    most likely tokens there (rank 1 is the most likely; the prompt token's rank is None when
    it is not among them: the engine computed only those)."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for tok, entry in zip(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        ranked = sorted(entry.items(), key=lambda kv: -kv[1])
        inside = len(entry) <= k  # the prompt token is among the top k
        top = ranked if inside else [kv for kv in ranked if kv[0] != tok][:k]
        field: dict[str, dict[str, Any]] = {}
        if not inside:
            field[str(tok)] = {"logprob": _finite(entry[tok]), "rank": None, "decoded_token": token_text(tok)}
        for r, (t, lp) in enumerate(top):
            field[str(t)] = {"logprob": _finite(lp), "rank": r + 1, "decoded_token": token_text(t)}
        out.append(field)
    return out


def echo_logprobs(
    prompt_ids: list[int], entries: list[dict[int, float] | None], token_text: Callable[[int], str]
) -> dict[str, Any]:
    """The prompt's part of a completions ``logprobs`` object (``echo`` with ``logprobs``):
    each prompt token with its logprob (None for the first, which has no context) and the
    alternatives at its position, text offsets from 0."""
    texts = [token_text(t) for t in prompt_ids]
    lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    for tok, entry in zip(prompt_ids, entries):
        if entry is None:
            lps.append(None)
            tops.append(None)
            continue
        lps.append(_finite(entry.get(tok, -math.inf)))
        tops.append({token_text(t): _finite(v) for t, v in entry.items()})
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": _text_offsets(texts, 0)}


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
