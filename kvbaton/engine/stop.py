"""When a request stops: the one rule the engine applies after every sampled token, as a pure
function, so a simulator that samples no text can apply the same rule (it passes no text).

Order of checks, first match wins: an end-of-sequence token (unless ``ignore_eos``), one of the
request's ``stop_token_ids``, one of its ``stop`` strings in the new text (the text is cut
before it), then the length limits (``max_tokens`` output tokens, or the context full). While a
request has fewer than ``min_tokens`` output tokens only the length limits apply (the sampler
also keeps EOS and ``stop_token_ids`` from being sampled until then, as vLLM does).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from kvbaton.sampling_params import SamplingParams


@dataclass(frozen=True)
class StopDecision:
    """Why a request ends: ``reason`` is ``stop`` or ``length``; ``stop_reason`` the stop
    string or token id that ended it (None for EOS and length); ``text`` the output text cut
    before the stop string when a stop string matched, else None (unchanged)."""

    reason: str
    stop_reason: str | int | None = None
    text: str | None = None


def find_stop_string(text: str, prev_text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """``(index, stop)`` of the first stop string in the part of ``text`` that a new token
    could have completed; None when there is none."""
    for s in stops:
        # Only the tail can hold a new match (a few chars of slack: a half-decoded UTF-8
        # character at the old end can be rewritten by the next token).
        idx = text.find(s, max(0, len(prev_text) - len(s) - 3))
        if idx >= 0:
            return idx, s
    return None


def check_stop(
    params: SamplingParams,
    last_token: int,
    num_output_tokens: int,
    num_tokens: int,
    max_model_len: int,
    eos_token_ids: Collection[int],
    text: str | None = None,
    prev_text: str = "",
) -> StopDecision | None:
    """The stop decision after ``last_token`` was sampled, or None to go on.

    ``num_output_tokens`` and ``num_tokens`` count ``last_token``; ``text`` is the output text
    so far (None when not detokenized: stop strings are then not checked, which is exact
    whenever the request has none), ``prev_text`` the text before ``last_token``.
    """
    if num_output_tokens >= params.min_tokens:  # before that only the length limits apply
        if not params.ignore_eos and last_token in eos_token_ids:
            return StopDecision("stop")
        if last_token in params.stop_token_ids:
            return StopDecision("stop", last_token)
        if text is not None and params.stop:
            hit = find_stop_string(text, prev_text, params.stop)
            if hit is not None:
                return StopDecision("stop", hit[1], text[: hit[0]])
    if num_output_tokens >= params.max_tokens or num_tokens >= max_model_len:
        return StopDecision("length")
    return None
