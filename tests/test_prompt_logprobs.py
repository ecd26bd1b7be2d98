"""prompt_logprobs: each prompt token's log-probability under the model given the tokens before
it, plus the top-k there, equal to one full-sequence forward pass however the prompt ran
(batched, chunked, preempted, after the prefix cache or a KV tier held it)."""

from __future__ import annotations

import pytest
import torch

from conftest import GREEDY, make_llm, random_prompts
from kvbaton import LLM, SamplingParams
from kvbaton.engine.attention import SeqSlice
from kvbaton.errors import InvalidRequestError
from kvbaton.kv.hashing import hash_block_chain

TOL = 1e-4  # float32 on the CPU: batch shape and chunking only reorder sums


@pytest.fixture(scope="module")
def full_logprobs():
    """log_softmax of one forward pass over the whole sequence ([len, vocab]), on an engine of
    its own (the pass writes KV into blocks from 0 up, which nothing else there uses)."""
    ref = make_llm(enable_prefix_caching=False)
    model, runner = ref.engine.loaded.model, ref.engine.runner

    def run(tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        meta = runner.backend.prepare([SeqSlice(list(range(-(-n // 16))), 0, n)])
        with torch.inference_mode():
            hidden = model(torch.tensor(tokens), torch.arange(n), runner.backend.bind(meta))
            return torch.log_softmax(model.compute_logits(hidden), -1)

    return run


def assert_prompt_logprobs(out, full_logprobs, k: int) -> None:
    prompt = out.prompt_token_ids
    got = out.prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    ref = full_logprobs(prompt)
    for i in range(1, len(prompt)):
        entry = got[i]
        tok = prompt[i]
        assert next(iter(entry)) == tok  # the actual token first
        assert entry[tok] == pytest.approx(ref[i - 1, tok].item(), abs=TOL)
        if k:
            vals, idx = torch.topk(ref[i - 1], k)
            top = set(idx.tolist())
            assert set(entry) - {tok} <= top and top <= set(entry) | _near_ties(ref[i - 1], vals[-1].item())
            for t in top & set(entry):
                assert entry[t] == pytest.approx(ref[i - 1, t].item(), abs=TOL)
        assert len(entry) in (k, k + 1) if k else len(entry) == 1


def _near_ties(row: torch.Tensor, kth: float) -> set[int]:
    """Tokens within tolerance of the k-th value: either side of a tie may be the one chosen."""
    return set(torch.nonzero((row - kth).abs() <= TOL).flatten().tolist())


PROMPTS = random_prompts(6, 2, 90, seed=41)


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_equal_a_full_forward_pass(full_logprobs, k):
    llm = make_llm()
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=k))
    for o in outs:
        assert_prompt_logprobs(o, full_logprobs, k)
    # Asking for them changes no generated token.
    assert [o.token_ids for o in outs] == [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True))]
    assert llm.engine.pool.num_used_blocks == 0
    llm.engine.check_integrity()


def test_one_token_prompt_and_requests_that_do_not_ask(full_logprobs):
    llm = make_llm()
    one = llm.generate([[5]], SamplingParams(max_tokens=2, prompt_logprobs=2))[0]
    assert one.prompt_logprobs == [None]
    assert llm.generate([[5, 6]], GREEDY)[0].prompt_logprobs is None


def test_chunked_prefill_accumulates_across_chunks(full_logprobs):
    llm = make_llm(max_num_batched_tokens=13)  # every prompt in several chunks, sharing steps
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2))
    for o in outs:
        assert_prompt_logprobs(o, full_logprobs, 2)
    llm.engine.check_integrity()


def test_batched_with_other_requests(full_logprobs):
    llm = make_llm()
    asks = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=1)
    others = [GREEDY, SamplingParams(max_tokens=5, temperature=0.8, seed=3, frequency_penalty=1.0),
              SamplingParams(max_tokens=5, temperature=0, logprobs=2)]
    params = [asks if i % 2 == 0 else others[i % 3] for i in range(len(PROMPTS))]
    outs = llm.generate(PROMPTS, params)
    for o, p in zip(outs, params):
        if p is asks:
            assert_prompt_logprobs(o, full_logprobs, 1)
        else:
            assert o.prompt_logprobs is None


def test_a_warm_prefix_cache_is_not_read_but_is_written(full_logprobs):
    llm = make_llm()
    prompt = random_prompts(1, 70, 70, seed=42)[0]
    asks = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2)
    warm = llm.generate([prompt], GREEDY)[0]
    assert llm.generate([prompt], GREEDY)[0].num_cached_tokens == 64  # the cache holds it
    hits = llm.engine.pool.prefix_hits
    first, second = (llm.generate([prompt], asks)[0] for _ in range(2))
    for o in (first, second):
        assert o.num_cached_tokens == 0
        assert_prompt_logprobs(o, full_logprobs, 2)
        assert o.token_ids == warm.token_ids[:3]
    assert llm.engine.pool.prefix_hits == hits
    # A request without prompt_logprobs still finds the blocks they computed.
    other = prompt[:48] + [1, 2, 3]
    fresh = make_llm()
    fresh.generate([prompt], asks)
    assert fresh.generate([other], GREEDY)[0].num_cached_tokens == 48


def test_siblings_do_not_wait_for_or_share_an_inflight_prefix(full_logprobs):
    base = random_prompts(1, 64, 64, seed=43)[0]
    prompts = [base + t for t in random_prompts(3, 5, 10, seed=44)]
    llm = make_llm()
    asks = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts, [GREEDY, asks, asks])
    for o in outs[1:]:
        assert o.num_cached_tokens == 0
        assert_prompt_logprobs(o, full_logprobs, 1)


def test_preemption_keeps_what_was_collected(full_logprobs):
    prompts = random_prompts(8, 20, 60, seed=45)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, prompt_logprobs=2)
    llm = make_llm(num_kv_blocks=16, max_num_batched_tokens=32)
    outs = llm.generate(prompts, params)
    assert llm.engine.scheduler.num_preemptions > 0
    for o in outs:
        assert_prompt_logprobs(o, full_logprobs, 2)
    plain = make_llm().generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert llm.engine.pool.num_used_blocks == 0
    llm.engine.check_integrity()


def test_preempted_mid_prompt_recomputes_without_the_cache_and_without_duplicates(full_logprobs):
    llm = make_llm(max_num_batched_tokens=20)
    eng = llm.engine
    prompt = random_prompts(1, 75, 75, seed=46)[0]
    rid = eng.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=3))
    req = eng.scheduler.requests[rid]
    for _ in range(2):  # two 20-token chunks: one full block committed to the prefix cache
        assert eng.step() == []
    assert len(req.prompt_logprobs) == 41 and req.num_committed_blocks == 2
    sched = eng.scheduler
    sched.running.remove(req)
    sched._preempt(req)  # as the scheduler does when memory runs short
    last = None
    while eng.has_unfinished_requests():
        for o in eng.step():
            last = o
    assert last is not None and last.finished and last.num_cached_tokens == 0
    assert_prompt_logprobs(last, full_logprobs, 3)
    eng.check_integrity()


def test_outputs_carry_them_from_the_first_token_on():
    llm = make_llm(max_num_batched_tokens=16)
    eng = llm.engine
    rid = eng.add_request(random_prompts(1, 40, 40, seed=47)[0],
                          SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=0))
    outs = []
    while eng.has_unfinished_requests():
        outs.extend(o for o in eng.step() if o.request_id == rid)
    assert len(outs) == 3
    assert all(o.prompt_logprobs is outs[0].prompt_logprobs for o in outs)
    assert len(outs[0].prompt_logprobs) == 40


def test_a_tier_held_prefix_is_not_loaded(full_logprobs):
    prompts = random_prompts(6, 70, 130, seed=48)
    llm = make_llm(num_kv_blocks=24, max_num_seqs=2, kv_host_cache_bytes=8 << 20)
    for _ in range(2):
        llm.generate(prompts, GREEDY)
    host = llm.engine.stats()["kv_tiers"]["host"]
    assert host["loads"] > 0  # the rounds reload from the host tier
    loads = host["loads"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=1))
    assert llm.engine.stats()["kv_tiers"]["host"]["loads"] == loads
    for o in outs:
        assert o.num_cached_tokens == 0
        assert_prompt_logprobs(o, full_logprobs, 1)
    llm.engine.check_integrity()


def _handle(eng, prompt: list[int]):
    return hash_block_chain(eng.root_hash(), prompt, eng.config.block_size)


def test_prefilled_elsewhere_cannot_have_prompt_logprobs():
    llm: LLM = make_llm()
    eng = llm.engine
    prompt = [3, 4, 5, 6, 7]
    asks = SamplingParams(max_tokens=4, prompt_logprobs=1)
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request(prompt, asks, first_token=(9, None))
    assert e.value.param == "prompt_logprobs"
    plan = eng.reserve_import(prompt, _handle(eng, prompt), "imp")
    assert plan is not None
    with pytest.raises(InvalidRequestError) as e:
        eng.commit_import("imp", asks, (9, None))
    assert e.value.param == "prompt_logprobs"
    assert not eng.handoff.plans and not eng.has_unfinished_requests()
    assert eng.pool.num_used_blocks == 0
    eng.check_integrity()
