"""Several choices in one request (``n``, ``best_of``, a batch of prompts) and the sampling
controls (penalties, ``logit_bias``, ``min_tokens``) over HTTP: on a worker, and through a
router in front of colocated and of disaggregated workers, where every answer must equal the
worker's own. Choice ``j`` samples with ``seed + j`` (kvbaton.api.fanout), so a seeded choice
is checked against the single request with that seed."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from worker_support import engine_debug, router_over_workers, running_worker, wait_idle

MODEL = "tiny-random"
SAMPLED = {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True, "return_token_ids": True}
# Longer than two KV blocks (16 tokens each): the runs of one prompt can share its blocks.
PROMPT = list(range(40, 80))


@pytest.fixture(scope="module")
def worker() -> Iterator[Any]:
    with running_worker(num_kv_blocks=256) as w:
        yield w


@pytest.fixture(scope="module", params=["colocated", "disaggregated"])
def router(request: pytest.FixtureRequest) -> Iterator[str]:
    with router_over_workers(request.param == "disaggregated") as url:
        yield url


def _post(url: str, body: dict[str, Any], path: str = "/v1/completions") -> dict[str, Any]:
    r = httpx.post(f"{url}{path}", json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _stream(url: str, body: dict[str, Any], path: str = "/v1/completions") -> list[dict[str, Any]]:
    chunks = []
    with httpx.stream("POST", f"{url}{path}", json={"model": MODEL, **body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def _single(url: str, prompt: Any, **body: Any) -> dict[str, Any]:
    return _post(url, {"prompt": prompt, **body})["choices"][0]


# ---- n and seeds ----------------------------------------------------------------------------


def test_n_choices_are_the_single_requests_with_consecutive_seeds(worker: Any) -> None:
    out = _post(worker.url, {"prompt": PROMPT, "n": 3, "seed": 11, **SAMPLED})
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for j, choice in enumerate(out["choices"]):
        alone = _single(worker.url, PROMPT, seed=11 + j, **SAMPLED)
        assert choice["token_ids"] == alone["token_ids"]
        assert choice["text"] == alone["text"]
    # Different seeds: the choices are not all one sample.
    assert len({tuple(c["token_ids"]) for c in out["choices"]}) > 1
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(PROMPT)  # the prompt counts once
    assert usage["completion_tokens"] == 3 * SAMPLED["max_tokens"]


def test_n_runs_share_the_prompt_blocks(worker: Any) -> None:
    before = engine_debug(worker.url)["stats"]
    prompt = list(range(100, 140))  # not cached yet
    _post(worker.url, {"prompt": prompt, "n": 4, "seed": 1, **SAMPLED})
    after = wait_idle(worker.url, 0)["stats"]
    full_blocks = len(prompt) // 16 * 16
    # The three runs after the first found its two full blocks cached instead of computing them.
    assert after["prefix_cache_hits"] - before["prefix_cache_hits"] >= 3 * full_blocks


def test_streamed_n_choices_reassemble_to_the_whole_response(worker: Any) -> None:
    body = {"prompt": PROMPT, "n": 2, "seed": 5, **SAMPLED}
    whole = _post(worker.url, body)
    chunks = _stream(worker.url, {**body, "stream_options": {"include_usage": True}})
    texts: dict[int, str] = {}
    ids: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    for c in chunks[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
            ids.setdefault(ch["index"], []).extend(ch.get("token_ids") or [])
            if ch["finish_reason"]:
                finish[ch["index"]] = ch["finish_reason"]
    assert sorted(texts) == [0, 1]
    for c in whole["choices"]:
        assert texts[c["index"]] == c["text"]
        assert ids[c["index"]] == c["token_ids"]
        assert finish[c["index"]] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_chat_n_streams_a_role_delta_per_choice(worker: Any) -> None:
    body = {"messages": [{"role": "user", "content": "Hi there"}], "n": 2, "seed": 3, **SAMPLED}
    whole = _post(worker.url, body, "/v1/chat/completions")
    chunks = _stream(worker.url, body, "/v1/chat/completions")
    roles = [ch["index"] for c in chunks for ch in c["choices"] if ch["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1]
    content: dict[int, str] = {}
    for c in chunks:
        for ch in c["choices"]:
            content[ch["index"]] = content.get(ch["index"], "") + (ch["delta"].get("content") or "")
    assert [content[i] for i in range(2)] == [c["message"]["content"] for c in whole["choices"]]


# ---- best_of --------------------------------------------------------------------------------


def _cumulative(url: str, seed: int) -> float:
    choice = _single(url, PROMPT, seed=seed, logprobs=0, **SAMPLED)
    return sum(choice["logprobs"]["token_logprobs"])


def test_best_of_returns_the_most_likely_candidates(worker: Any) -> None:
    out = _post(worker.url, {"prompt": PROMPT, "n": 2, "best_of": 4, "seed": 20, **SAMPLED})
    scores = {seed: _cumulative(worker.url, seed) for seed in range(20, 24)}
    best = sorted(scores, key=lambda s: -scores[s])[:2]
    expected = [_single(worker.url, PROMPT, seed=s, **SAMPLED)["token_ids"] for s in best]
    assert [c["token_ids"] for c in out["choices"]] == expected
    assert all(c["logprobs"] is None for c in out["choices"])  # not asked for
    assert out["usage"]["completion_tokens"] == 4 * SAMPLED["max_tokens"]  # every candidate ran


# ---- batches of prompts ---------------------------------------------------------------------


def test_a_batch_of_prompts_answers_in_order(worker: Any) -> None:
    prompts = ["The quick brown fox", "Once upon a time", "Hello"]
    out = _post(worker.url, {"prompt": prompts, "n": 2, **GREEDY})
    assert [c["index"] for c in out["choices"]] == list(range(6))
    prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        alone = _post(worker.url, {"prompt": prompt, **GREEDY})
        prompt_tokens += alone["usage"]["prompt_tokens"]
        for j in range(2):
            assert out["choices"][p * 2 + j]["token_ids"] == alone["choices"][0]["token_ids"]
    assert out["usage"]["prompt_tokens"] == prompt_tokens


# ---- sampling controls over HTTP ------------------------------------------------------------


def test_logit_bias_forces_a_token(worker: Any) -> None:
    out = _single(worker.url, PROMPT, logit_bias={"77": 100}, **GREEDY)
    assert out["token_ids"] == [77] * GREEDY["max_tokens"]


def test_min_tokens_holds_back_a_stop_token(worker: Any) -> None:
    # Token 77 is pushed to the top and ends the request, but not before 3 tokens.
    body = {**GREEDY, "ignore_eos": False, "logit_bias": {"77": 100}, "stop_token_ids": [77]}
    assert _single(worker.url, PROMPT, **body)["token_ids"] == [77]
    held = _single(worker.url, PROMPT, min_tokens=3, **body)
    assert held["token_ids"][-1] == 77 and len(held["token_ids"]) == 4
    assert 77 not in held["token_ids"][:3]
    assert held["finish_reason"] == "stop" and held["stop_reason"] == 77


def test_frequency_penalty_reduces_repeats(worker: Any) -> None:
    body = {**GREEDY, "max_tokens": 24}
    plain = _single(worker.url, PROMPT, **body)["token_ids"]
    penalised = _single(worker.url, PROMPT, frequency_penalty=2.0, **body)["token_ids"]
    assert max(Counter(plain).values()) > 1  # greedy decoding of a random model repeats itself
    assert max(Counter(penalised).values()) < max(Counter(plain).values())


def test_openai_client_gets_n_choices_and_sampling_controls(worker: Any) -> None:
    client = openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model=MODEL, prompt=["a b c", "d e f"], n=2, max_tokens=4,
                                    temperature=0.8, seed=9, presence_penalty=0.5,
                                    frequency_penalty=0.5, logit_bias={"5": -100})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], n=2, max_tokens=4, seed=2,
        stream=True, extra_body={"min_tokens": 2, "repetition_penalty": 1.2})
    indices = {ch.index for chunk in streamed for ch in chunk.choices}
    assert indices == {0, 1}
    echoed = client.completions.create(model=MODEL, prompt="The quick brown fox", echo=True, logprobs=1,
                                       best_of=3, n=1, max_tokens=4, temperature=1.0, seed=5)
    [choice] = echoed.choices
    assert choice.text.startswith("The quick brown fox")
    assert choice.logprobs is not None and choice.logprobs.token_logprobs[0] is None  # type: ignore[index]
    assert echoed.usage is not None and echoed.usage.completion_tokens == 3 * 4


def test_a_refused_run_leaves_nothing_running(worker: Any) -> None:
    r = httpx.post(f"{worker.url}/v1/completions",
                   json={"model": MODEL, "prompt": [[1, 2], [99999]], "n": 2, **GREEDY}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    wait_idle(worker.url, 0)


# ---- through the router ---------------------------------------------------------------------


def test_router_n_and_best_of_equal_the_worker(router: str, worker: Any) -> None:
    body = {"prompt": PROMPT, "n": 3, "seed": 7, **SAMPLED}
    assert _post(router, body)["choices"] == _post(worker.url, body)["choices"]
    best = {"prompt": PROMPT, "n": 1, "best_of": 3, "seed": 30, **SAMPLED}
    routed, direct = _post(router, best), _post(worker.url, best)
    assert routed["choices"] == direct["choices"]
    assert routed["usage"]["completion_tokens"] == direct["usage"]["completion_tokens"]


def test_router_batch_and_stream_equal_the_worker(router: str, worker: Any) -> None:
    body = {"prompt": ["The quick brown fox", "Hello"], "n": 2, "seed": 4, **SAMPLED}
    direct = _post(worker.url, body)
    assert _post(router, body)["choices"] == direct["choices"]
    texts: dict[int, str] = {}
    for c in _stream(router, body):
        for ch in c["choices"]:
            texts[ch["index"]] = texts.get(ch["index"], "") + ch["text"]
    assert [texts[i] for i in range(4)] == [c["text"] for c in direct["choices"]]


def test_router_forwards_the_sampling_controls(router: str, worker: Any) -> None:
    body = {**GREEDY, "max_tokens": 12, "frequency_penalty": 1.5, "presence_penalty": 0.5,
            "repetition_penalty": 1.3, "logit_bias": {"9": 5.0}, "min_tokens": 2}
    controlled = _single(router, PROMPT, **body)["token_ids"]
    assert controlled == _single(worker.url, PROMPT, **body)["token_ids"]
    assert controlled != _single(router, PROMPT, **{**GREEDY, "max_tokens": 12})["token_ids"]
    chat = {"messages": [{"role": "user", "content": "Hi"}], "n": 2, "seed": 8, **SAMPLED}
    routed = _post(router, chat, "/v1/chat/completions")["choices"]
    direct = _post(worker.url, chat, "/v1/chat/completions")["choices"]
    assert [c["message"] for c in routed] == [c["message"] for c in direct]


# ---- echo and prompt logprobs ---------------------------------------------------------------


def test_echo_returns_the_prompt_and_its_logprobs(worker: Any) -> None:
    prompt = "The quick brown fox jumps"
    plain = _single(worker.url, prompt, logprobs=2, **GREEDY)
    echoed = _single(worker.url, prompt, echo=True, logprobs=2, **GREEDY)
    assert echoed["text"] == prompt + plain["text"]
    lp = echoed["logprobs"]
    n_prompt = len(lp["tokens"]) - len(plain["logprobs"]["tokens"])
    assert n_prompt > 1 and "".join(lp["tokens"][:n_prompt]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:n_prompt])
    assert lp["token_logprobs"][n_prompt:] == plain["logprobs"]["token_logprobs"]
    assert lp["text_offset"][n_prompt] == len(prompt)
    assert lp["text_offset"] == sorted(lp["text_offset"])
    # Streamed: the first chunk opens with the prompt, and the chunks add up to the whole.
    chunks = _stream(worker.url, {"prompt": prompt, "echo": True, **GREEDY})
    assert chunks[0]["choices"][0]["text"].startswith(prompt)
    assert "".join(c["choices"][0]["text"] for c in chunks) == prompt + plain["text"]


def test_prompt_logprobs_name_each_prompt_token(worker: Any) -> None:
    out = _single(worker.url, PROMPT, prompt_logprobs=2, **GREEDY)
    entries = out["prompt_logprobs"]
    assert len(entries) == len(PROMPT) and entries[0] is None
    for tok, entry in zip(PROMPT[1:], entries[1:]):
        assert str(tok) in entry
        ranks = sorted(e["rank"] for e in entry.values() if e["rank"] is not None)
        assert ranks == [1, 2]
        best = min(entry.values(), key=lambda e: e["rank"] or 99)
        assert best["logprob"] == max(e["logprob"] for e in entry.values())


def test_router_echo_and_prompt_logprobs_equal_the_worker(router: str, worker: Any) -> None:
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "prompt_logprobs": 1, **GREEDY}
    routed, direct = _single(router, **body), _single(worker.url, **body)
    assert routed["text"] == direct["text"]
    # (The router reads a streamed run: its text offsets must count as a whole response's do,
    # even for tokens that are partial UTF-8 characters, which random token ids often are.)
    assert routed["logprobs"] == direct["logprobs"]
    assert routed["prompt_logprobs"] == direct["prompt_logprobs"]
    text = {"prompt": "Once upon a time", "echo": True, **GREEDY}
    assert _single(router, **text)["text"] == _single(worker.url, **text)["text"]


def test_echo_with_max_tokens_zero_scores_the_prompt(worker: Any, router: str) -> None:
    # What lm-eval-harness sends for loglikelihoods: the prompt back with its logprobs, nothing generated.
    prompt = "The quick brown fox jumps"
    for url in (worker.url, router):
        out = _post(url, {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0})
        choice = out["choices"][0]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert "".join(choice["logprobs"]["tokens"]) == prompt
        assert choice["logprobs"]["token_logprobs"][0] is None
        assert out["usage"]["completion_tokens"] == 0 and out["usage"]["prompt_tokens"] == len(
            choice["logprobs"]["tokens"])
        chunks = _stream(url, {"prompt": prompt, "echo": True, "max_tokens": 0, "temperature": 0})
        assert "".join(c["choices"][0]["text"] for c in chunks) == prompt
    direct = _post(worker.url, {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1})
    routed = _post(router, {"prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 1})
    assert routed["choices"][0]["logprobs"]["token_logprobs"] == direct["choices"][0]["logprobs"]["token_logprobs"]
    r = httpx.post(f"{worker.url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
