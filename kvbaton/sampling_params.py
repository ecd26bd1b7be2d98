"""SamplingParams: how one request picks its tokens and when it stops (shared by the engine,
the worker and router APIs, and the simulator; it imports nothing heavy)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvbaton.errors import InvalidRequestError

_GREEDY_EPS = 1e-5


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# The kinds of constraint a structured output can have (see StructuredOutput).
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match (structured outputs, kvbaton.models.grammar).

    ``kind`` is ``json`` (``spec``: a JSON schema as text; ``{"type": "object"}`` for any JSON
    object), ``regex`` (a regular expression), ``choice`` (a JSON list of strings, one of which
    is the whole output) or ``grammar`` (a Lark or GBNF grammar). ``param`` is the request
    field it came from, which errors name (``response_format``, ``guided_json``, ...).
    """

    kind: str
    spec: str
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(self.param, f"unknown constraint kind {self.kind!r}; one of {STRUCTURED_KINDS}")
        if not isinstance(self.spec, str) or not self.spec:
            raise InvalidRequestError(self.param, "the constraint must be a non-empty string")


@dataclass
class SamplingParams:
    """Per-request sampling settings, validated at construction.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those filters.
    ``logprobs``: None for none, 0 for the sampled token's log-probability only, k > 0 to also
    return the k most likely tokens at each step.

    Logit controls, with vLLM's names and semantics, applied per request in this order before
    temperature, top-k and top-p (greedy takes the argmax of the adjusted logits):

    - ``logit_bias``: token id -> value in [-100, 100] added to that token's logit (OpenAI's);
      ids must be below the model's vocabulary size, which the engine checks.
    - ``min_tokens``: until this many tokens are generated, EOS (unless ``ignore_eos``) and
      ``stop_token_ids`` cannot be sampled and stop strings are not checked.
    - ``repetition_penalty`` (> 0, 1 = off): every token seen in the prompt or the output has
      its logit divided by it when positive and multiplied by it when negative (HF's and vLLM's).
    - ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2], OpenAI's): over the output
      tokens so far, ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.

    Reported logprobs (``logprobs``, ``prompt_logprobs``) are those of the raw model logits,
    never of the adjusted ones (vLLM's default). ``prompt_logprobs``: None for none, k >= 0 to
    return each prompt token's log-probability given the tokens before it, plus the k most
    likely tokens there (a request that asks computes its whole prompt: it never reads it from
    the prefix cache).

    ``structured``: the output must match this constraint (a JSON schema, a regex, a choice, a
    grammar); the engine masks every token the constraint does not allow and ends the request
    when it is complete.

    Invalid values raise :class:`~kvbaton.errors.InvalidRequestError` naming the field, which
    servers answer with a 400. Torch-free: the router validates with it too.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidRequestError("structured_outputs", "must be a StructuredOutput")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        # Finite and in range: NaN passes a plain `< 0` test and would reach the sampler as NaN
        # probabilities (JSON bodies may carry NaN and Infinity).
        if (not _is_number(self.temperature) or not math.isfinite(self.temperature)
                or self.temperature < 0):
            raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k):
            raise InvalidRequestError("top_k", f"must be an integer, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise InvalidRequestError("seed", f"must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise InvalidRequestError("logprobs", f"must be None or an integer >= 0, got {self.logprobs!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop", "must be a list of non-empty strings")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", "must be a list of non-negative integers")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or not -2 <= v <= 2:
                raise InvalidRequestError(name, f"must be a number in [-2, 2], got {v!r}")
        rp = self.repetition_penalty
        if not _is_number(rp) or not math.isfinite(rp) or rp <= 0:
            raise InvalidRequestError("repetition_penalty", f"must be a finite number > 0, got {rp!r}")
        self.logit_bias = self._checked_logit_bias(self.logit_bias)
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                "min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or self.prompt_logprobs < 0):
            raise InvalidRequestError(
                "prompt_logprobs", f"must be None or an integer >= 0, got {self.prompt_logprobs!r}"
            )

    @staticmethod
    def _checked_logit_bias(bias: Any) -> dict[int, float]:
        if bias is None:  # OpenAI's clients send null for "none"
            return {}
        if not isinstance(bias, dict):
            raise InvalidRequestError("logit_bias", f"must be a mapping of token id to bias, got {bias!r}")
        out: dict[int, float] = {}
        for tok, v in bias.items():
            # Integer keys only: a JSON body's string keys are the API layer's to convert, so
            # that "1.5" or " 7" never quietly becomes a token id here.
            if not _is_int(tok) or tok < 0:
                raise InvalidRequestError("logit_bias", f"keys must be token ids (integers >= 0), got {tok!r}")
            if not _is_number(v) or not math.isfinite(v) or not -100 <= v <= 100:
                raise InvalidRequestError("logit_bias", f"values must be numbers in [-100, 100], got {v!r} for {tok}")
            out[tok] = float(v)
        return out

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler must adjust this request's logits (any of ``logit_bias``,
        ``min_tokens``, or the repetition, frequency and presence penalties is set). When no
        request in a batch does, sampling costs what it did before these controls existed."""
        return bool(
            self.logit_bias or self.min_tokens or self.repetition_penalty != 1.0
            or self.frequency_penalty or self.presence_penalty
        )

