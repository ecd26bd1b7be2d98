"""vLLM's logit controls: logit_bias, min_tokens, repetition/frequency/presence penalties.

Unit tests on :func:`~kvbaton.engine.sampler.sample` with crafted logits pin the semantics and
the order; engine tests check the behaviour end to end (greedy stays deterministic, batching
does not change a request's tokens, reported logprobs stay the raw model's).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from conftest import make_llm, random_prompts
from kvbaton import SamplingParams
from kvbaton.engine import sampler as sampler_mod
from kvbaton.engine.sampler import sample
from kvbaton.engine.stop import check_stop
from kvbaton.errors import InvalidRequestError

EOS = 257  # tiny-random's


@pytest.fixture(scope="module")
def llm():
    return make_llm()


def greedy(**kw) -> SamplingParams:
    kw.setdefault("max_tokens", 12)
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0, **kw)


def _argmax(logits: list[float], params: SamplingParams, token_ids: Sequence[int] = (), num_prompt: int = 0,
            eos: tuple[int, ...] = ()) -> int:
    res = sample(torch.tensor([logits]), [params], [None], [(list(token_ids), num_prompt)], eos)
    return res.token_ids[0]


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": -2.01}, "presence_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"presence_penalty": True}, "presence_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"frequency_penalty": None}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {5: -101}}, "logit_bias"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias"),
        ({"logit_bias": {5: "1"}}, "logit_bias"),
        ({"logit_bias": [5, 1.0]}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": True}, "min_tokens"),
        ({"min_tokens": 1.0}, "min_tokens"),
        ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": True}, "prompt_logprobs"),
        ({"prompt_logprobs": 2.0}, "prompt_logprobs"),
    ],
)
def test_invalid_controls_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == field


def test_boundary_values_are_accepted_and_defaults_are_off():
    p = SamplingParams(presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=1e-3,
                       logit_bias={0: -100, 7: 100}, min_tokens=16, max_tokens=16, prompt_logprobs=0)
    assert p.logit_bias == {0: -100.0, 7: 100.0} and p.has_penalties
    assert SamplingParams(logit_bias=None).logit_bias == {}
    assert not SamplingParams().has_penalties
    for kw in ({"presence_penalty": 0.1}, {"frequency_penalty": -0.1}, {"repetition_penalty": 1.1},
               {"logit_bias": {3: 0.0}}, {"min_tokens": 1}):
        assert SamplingParams(**kw).has_penalties, kw
    assert not SamplingParams(prompt_logprobs=3, logprobs=2).has_penalties  # reporting only


def test_engine_rejects_logit_bias_ids_past_the_vocabulary(llm):
    eng = llm.engine
    vocab = eng.model_config.vocab_size
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request([1, 2, 3], SamplingParams(logit_bias={3: 1.0, vocab: 1.0}))
    assert e.value.param == "logit_bias" and str(vocab) in str(e.value)
    assert not eng.has_unfinished_requests() and eng.pool.num_used_blocks == 0
    out = llm.generate([[1, 2, 3]], greedy(max_tokens=3, logit_bias={vocab - 1: 100}))[0]
    assert out.token_ids == [vocab - 1] * 3


# ---- sample() on crafted logits ---------------------------------------------------------------


def test_logit_bias_moves_the_argmax():
    logits = [1.0, 3.0, 2.0, 0.0]
    assert _argmax(logits, greedy()) == 1
    assert _argmax(logits, greedy(logit_bias={1: -1.5})) == 2
    assert _argmax(logits, greedy(logit_bias={3: 100})) == 3


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    # Token 0 was seen (in the prompt): 2.0 / 1.5 = 1.33 falls below unseen token 1's 1.9.
    assert _argmax([2.0, 1.9, -1.0], greedy(), [0], num_prompt=1) == 0
    assert _argmax([2.0, 1.9, -1.0], greedy(repetition_penalty=1.5), [0], num_prompt=1) == 1
    # Seen in the output counts too.
    assert _argmax([2.0, 1.9, -1.0], greedy(repetition_penalty=1.5), [2, 0], num_prompt=1) == 1
    # All negative: the seen token's -1.0 * 1.5 = -1.5 falls below unseen -1.2.
    assert _argmax([-1.0, -1.2, -3.0], greedy(repetition_penalty=1.5), [0], num_prompt=1) == 1
    # Below 1 it favours seen tokens: -1.2 * 0.5 = -0.6 beats -1.0.
    assert _argmax([-1.0, -1.2, -3.0], greedy(repetition_penalty=0.5), [1], num_prompt=1) == 1


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = [3.0, 2.5, 0.0]
    # Token 0 only in the prompt: no frequency or presence penalty.
    assert _argmax(logits, greedy(frequency_penalty=2.0, presence_penalty=2.0), [0, 0, 0], num_prompt=3) == 0
    # Once in the output: 3.0 - 0.3 = 2.7 still wins; twice: 3.0 - 0.6 = 2.4 loses.
    assert _argmax(logits, greedy(frequency_penalty=0.3), [2, 0], num_prompt=1) == 0
    assert _argmax(logits, greedy(frequency_penalty=0.3), [2, 0, 0], num_prompt=1) == 1
    # Presence does not grow with the count: 0.4 either way.
    assert _argmax(logits, greedy(presence_penalty=0.4), [2, 0], num_prompt=1) == 0
    assert _argmax(logits, greedy(presence_penalty=0.4), [2, 0, 0, 0, 0], num_prompt=1) == 0
    assert _argmax(logits, greedy(presence_penalty=0.6), [2, 0], num_prompt=1) == 1
    # Negative values encourage repeats.
    assert _argmax([2.5, 3.0, 0.0], greedy(frequency_penalty=-0.5), [2, 0, 0], num_prompt=1) == 0


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = [0.0, 1.0, 5.0, 4.0]  # EOS (2) first, stop token (3) second
    p = greedy(min_tokens=2, stop_token_ids=[3], ignore_eos=False)
    assert _argmax(logits, p, [0], num_prompt=1, eos=(2,)) == 1  # 0 outputs so far: both masked
    assert _argmax(logits, p, [0, 1], num_prompt=1, eos=(2,)) == 1  # 1 output so far
    assert _argmax(logits, p, [0, 1, 1], num_prompt=1, eos=(2,)) == 2  # reached: EOS may come
    # ignore_eos: EOS stops nothing, so it is not masked (stop_token_ids still are).
    q = greedy(min_tokens=2, stop_token_ids=[3], ignore_eos=True)
    assert _argmax(logits, q, [0], num_prompt=1, eos=(2,)) == 2
    # min_tokens masking wins over a +100 bias (bias first, then the mask).
    assert _argmax(logits, greedy(min_tokens=1, ignore_eos=False, logit_bias={2: 100}), [0], 1, (2,)) == 3


def test_controls_apply_in_vllm_order():
    # Bias, then the repetition penalty: (1.0 + 3.0) / 2 = 2.0 < 2.5 (penalty first would give
    # 1.0 / 2 + 3.0 = 3.5 and pick token 0).
    assert _argmax([1.0, 2.5], greedy(logit_bias={0: 3.0}, repetition_penalty=2.0), [0], 1) == 1
    # Repetition, then frequency: 4.0 / 2 - 1.0 = 1.0 < 1.2 (the other order: (4.0 - 1.0) / 2 = 1.5).
    assert _argmax([4.0, 1.2], greedy(repetition_penalty=2.0, frequency_penalty=1.0), [0], 0) == 1


def test_reported_logprobs_are_those_of_the_raw_logits():
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    hist = [([1, 2, 3, 4, 4], 3)] * 3
    plain = [SamplingParams(temperature=0, logprobs=5)] * 3
    penal = [SamplingParams(temperature=0, logprobs=5, logit_bias={7: 100}, repetition_penalty=1.7,
                            frequency_penalty=1.0, presence_penalty=-1.0, min_tokens=2)] * 3
    a = sample(logits, plain, [None] * 3, hist)
    b = sample(logits, penal, [None] * 3, hist, eos_token_ids=(0,))
    assert b.token_ids == [7, 7, 7] and a.token_ids != b.token_ids
    assert a.top_logprobs == b.top_logprobs  # the raw distribution's top 5
    raw = torch.log_softmax(logits, -1)
    assert b.logprobs == pytest.approx(raw[:, 7].tolist(), abs=1e-6)
    before = logits.clone()
    sample(logits, penal, [None] * 3, hist)
    assert torch.equal(logits, before)  # the caller's logits are not modified


def test_no_possible_token_or_extreme_penalties_never_fail_the_batch():
    torch.manual_seed(1)
    logits = torch.randn(2, 16)
    # Every token is a stop token under min_tokens: nothing is possible; the row falls back.
    p = SamplingParams(temperature=1.0, seed=1, min_tokens=3, stop_token_ids=list(range(16)))
    # A tiny repetition penalty would blow seen logits past float32's range.
    q = SamplingParams(temperature=0.5, seed=2, repetition_penalty=1e-30)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    res = sample(logits, [p, q], gens, [([1, 2], 2), (list(range(16)), 16)])
    assert all(0 <= t < 16 for t in res.token_ids)


def test_the_fast_path_adjusts_nothing(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("logits adjusted for a request without controls")

    monkeypatch.setattr(sampler_mod, "_adjust_row", boom)
    logits = torch.randn(2, 10)
    res = sampler_mod.Sampler().sample(logits, [_Row("a", SamplingParams(temperature=0)),
                                                _Row("b", SamplingParams(temperature=0, prompt_logprobs=1))])
    assert res.token_ids == logits.argmax(-1).tolist()


class _Row:
    def __init__(self, rid: str, params: SamplingParams, token_ids: list[int] | None = None) -> None:
        self.request_id, self.params = rid, params
        self.token_ids = token_ids or [1, 2]
        self.num_prompt_tokens = len(self.token_ids)


# ---- stop rule --------------------------------------------------------------------------------


def test_check_stop_ignores_eos_stop_ids_and_strings_before_min_tokens():
    p = SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=[5], stop=["ab"])
    assert check_stop(p, EOS, 2, 12, 100, (EOS,)) is None
    assert check_stop(p, 5, 2, 12, 100, (EOS,)) is None
    assert check_stop(p, 1, 2, 12, 100, (EOS,), text="xab", prev_text="x") is None
    assert check_stop(p, EOS, 3, 13, 100, (EOS,)).reason == "stop"
    assert check_stop(p, 5, 3, 13, 100, (EOS,)).stop_reason == 5
    assert check_stop(p, 1, 3, 13, 100, (EOS,), text="xyab", prev_text="xy").stop_reason == "ab"
    # Length limits still apply under min_tokens.
    assert check_stop(p, 1, 2, 100, 100, (EOS,)).reason == "length"
    q = SamplingParams(max_tokens=2, min_tokens=2)
    assert check_stop(q, EOS, 2, 12, 100, (EOS,)).reason == "stop"


# ---- through the engine -----------------------------------------------------------------------

PROMPTS = random_prompts(6, 4, 40, seed=31)


def test_logit_bias_forces_and_forbids_tokens(llm):
    forced = llm.generate(PROMPTS, greedy(logit_bias={42: 100}))
    assert all(o.token_ids == [42] * 12 for o in forced)
    sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True,
                                                   logit_bias={42: 100}))
    assert all(o.token_ids == [42] * 12 for o in sampled)
    free = llm.generate(PROMPTS, greedy())
    banned = llm.generate(PROMPTS, [greedy(logit_bias={o.token_ids[0]: -100}) for o in free])
    for f, b in zip(free, banned):
        assert b.token_ids[0] != f.token_ids[0]
        assert f.token_ids[0] not in b.token_ids


def test_min_tokens_holds_off_a_pushed_eos_then_stops(llm):
    for n in (1, 5):
        params = SamplingParams(max_tokens=20, temperature=0, min_tokens=n, logit_bias={EOS: 100})
        out = llm.generate(PROMPTS[0], params)[0]
        # n tokens that are not EOS, then the EOS it was pushed to (in token_ids, not in text).
        assert len(out.token_ids) == n + 1 and EOS not in out.token_ids[:n] and out.token_ids[-1] == EOS
        assert out.finish_reason == "stop"
    without = llm.generate(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, logit_bias={EOS: 100}))[0]
    assert without.token_ids == [EOS] and without.finish_reason == "stop"
    # Sampled too: the mask holds whatever the draw.
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=20, temperature=1.0, seed=5, min_tokens=4,
                                                  logit_bias={EOS: 100}))[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == EOS


def test_min_tokens_holds_off_stop_token_ids(llm):
    free = llm.generate(PROMPTS[1], greedy(max_tokens=8))[0]
    stop = free.token_ids[0]
    early = llm.generate(PROMPTS[1], greedy(max_tokens=8, stop_token_ids=[stop]))[0]
    assert early.token_ids == [stop] and early.finish_reason == "stop"
    held = llm.generate(PROMPTS[1], greedy(max_tokens=8, stop_token_ids=[stop], min_tokens=3))[0]
    assert stop not in held.token_ids[:3]
    assert held.finish_reason == "length" or (held.token_ids[-1] == stop and held.stop_reason == stop)


def _repeats(token_ids: list[int]) -> int:
    return len(token_ids) - len(set(token_ids))


def test_frequency_and_presence_penalties_reduce_repeats(llm):
    free = llm.generate(PROMPTS, greedy(max_tokens=40))
    base = sum(_repeats(o.token_ids) for o in free)
    assert base > 20, "the tiny model's greedy runs should loop (the test needs repeats to reduce)"
    freq = llm.generate(PROMPTS, greedy(max_tokens=40, frequency_penalty=2.0))
    pres = llm.generate(PROMPTS, greedy(max_tokens=40, presence_penalty=2.0))
    assert sum(_repeats(o.token_ids) for o in freq) < base
    assert sum(_repeats(o.token_ids) for o in pres) < base
    # The most repeated token of each run is repeated no more with the penalty.
    for f, q in zip(free, freq):
        tok, n = Counter(f.token_ids).most_common(1)[0]
        assert Counter(q.token_ids)[tok] <= n
    # Negative: more repeats.
    more = llm.generate(PROMPTS, greedy(max_tokens=40, frequency_penalty=-2.0))
    assert sum(_repeats(o.token_ids) for o in more) >= base


def test_repetition_penalty_steers_greedy_away_from_seen_tokens(llm):
    free = llm.generate(PROMPTS, greedy(max_tokens=40))
    rep = llm.generate(PROMPTS, greedy(max_tokens=40, repetition_penalty=3.0))
    assert [o.token_ids for o in rep] != [o.token_ids for o in free]

    def seen(p: list[int], o) -> int:  # generated tokens that repeat the prompt or earlier output
        return sum(t in set(p + o.token_ids[:i]) for i, t in enumerate(o.token_ids))

    assert sum(seen(p, o) for p, o in zip(PROMPTS, rep)) < sum(seen(p, o) for p, o in zip(PROMPTS, free))
    again = llm.generate(PROMPTS, greedy(max_tokens=40, repetition_penalty=3.0))
    assert [o.token_ids for o in again] == [o.token_ids for o in rep]  # greedy stays deterministic


MIXED = [
    greedy(max_tokens=20),
    greedy(max_tokens=20, frequency_penalty=1.5),
    greedy(max_tokens=20, presence_penalty=-1.0, logit_bias={3: 4.0}),
    greedy(max_tokens=20, repetition_penalty=1.8),
    SamplingParams(max_tokens=20, temperature=0.9, seed=11, frequency_penalty=0.7, repetition_penalty=1.2,
                   top_k=20),
    greedy(max_tokens=20, min_tokens=6, ignore_eos=False, logit_bias={EOS: 8.0}),
]


def test_batched_penalty_requests_equal_each_run_alone(llm):
    prompts = random_prompts(len(MIXED), 3, 60, seed=32)
    batched = llm.generate(prompts, MIXED)
    alone = [llm.generate([p], params)[0] for p, params in zip(prompts, MIXED)]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    # Chunked prefill and preemption (prompts and outputs recomputed) change nothing either.
    tight = make_llm(num_kv_blocks=10, max_num_batched_tokens=16)
    squeezed = tight.generate(prompts, MIXED)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in alone]
    assert tight.engine.pool.num_used_blocks == 0
    tight.engine.check_integrity()


def test_engine_logprobs_stay_raw_under_penalties(llm):
    params = greedy(max_tokens=8, logprobs=2, logit_bias={42: 30.0}, frequency_penalty=2.0)
    out = llm.generate(PROMPTS[2], params)[0]
    assert 42 in out.token_ids
    # The raw model's logprob of each generated token, read back as prompt logprobs of the
    # prompt followed by the output.
    ref = llm.generate([PROMPTS[2] + out.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    n = len(PROMPTS[2])
    for i, (tok, lp, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
        expect = ref.prompt_logprobs[n + i]
        assert lp == pytest.approx(expect[tok], abs=1e-4)
        for k, v in top.items():
            if k in expect:
                assert v == pytest.approx(expect[k], abs=1e-4)
        assert all(math.isfinite(v) and v <= 0 for v in top.values())
