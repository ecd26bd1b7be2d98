"""Strings that cannot be encoded: JSON may carry a lone UTF-16 surrogate escape ("\\ud800"),
which Python's json decodes into a str that no tokenizer, chat template or ``.encode()``
accepts. Every such string field is a 400 naming the field (``invalid_value``), on a worker
and on the router alike, before any work starts; a properly paired escape (a non-BMP
character such as an emoji) is accepted."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pydantic
import pytest

from kvbaton.api.protocol import UNPAIRED_SURROGATE, ChatCompletionRequest, CompletionRequest
from router_fakes import FakeWorker, cluster
from worker_support import engine_debug, running_worker, wait_idle

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}

# (id, path, raw JSON text, param, where the message says the bad string is, the surrogate's
# hex, its index in that decoded string). The texts are
# raw strings: the JSON itself holds the six characters \ud800, as a client would send them
# (json.dumps would escape them anyway; httpx's json= cannot send them at all).
BAD = [
    ("prompt", CMPL, r'{"prompt": "hi \ud800 there", "max_tokens": 2}', "prompt", "prompt", "d800", 3),
    ("prompt-low-surrogate", CMPL, r'{"prompt": "\udc00", "max_tokens": 2}', "prompt", "prompt", "dc00", 0),
    ("prompt-pair-reversed", CMPL, r'{"prompt": "ab\ude00\ud83d", "max_tokens": 2}', "prompt", "prompt",
     "de00", 2),
    ("prompt-half-a-pair", CMPL, r'{"prompt": "\ud83d\ude00 \ud83d", "max_tokens": 2}', "prompt", "prompt",
     "d83d", 2),
    ("stop-string", CMPL, r'{"prompt": "hi", "max_tokens": 2, "stop": "x\ud800"}', "stop", "stop", "d800", 1),
    ("stop-list", CMPL, r'{"prompt": "hi", "max_tokens": 2, "stop": ["ok", "x\udfff"]}', "stop", "stop[1]",
     "dfff", 1),
    ("cache-salt", CMPL, r'{"prompt": "hi", "max_tokens": 2, "cache_salt": "salt\ud800"}', "cache_salt",
     "cache_salt", "d800", 4),
    ("model", CMPL, r'{"prompt": "hi", "max_tokens": 2, "model": "m\ud800"}', "model", "model", "d800", 1),
    ("chat-content", CHAT, r'{"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2}',
     "messages", "messages[0].content", "d800", 3),
    ("chat-content-part", CHAT,
     r'{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": '
     r'[{"type": "text", "text": "ok"}, {"type": "text", "text": "\udbff"}]}], "max_tokens": 2}',
     "messages", "messages[1].content[1].text", "dbff", 0),
    ("chat-role", CHAT, r'{"messages": [{"role": "us\ud800er", "content": "hi"}], "max_tokens": 2}',
     "messages", "messages[0].role", "d800", 2),
    ("chat-stop", CHAT,
     r'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": ["\ud800"]}',
     "stop", "stop[0]", "d800", 0),
    ("chat-cache-salt", CHAT,
     r'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "cache_salt": "\ud800"}',
     "cache_salt", "cache_salt", "d800", 0),
]
BAD_IDS = [case[0] for case in BAD]

# Valid non-BMP text: the emoji U+1F600, spelled in JSON as the surrogate pair \ud83d\ude00.
GOOD = [
    ("prompt", CMPL, r'{"prompt": "hi \ud83d\ude00 there", "max_tokens": 2}'),
    ("stop", CMPL, r'{"prompt": "hi", "max_tokens": 2, "stop": ["\ud83d\ude00", "x"]}'),
    ("cache-salt", CMPL, r'{"prompt": "hi", "max_tokens": 2, "cache_salt": "salt\ud83d\ude00"}'),
    ("chat-content", CHAT, r'{"messages": [{"role": "user", "content": "hi \ud83d\ude00"}], "max_tokens": 2}'),
    ("chat-content-part", CHAT,
     r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d\ude00"}]}], '
     r'"max_tokens": 2}'),
    # ``user`` is accepted and ignored (never encoded), so even a lone surrogate there is harmless.
    ("ignored-user", CMPL, r'{"prompt": "hi", "max_tokens": 2, "user": "u\ud800"}'),
]
GOOD_IDS = [case[0] for case in GOOD]


def raw_post(http: httpx.Client, path: str, text: str | bytes) -> httpx.Response:
    """POST the JSON text exactly as written (``str``: ASCII with the escapes; or bytes)."""
    data = text.encode("ascii") if isinstance(text, str) else text
    return http.post(path, content=data, headers=JSON)


def assert_rejected(resp: httpx.Response, param: str, where: str, char: str, index: int) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, "invalid_value"), err
    assert err["message"] == (
        f"{where}: contains an unpaired UTF-16 surrogate (\\u{char} at index {index}); send valid Unicode"
    ), err


def test_the_bodies_hold_the_escape_itself() -> None:
    for _, _, text, *_ in BAD:
        assert "\\ud" in text and "\\\\" not in text
        assert text.isascii()
    for _, _, text in GOOD[:-1]:
        assert "\\ud83d\\ude00" in text and text.isascii()


# ---- the models (what direct callers and both servers validate with) ------------------------


def test_models_reject_a_lone_surrogate_with_a_typed_error() -> None:
    with pytest.raises(pydantic.ValidationError) as e:
        CompletionRequest.model_validate({"prompt": "a\ud800b"})
    err = e.value.errors()[0]
    assert err["type"] == UNPAIRED_SURROGATE and err["loc"] == ("prompt",)
    assert err["ctx"] == {"field_path": "prompt", "char": "\\ud800", "index": 1}
    with pytest.raises(pydantic.ValidationError) as e:
        ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]})
    err = e.value.errors()[0]
    assert err["type"] == UNPAIRED_SURROGATE and err["loc"] == ("messages",)
    assert err["ctx"]["field_path"] == "messages[0].content[0].text"
    # Paired, the same character is one code point and fine; token-id prompts have no text.
    assert CompletionRequest.model_validate({"prompt": "\U0001f600", "stop": ["\U0001f600"]})
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]})


# ---- a real worker ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker() -> Iterator[Any]:
    with running_worker() as w:
        yield w


@pytest.fixture(scope="module")
def whttp(worker: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=worker.url, timeout=30) as c:
        yield c


def _worker_serves(http: httpx.Client) -> None:
    r = http.post(CMPL, json={"prompt": "hello", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("name, path, text, param, where, char, index", BAD, ids=BAD_IDS)
def test_worker_rejects_lone_surrogates(worker: Any, whttp: httpx.Client, name: str, path: str, text: str,
                                        param: str, where: str, char: str, index: int) -> None:
    baseline = engine_debug(worker.url)["stats"]["kv_blocks_used"]
    assert_rejected(raw_post(whttp, path, text), param, where, char, index)
    wait_idle(worker.url, baseline)
    _worker_serves(whttp)


def test_worker_rejects_surrogates_sent_as_raw_bytes(whttp: httpx.Client) -> None:
    # The surrogate encoded as if it were a character (CESU-8 style bytes ED A0 80): Python's
    # json decodes bytes with "surrogatepass", so this too arrives as a str holding U+D800.
    body = b'{"prompt": "hi \xed\xa0\x80", "max_tokens": 2}'
    assert_rejected(raw_post(whttp, CMPL, body), "prompt", "prompt", "d800", 3)
    _worker_serves(whttp)


@pytest.mark.parametrize("name, path, text", GOOD, ids=GOOD_IDS)
def test_worker_accepts_valid_non_bmp_text(whttp: httpx.Client, name: str, path: str, text: str) -> None:
    resp = raw_post(whttp, path, text)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] >= 1


def test_worker_is_intact_after_the_bad_requests(worker: Any, whttp: httpx.Client) -> None:
    baseline = engine_debug(worker.url)["stats"]["kv_blocks_used"]
    for _, path, text, *_ in BAD:
        assert raw_post(whttp, path, text).status_code == 400
    state = wait_idle(worker.url, baseline)
    assert state["integrity_error"] is None
    _worker_serves(whttp)


# ---- the router in front of a (fake) worker --------------------------------------------------


@pytest.fixture(scope="module")
def router() -> Iterator[tuple[httpx.Client, FakeWorker]]:
    w = FakeWorker("both", "w")
    with cluster(w) as r, httpx.Client(base_url=r.url, timeout=30) as http:
        yield http, w


def _router_serves(http: httpx.Client) -> None:
    r = http.post(CMPL, json={"prompt": "hello", "max_tokens": 2, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "t0 t1 "


@pytest.mark.parametrize("name, path, text, param, where, char, index", BAD, ids=BAD_IDS)
def test_router_rejects_lone_surrogates_without_contacting_workers(
    router: tuple[httpx.Client, FakeWorker], name: str, path: str, text: str, param: str, where: str, char: str,
    index: int,
) -> None:
    r, w = router
    before = w.counts()
    assert_rejected(raw_post(r, path, text), param, where, char, index)
    assert w.counts() == before
    _router_serves(r)


def test_router_rejects_surrogates_in_kv_transfer_params(router: tuple[httpx.Client, FakeWorker]) -> None:
    r, w = router
    before = w.counts()
    body = r'{"prompt": "hi", "max_tokens": 2, "kv_transfer_params": {"lease_id": "\ud800"}}'
    assert_rejected(raw_post(r, CMPL, body), "kv_transfer_params", "kv_transfer_params.lease_id",
                    "d800", 0)
    assert w.counts() == before


@pytest.mark.parametrize("name, path, text", GOOD, ids=GOOD_IDS)
def test_router_accepts_valid_non_bmp_text(router: tuple[httpx.Client, FakeWorker], name: str, path: str,
                                           text: str) -> None:
    r, w = router
    resp = raw_post(r, path, text)
    assert resp.status_code == 200, resp.text
    with w.lock:
        sent = w.decodes[-1]
    if name == "stop":
        assert sent["stop"] == ["\U0001f600", "x"]
    if name == "cache-salt":
        assert sent["cache_salt"] == "salt\U0001f600"
