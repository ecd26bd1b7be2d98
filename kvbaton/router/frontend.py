"""Client request -> what the workers are sent: validation, chat template, tokenization.

The router owns the client-facing API, so it validates with the worker's own request models
and sampling checks (same 400s, naming the same fields) before any worker is contacted, then
tokenizes once; workers only ever see token ids. Only the sampling fields the client set are
forwarded, so the workers' defaults stay the defaults.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any

import anyio

from kvbaton.models.loader import dir_tokenizer, resolve_model_dir
from kvbaton.models.tokenizer import chat_prompt_ids
from kvbaton.models.registry import DUMMY_CONFIGS
from kvbaton.models.tokenizer import byte_tokenizer
from kvbaton.router.config import RouterConfig
from kvbaton.worker.params import request_sampling_params
from kvbaton.worker.protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingFields


def load_router_tokenizer(model: str) -> Any:
    """The tokenizer a worker started with ``--model model`` uses (same resolution: built-in
    names, .gguf files, HF directories; random-weight models get the byte tokenizer)."""
    if model in DUMMY_CONFIGS:
        return byte_tokenizer()
    return dir_tokenizer(resolve_model_dir(model))


@dataclass
class Prepared:
    """A validated, tokenized client request."""

    request_id: str
    chat: bool
    model: str  # the name the client asked for, echoed in responses
    token_ids: list[int]
    max_tokens: int
    fields: dict[str, Any]  # sampling fields for the workers
    stream: bool
    include_usage: bool
    # Chat only: how many alternatives per token the client asked for (top_logprobs), or
    # None when it asked for no logprobs.
    chat_top_logprobs: int | None = None


class Frontend:
    """Validates and tokenizes client requests (the tokenizer from ``config.model``)."""

    def __init__(self, config: RouterConfig, tokenizer: Any | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_router_tokenizer(config.model)
        # Tokenization runs on worker threads; HF fast tokenizers can raise "Already borrowed"
        # when one object is used from two threads at once.
        self._lock = threading.Lock()

    def resolve_model(self, name: str | None) -> str:
        names = self.config.model_names
        if name is None or name in names:
            return name or names[0]
        raise ApiError(404, f"model {name!r} does not exist; this router serves {names}", "model", "model_not_found")

    # ---- tokenization (off the event loop: long prompts take milliseconds) ---------------

    def _encode(self, text: str) -> list[int]:
        with self._lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        # The engine's own function, so the router's ids equal what a worker would compute.
        try:
            with self._lock:
                return chat_prompt_ids(self.tokenizer, messages, self.config.model)
        except ValueError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None

    # ---- requests ------------------------------------------------------------------------

    async def completion(self, body: CompletionRequest, max_model_len: int | None) -> Prepared:
        body.check_supported()
        name = self.resolve_model(body.model)
        prompt = body.prompt_input()
        if body.logprobs is not None and body.logprobs > self.config.max_logprobs:
            raise ApiError(400, f"logprobs: at most {self.config.max_logprobs}", "logprobs", "invalid_value")
        max_tokens = self.config.default_completion_max_tokens if body.max_tokens is None else body.max_tokens
        request_sampling_params(body, max_tokens, body.logprobs, {}, "prompt")
        if isinstance(prompt, str):
            ids = await anyio.to_thread.run_sync(self._encode, prompt)
        else:
            ids = prompt
            if any(t < 0 for t in ids):
                raise ApiError(400, "prompt: token ids must be non-negative", "prompt", "invalid_value")
        self._check_context(ids, max_tokens, max_model_len, "prompt", "max_tokens")
        fields = _forwarded(body, body.logprobs)
        return Prepared(f"cmpl-{uuid.uuid4().hex}", False, name, ids, max_tokens, fields,
                        body.stream, _include_usage(body))

    async def chat(self, body: ChatCompletionRequest, max_model_len: int | None) -> Prepared:
        body.check_supported()
        name = self.resolve_model(body.model)
        messages = body.template_input()
        max_tokens, logprobs, aliases = body.limits(self.config.max_logprobs)
        request_sampling_params(body, 1 if max_tokens is None else max_tokens, logprobs, aliases, "messages")
        ids = await anyio.to_thread.run_sync(self._chat_ids, messages)
        if max_tokens is None:
            room = max_model_len - len(ids) if max_model_len else self.config.default_chat_max_tokens
            max_tokens = max(1, min(self.config.default_chat_max_tokens, room))
        self._check_context(ids, max_tokens, max_model_len, "messages", aliases.get("max_tokens", "max_tokens"))
        fields = _forwarded(body, logprobs)
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", True, name, ids, max_tokens, fields,
                        body.stream, _include_usage(body), chat_top_logprobs=logprobs)

    @staticmethod
    def _check_context(ids: list[int], max_tokens: int, max_model_len: int | None,
                       prompt_param: str, max_param: str) -> None:
        """The workers' own checks (same messages), done here so that no leg starts."""
        if not ids:
            raise ApiError(400, f"{prompt_param}: prompt is empty", prompt_param, "invalid_value")
        if max_model_len is None:
            return  # no worker reported its context yet; the decode worker checks
        if len(ids) >= max_model_len:
            raise ApiError(400, f"prompt has {len(ids)} tokens; the context is {max_model_len} tokens",
                           prompt_param, "context_length_exceeded")
        if len(ids) + max_tokens > max_model_len:
            raise ApiError(
                400, f"{max_param} {max_tokens} + prompt {len(ids)} tokens exceeds the context of "
                f"{max_model_len} tokens", max_param, "context_length_exceeded")


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _forwarded(body: SamplingFields, logprobs: int | None) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed,
        "stop": body.stop, "stop_token_ids": body.stop_token_ids, "logprobs": logprobs,
        "cache_salt": body.cache_salt,
    }
    out = {k: v for k, v in fields.items() if v is not None}
    if body.ignore_eos:
        out["ignore_eos"] = True
    if not body.skip_special_tokens:
        out["skip_special_tokens"] = False
    if body.return_token_ids:
        out["return_token_ids"] = True
    return out
