"""The bench corpus: committed, verified against its manifest, reproducible by the builder,
and cut into text of exact token lengths with clean seams."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

from kvbaton.bench.corpus import (
    DATA_DIR,
    CorpusError,
    TextSampler,
    count_tokens,
    head_text,
    load_corpus,
    read_corpus,
    token_stream,
)
from kvbaton.models.tokenizer import byte_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _builder():
    spec = importlib.util.spec_from_file_location("build_corpus", ROOT / "scripts" / "build_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_corpus_has_prose_and_code_matching_the_manifest():
    corpus = load_corpus()
    m = corpus.manifest
    assert {d.kind for d in corpus.documents} == {"prose", "code"}
    for kind in ("prose", "code"):
        docs = corpus.of_kind(kind)
        assert len(docs) == m["totals"][kind]["documents"]
        assert sum(len(d.text.encode()) for d in docs) == m["totals"][kind]["bytes"]
    # Real documents, not a toy: hundreds of KB of each kind, within a few MB compressed.
    assert m["totals"]["prose"]["bytes"] > 400_000 and m["totals"]["code"]["bytes"] > 400_000
    assert m["file_bytes"] < 4 << 20
    assert all(d.source and d.licence for d in corpus.documents)
    assert any("def " in d.text for d in corpus.of_kind("code"))


def test_tampered_corpus_is_rejected(tmp_path: Path):
    shutil.copytree(DATA_DIR, tmp_path / "data")
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    manifest["documents"][3]["sha256"] = "0" * 64
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorpusError, match=manifest["documents"][3]["id"]):
        read_corpus(tmp_path / "data")
    (tmp_path / "data" / "corpus.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(CorpusError, match="sha256"):
        read_corpus(tmp_path / "data")
    with pytest.raises(CorpusError, match="cannot read"):
        read_corpus(tmp_path / "missing")


def test_builder_encoding_reproduces_the_committed_files():
    """Re-encoding the committed documents gives the committed bytes: the builder's output is a
    function of the documents alone (no timestamps, no dict order), on any Python."""
    b = _builder()
    corpus = load_corpus()
    docs = [{"id": d.id, "kind": d.kind, "source": d.source, "licence": d.licence, "text": d.text}
            for d in corpus.documents]
    blob = b.encode_corpus(docs)
    assert blob == (DATA_DIR / "corpus.jsonl.gz").read_bytes()
    manifest = b.build_manifest(docs, blob)
    committed = json.loads((DATA_DIR / "manifest.json").read_text())
    manifest["built_with"] = committed["built_with"]
    assert manifest == committed
    assert b.encode_trace(b.synthetic_trace()) == (DATA_DIR / "sample_trace.jsonl").read_bytes()


def test_token_stream_is_built_once_per_tokenizer(tok):
    assert token_stream(tok, "prose") is token_stream(tok, "prose")
    assert token_stream(tok, "prose") is not token_stream(byte_tokenizer(), "prose")


@pytest.mark.parametrize("kind", ["prose", "code"])
def test_sampled_text_has_the_requested_token_count(tok, kind):
    sampler = TextSampler(tok, kind)
    rng = random.Random(7)
    errors = []
    for i in range(200):
        n = rng.choice([2, 3, 16, 100, 512])
        text = sampler.sample(n, rng, line_end=bool(i % 2))
        errors.append(count_tokens(tok, text) - n)
        assert text[:1].strip(), "text starts with a non-blank character"
    exact = sum(e == 0 for e in errors) / len(errors)
    assert exact >= 0.97 and max(abs(e) for e in errors) <= 16, errors


def test_line_end_texts_concatenate_without_merging_tokens(tok):
    rng = random.Random(3)
    for kind in ("prose", "code"):
        sampler = TextSampler(tok, kind)
        for _ in range(20):
            a = sampler.sample(rng.randint(2, 200), rng, line_end=True)
            b = sampler.sample(rng.randint(1, 50), rng)
            assert a.endswith("\n") and not a.endswith("\n\n") and not a[-2].isspace()
            ids = tok(a + b, add_special_tokens=False)["input_ids"]
            assert ids == tok(a, add_special_tokens=False)["input_ids"] + tok(b, add_special_tokens=False)["input_ids"]


def test_sampling_is_deterministic_and_checks_its_arguments(tok):
    sampler = TextSampler(tok, "code")
    assert sampler.sample(64, random.Random(1)) == sampler.sample(64, random.Random(1))
    assert sampler.sample(64, random.Random(1)) != sampler.sample(64, random.Random(2))
    with pytest.raises(ValueError, match="at least 1"):
        sampler.sample(0, random.Random(1))
    with pytest.raises(ValueError, match="at least 2"):
        sampler.sample(1, random.Random(1), line_end=True)
    with pytest.raises(ValueError, match="cannot sample"):
        sampler.sample(10**9, random.Random(1))
    with pytest.raises(ValueError, match="kind"):
        TextSampler(tok, "poetry")


def test_head_text_is_a_token_prefix(tok):
    text = TextSampler(tok, "prose").sample(300, random.Random(5), line_end=True)
    head = head_text(tok, text, 120)
    assert text.startswith(head) and count_tokens(tok, head) == 120
    assert head_text(tok, text, 10_000) == text


@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_sample_many_gives_the_texts_sample_at_gives(tok, which):
    from kvbaton.bench.workloads import load_tokenizer

    t = tok if which == "bytes" else load_tokenizer("tiny-random")  # BPE: merges make first tries miss
    sampler = TextSampler(t, "prose")
    rng = random.Random(7)
    windows = [(rng.randrange(len(sampler.stream)), rng.choice([1, 7, 64, 300])) for _ in range(40)]
    assert [text for text, _ in sampler.sample_many(windows)] == [sampler.sample_at(s, n) for s, n in windows]
    with pytest.raises(ValueError, match="at least 1"):
        sampler.sample_many([(0, 0)])
