"""Sampling parameters: seeds, filters, stop conditions, logprobs, validation."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_llm, random_prompts
from kvbaton import SamplingParams
from kvbaton.engine.sampler import sample


@pytest.fixture(scope="module")
def llm():
    return make_llm()


PROMPTS = random_prompts(4, 5, 30, seed=21)


def test_seeded_sampling_is_reproducible_and_seed_dependent(llm):
    p1 = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    a = [o.token_ids for o in llm.generate(PROMPTS, p1)]
    b = [o.token_ids for o in llm.generate(PROMPTS, p1)]
    p2 = SamplingParams(max_tokens=20, temperature=1.0, seed=8, ignore_eos=True)
    c = [o.token_ids for o in llm.generate(PROMPTS, p2)]
    assert a == b and a != c


def test_seeded_output_independent_of_batch(llm):
    p = SamplingParams(max_tokens=15, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    alone = llm.generate(PROMPTS[:1], p)[0].token_ids
    batched = llm.generate(PROMPTS, p)[0].token_ids
    assert alone == batched


def test_top_k_1_is_greedy(llm):
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    topk1 = llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=1, ignore_eos=True))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]])
    probs = torch.softmax(logits[0], -1)
    assert probs[0] < 0.8 < probs[0] + probs[1]
    params = [SamplingParams(temperature=1.0, top_p=0.8)]
    seen = {sample(logits, params, [torch.Generator().manual_seed(s)]).token_ids[0] for s in range(200)}
    assert seen == {0, 1}


def test_max_tokens_and_length_reason(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ids(llm):
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    stop_tok = free.token_ids[6]
    first = free.token_ids.index(stop_tok)
    params = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_tok], ignore_eos=True)
    out = llm.generate(PROMPTS[0], params)[0]
    assert out.token_ids == free.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok


def test_eos_stops_unless_ignored(llm):
    eos = llm.engine.eos_token_ids[0]
    free = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    # Make the 4th generated token an EOS by declaring it one for this engine.
    llm.engine.eos_token_ids = (eos, free.token_ids[3])
    try:
        out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0))[0]
        ign = llm.generate(PROMPTS[1], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    finally:
        llm.engine.eos_token_ids = (eos,)
    first = free.token_ids.index(free.token_ids[3])
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    assert ign.token_ids == free.token_ids


def test_stop_string_truncates_text(llm):
    prompt = "The quick brown fox"
    free = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    text = free.text
    printable = [i for i in range(2, len(text) - 2) if text[i : i + 2].isprintable() and text[i : i + 2].strip()]
    assert printable, f"need printable output to pick a stop string from: {text!r}"
    i = printable[0]
    stop = text[i : i + 2]
    out = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_logprobs_are_log_softmax_of_sampled_tokens(llm):
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 6 and len(out.top_logprobs) == 6
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs):
        assert lp <= 0 and len(top) == 3
        assert max(top.values()) == pytest.approx(lp)  # greedy picks the most likely token
        assert tok in top
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-6


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_rejected_and_nothing_leaks(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1, 100000], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        eng.add_request([1] * eng.max_model_len, SamplingParams())
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request([1, 2], SamplingParams(max_tokens=eng.max_model_len))
    assert not eng.has_unfinished_requests() and eng.pool.num_used_blocks == 0


def test_request_larger_than_cache_rejected():
    small = make_llm(num_kv_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        small.engine.add_request([1] * 60, SamplingParams(max_tokens=10))


def test_seeded_request_continued_after_a_first_token_equals_the_whole_run(llm):
    # The disaggregated decode side: the prefill worker drew the first token, this engine
    # continues from it and must draw what the whole run drew next (the generator skips one).
    prompt = random_prompts(1, 20, 20, seed=9)[0]
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=17, ignore_eos=True, logprobs=0)
    whole = llm.generate([prompt], params)[0]
    eng = llm.engine
    eng.add_request(prompt, params, request_id="continued", first_token=(whole.token_ids[0], whole.logprobs[0]))
    final = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            final = out
    assert final is not None and final.finished
    assert final.token_ids == whole.token_ids
    # A fresh generator on the same context (no skip) draws something else.
    fresh = SamplingParams(max_tokens=7, temperature=1.0, seed=17, ignore_eos=True)
    redrawn = llm.generate([prompt + whole.token_ids[:1]], fresh)[0]
    assert redrawn.token_ids != whole.token_ids[1:]
