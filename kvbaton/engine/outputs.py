"""What the engine returns to callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvbaton.engine.kv_handoff import LeaseInfo


@dataclass
class RequestOutput:
    """The state of one request after a step (``finished`` tells whether it is final).

    ``new_token_ids`` are the tokens this step added. Text is only given whole: a streaming
    consumer must hold back text that a later token could still change (a stop string, a
    half-decoded character), which ``kvbaton.worker`` does.

    ``prompt_logprobs`` (when the request's params ask): one entry per prompt position, None at
    position 0 (no context), else ``{token_id: logprob}`` holding the actual prompt token first
    and the ``prompt_logprobs`` most likely tokens there, under the raw model. It is set on
    every output once the prompt has run (None before: an error or abort during the prefill),
    and every output of a request carries the same list: treat it as read-only.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    num_cached_tokens: int = 0
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    new_token_ids: list[int] = field(default_factory=list)
    kv_lease: LeaseInfo | None = None  # prefill-only requests: the lease on the prompt's KV
    error: str | None = None  # finish_reason "error": what failed (the step running it raised)
