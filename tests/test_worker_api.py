"""The worker's OpenAI API through the official client: outputs equal LLM.generate's."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conftest import make_llm, random_prompts
from kvbaton import SamplingParams
from worker_support import MODEL, metric, parse_metrics, running_worker

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def worker():
    with running_worker() as w:
        yield w


@pytest.fixture(scope="module")
def client(worker):
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """Greedy LLM outputs of the same model (same seed), computed in-process."""
    llm = make_llm()

    def run(prompt, max_tokens: int = MAX_TOKENS, chat: bool = False, ignore_eos: bool = True,
            stop: list[str] | None = None):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos,
                                stop=stop or [])
        return (llm.chat(prompt, params) if chat else llm.generate([prompt], params))[0]

    return run


def _ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_completion_token_ids_equal_generate(client, reference):
    for prompt in random_prompts(3, 1, 60, seed=11):
        r = client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        ref = reference(prompt)
        assert _ids(r.choices[0]) == ref.token_ids
        assert r.choices[0].text == ref.text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.prompt_tokens == len(prompt)
        assert r.usage.completion_tokens == MAX_TOKENS
        assert r.usage.total_tokens == len(prompt) + MAX_TOKENS
        assert r.model == MODEL and r.object == "text_completion"


def test_completion_text_prompt_and_eos(client, reference):
    # Without ignore_eos the request may stop early at EOS: both sides must agree.
    r = client.completions.create(
        model=MODEL, prompt="Hello, kvbaton!", max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True},
    )
    ref = reference("Hello, kvbaton!", ignore_eos=False)
    assert _ids(r.choices[0]) == ref.token_ids
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason


def test_default_max_tokens_is_16_for_completions(client):
    r = client.completions.create(model=MODEL, prompt=[5, 6, 7], temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_chat_equals_llm_chat(client, reference):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime number."},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=MAX_TOKENS, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    ref = reference(messages, chat=True)
    assert _ids(r.choices[0]) == ref.token_ids
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.object == "chat.completion"


def test_chat_default_max_tokens_runs_to_eos_or_cap(worker, client, reference):
    # Chat without max_tokens: bounded by min(1024, context - prompt, KV cache - prompt) (see
    # docs/worker.md); this worker's 4096-token context and cache leave the 1024 as the bound.
    cap = worker.state.config.default_chat_max_tokens
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       extra_body={"return_token_ids": True})
    ref = reference(messages, max_tokens=cap, chat=True, ignore_eos=False)
    assert _ids(r.choices[0]) == ref.token_ids  # EOS or the cap, whichever comes first
    assert r.choices[0].finish_reason == ref.finish_reason
    # Nothing to stop at: it runs to exactly the cap.
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == cap


def test_completion_stream_equals_generate(client, reference):
    prompt = random_prompts(1, 5, 40, seed=12)[0]
    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ))
    ref = reference(prompt)
    body, usage_chunk = chunks[:-1], chunks[-1]
    assert "".join(c.choices[0].text for c in body) == ref.text
    assert [t for c in body for t in c.choices[0].model_extra["token_ids"]] == ref.token_ids
    assert [c.choices[0].finish_reason for c in body][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == MAX_TOKENS
    assert usage_chunk.usage.prompt_tokens == len(prompt)


def test_chat_stream_equals_llm_chat(client, reference):
    messages = [{"role": "user", "content": "Stream me something."}]
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    chunks = list(stream)
    ref = reference(messages, chat=True)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    ids = [t for c in chunks for t in (c.choices[0].model_extra.get("token_ids") or [])]
    assert text == ref.text and ids == ref.token_ids
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_stop_string_equals_generate_streamed_or_not(client, reference):
    # Pick a stop string from the middle of a greedy output, so the request must end there.
    for prompt in random_prompts(10, 5, 30, seed=15):
        full = reference(prompt, max_tokens=24).text
        candidates = [full[i:i + 2] for i in range(3, len(full) - 2)
                      if full[i:i + 2].isprintable() and full.find(full[i:i + 2]) >= 3]
        if candidates:
            stop = candidates[0]
            break
    else:
        pytest.skip("no usable stop string in the random model's outputs")
    ref = reference(prompt, max_tokens=24, stop=[stop])
    assert ref.finish_reason == "stop" and stop not in ref.text
    kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=stop,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    assert whole.choices[0].text == ref.text
    assert whole.choices[0].finish_reason == "stop"
    assert whole.choices[0].model_extra["stop_reason"] == stop
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stream_ends_with_done(worker):
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{worker.url}/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_32_concurrent_streams_equal_generate(worker, reference):
    prompts = random_prompts(32, 1, 80, seed=13)
    aclient = openai.AsyncOpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0,
                                 timeout=120)

    async def one(prompt):
        stream = await aclient.completions.create(
            model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        ids, text = [], ""
        async for c in stream:
            ids += c.choices[0].model_extra["token_ids"]
            text += c.choices[0].text
        return ids, text

    async def run_all():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    for prompt, (ids, text) in zip(prompts, results):
        ref = reference(prompt)
        assert ids == ref.token_ids
        assert text == ref.text


def test_logprobs_shapes(client):
    r = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, temperature=0,
                                  logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(d) <= 4 for d in lp.top_logprobs)
    c = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True},
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    # The greedy token is the most likely one.
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-5 for t in content)


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt=[9, 8, 7], max_tokens=8, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"ignore_eos": True, "return_token_ids": True, "top_k": 50})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert _ids(a.choices[0]) == _ids(b.choices[0])


def test_cache_salt_isolates_prefix_cache(client):
    prompt = random_prompts(1, 64, 64, seed=14)[0]  # 4 full blocks of 16

    def cached(salt: str) -> int:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0,
                                      extra_body={"cache_salt": salt, "ignore_eos": True})
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # same prompt, other tenant: nothing shared
    assert cached("tenant-a") == 48  # same tenant: all but the last block is reused


def test_models_health_and_metrics(worker, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["role"] == "both"
    health = httpx.get(f"{worker.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["role"] == "both"

    before = parse_metrics(httpx.get(f"{worker.url}/metrics", timeout=10).text)
    client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    r = httpx.get(f"{worker.url}/metrics", timeout=10)
    assert r.headers["content-type"].startswith("text/plain")
    after = parse_metrics(r.text)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("kvbaton:request_success_total", finished_reason="length") == 1
    assert delta("kvbaton:prompt_tokens_total") == 4
    assert delta("kvbaton:generation_tokens_total") == 5
    assert delta("kvbaton:time_to_first_token_seconds_count") == 1
    assert delta("kvbaton:e2e_request_latency_seconds_count") == 1
    assert delta("kvbaton:time_per_output_token_seconds_count") == 4
    assert delta("kvbaton:prefix_cache_queries_total") == 4
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_blocks_used"):
        assert f"kvbaton:{gauge}" in {k.partition("{")[0] for k in after}
    assert metric(after, "kvbaton:kv_blocks_total") == 256
    assert "kvbaton:prefix_cache_hits_total" in {k.partition("{")[0] for k in after}


def test_prompts_are_tokenized_off_the_engine_thread() -> None:
    # The engine thread's tokenizer must never encode a prompt (a long one would stall every
    # running stream); the worker's tokenizer thread encodes with its own copy, to the same ids.
    with running_worker() as w:
        eng = w.state.engine.engine
        want = eng.tokenize("hello there, tokenizer")

        def refuse(*_a, **_k):
            raise AssertionError("a prompt was encoded by the engine's tokenizer")

        eng.tokenizer.encode = refuse
        by_text = httpx.post(f"{w.url}/v1/completions", timeout=30,
                             json={"prompt": "hello there, tokenizer", "max_tokens": 3, "temperature": 0})
        by_ids = httpx.post(f"{w.url}/v1/completions", timeout=30,
                            json={"prompt": want, "max_tokens": 3, "temperature": 0})
        assert by_text.status_code == 200 and by_ids.status_code == 200, by_text.text
        assert by_text.json()["choices"][0]["text"] == by_ids.json()["choices"][0]["text"]
        assert by_text.json()["usage"]["prompt_tokens"] == len(want)
        chat = httpx.post(f"{w.url}/v1/chat/completions", timeout=30,
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert chat.status_code == 200, chat.text
