"""The router's client-facing API: validation before any worker is contacted, /health,
/metrics (the TTFT split and counters), /v1/models, the API key."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import wait_until
from router_fakes import TRANSFER_BYTES, TRANSFER_S, FakeWorker, cluster, tokenizer
from worker_support import metric, parse_metrics

LONG = "x" * 40


def post(url: str, body: Any, path: str = "/v1/completions", **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=10, **kw)


@pytest.fixture(scope="module")
def one_worker():
    w = FakeWorker("both", "w", max_model_len=64)
    with cluster(w, served_model_name="served") as r:
        yield r, w


BAD = [
    ("/v1/completions", {"max_tokens": 3}, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "temperature": -1}, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "top_p": 0}, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "n": 17}, "n", "invalid_value"),
    ("/v1/completions", {"prompt": ["a", [1]]}, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": "a", "best_of": 2, "stream": True}, "best_of", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "logit_bias": {"3": 500}}, "logit_bias", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "presence_penalty": 9}, "presence_penalty", "invalid_value"),
    ("/v1/completions", {"prompt": "a", "suffix": "b"}, "suffix", "unsupported_value"),
    ("/v1/completions", {"prompt": "a", "logprobs": 21}, "logprobs", "invalid_value"),
    ("/v1/completions", {"prompt": ""}, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": "a" * 64}, "prompt", "context_length_exceeded"),
    # Too long to tokenize at all (64 tokens of at most 12 characters, twice over).
    ("/v1/completions", {"prompt": "a" * (64 * 12 * 2 + 1)}, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * (64 * 12 * 2 + 1)}]}, "messages",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "a" * 10, "max_tokens": 60}, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "a", "model": "nope"}, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options",
     "invalid_value"),
    ("/v1/chat/completions", {"messages": []}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 0},
     "max_completion_tokens", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
     "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages", "unsupported_value"),
]


@pytest.mark.parametrize("path, body, param, code", BAD)
def test_bad_input_is_400_naming_the_field_without_contacting_workers(
    one_worker: Any, path: str, body: dict[str, Any], param: str, code: str
) -> None:
    r, w = one_worker
    before = w.counts()
    resp = post(r.url, body, path)
    err = resp.json()["error"]
    assert resp.status_code == (404 if code == "model_not_found" else 400), err
    assert (err["param"], err["code"]) == (param, code) and param in err["message"]
    assert w.counts() == before


def test_malformed_json_is_400(one_worker: Any) -> None:
    r, _ = one_worker
    resp = httpx.post(f"{r.url}/v1/completions", content=b"{nope", timeout=5,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"


def test_chat_without_a_template_is_400(one_worker: Any) -> None:
    r, w = one_worker
    toks = r.state.frontend.tokenizers  # every copy the router tokenizes with
    saved = [t.chat_template for t in toks]
    for t in toks:
        t.chat_template = None
    try:
        resp = post(r.url, {"messages": [{"role": "user", "content": "a"}]}, "/v1/chat/completions")
    finally:
        for t, template in zip(toks, saved):
            t.chat_template = template
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"
    assert "chat template" in resp.json()["error"]["message"]


def test_models_lists_the_served_names(one_worker: Any) -> None:
    r, _ = one_worker
    data = httpx.get(f"{r.url}/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["served", "tiny-random"]
    assert data[0]["max_model_len"] == 64
    assert post(r.url, {"prompt": "a", "max_tokens": 1, "model": "served"}).json()["model"] == "served"


def test_router_health_follows_decode_workers() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    with cluster(p, d) as r:
        assert httpx.get(f"{r.url}/health").status_code == 200
        d.healthy = False
        wait_until(lambda: httpx.get(f"{r.url}/health").status_code == 503, what="router health 503")
        body = httpx.get(f"{r.url}/health").json()
        assert body["status"] == "unhealthy"
        assert {w["url"]: w["healthy"] for w in body["workers"]} == {p.url: True, d.url: False}
        assert post(r.url, {"prompt": "a", "max_tokens": 1}).status_code == 503
        d.healthy = True
        wait_until(lambda: httpx.get(f"{r.url}/health").status_code == 200, what="router health 200")
        assert post(r.url, {"prompt": "a", "max_tokens": 2}).status_code == 200


def test_metrics_expose_the_ttft_split_and_counters() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    with cluster(p, d) as r:
        assert post(r.url, {"prompt": LONG, "max_tokens": 3}).status_code == 200
        assert post(r.url, {"prompt": "a", "max_tokens": 3}).status_code == 200
        text = httpx.get(f"{r.url}/metrics").text
    m = parse_metrics(text)
    assert metric(m, "kvbaton:router_requests_total", path="disagg") == 1
    assert metric(m, "kvbaton:router_requests_total", path="local") == 1
    for part in ("routing", "first_decode"):
        assert metric(m, f"kvbaton:router_ttft_{part}_seconds_count", path="disagg") == 1
        assert metric(m, f"kvbaton:router_ttft_{part}_seconds_count", path="local") == 1
    assert metric(m, "kvbaton:router_ttft_prefill_seconds_count", path="disagg") == 1
    assert metric(m, "kvbaton:router_ttft_transfer_seconds_count", path="disagg") == 1
    assert metric(m, "kvbaton:router_ttft_transfer_seconds_sum", path="disagg") == pytest.approx(TRANSFER_S)
    assert metric(m, "kvbaton:router_time_to_first_token_seconds_count") == 2
    assert metric(m, "kvbaton:router_e2e_request_latency_seconds_count") == 2
    assert metric(m, "kvbaton:router_transfers_total", outcome="fetched") == 1
    assert metric(m, "kvbaton:router_transfer_bytes_total") == TRANSFER_BYTES
    assert metric(m, "kvbaton:router_worker_healthy", worker=p.url, role="prefill") == 1
    assert metric(m, "kvbaton:router_worker_in_flight_requests", worker=d.url) == 0
    # Every known reason exists from the start, at 0 here.
    for name, label in (("fallbacks", 'reason="prefill_connect"'), ("retries", 'reason="transfer_failed"'),
                        ("transfer_failures", 'outcome="recomputed"'), ("lease_releases", 'result="released"'),
                        ("request_failures", 'stage="mid_stream"')):
        assert m[f"kvbaton:router_{name}_total{{{label}}}"] == 0


def test_api_key_guards_generation_but_not_health() -> None:
    w = FakeWorker("both", "w")
    with cluster(w, api_key="sekret") as r:
        assert post(r.url, {"prompt": "a"}).status_code == 401
        ok = post(r.url, {"prompt": "a", "max_tokens": 1}, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        health = httpx.get(f"{r.url}/health")
        assert health.status_code == 200
        # Open to probes, but the workers' URLs and errors are only for callers with the key.
        assert health.json()["workers"] == [{"role": "both", "healthy": True}]
        full = httpx.get(f"{r.url}/health", headers={"Authorization": "Bearer sekret"}).json()
        assert [w["url"] for w in full["workers"]] == [w.url]
        assert httpx.get(f"{r.url}/metrics").status_code == 200


def test_token_id_prompts_are_forwarded_unchanged() -> None:
    w = FakeWorker("both", "w")
    with cluster(w) as r:
        assert post(r.url, {"prompt": [1, 2, 3], "max_tokens": 1}).status_code == 200
        assert post(r.url, {"prompt": "ab", "max_tokens": 1}).status_code == 200
    assert w.decodes[0]["prompt"] == [1, 2, 3]
    assert w.decodes[1]["prompt"] == list(tokenizer().encode("ab", add_special_tokens=False))


def test_one_slow_tokenization_does_not_hold_the_others() -> None:
    # The router tokenizes with a small pool of tokenizer copies: a huge prompt holds one copy,
    # and other requests are tokenized meanwhile (one shared tokenizer behind a lock used to
    # hold every request for the whole tokenization).
    import copy
    import threading

    from kvbaton.router.config import RouterConfig
    from kvbaton.router.frontend import Frontend

    gate = threading.Event()

    class Gated:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            if text.startswith("SLOW"):
                gate.wait(30)
            return list(self.inner.encode(text, add_special_tokens=add_special_tokens))

        def get_vocab(self) -> dict[str, int]:
            return dict(self.inner.get_vocab())

        def __deepcopy__(self, memo: dict[int, Any]) -> Gated:
            return Gated(copy.deepcopy(self.inner, memo))

    front = Frontend(RouterConfig(workers=("http://127.0.0.1:9",), model="tiny-random"), tokenizer=Gated(tokenizer()))
    slow = threading.Thread(target=front._encode, args=("SLOW " * 10,))
    slow.start()
    try:
        done: list[list[int]] = []
        fast = threading.Thread(target=lambda: done.append(front._encode("hello")))
        fast.start()
        fast.join(10)
        assert done == [list(tokenizer().encode("hello", add_special_tokens=False))]
    finally:
        gate.set()
        slow.join(10)
