"""Bench workloads: seeded and reproducible, lengths and prefix structure checked on token ids
(byte tokenizer throughout, the bundled SmolLM2 tokenizer for the structural promises)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbaton.bench.corpus import SAMPLE_TRACE
from kvbaton.bench.trace import read_mooncake_trace
from kvbaton.bench.workloads import OPTIONS, WORKLOAD_NAMES, Session, load_tokenizer, make_workload

# Small lengths keep every generator fast under the byte tokenizer (one token per byte).
SMALL = {
    "random": {"input_len": 64, "output_len": 8},
    "shared-prefix": {"num_prefixes": 3, "prefix_len": 128, "question_len": 16},
    "multi-turn": {"turns": 3, "user_len": 16, "system_len": 32},
    "mixed": {"long_input_len": 256, "short_input_len": 16},
    "trace": {},
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-random")


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer(None)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def sessions(tok, name: str, seed: int = 0, n: int = 12, **opts) -> list[Session]:
    return make_workload(name, tokenizer=tok, seed=seed, num_sessions=n, **{**SMALL[name], **opts}).sessions()


@pytest.mark.parametrize("name", WORKLOAD_NAMES)
def test_same_seed_same_sessions_other_seed_other_sessions(tok, name):
    a = sessions(tok, name, seed=1)
    assert a == sessions(tok, name, seed=1)
    assert a != sessions(tok, name, seed=2)
    assert len(a) == 12 and len({s.session_id for s in a}) == 12


def test_workloads_differ_from_each_other(tok):
    texts = {name: sessions(tok, name, seed=0)[0].turns[0].user for name in WORKLOAD_NAMES}
    assert len(set(texts.values())) == len(texts)
    # Same options, different name: the name is part of the seed.
    random_ = make_workload("random", tokenizer=tok, seed=0, num_sessions=4, input_len=16).sessions()
    mixed = make_workload("mixed", tokenizer=tok, seed=0, num_sessions=4, long_fraction=0.0,
                          short_input_len=16).sessions()
    assert [s.turns[0].user for s in random_] != [s.turns[0].user for s in mixed]


def test_random_lengths_follow_the_range(tok):
    ss = sessions(tok, "random", n=80, input_len=64, output_len=40, range_ratio=0.5)
    lens = [len(ids(tok, s.turns[0].user)) for s in ss]
    assert all(32 - 2 <= n <= 96 + 2 for n in lens), lens
    assert min(lens) < 48 and max(lens) > 80  # spread over the range, not a point
    outs = [s.turns[0].max_tokens for s in ss]
    assert all(20 <= n <= 60 for n in outs) and len(set(outs)) > 10
    exact = sessions(tok, "random", n=40, input_len=50, output_len=7)
    assert sum(len(ids(tok, s.turns[0].user)) == 50 for s in exact) >= 38
    assert {s.turns[0].max_tokens for s in exact} == {7}
    assert all(s.arrival_s is None and s.prefix == "" and len(s.turns) == 1 for s in exact)


def _check_shared_prefix(tok, ss: list[Session], prefix_len: int, question_len: int,
                         clean_seam: bool = False) -> None:
    groups: dict[str, list[Session]] = {}
    for s in ss:
        groups.setdefault(s.prefix, []).append(s)
    assert len(groups) == 3 and sorted(len(g) for g in groups.values()) == [4, 4, 4]
    prefix_ids = {p: ids(tok, p) for p in groups}
    for p, members in groups.items():
        assert abs(len(prefix_ids[p]) - prefix_len) <= 4
        for s in members:
            whole = ids(tok, s.prefix + s.turns[0].user)
            # The prompt's tokens start with the prefix's tokens (at most the last may differ).
            assert whole[: len(prefix_ids[p]) - 1] == prefix_ids[p][:-1]
            assert abs(len(whole) - len(prefix_ids[p]) - question_len) <= 2
            if clean_seam:  # the prefix ends with a newline: no token straddles the seam
                assert whole == prefix_ids[p] + ids(tok, s.turns[0].user)
    ps = list(prefix_ids.values())
    assert max(common_prefix(a, b) for i, a in enumerate(ps) for b in ps[i + 1:]) <= 4
    questions = [s.turns[0].user for s in ss]
    assert len(set(questions)) == len(questions)


def test_shared_prefix_groups_share_exactly_their_prefix_tokens(tok):
    _check_shared_prefix(tok, sessions(tok, "shared-prefix"), 128, 16)


def test_multi_turn_sessions(tok):
    ss = sessions(tok, "multi-turn", think_time=2.5, think_time_dist="constant")
    system = ss[0].prefix
    assert all(s.prefix == system for s in ss) and len(ids(tok, system)) == 32
    for s in ss:
        assert len(s.turns) == 3
        assert [t.think_time_s for t in s.turns] == [0.0, 2.5, 2.5]
        assert all(t.user.endswith("\n") and len(ids(tok, t.user)) == 16 for t in s.turns)
    exp = sessions(tok, "multi-turn", n=40, think_time=1.0)
    thinks = [t.think_time_s for s in exp for t in s.turns[1:]]
    assert all(x >= 0 for x in thinks) and len(set(thinks)) == len(thinks)
    assert 0.5 < sum(thinks) / len(thinks) < 1.6
    assert sessions(tok, "multi-turn", system_len=0)[0].prefix == ""


@pytest.mark.parametrize("system_len", [0, 24])
def test_multi_turn_private_contexts_follow_the_shared_system_prompt(smol, system_len):
    ss = sessions(smol, "multi-turn", n=6, system_len=system_len, context_len=48)
    plain = sessions(smol, "multi-turn", n=6, system_len=system_len)
    system = plain[0].prefix
    contexts = [s.prefix[len(system):] for s in ss]
    assert all(s.prefix.startswith(system) for s in ss) and len(set(contexts)) == len(ss)
    sys_ids = ids(smol, system)
    for s, context in zip(ss, contexts):
        assert context.endswith("\n") and len(ids(smol, context)) == 48
        # The shared prompt's tokens lead every session's tokens: a cache can share them.
        assert ids(smol, s.prefix)[:len(sys_ids)] == sys_ids
    for i, a in enumerate(ss):
        for b in ss[i + 1:]:
            assert common_prefix(ids(smol, a.prefix), ids(smol, b.prefix)) <= len(sys_ids) + 4


def test_mixed_tags_long_and_short(tok):
    ss = sessions(tok, "mixed", n=20, long_fraction=0.25, long_output_len=4, short_output_len=64)
    long_ = [s for s in ss if s.tags == ("long",)]
    short = [s for s in ss if s.tags == ("short",)]
    assert len(long_) == 5 and len(short) == 15
    assert all(abs(len(ids(tok, s.turns[0].user)) - 256) <= 2 and s.turns[0].max_tokens == 4 for s in long_)
    assert all(abs(len(ids(tok, s.turns[0].user)) - 16) <= 2 and s.turns[0].max_tokens == 64 for s in short)
    order = [s.tags[0] for s in ss]
    assert order != sorted(order)  # interleaved, not all long first


def _write_trace(path: Path) -> Path:
    rows = [
        {"timestamp": 1000, "input_length": 4 * 512, "output_length": 5, "hash_ids": [0, 1, 2, 3]},
        {"timestamp": 1500, "input_length": 3 * 512 - 100, "output_length": 6, "hash_ids": [0, 1, 5]},
        {"timestamp": 4000, "input_length": 5 * 512 - 7, "output_length": 0, "hash_ids": [0, 1, 2, 3, 9]},
        {"timestamp": 4000, "input_length": 300, "output_length": 9, "hash_ids": [7]},
        # Ends inside block 2, which request 0 holds whole: they share 2 blocks + 312 tokens.
        {"timestamp": 4200, "input_length": 3 * 512 - 200, "output_length": 9, "hash_ids": [0, 1, 2]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _check_trace(tok, ss: list[Session]) -> None:
    assert [s.arrival_s for s in ss] == [0.0, 0.5, 3.0, 3.0, 3.2]
    assert [s.turns[0].max_tokens for s in ss] == [5, 6, 1, 9, 9]
    t = [ids(tok, s.prefix + s.turns[0].user) for s in ss]
    for got, want in zip(t, [4 * 512, 3 * 512 - 100, 5 * 512 - 7, 300, 3 * 512 - 200]):
        assert abs(len(got) - want) <= 8
    # (request a, request b, tokens their hash ids say they share)
    for a, b, k in [(0, 1, 1024), (0, 2, 2048), (1, 2, 1024), (0, 3, 0), (1, 3, 0),
                    (0, 4, 1024 + 312), (1, 4, 1024)]:
        shared = common_prefix(t[a], t[b])
        assert k - 4 <= shared <= k + 8, (a, b, shared)


def test_trace_follows_hash_ids_and_timestamps(tok, tmp_path):
    path = _write_trace(tmp_path / "t.jsonl")
    ss = make_workload("trace", tokenizer=tok, seed=0, num_sessions=100, trace_file=str(path)).sessions()
    _check_trace(tok, ss)
    capped = make_workload("trace", tokenizer=tok, seed=0, num_sessions=2, trace_file=path).sessions()
    assert capped == ss[:2]
    assert all(s.prefix == "" and len(s.turns) == 1 for s in ss)


def test_bundled_sample_trace_replays(tok):
    records = read_mooncake_trace(SAMPLE_TRACE)
    ss = make_workload("trace", tokenizer=tok, seed=0, num_sessions=1000).sessions()
    assert len(ss) == len(records) >= 32
    first = records[0].timestamp_ms
    assert [s.arrival_s for s in ss] == [(r.timestamp_ms - first) / 1000 for r in records]
    # The sample really shares prefixes: some pair of requests shares leading hash ids.
    assert any(a.hash_ids[0] == b.hash_ids[0] for i, a in enumerate(records) for b in records[i + 1:])


@pytest.mark.slow
def test_structure_holds_under_the_smollm2_tokenizer(smol, tmp_path):
    _check_shared_prefix(smol, sessions(smol, "shared-prefix"), 128, 16, clean_seam=True)
    for kind in ("prose", "code"):
        _check_shared_prefix(smol, sessions(smol, "shared-prefix", seed=3, kind=kind), 128, 16,
                             clean_seam=True)
    ss = make_workload("trace", tokenizer=smol, seed=0, num_sessions=10,
                       trace_file=_write_trace(tmp_path / "t.jsonl")).sessions()
    _check_trace(smol, ss)
    lens = [len(ids(smol, s.turns[0].user)) for s in sessions(smol, "random", n=20, input_len=300)]
    assert sum(n == 300 for n in lens) >= 18 and all(abs(n - 300) <= 2 for n in lens)


@pytest.mark.parametrize(
    ("name", "kwargs", "named"),
    [
        ("nope", {}, "nope"),
        ("random", {"input_length": 5}, "input_length"),
        ("random", {"input_len": 0}, "input_len"),
        ("random", {"input_len": "64"}, "input_len"),
        ("random", {"output_len": 1.5}, "output_len"),
        ("random", {"range_ratio": 1.0}, "range_ratio"),
        ("random", {"range_ratio": -0.1}, "range_ratio"),
        ("random", {"kind": "poetry"}, "kind"),
        ("shared-prefix", {"prefix_len": 1}, "prefix_len"),
        ("multi-turn", {"think_time_dist": "gaussian"}, "think_time_dist"),
        ("multi-turn", {"think_time": float("nan")}, "think_time"),
        ("multi-turn", {"system_len": 1}, "system_len"),
        ("multi-turn", {"context_len": 1}, "context_len"),
        ("mixed", {"long_fraction": 1.5}, "long_fraction"),
        ("trace", {"block_size": True}, "block_size"),
        ("random", {"num_sessions": 0}, "num_sessions"),
        ("random", {"seed": "x"}, "seed"),
    ],
)
def test_bad_options_raise_naming_the_option(tok, name, kwargs, named):
    args = {"tokenizer": tok, "seed": 0, "num_sessions": 4, **kwargs}
    with pytest.raises(ValueError, match=named):
        make_workload(name, **args)


def test_bad_trace_files_raise_with_file_and_line(tok, tmp_path):
    def build(text: str):
        (tmp_path / "bad.jsonl").write_text(text)
        return make_workload("trace", tokenizer=tok, seed=0, num_sessions=4,
                             trace_file=str(tmp_path / "bad.jsonl")).sessions()

    ok = '{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n'
    with pytest.raises(ValueError, match="bad.jsonl:2: 'hash_ids' has 2 ids"):
        build(ok + '{"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": [1, 2]}\n')
    with pytest.raises(ValueError, match=":2: missing field 'output_length'"):
        build(ok + '{"timestamp": 1, "input_length": 10, "hash_ids": [1]}\n')
    with pytest.raises(ValueError, match=":2: 'timestamp' goes backwards"):
        build(ok.replace('"timestamp": 0', '"timestamp": 5') + ok)
    with pytest.raises(ValueError, match=":1: not JSON"):
        build("{oops\n")
    with pytest.raises(ValueError, match="trace_file.*no records"):
        build("\n")
    with pytest.raises(ValueError, match="trace_file.*cannot read"):
        make_workload("trace", tokenizer=tok, seed=0, num_sessions=4,
                      trace_file=str(tmp_path / "missing.jsonl")).sessions()


def test_options_table_lists_every_workload():
    assert set(OPTIONS) == set(WORKLOAD_NAMES) == set(SMALL)
    assert OPTIONS["random"]["input_len"] == 1024 and OPTIONS["trace"]["block_size"] == 512


def test_random_sessions_are_those_one_sample_per_session_would_give(tok):
    """The batched cut (TextSampler.sample_many) changes no prompt: the same seed gives the
    texts that drawing and sampling session by session gives."""
    import hashlib
    import random

    from kvbaton.bench.workloads import draw_length

    w = make_workload("random", tokenizer=tok, seed=4, num_sessions=30, input_len=80, output_len=5, range_ratio=0.5)
    digest = hashlib.sha256(b"random:4").digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    expected = []
    for _ in range(30):
        n_in = draw_length(rng, 80, 0.5)
        n_out = draw_length(rng, 5, 0.5)
        expected.append((w.sampler("any", rng).sample(n_in, rng), n_out))
    assert [(s.turns[0].user, s.turns[0].max_tokens) for s in w.sessions()] == expected


def test_random_prompts_carry_the_ids_their_text_tokenizes_to(smol):
    """The ids the batch count produced ride with each prompt (the simulator uses them instead
    of tokenizing again): they are exactly the text's tokens, and a prompt that needed the
    one-by-one retries carries none rather than a wrong guess."""
    sessions = make_workload("random", tokenizer=smol, seed=2, num_sessions=40, input_len=60, output_len=4,
                             range_ratio=0.5).sessions()
    with_ids = [s.turns[0] for s in sessions if s.turns[0].user_ids is not None]
    assert len(with_ids) > len(sessions) // 2
    for t in with_ids:
        assert list(t.user_ids) == smol(t.user, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["random", "mixed"])
def test_ids_only_sessions_are_the_same_requests_as_token_ids(smol, name):
    # The simulator's sessions: the same draws, each prompt the corpus stream's own ids of its
    # window, no text. The text of a window, tokenized alone, is those ids unless its first cut
    # missed the length and the sampler moved the window (a few in a hundred).
    w = make_workload(name, tokenizer=smol, seed=0, num_sessions=200, **SMALL[name])
    text, only = w.sessions(), w.sessions(ids_only=True)
    assert [(s.session_id, s.tags, [t.max_tokens for t in s.turns]) for s in only] == \
        [(s.session_id, s.tags, [t.max_tokens for t in s.turns]) for s in text]
    same = 0
    for a, b in zip(text, only):
        (ta,), (tb,) = a.turns, b.turns
        assert tb.user == "" and tb.user_ids is not None
        want = ids(smol, ta.user)
        assert len(tb.user_ids) == len(want)
        same += list(tb.user_ids) == want
    assert same >= 190
