"""The router in front of two real ``both`` workers (tiny random model): greedy output through
the router equals a direct worker request (the colocated path)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from kvbaton.router.config import RouterConfig
from kvbaton.router.server import RouterThread
from worker_support import running_worker, wait_idle


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[str, list[str]]]:
    with running_worker() as w1, running_worker() as w2:
        # Disaggregation off: this checks the colocated path, which works with any worker.
        cfg = RouterConfig(workers=(w1.url, w2.url), model="tiny-random", port=0, decode_policy="round_robin",
                           disagg_min_tokens=1 << 30, health_interval_s=0.5)
        router = RouterThread(cfg).start()
        try:
            yield router.url, [w1.url, w2.url]
        finally:
            assert router.stop()


GREEDY = {"temperature": 0, "max_tokens": 12, "ignore_eos": True, "return_token_ids": True}


def _stream(url: str, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def test_greedy_completion_through_the_router_equals_a_direct_request(setup: tuple[str, list[str]]) -> None:
    router, workers = setup
    body = {"prompt": "The quick brown fox", **GREEDY}
    direct = httpx.post(f"{workers[0]}/v1/completions", json=body, timeout=60).json()
    for _ in range(2):  # round robin: once on each worker
        routed = httpx.post(f"{router}/v1/completions", json=body, timeout=60).json()
        assert routed["choices"][0]["text"] == direct["choices"][0]["text"]
        assert routed["choices"][0]["token_ids"] == direct["choices"][0]["token_ids"]
        assert routed["choices"][0]["finish_reason"] == "length"
        assert routed["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    streamed = _stream(router, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in streamed) == direct["choices"][0]["text"]


def test_greedy_chat_stream_through_the_router_equals_a_direct_request(setup: tuple[str, list[str]]) -> None:
    router, workers = setup
    body = {"messages": [{"role": "user", "content": "Hello there"}], **GREEDY}
    direct = httpx.post(f"{workers[1]}/v1/chat/completions", json=body, timeout=60).json()
    chunks = _stream(router, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:])
    assert text == direct["choices"][0]["message"]["content"]
    ids = [t for c in chunks[1:] for t in c["choices"][0].get("token_ids", [])]
    assert ids == direct["choices"][0]["token_ids"]
    routed = httpx.post(f"{router}/v1/chat/completions", json=body, timeout=60).json()
    assert routed["choices"][0]["message"] == direct["choices"][0]["message"]
    for w in workers:
        wait_idle(w, 0)


def test_router_metrics_federate_the_workers_series(setup: tuple[str, list[str]]) -> None:
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    from kvbaton.bench.client import scrape_prefix_cache

    url, workers = setup
    prompt = list(range(1, 40))
    for _ in range(2):  # round robin: each worker sees the prompt once
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, **GREEDY}, timeout=60)
        assert r.status_code == 200, r.text
    for w in workers:
        wait_idle(w, 0)
    text = httpx.get(f"{url}/metrics", timeout=10).text
    queries = {s.labels["worker"]: s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "kvbaton:prefix_cache_queries_total"}
    direct = {w: sum(s.value for f in text_string_to_metric_families(httpx.get(f"{w}/metrics", timeout=10).text)
                     for s in f.samples if s.name == "kvbaton:prefix_cache_queries_total") for w in workers}
    assert queries == direct and all(v > 0 for v in queries.values())
    # What kvbaton bench reads through the router: the cluster's counters, not nothing.
    async def scrape() -> tuple[float, float] | None:
        async with httpx.AsyncClient(timeout=10) as c:
            return await scrape_prefix_cache(c, url)

    got = asyncio.run(scrape())
    assert got is not None and got[0] == sum(direct.values())
