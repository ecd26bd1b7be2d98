"""Grammars for structured outputs: a request's constraint (a :class:`Constraint`, such as
:class:`kvbaton.sampling_params.StructuredOutput`) compiled against a tokenizer, with llguidance.

Why llguidance (measured on this machine, SmolLM2's 49k-token vocabulary; docs/worker.md,
"Structured outputs"): a 3 MB wheel without dependencies (xgrammar pulls torch and a 286 MB
triton), a JSON-schema token mask in 7.6 us p50, compilation in under 1 ms
(benchmarks/grammar_libraries.py), and schema,
regex and grammar errors reported as text without raising. Torch-free, so the router
validates constraints with the same code the workers run.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import llguidance
import llguidance.hf

from kvbaton.errors import InvalidRequestError


class Constraint(Protocol):
    """What an output must match: ``kind`` (``json``, ``regex``, ``choice``, ``grammar``),
    ``spec`` (its text) and ``param`` (the request field errors name)."""

    @property
    def kind(self) -> str: ...

    @property
    def spec(self) -> str: ...

    @property
    def param(self) -> str: ...

# Compiled constraints kept per compiler (least recently used out): agents send the same
# schema again and again.
CACHE_SIZE = 256


def grammar_text(so: Constraint) -> str:
    """llguidance's grammar for a constraint; InvalidRequestError naming ``so.param`` if its
    text is malformed (a schema that is not JSON, a choice that is not a list of strings)."""
    if so.kind == "json":
        try:
            schema = json.loads(so.spec)
        except ValueError as e:
            raise InvalidRequestError(so.param, f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidRequestError(so.param, "a JSON schema must be an object")
        # Compact JSON, no stray whitespace: a model that may emit whitespace forever between
        # tokens (small models do) would otherwise run out its max_tokens on it.
        if isinstance(schema, dict):
            schema = closed_objects(schema)
            options = {"whitespace_flexible": False, **schema.get("x-guidance", {})}
            schema = {**schema, "x-guidance": options}
        return str(llguidance.grammar_from("json_schema", json.dumps(schema)))
    if so.kind == "choice":
        try:
            choices = json.loads(so.spec)
        except ValueError:
            choices = None
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise InvalidRequestError(so.param, "a choice must be a non-empty list of strings")
        return str(llguidance.grammar_from("choice", json.dumps(choices)))
    try:
        if so.kind == "regex":
            return str(llguidance.grammar_from("regex", so.spec))
        return str(llguidance.grammar_from("grammar", so.spec))
    except ValueError as e:
        raise InvalidRequestError(so.param, f"invalid {so.kind}: {e}") from None


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object that lists
    ``properties`` and says nothing about others, as vLLM's default backend (xgrammar's strict
    mode) and OpenAI's strict mode treat them: a model asked for ``{name, age}`` must not add
    ``"occupation"`` (llguidance, reading the schema literally, lets it)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and not {"additionalProperties", "patternProperties",
                                                             "unevaluatedProperties"} & set(schema):
        out["additionalProperties"] = False
    return out


class GrammarCompiler:
    """Compiles constraints for one tokenizer and hands out matchers (llguidance ``LLMatcher``:
    the state of one request's output against its constraint).

    ``vocab_size`` is the model's (its logits may have more rows than the tokenizer has
    tokens); ``eos_token_ids`` end a complete output. Building the token table took ~0.3 s (ad hoc)
    for a 49k vocabulary, so it is built on first use. Thread-safe: the router checks
    constraints from several threads.
    """

    def __init__(self, tokenizer: Any, vocab_size: int | None = None,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        self._hf = tokenizer
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids) if eos_token_ids else None
        self._tok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tok is None:
                self._tok = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self._eos)
            return self._tok

    def matcher(self, so: Constraint) -> llguidance.LLMatcher:
        """A fresh matcher for ``so`` (a copy of the compiled one); InvalidRequestError naming
        ``so.param`` when the constraint does not compile (an unsupported schema, a regex or
        grammar with an error), with llguidance's message."""
        return self._compiled(so).deep_copy()

    def check(self, so: Constraint) -> None:
        """Compile ``so`` (kept for the matchers that follow); raise what :meth:`matcher`
        would for a constraint that does not compile."""
        self._compiled(so)

    def _compiled(self, so: Constraint) -> llguidance.LLMatcher:
        """The pristine matcher of ``so``: from the cache, or compiled and cached."""
        key = (so.kind, so.spec)
        tok = self.tokenizer
        with self._lock:
            pristine = self._cache.get(key)
            if pristine is not None:
                self._cache.move_to_end(key)
                return pristine
        grammar = grammar_text(so)
        error = llguidance.LLMatcher.validate_grammar(grammar, tok)
        if error:
            raise InvalidRequestError(so.param, f"the {so.kind} constraint does not compile: {_first_lines(error)}")
        pristine = llguidance.LLMatcher(tok, grammar, log_level=0)
        if pristine.is_error():
            raise InvalidRequestError(so.param, f"the {so.kind} constraint does not compile: "
                                      f"{_first_lines(pristine.get_error())}")
        with self._lock:
            self._cache[key] = pristine
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return pristine


def _first_lines(text: str, limit: int = 400) -> str:
    text = " ".join(line.strip() for line in str(text).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + "..."
