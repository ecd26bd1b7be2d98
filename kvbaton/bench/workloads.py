"""Workloads: seeded, reproducible sets of request sessions cut from the bench corpus.

A ``Workload`` is a list of ``Session``s; a session is one or more ``Turn``s sent one after
another. Text comes from ``kvbaton.bench.corpus`` and every length is measured in tokens of
the tokenizer passed in, without special tokens or a chat template (the server's
``usage.prompt_tokens`` adds those). The same name, tokenizer, seed, session count and options
always give the same sessions.

Workloads (``make_workload(name, ...)``; options and defaults in ``OPTIONS``):

- ``random``: one prompt per session, input/output lengths drawn uniformly within
  ``length * (1 ± range_ratio)`` as ``vllm bench serve --random-*`` does.
- ``shared-prefix``: ``num_prefixes`` long shared prefixes (system prompts, RAG documents),
  each followed by distinct questions; the sessions are spread evenly over the prefixes.
- ``multi-turn``: chat sessions of ``turns`` turns with think time between them; the runner
  sends the real answers back as history, so the context grows turn by turn. An optional
  system prompt is shared by all sessions, an optional context is private to each.
- ``mixed``: long-prompt requests interleaved with short interactive ones, tagged ``long`` /
  ``short`` (the interference case that disaggregation exists for).
- ``trace``: replay of a Mooncake-format trace (``kvbaton.bench.trace``); requests that share
  leading hash ids share the same leading text, block by block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import random
from abc import ABC, abstractmethod
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbaton.bench.corpus import KINDS, SAMPLE_TRACE, TextSampler, head_text
from kvbaton.bench.trace import read_mooncake_trace


@dataclass(frozen=True)
class Turn:
    """One request of a session: the user's text and how many tokens to ask for."""

    user: str  # completions mode: appended to the prompt
    max_tokens: int  # the runner sends ignore_eos so servers that support it generate exactly this
    think_time_s: float = 0.0  # pause after the previous turn's answer before this turn is sent
    # ``user``'s token ids under the workload's tokenizer, where the workload had them anyway
    # (the random workload counts every prompt): the simulator then need not tokenize it again.
    # None: not known. Kept compact (4 bytes a token) and out of comparisons.
    user_ids: array[int] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Session:
    """A sequence of turns sharing one conversation.

    ``prefix`` is shared leading text: the system message in chat mode, the start of the prompt
    in completions mode. ``arrival_s`` fixes the arrival offset from the start of the run
    (trace replay); None lets the load generator decide. ``tags`` name a class of session
    (``long`` / ``short`` in the mixed workload) so metrics can be split by it.
    """

    session_id: str
    turns: tuple[Turn, ...]
    prefix: str = ""
    arrival_s: float | None = None
    tags: tuple[str, ...] = ()


class Workload(ABC):
    """A named, seeded source of sessions."""

    name: str

    @abstractmethod
    def sessions(self, *, ids_only: bool = False) -> list[Session]:
        """The sessions, in the order they should be offered; identical for the same seed.

        ``ids_only``: the caller needs token ids, not text (the simulator). A workload may then
        skip making text where that is what costs: a turn comes with ``user_ids`` and an empty
        ``user``. The draws are the same, so the sessions are the same requests."""


# ---------------------------------------------------------------------------------------
# Options: one frozen dataclass per workload; make_workload checks names, types and ranges.


@dataclass(frozen=True)
class RandomOptions:
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0
    kind: str = "any"  # corpus text: "prose", "code" or "any" (drawn per prompt)


@dataclass(frozen=True)
class SharedPrefixOptions:
    num_prefixes: int = 4
    prefix_len: int = 2048
    question_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0  # applies to question and output lengths; prefixes are exact
    kind: str = "prose"


@dataclass(frozen=True)
class MultiTurnOptions:
    turns: int = 4
    user_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0
    think_time: float = 1.0  # mean seconds between an answer and the next turn
    think_time_dist: str = "exponential"  # "constant", "exponential" or "uniform" on [0, 2*mean]
    system_len: int = 0  # tokens of one system prompt shared by every session (0: none)
    # Tokens of a context private to each session (the document or user history the chat is
    # about, as in LMCache's multi-round QA benchmark), after the system prompt (0: none).
    context_len: int = 0
    kind: str = "prose"


@dataclass(frozen=True)
class MixedOptions:
    long_fraction: float = 0.2
    long_input_len: int = 4096
    long_output_len: int = 32
    short_input_len: int = 128
    short_output_len: int = 128
    range_ratio: float = 0.0
    kind: str = "any"


@dataclass(frozen=True)
class TraceOptions:
    trace_file: str = str(SAMPLE_TRACE)
    block_size: int = 512  # tokens per hash id; Mooncake's traces use 512
    kind: str = "any"  # text of each hash id's block ("any": prose or code, chosen per id)


THINK_DISTS = ("constant", "exponential", "uniform")
# Lowest value of each numeric option not listed at 0. Texts that end with a newline (shared
# prefixes, multi-turn user turns) need 2 tokens: the newline is one of its own.
_MINIMUM = {"input_len": 1, "output_len": 1, "num_prefixes": 1, "prefix_len": 2,
            "question_len": 1, "turns": 1, "user_len": 2, "long_input_len": 1,
            "long_output_len": 1, "short_input_len": 1, "short_output_len": 1, "block_size": 2}


def _parse_options(workload: str, cls: type, options: dict[str, Any]) -> Any:
    """``options`` as ``cls``: unknown names, wrong types and out-of-range values raise a
    ValueError that names the option."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for workload {workload!r} "
                         f"(options: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for name, value in options.items():
        default = fields[name].default
        if isinstance(default, str) and isinstance(value, os.PathLike):
            value = os.fspath(value)
        ok = (isinstance(value, type(default)) and not isinstance(value, bool)) or (
            isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)
        )
        if not ok:
            raise ValueError(f"option {name!r} must be {type(default).__name__}, got {value!r}")
        if isinstance(value, (int, float)):
            low = _MINIMUM.get(name, 0)
            if not (math.isfinite(value) and value >= low):
                raise ValueError(f"option {name!r} must be a finite number >= {low}, got {value!r}")
            value = float(value) if isinstance(default, float) else int(value)  # `ok`: an int or float field
        values[name] = value
    opts = cls(**values)
    if "range_ratio" in fields and not opts.range_ratio < 1:
        raise ValueError(f"option 'range_ratio' must be in [0, 1), got {opts.range_ratio}")
    if "long_fraction" in fields and not opts.long_fraction <= 1:
        raise ValueError(f"option 'long_fraction' must be in [0, 1], got {opts.long_fraction}")
    if "think_time_dist" in fields and opts.think_time_dist not in THINK_DISTS:
        raise ValueError(f"option 'think_time_dist' must be one of {', '.join(THINK_DISTS)}, "
                         f"got {opts.think_time_dist!r}")
    for name in ("system_len", "context_len"):
        if getattr(opts, name, 0) == 1:
            raise ValueError(f"option {name!r} must be 0 (none) or >= 2, got 1")
    if "kind" in fields and opts.kind not in (*KINDS, "any"):
        raise ValueError(f"option 'kind' must be one of {', '.join((*KINDS, 'any'))}, "
                         f"got {opts.kind!r}")
    return opts


def draw_length(rng: random.Random, length: int, range_ratio: float) -> int:
    """A length uniform on ``[length * (1 - r), length * (1 + r)]`` (at least 1), as vLLM's
    ``--random-range-ratio``."""
    lo = max(1, math.floor(length * (1 - range_ratio)))
    hi = max(lo, math.ceil(length * (1 + range_ratio)))
    return rng.randint(lo, hi)


class _CorpusWorkload(Workload):
    """Shared plumbing: a seeded rng, lazily built samplers, sessions built once."""

    def __init__(self, tokenizer: Any, seed: int, num_sessions: int, options: Any) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.num_sessions = num_sessions
        self.options = options
        self._samplers: dict[str, TextSampler] = {}
        self._sessions: dict[bool, list[Session]] = {}  # by ids_only

    def sampler(self, kind: str, rng: random.Random) -> TextSampler:
        """The sampler of ``kind``; "any" draws prose or code with ``rng``."""
        if kind == "any":
            kind = rng.choice(KINDS)
        if kind not in self._samplers:
            self._samplers[kind] = TextSampler(self.tokenizer, kind)
        return self._samplers[kind]

    def sessions(self, *, ids_only: bool = False) -> list[Session]:
        if ids_only not in self._sessions:
            # The name is mixed into the seed so two workloads never draw the same stream.
            digest = hashlib.sha256(f"{self.name}:{self.seed}".encode()).digest()
            self._sessions[ids_only] = self._build(random.Random(int.from_bytes(digest[:8], "big")), ids_only)
        return list(self._sessions[ids_only])

    @abstractmethod
    def _build(self, rng: random.Random, ids_only: bool) -> list[Session]:
        """Generate the sessions from ``rng`` (called once per ``ids_only``; see ``sessions``:
        a workload whose text is cheap ignores it)."""


class RandomWorkload(_CorpusWorkload):
    name = "random"

    def _build(self, rng: random.Random, ids_only: bool) -> list[Session]:
        o: RandomOptions = self.options
        # The rng draws in the order one sample() per session would make them; the texts are
        # then cut per sampler in one batch (TextSampler.sample_many: the same texts, faster).
        draws = []
        for _ in range(self.num_sessions):
            n_in = draw_length(rng, o.input_len, o.range_ratio)
            n_out = draw_length(rng, o.output_len, o.range_ratio)
            sampler = self.sampler(o.kind, rng)
            draws.append((sampler, rng.randrange(len(sampler.stream)), n_in, n_out))
        if ids_only:  # counting every text's tokens is what costs (minutes for a simulated hour)
            return [Session(f"random-{i}", (Turn("", n_out, user_ids=sampler.ids_at(start, n_in)),))
                    for i, (sampler, start, n_in, n_out) in enumerate(draws)]
        cut: list[tuple[str, list[int] | None]] = [("", None)] * len(draws)
        for sampler in {id(d[0]): d[0] for d in draws}.values():
            mine = [i for i, d in enumerate(draws) if d[0] is sampler]
            for i, got in zip(mine, sampler.sample_many([(draws[i][1], draws[i][2]) for i in mine])):
                cut[i] = got
        return [Session(f"random-{i}", (Turn(text, d[3], user_ids=None if ids is None else array("I", ids)),))
                for i, ((text, ids), d) in enumerate(zip(cut, draws))]


class SharedPrefixWorkload(_CorpusWorkload):
    name = "shared-prefix"

    def _build(self, rng: random.Random, ids_only: bool) -> list[Session]:
        o: SharedPrefixOptions = self.options
        prefixes = self._prefixes(rng, o)
        # Even spread over the prefixes, offered in a shuffled order so groups interleave.
        groups = [i % o.num_prefixes for i in range(self.num_sessions)]
        rng.shuffle(groups)
        out = []
        for i, g in enumerate(groups):
            # A question starts with a non-blank character and the prefix ends with one
            # newline, so the prefix's tokens are a prefix of the whole prompt's tokens.
            question = self.sampler(o.kind, rng).sample(
                draw_length(rng, o.question_len, o.range_ratio), rng)
            n_out = draw_length(rng, o.output_len, o.range_ratio)
            out.append(Session(f"shared-prefix-{g}-{i}", (Turn(question, n_out),),
                               prefix=prefixes[g]))
        return out

    def _prefixes(self, rng: random.Random, o: SharedPrefixOptions) -> list[str]:
        # One stratum of the corpus per prefix, so prefixes are distinct documents rather
        # than overlapping windows (when the corpus is long enough for that).
        sampler = self.sampler(o.kind, rng)
        stratum = len(sampler.stream) // o.num_prefixes
        out = []
        for g in range(o.num_prefixes):
            start = (g * stratum + rng.randrange(max(1, stratum - o.prefix_len))
                     if stratum > o.prefix_len else rng.randrange(len(sampler.stream)))
            out.append(sampler.sample_at(start, o.prefix_len, line_end=True))
        return out


class MultiTurnWorkload(_CorpusWorkload):
    name = "multi-turn"

    def _think(self, rng: random.Random) -> float:
        o: MultiTurnOptions = self.options
        if o.think_time_dist == "constant":
            return o.think_time
        if o.think_time_dist == "uniform":
            return rng.uniform(0.0, 2 * o.think_time)
        return rng.expovariate(1 / o.think_time) if o.think_time > 0 else 0.0

    def _build(self, rng: random.Random, ids_only: bool) -> list[Session]:
        o: MultiTurnOptions = self.options
        system = (self.sampler(o.kind, rng).sample(o.system_len, rng, line_end=True)
                  if o.system_len else "")
        out = []
        for i in range(self.num_sessions):
            # Both texts end with a newline, so the system prompt's tokens stay a prefix of
            # every session's and each context's tokens a prefix of its session's turns.
            context = (self.sampler(o.kind, rng).sample(o.context_len, rng, line_end=True)
                       if o.context_len else "")
            turns = []
            for t in range(o.turns):
                # Each user turn ends with a newline so the answer starts on a fresh line.
                n_user = max(2, draw_length(rng, o.user_len, o.range_ratio))  # see _MINIMUM
                user = self.sampler(o.kind, rng).sample(n_user, rng, line_end=True)
                n_out = draw_length(rng, o.output_len, o.range_ratio)
                turns.append(Turn(user, n_out, self._think(rng) if t else 0.0))
            out.append(Session(f"multi-turn-{i}", tuple(turns), prefix=system + context))
        return out


class MixedWorkload(_CorpusWorkload):
    name = "mixed"

    def _build(self, rng: random.Random, ids_only: bool) -> list[Session]:
        o: MixedOptions = self.options
        n_long = round(self.num_sessions * o.long_fraction)
        is_long = [i < n_long for i in range(self.num_sessions)]
        rng.shuffle(is_long)
        out = []
        for i, long in enumerate(is_long):
            n_in, n_out = ((o.long_input_len, o.long_output_len) if long
                           else (o.short_input_len, o.short_output_len))
            n_in = draw_length(rng, n_in, o.range_ratio)
            n_out = draw_length(rng, n_out, o.range_ratio)
            sampler = self.sampler(o.kind, rng)
            turn = (Turn("", n_out, user_ids=sampler.sample_ids(n_in, rng)) if ids_only
                    else Turn(sampler.sample(n_in, rng), n_out))
            out.append(Session(f"mixed-{i}", (turn,), tags=("long" if long else "short",)))
        return out


class TraceWorkload(_CorpusWorkload):
    """Replays a Mooncake-format trace: one single-turn session per record, in file order.

    The text of hash id ``k`` is a ``block_size``-token corpus window at an offset derived
    from ``(seed, k)``, ending with a newline so blocks concatenate without merging tokens;
    the last block is cut to the record's ``input_length`` by taking the head of its text. The whole
    prompt is the turn's text and ``prefix`` stays empty, so in chat mode too the shared
    blocks lead the prompt. Arrivals are the timestamps in seconds after the first record;
    the runner's ``time_scale`` stretches them. ``num_sessions`` caps how many records run.
    """

    name = "trace"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._full_blocks: dict[int, str] = {}

    def _build(self, rng: random.Random, ids_only: bool) -> list[Session]:
        o: TraceOptions = self.options
        records = read_mooncake_trace(Path(o.trace_file), block_size=o.block_size)
        records = records[: self.num_sessions]
        t0 = records[0].timestamp_ms if records else 0.0
        out = []
        for i, r in enumerate(records):
            full = [self._block(k) for k in r.hash_ids[:-1]]
            tail_len = r.input_length - o.block_size * (len(r.hash_ids) - 1)
            text = "".join(full) + self._block(r.hash_ids[-1], tail_len)
            out.append(Session(f"trace-{i}", (Turn(text, max(1, r.output_length)),),
                               arrival_s=(r.timestamp_ms - t0) / 1000.0))
        return out

    def _block(self, hash_id: int, n: int | None = None) -> str:
        """Text of hash id ``hash_id``: its full block, or its first ``n`` tokens."""
        o: TraceOptions = self.options
        full = self._full_blocks.get(hash_id)
        if full is None:
            digest = hashlib.sha256(f"trace-block:{self.seed}:{hash_id}".encode()).digest()
            pick = random.Random(int.from_bytes(digest[:8], "big"))
            sampler = self.sampler(o.kind, pick)
            full = sampler.sample_at(pick.randrange(len(sampler.stream)), o.block_size,
                                     line_end=True)
            self._full_blocks[hash_id] = full
        # A partial block is the head of the full one, so it shares those tokens with it.
        return full if n is None or n >= o.block_size else head_text(self.tokenizer, full, n)


_WORKLOADS: dict[str, tuple[type[_CorpusWorkload], type]] = {
    "random": (RandomWorkload, RandomOptions),
    "shared-prefix": (SharedPrefixWorkload, SharedPrefixOptions),
    "multi-turn": (MultiTurnWorkload, MultiTurnOptions),
    "mixed": (MixedWorkload, MixedOptions),
    "trace": (TraceWorkload, TraceOptions),
}
WORKLOAD_NAMES = tuple(_WORKLOADS)
# name -> {option: default}, for help texts.
OPTIONS: dict[str, dict[str, Any]] = {
    name: {f.name: f.default for f in dataclasses.fields(opts)}
    for name, (_, opts) in _WORKLOADS.items()
}


def make_workload(name: str, *, tokenizer: Any, seed: int, num_sessions: int,
                  **options: Any) -> Workload:
    """The workload ``name`` with its ``options`` (see ``OPTIONS``); ValueError naming the
    workload, ``seed``, ``num_sessions`` or the option that is wrong."""
    if name not in _WORKLOADS:
        raise ValueError(f"unknown workload {name!r} (workloads: {', '.join(WORKLOAD_NAMES)})")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not isinstance(num_sessions, int) or isinstance(num_sessions, bool) or num_sessions < 1:
        raise ValueError(f"num_sessions must be an integer >= 1, got {num_sessions!r}")
    cls, opts_cls = _WORKLOADS[name]
    return cls(tokenizer, seed, num_sessions, _parse_options(name, opts_cls, options))


def load_tokenizer(name_or_path: str | None) -> Any:
    """The tokenizer lengths are measured with.

    None: the bundled SmolLM2 tokenizer; "tiny-random" (or any other random-weight model name)
    the byte tokenizer those models use; otherwise a model name, GGUF file or HF directory
    as ``kvbaton.models.sources.resolve_model_dir`` accepts.
    """
    from kvbaton.models.sources import tokenizer_for_model

    return tokenizer_for_model(name_or_path)

