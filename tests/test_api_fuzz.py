"""Fuzz the HTTP API: hundreds of generated malformed, extreme or odd requests against a worker
and a router. Every one must be answered with a 2xx or a 4xx, never a 5xx or a hang, and the
server must be healthy, idle and consistent afterwards (a request used to be able to crash the
engine loop: top_p 1e-46)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from router_fakes import FakeWorker, cluster
from worker_support import running_worker, wait_idle

CONTEXT = 96

# Values a client might put in any field: right, wrong-typed, extreme or absurd.
_numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 1e-46, 5e-324, 1e-5, 1e308, 2**63, 2**64]),
)
_scalars = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=20))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                       max_leaves=8)
_token_ids = st.lists(st.integers(-5, 600), min_size=0, max_size=40)
_prompts = st.one_of(st.text(max_size=200), _token_ids, st.lists(_token_ids, max_size=3), _values,
                     st.just("x" * 5000), st.just("\ud800"), st.just("a\x00b"))
_messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
                                    "content": st.one_of(st.text(max_size=80), _values)}), max_size=3),
    _values,
)
_sampling = {
    "max_tokens": st.one_of(st.integers(-3, 8), _values),
    "temperature": st.one_of(st.floats(0, 3), _numbers, _values),
    "top_p": st.one_of(st.floats(0, 1), _numbers),
    "top_k": st.one_of(st.integers(-2, 600), _numbers),
    "seed": st.one_of(st.integers(-(2**64), 2**65), _values),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3), _values),
    "stop_token_ids": st.one_of(st.lists(st.integers(-3, 600), max_size=3), _values),
    "logprobs": st.one_of(st.integers(-2, 30), st.booleans(), _values),
    "top_logprobs": st.one_of(st.integers(-2, 30), _values),
    "n": st.one_of(st.integers(-1, 3), _values),
    "stream": st.one_of(st.booleans(), _values),
    "ignore_eos": st.one_of(st.booleans(), _values),
    "cache_salt": st.one_of(st.text(max_size=10), _values),
    "model": st.one_of(st.sampled_from(["tiny-random", "nope"]), _values),
    "echo": st.one_of(st.booleans(), _values),
    "best_of": st.one_of(st.integers(-1, 4), _values),
    "presence_penalty": st.one_of(st.floats(-3, 3), _numbers, _values),
    "frequency_penalty": st.one_of(st.floats(-3, 3), _numbers, _values),
    "repetition_penalty": st.one_of(st.floats(-1, 3), _numbers, _values),
    "min_tokens": st.one_of(st.integers(-2, 10), _values),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(st.integers(-5, 600).map(str), st.text(max_size=4)),
                                            st.one_of(st.floats(-150, 150), _numbers), max_size=3), _values),
    "prompt_logprobs": st.one_of(st.integers(-2, 30), _values),
    "kv_transfer_params": st.one_of(st.none(), _values),
}


@st.composite
def _bodies(draw: st.DrawFn, chat: bool) -> str | dict[str, Any]:
    if draw(st.integers(0, 19)) == 0:  # now and then not even a JSON object
        return draw(st.sampled_from(["", "{", "[1,2]", "null", '{"prompt": NaN}', "\"x\"", "{}" * 3]))
    body: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        body["messages" if chat else "prompt"] = draw(_messages if chat else _prompts)
    for name in draw(st.sets(st.sampled_from(sorted(_sampling)), max_size=6)):
        body[name] = draw(_sampling[name])
    if body.get("max_tokens") is None or not isinstance(body["max_tokens"], int) or body["max_tokens"] > 8:
        body.setdefault("max_tokens", 4)  # keep the valid ones short: this tests answers, not speed
    return body


def _send(client: httpx.Client, path: str, body: str | dict[str, Any]) -> None:
    try:
        content = body if isinstance(body, str) else json.dumps(body)
    except ValueError:
        return
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        data = r.read()
        assert r.status_code < 500, (body, r.status_code, data[:500])
        if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/event-stream"):
            assert data.rstrip().endswith(b"data: [DONE]"), (body, data[-300:])


_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def worker_client():
    with running_worker(max_model_len=CONTEXT, num_kv_blocks=64) as w, \
            httpx.Client(base_url=w.url, timeout=60) as c:
        yield w, c
        assert httpx.get(f"{w.url}/health", timeout=10).status_code == 200
        wait_idle(w.url, 0)


@_SETTINGS
@given(body=_bodies(chat=False))
def test_worker_completions_never_5xx(worker_client: Any, body: str | dict[str, Any]) -> None:
    _send(worker_client[1], "/v1/completions", body)


@_SETTINGS
@given(body=_bodies(chat=True))
def test_worker_chat_never_5xx(worker_client: Any, body: str | dict[str, Any]) -> None:
    _send(worker_client[1], "/v1/chat/completions", body)


@pytest.fixture(scope="module")
def router_client():
    w = FakeWorker("both", "w", max_model_len=CONTEXT)
    with cluster(w) as r, httpx.Client(base_url=r.url, timeout=60) as c:
        yield r, c
        assert httpx.get(f"{r.url}/health", timeout=10).status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_bodies(chat=False))
def test_router_completions_never_5xx(router_client: Any, body: str | dict[str, Any]) -> None:
    _send(router_client[1], "/v1/completions", body)
