"""Client request -> what the workers are sent: validation, chat template, tokenization.

The router owns the client-facing API, so it validates with the worker's own request models
and sampling checks (same 400s, naming the same fields) before any worker is contacted, then
tokenizes once; workers only ever see token ids. Only the sampling fields the client set are
forwarded, so the workers' defaults stay the defaults.
"""

from __future__ import annotations

import json
import queue
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from kvbaton.api.fanout import Fanout, child_seed
from kvbaton.api.frontdoor import Preamble, chat_preamble, completion_preamble
from kvbaton.api.protocol import ApiError, ChatCompletionRequest, CompletionRequest, SamplingFields
from kvbaton.api.tools import Tool
from kvbaton.errors import InvalidRequestError
from kvbaton.limits import check_request_fits, default_max_tokens, max_token_chars
from kvbaton.models.grammar import GrammarCompiler
from kvbaton.models.sources import tokenizer_for_model
from kvbaton.models.tokenizer import chat_prompt_ids, chat_template_takes_tools, copy_tokenizer, encode_text
from kvbaton.router.config import RouterConfig

# Tokenizers the router keeps, one per concurrent tokenization.
TOKENIZER_COPIES = 4


@dataclass
class Prepared:
    """A validated, tokenized client request."""

    request_id: str
    chat: bool
    model: str  # the name the client asked for, echoed in responses
    prompts: list[list[int]]  # token ids of each prompt (more than one: a batch)
    max_tokens: int
    fields: dict[str, Any]  # sampling fields for the workers
    stream: bool
    include_usage: bool
    # Chat only: how many alternatives per token the client asked for (top_logprobs), or
    # None when it asked for no logprobs.
    chat_top_logprobs: int | None = None
    fan: Fanout = Fanout(1, 1, 1)
    # The client asked for logprobs (best_of runs carry them to rank the candidates anyway).
    logprobs: bool = False
    # Chat: the tools whose calls the output is parsed for (None: not parsed).
    tools: list[Tool] | None = None

    @property
    def token_ids(self) -> list[int]:
        """The (first) prompt's token ids."""
        return self.prompts[0]

    def run_fields(self, sample: int) -> dict[str, Any]:
        """The sampling fields of a run (:mod:`kvbaton.api.fanout`): its seed, and logprobs
        when ``best_of`` ranks candidates by them."""
        if self.fan.k == 1:
            return self.fields
        fields = dict(self.fields)
        if "seed" in fields:
            fields["seed"] = child_seed(fields["seed"], sample)
        if self.fan.k > self.fan.n:
            fields.setdefault("logprobs", 0)
        return fields


class Frontend:
    """Validates and tokenizes client requests (the tokenizer from ``config.model``)."""

    def __init__(self, config: RouterConfig, tokenizer: Any | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_for_model(config.model)
        # Tokenization runs on worker threads, each with a tokenizer of its own from this pool
        # (HF fast tokenizers can raise "Already borrowed" when one object is used from two
        # threads at once), so one long prompt holds one copy, not every request behind it.
        self.tokenizers = [self.tokenizer]  # all of them (the first is ``tokenizer``)
        for _ in range(TOKENIZER_COPIES - 1):
            copied = copy_tokenizer(self.tokenizer)
            if copied is None:
                break
            self.tokenizers.append(copied)
        self._tokenizers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for tok in self.tokenizers:
            self._tokenizers.put(tok)
        self.token_chars = max_token_chars(self.tokenizer)
        # Constraints are compiled here too (the workers' code), so a bad schema is the same
        # 400 before any worker is contacted.
        self.grammars = GrammarCompiler(self.tokenizer)
        self.native_tools = chat_template_takes_tools(self.tokenizer)

    # ---- tokenization (off the event loop: long prompts take milliseconds) ---------------

    @contextmanager
    def _tokenizer(self) -> Iterator[Any]:
        """A tokenizer of the pool for this thread; blocks it (not the event loop) while all
        are busy."""
        tok = self._tokenizers.get()
        try:
            yield tok
        finally:
            self._tokenizers.put(tok)

    def _encode(self, text: str) -> list[int]:
        with self._tokenizer() as tok:
            return encode_text(tok, text)

    def _chat_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        # The engine's own function, so the router's ids equal what a worker would compute.
        with self._tokenizer() as tok:
            return chat_prompt_ids(tok, messages, self.config.model, tools)

    # ---- requests ------------------------------------------------------------------------

    async def completion(self, body: CompletionRequest, max_model_len: int | None) -> Prepared:
        pre = completion_preamble(self.config, self.config.model_names, "router", body)
        pre.check_length_before_tokenizing(max_model_len, self.token_chars)
        await self._check_constraint(pre)
        prompts: list[list[int]] = []
        for prompt in pre.prompts:
            if isinstance(prompt, str):
                try:
                    ids = await anyio.to_thread.run_sync(self._encode, prompt)
                except InvalidRequestError as e:
                    raise pre.error(e) from None
            else:
                ids = list(prompt)
                if any(t < 0 for t in ids):
                    raise ApiError(400, "prompt: token ids must be non-negative", "prompt", "invalid_value")
            self._check(pre, len(ids), pre.params.max_tokens, max_model_len)
            prompts.append(ids)
        # (max_tokens 0 with echo travels as 0: the decode worker runs and trims the token.)
        max_tokens = 0 if pre.prompt_only else pre.params.max_tokens
        return Prepared(f"cmpl-{uuid.uuid4().hex}", False, pre.model, prompts, max_tokens,
                        _forwarded(body, pre), body.stream, _include_usage(body),
                        fan=pre.fan, logprobs=pre.logprobs is not None)

    async def chat(self, body: ChatCompletionRequest, max_model_len: int | None) -> Prepared:
        pre = chat_preamble(self.config, self.config.model_names, "router", body, self.native_tools)
        assert pre.messages is not None
        pre.check_length_before_tokenizing(max_model_len, self.token_chars)
        await self._check_constraint(pre)
        try:
            ids = await anyio.to_thread.run_sync(self._chat_ids, pre.messages, pre.template_tools)
        except InvalidRequestError as e:
            raise pre.error(e) from None
        max_tokens = pre.max_tokens
        if max_tokens is None:
            max_tokens = default_max_tokens(self.config.default_chat_max_tokens, len(ids), max_model_len)
        self._check(pre, len(ids), max_tokens, max_model_len)
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", True, pre.model, [ids], max_tokens,
                        _forwarded(body, pre), body.stream, _include_usage(body),
                        chat_top_logprobs=pre.logprobs, fan=pre.fan, logprobs=pre.logprobs is not None,
                        tools=pre.tools if pre.parses_tool_calls else None)

    async def _check_constraint(self, pre: Preamble) -> None:
        so = pre.constraint_to_check()
        if so is not None:
            try:
                await anyio.to_thread.run_sync(self.grammars.check, so)
            except InvalidRequestError as e:
                raise pre.error(e) from None

    @staticmethod
    def _check(pre: Preamble, num_prompt_tokens: int, max_tokens: int, max_model_len: int | None) -> None:
        """The workers' own check (:func:`kvbaton.limits.check_request_fits`), done here so
        that no leg starts; without a known context only emptiness is checked."""
        try:
            check_request_fits(num_prompt_tokens, max_tokens, max_model_len)
        except InvalidRequestError as e:
            raise pre.error(e) from None


def _include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _forwarded(body: SamplingFields, pre: Preamble) -> dict[str, Any]:
    logprobs = pre.logprobs
    fields: dict[str, Any] = {
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed,
        "stop": body.stop, "stop_token_ids": body.stop_token_ids, "logprobs": logprobs,
        "cache_salt": body.cache_salt, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty, "repetition_penalty": body.repetition_penalty,
        "min_tokens": body.min_tokens, "logit_bias": body.logit_bias or None,
        "prompt_logprobs": body.prompt_logprobs,
    }
    out = {k: v for k, v in fields.items() if v is not None}
    if body.ignore_eos:
        out["ignore_eos"] = True
    if not body.skip_special_tokens:
        out["skip_special_tokens"] = False
    if body.return_token_ids:
        out["return_token_ids"] = True
    so = pre.params.structured
    if so is not None:  # in one form, whichever field the client used
        out["structured_outputs"] = {so.kind: json.loads(so.spec) if so.kind == "choice" else so.spec}
    if isinstance(body, CompletionRequest) and body.echo:
        # The worker echoes what the prompt's token ids decode to: the prompt itself for the
        # byte-level tokenizers kvbaton serves (no special tokens are added when encoding).
        out["echo"] = True
    return out
