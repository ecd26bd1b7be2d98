"""The bundled bench corpus and token-level sampling from it.

The corpus is English prose (the Python language/library reference, licence texts) and
source code (Python standard-library modules), committed under ``kvbaton/bench/data/`` with a
manifest of sources, sizes and checksums; ``scripts/build_corpus.py`` rebuilds it and
``docs/bench-corpus.md`` says where each part comes from. Because the built file is committed,
every machine samples the same text whatever Python it runs.

Prompts are cut from it by token count under the tokenizer being benchmarked: each kind is
tokenized once as one stream (documents joined by a blank line) and ``TextSampler`` turns a
seeded window of that stream back into text that re-tokenizes to the requested length.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Loaded by path next to this module so an editable install needs no package-data entry.
DATA_DIR = Path(__file__).resolve().parent / "data"
KINDS = ("prose", "code")
SAMPLE_TRACE = DATA_DIR / "sample_trace.jsonl"
_DOC_SEPARATOR = "\n\n"


class CorpusError(ValueError):
    """The corpus files are missing or do not match their manifest."""


@dataclass(frozen=True)
class Document:
    """One corpus document: ``kind`` is "prose" or "code"; ``source`` says where it came from."""

    id: str
    kind: str
    source: str
    licence: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """All documents, sorted by id, and the manifest they were checked against."""

    documents: tuple[Document, ...]
    manifest: dict[str, Any]

    def of_kind(self, kind: str) -> tuple[Document, ...]:
        """The documents of one kind; ValueError naming ``kind`` if it is unknown."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return tuple(d for d in self.documents if d.kind == kind)

    def stream_text(self, kind: str) -> str:
        """All documents of ``kind`` joined by a blank line: the text token streams cut from."""
        return _DOC_SEPARATOR.join(d.text for d in self.of_kind(kind))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_corpus(data_dir: Path = DATA_DIR) -> Corpus:
    """Read and verify a corpus directory (``manifest.json`` + the file it names).

    Checks the file's sha256 and, per document, its id, kind, byte size and sha256, so a
    truncated or edited corpus fails here rather than skewing a benchmark.
    """
    manifest_path = data_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        blob = (data_dir / manifest["file"]).read_bytes()
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise CorpusError(f"cannot read the corpus in {data_dir}: {e}") from e
    if _sha256(blob) != manifest.get("file_sha256"):
        raise CorpusError(f"{manifest['file']} does not match the sha256 in {manifest_path}")
    rows = [json.loads(line) for line in gzip.decompress(blob).decode("utf-8").splitlines()]
    expected = manifest.get("documents", [])
    if len(rows) != len(expected):
        raise CorpusError(f"corpus has {len(rows)} documents, manifest lists {len(expected)}")
    docs = []
    for row, entry in zip(rows, expected):
        raw = row["text"].encode("utf-8")
        if (row["id"], row["kind"], len(raw), _sha256(raw)) != (
            entry["id"], entry["kind"], entry["bytes"], entry["sha256"]
        ):
            raise CorpusError(f"document {row['id']!r} does not match its manifest entry")
        docs.append(Document(row["id"], row["kind"], row["source"], row["licence"], row["text"]))
    return Corpus(tuple(docs), manifest)


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """The bundled corpus, verified once per process."""
    return read_corpus(DATA_DIR)


class TokenStream:
    """One text tokenized as a whole, with each token's character span.

    Spans (from a fast tokenizer's offset mapping) let a token window be cut from the original
    string, so a window never splits a character the way decoding raw byte tokens can.
    """

    def __init__(self, tokenizer: Any, text: str) -> None:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        self.text = text
        self.ids: list[int] = list(enc["input_ids"])
        self.spans: list[tuple[int, int]] = [tuple(s) for s in enc["offset_mapping"]]

    def __len__(self) -> int:
        return len(self.ids)

    def window_text(self, start: int, n: int) -> str:
        """The source text covering tokens ``[start, start + n)``."""
        end = min(start + n, len(self.ids)) - 1
        return self.text[self.spans[start][0] : self.spans[end][1]]


_STREAMS: dict[tuple[int, str], tuple[Any, TokenStream]] = {}


def token_stream(tokenizer: Any, kind: str) -> TokenStream:
    """The bundled corpus's ``kind`` stream under ``tokenizer``, built once per tokenizer."""
    key = (id(tokenizer), kind)
    hit = _STREAMS.get(key)
    if hit is None or hit[0] is not tokenizer:  # the id of a dead tokenizer can be reused
        hit = (tokenizer, TokenStream(tokenizer, load_corpus().stream_text(kind)))
        _STREAMS[key] = hit
    return hit[1]


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens in ``text`` without special tokens: how every length here is measured."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def head_text(tokenizer: Any, text: str, n: int) -> str:
    """The start of ``text`` that covers its first ``n`` tokens (all of it if it has fewer), so
    a shorter piece is a true prefix of a longer one, token for token."""
    spans = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if n >= len(spans) else text[: spans[n - 1][1]]


class TextSampler:
    """Cuts seeded windows of the corpus into text of an exact token length.

    ``sample(n, rng)`` starts at a random token that begins a non-blank character, cuts about
    ``n`` tokens of source text, re-tokenizes it and grows or shrinks the window until the text
    is exactly ``n`` tokens, moving the start a token on if a boundary merge makes ``n``
    unreachable there (the closest text is kept if no start works, which is rare and off by
    a token or two). With ``line_end=True`` the text ends with a
    single newline after a non-blank character and starts with a non-blank one, so pieces can
    be concatenated without tokens merging across the seam (for byte-level BPE tokenizers:
    ``tokenize(a + b) == tokenize(a) + tokenize(b)``).
    """

    MAX_TRIES = 4
    MAX_STARTS = 16

    def __init__(self, tokenizer: Any, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.tokenizer = tokenizer
        self.kind = kind
        self.stream = token_stream(tokenizer, kind)

    def count(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def sample(self, n: int, rng: random.Random, *, line_end: bool = False) -> str:
        """``n`` tokens of corpus text from a window drawn with ``rng``."""
        return self.sample_at(rng.randrange(len(self.stream)), n, line_end=line_end)

    def sample_ids(self, n: int, rng: random.Random) -> array[int]:
        """``ids_at`` of the window ``sample(n, rng)`` would cut (the same draw from ``rng``)."""
        return self.ids_at(rng.randrange(len(self.stream)), n)

    def ids_at(self, start: int, n: int) -> array[int]:
        """Exactly ``n`` token ids: the corpus stream's own, over the window ``sample_at(start,
        n)`` tries first. For a caller that needs ids and no text (the simulator): tokenizing
        the text costs far more than the simulation, and the window's text, tokenized alone,
        differs from these at most in a token at its seams."""
        room = self._checked_room(n, 1)
        start = self._nonblank(start % room, room)
        return array("I", self.stream.ids[start : start + n])

    def sample_many(self, windows: Sequence[tuple[int, int]]) -> list[tuple[str, list[int] | None]]:
        """``[sample_at(start, n) for start, n in windows]``, with the first try of every window
        counted in one batch call of the tokenizer (its Rust side, on all cores): most windows
        land on ``n`` at once, and only the rest take the one-by-one retries. For workloads of
        tens of thousands of prompts (a simulated hour), where per-prompt calls dominate. Each
        text comes with its token ids where the batch count produced them (None for a window
        that needed the retries)."""
        out: list[tuple[str, list[int]] | None] = [None] * len(windows)
        firsts: list[tuple[int, str]] = []
        for i, (start, n) in enumerate(windows):
            first = self._first_try(start, n)
            if first is not None:
                firsts.append((i, first))
        if firsts:
            counts = self.tokenizer([t for _, t in firsts], add_special_tokens=False)["input_ids"]
            for (i, text), ids in zip(firsts, counts):
                if len(ids) == windows[i][1]:
                    out[i] = (text, ids)
        return [got if got is not None else (self.sample_at(*windows[i]), None) for i, got in enumerate(out)]

    def _first_try(self, start: int, n: int) -> str | None:
        """The text ``sample_at(start, n)`` tries first (None when it would raise)."""
        room = self._room(n)
        if n < 1 or room <= 1:
            return None
        return self._cut(self._nonblank(start % room, room), n, False)

    def _checked_room(self, n: int, least: int) -> int:
        """``_room(n)``; ValueError when ``n`` is below ``least`` or the corpus is too short."""
        if n < least:
            raise ValueError(f"token count must be at least {least}, got {n}")
        room = self._room(n)
        if room <= 1:
            raise ValueError(f"cannot sample {n} tokens: the {self.kind} corpus has {len(self.stream)}")
        return room

    def _room(self, n: int) -> int:
        """How many starts a window of ``n`` tokens has, with slack for the retries, which may
        need a few more tokens than asked for."""
        return max(1, len(self.stream) - n - 64)

    def _nonblank(self, start: int, room: int) -> int:
        """The first start from ``start`` on that begins a non-blank character."""
        while start < room - 1 and self._blank_at(start):
            start += 1
        return start

    def sample_at(self, start: int, n: int, *, line_end: bool = False) -> str:
        """``n`` tokens of corpus text starting near token ``start`` (wrapped into range)."""
        room = self._checked_room(n, 1 + line_end)  # the newline of line_end is a token of its own
        start %= room
        best, best_err = "", None
        # A window whose seams merge differently (a split character, a run of trailing blanks
        # under line_end) may never land on n; the next start usually does.
        for _ in range(self.MAX_STARTS):
            start = self._nonblank(start, room)
            k = n
            for _ in range(self.MAX_TRIES):
                text = self._cut(start, k, line_end)
                got = self.count(text)
                if best_err is None or abs(got - n) < best_err:
                    best, best_err = text, abs(got - n)
                if got == n:
                    return text
                k = max(1, k + (n - got))
            start = (start + 1) % room
        return best

    def _blank_at(self, i: int) -> bool:
        s, e = self.stream.spans[i]
        piece = self.stream.text[s:e]
        return not piece or piece[0].isspace()

    def _cut(self, start: int, k: int, line_end: bool) -> str:
        text = self.stream.window_text(start, k)
        if line_end:
            # One trailing newline after a non-blank character: a seam the next piece's first
            # word cannot merge into. Keeping k tokens means the newline replaces the last one.
            text = self.stream.window_text(start, max(1, k - 1)).rstrip() + "\n"
        return text
