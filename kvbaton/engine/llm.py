"""LLM: the offline, batch API (``from kvbaton import LLM, SamplingParams``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any, cast

from kvbaton.engine.config import EngineConfig
from kvbaton.engine.engine import LLMEngine
from kvbaton.engine.outputs import RequestOutput
from kvbaton.sampling_params import SamplingParams

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
    """Generate for a batch of prompts with continuous batching and prefix caching.

    Keyword arguments are those of :class:`EngineConfig` (``dtype``, ``device``,
    ``block_size``, ``num_kv_blocks``, ``max_num_seqs``, ``max_num_batched_tokens``,
    ``enable_prefix_caching``, ...).
    """

    def __init__(self, model: str = "smollm2-135m", **kwargs: Any) -> None:
        allowed = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"unknown LLM arguments: {sorted(unknown)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def close(self) -> None:
        """Finish the tiered KV store's queued copies and release it (a disk tier keeps what
        it has for the next start). Idempotent; the ``with`` statement calls it."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order.

        ``prompts`` is a string, a list of token ids, or a list of either.
        """
        plist: list[Prompt]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            plist = [cast(Prompt, prompts)]  # one prompt: text or token ids
        else:
            plist = list(cast(Sequence[Prompt], prompts))
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(plist)
        else:
            params = list(sampling_params)
            if len(params) != len(plist):
                raise ValueError("need one SamplingParams per prompt")
        order: dict[str, int] = {}
        try:
            for i, (p, sp) in enumerate(zip(plist, params)):
                order[self.engine.add_request(p, sp, cache_salt=cache_salt)] = i
            results: list[RequestOutput | None] = [None] * len(plist)
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
        except BaseException:
            for rid in order:
                self.engine.abort_request(rid)
            raise
        return [r for r in results if r is not None]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then ``generate``."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(list(c)) for c in convs]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, cache_salt)

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        """Token ids of a conversation followed by the assistant's generation prompt."""
        return self.engine.apply_chat_template(messages)
