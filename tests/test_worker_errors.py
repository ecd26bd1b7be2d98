"""Bad input never crashes or wedges the worker: each class gets a 4xx with an OpenAI-shaped
error naming the field, and the worker still answers a good request afterwards."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from worker_support import MODEL, running_worker

API_KEY = "sk-kvbaton-test"
CONTEXT = 128
MAX_BYTES = 64 << 10
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def worker():
    with running_worker(
        worker={"api_key": API_KEY, "max_request_bytes": MAX_BYTES, "served_model_name": "kvb"},
        max_model_len=CONTEXT,
    ) as w:
        yield w


@pytest.fixture(scope="module")
def http(worker):
    with httpx.Client(base_url=worker.url, headers=AUTH, timeout=30) as c:
        yield c


def _assert_error(r: httpx.Response, status: int, param: str | None, text: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert text.lower() in err["message"].lower(), err
    return err


def _assert_serving(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


LONG_TEXT = "x" * (CONTEXT + 10)  # the byte tokenizer: one token per byte
# Longer than any text of CONTEXT tokens can be (its longest token has 12 characters, and the
# bound allows twice that): refused before the tokenizer sees it.
HUGE_TEXT = "x" * (CONTEXT * 12 * 2 + 1)

COMPLETION_CASES = [
    # (id, body (dict or raw str), status, param, message fragment)
    ("malformed-json", '{"prompt": "x",', 400, None, "malformed JSON"),
    ("not-an-object", "[1, 2]", 400, None, "JSON object"),
    ("empty-body", "", 400, None, "missing"),
    ("missing-prompt", {"max_tokens": 3}, 400, "prompt", "required"),
    ("prompt-wrong-type", {"prompt": 123}, 400, "prompt", "string or a list of token ids"),
    ("prompt-bad-token-ids", {"prompt": [1, 99999]}, 400, "prompt", "token ids"),
    ("max-tokens-wrong-type", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", "integer"),
    ("temperature-wrong-type", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ("stop-wrong-type", {"prompt": "x", "stop": 5}, 400, "stop", "stop"),
    ("empty-prompt", {"prompt": ""}, 400, "prompt", "empty"),
    ("empty-token-list", {"prompt": []}, 400, "prompt", "empty"),
    ("prompt-too-long", {"prompt": LONG_TEXT}, 400, "prompt", "context"),
    ("prompt-too-long-to-tokenize", {"prompt": HUGE_TEXT}, 400, "prompt", "characters"),
    ("prompt-ids-too-long", {"prompt": [5] * (CONTEXT + 1)}, 400, "prompt", "context"),
    ("max-tokens-zero", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("max-tokens-negative", {"prompt": "x", "max_tokens": -5}, 400, "max_tokens", ">= 1"),
    ("max-tokens-past-context", {"prompt": "x", "max_tokens": CONTEXT}, 400, "max_tokens", "context"),
    ("negative-temperature", {"prompt": "x", "temperature": -0.5}, 400, "temperature", ">= 0"),
    ("nan-temperature", '{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    ("top-p-zero", {"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("top-p-above-one", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("n-zero", {"prompt": "x", "n": 0}, 400, "n", "[1, 16]"),
    ("n-above-maximum", {"prompt": "x", "n": 17}, 400, "n", "maximum"),
    ("best-of-below-n", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", "[n, 16]"),
    ("best-of-streamed", {"prompt": "x", "best_of": 2, "stream": True}, 400, "best_of", "streamed"),
    ("batch-mixed", {"prompt": ["a", [1, 2]]}, 400, "prompt", "prompt[1]"),
    ("batch-with-empty-ids", {"prompt": [[1, 2], []]}, 400, "prompt", "prompt[1]"),
    ("batch-too-large", {"prompt": ["a"] * 65}, 400, "prompt", "at most 64"),
    ("batch-with-bad-ids", {"prompt": [[1, 2], [99999]]}, 400, "prompt", "token ids"),
    ("logit-bias-key", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
    ("logit-bias-value", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias", "100"),
    ("logit-bias-out-of-vocab", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias", "vocab"),
    ("presence-penalty-range", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "2"),
    ("frequency-penalty-range", {"prompt": "x", "frequency_penalty": -2.5}, 400, "frequency_penalty", "2"),
    ("repetition-penalty-zero", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ("min-tokens-above-max", {"prompt": "x", "min_tokens": 9, "max_tokens": 4}, 400, "min_tokens",
     "max_tokens"),
    ("suffix", {"prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported"),
    ("too-many-logprobs", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "at most"),
    ("negative-logprobs", {"prompt": "x", "logprobs": -1}, 400, "logprobs", "logprobs"),
    ("seed-out-of-range", {"prompt": "x", "seed": 2**70}, 400, "seed", "seed"),
    ("stream-options-without-stream", {"prompt": "x", "stream_options": {"include_usage": True}},
     400, "stream_options", "stream"),
    ("unknown-model", {"prompt": "x", "model": "gpt-17"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize(
    "body,status,param,text", [c[1:] for c in COMPLETION_CASES], ids=[c[0] for c in COMPLETION_CASES]
)
def test_bad_completion_request(http, body, status, param, text):
    if isinstance(body, str):
        r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post("/v1/completions", json={"model": MODEL, **body} if "model" not in body else body)
    _assert_error(r, status, param, text)
    _assert_serving(http)


MSG = [{"role": "user", "content": "hi"}]
CHAT_CASES = [
    ("missing-messages", {"max_tokens": 3}, 400, "messages", "required"),
    ("messages-wrong-type", {"messages": "hi"}, 400, "messages", "list"),
    ("message-without-role", {"messages": [{"content": "hi"}]}, 400, "messages", "role"),
    ("role-wrong-type", {"messages": [{"role": 1, "content": "hi"}]}, 400, "messages", "string"),
    ("empty-messages", {"messages": []}, 400, "messages", "non-empty"),
    ("image-part", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages", "unsupported"),
    ("chat-too-long", {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400, "messages", "context"),
    ("chat-too-long-to-tokenize", {"messages": [{"role": "user", "content": HUGE_TEXT}]}, 400, "messages",
     "characters"),
    ("max-completion-tokens-zero", {"messages": MSG, "max_completion_tokens": 0},
     400, "max_completion_tokens", ">= 1"),
    ("max-tokens-past-context", {"messages": MSG, "max_tokens": CONTEXT}, 400, "max_tokens", "context"),
    ("top-logprobs-without-logprobs", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
    ("top-logprobs-negative", {"messages": MSG, "logprobs": True, "top_logprobs": -1},
     400, "top_logprobs", "top_logprobs"),
    ("negative-temperature", {"messages": MSG, "temperature": -1}, 400, "temperature", ">= 0"),
    ("n-above-maximum", {"messages": MSG, "n": 17}, 400, "n", "maximum"),
    ("chat-logit-bias-value", {"messages": MSG, "logit_bias": {"5": -101}}, 400, "logit_bias", "100"),
    ("tools-malformed", {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools", "tools[0]"),
    ("response-format-xml", {"messages": MSG, "response_format": {"type": "xml"}}, 400, "response_format",
     "unsupported"),
    ("unknown-model", {"messages": MSG, "model": "nope"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize(
    "body,status,param,text", [c[1:] for c in CHAT_CASES], ids=[c[0] for c in CHAT_CASES]
)
def test_bad_chat_request(http, body, status, param, text):
    r = http.post("/v1/chat/completions", json={"model": MODEL, **body} if "model" not in body else body)
    _assert_error(r, status, param, text)
    _assert_serving(http)


def test_served_model_name_is_accepted(http):
    for name in ("kvb", MODEL):
        r = http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == name
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids == ["kvb", MODEL]


def test_oversized_body_is_rejected(http):
    big = {"model": MODEL, "prompt": "x" * (MAX_BYTES + 1)}
    err = _assert_error(http.post("/v1/completions", json=big), 413, None, "exceeds")
    assert err["code"] == "request_too_large"
    # The same without Content-Length (chunked upload) is cut off while reading.
    data = json.dumps(big).encode()
    chunks = (data[i:i + 8192] for i in range(0, len(data), 8192))
    r = http.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"})
    _assert_error(r, 413, None, "exceeds")
    _assert_serving(http)


def test_api_key_required(worker, http):
    url = worker.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=headers, timeout=10)
        err = _assert_error(r, 401, None, "API key")
        assert err["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code == 401
        assert httpx.get(f"{url}/debug/engine", headers=headers, timeout=10).status_code == 401
    # Probes and scrapes stay open.
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
    _assert_serving(http)


def test_unknown_route_and_method(http):
    _assert_error(http.get("/v1/nothing"), 404, None, "not found")
    _assert_error(http.get("/v1/completions"), 405, None, "not allowed")
    _assert_serving(http)


def test_official_client_sees_errors(worker):
    client = openai.OpenAI(base_url=f"{worker.url}/v1", api_key=API_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSG)
    assert e.value.body["param"] == "model"
    bad = openai.OpenAI(base_url=f"{worker.url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    # Errors after the stream was requested come back before any event is sent.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="", max_tokens=2, stream=True)
    assert e.value.body["param"] == "prompt"
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=1).choices
