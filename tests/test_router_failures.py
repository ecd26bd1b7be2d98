"""Every failure outcome of the router against fake workers: a defined answer, never a hang."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from conftest import wait_until
from kvbaton.router.config import RouterConfig
from kvbaton.router.server import RouterThread
from router_fakes import ROUTER_DEFAULTS, FakeWorker, cluster, dead_url, expected_text, tokenizer
from worker_support import metric, parse_metrics

LONG = "x" * 40
SHORT = "hi"


def post(url: str, body: dict[str, Any], path: str = "/v1/completions", timeout: float = 10) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=timeout)


def post_while(fault: Callable[[], None], url: str, body: dict[str, Any]) -> httpx.Response:
    """``post`` while ``fault`` runs on another thread (it waits for the request to reach a
    worker, then breaks something), so the request sees the fault happen mid-flight."""
    t = threading.Thread(target=fault)
    t.start()
    try:
        return post(url, body, timeout=60)
    finally:
        t.join(30)


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=5).text)


def stream_events(url: str, body: dict[str, Any]) -> tuple[int, list[Any]]:
    out: list[Any] = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=10) as r:
        if r.status_code != 200:
            return r.status_code, [json.loads(r.read())]
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return 200, out


# ---- prefill leg ------------------------------------------------------------------------


@pytest.mark.parametrize("fault, reason", [("500", "prefill_http_5xx"), ("hang", "prefill_timeout"),
                                           ("bad_handle", "prefill_bad_handle")])
def test_prefill_failure_falls_back_to_local_prefill(fault: str, reason: str) -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    p.prefill_fault = fault
    with cluster(p, d, prefill_timeout_s=0.5) as r:
        resp = post(r.url, {"prompt": LONG, "max_tokens": 3})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == expected_text(3)
        m = metrics(r.url)
        if fault == "bad_handle":  # the malformed handle still named its lease: released
            wait_until(lambda: p.releases == p.leases, what="the lease release")
    assert len(p.prefills) == 1 and "kv_transfer_params" not in d.decodes[0]
    assert metric(m, "kvbaton:router_fallbacks_total", reason=reason) == 1
    assert metric(m, "kvbaton:router_requests_total", path="local") == 1


def test_prefill_worker_that_dies_is_a_fallback_and_is_marked_down() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    # A long poll interval: the router learns of the death from the refused connection.
    with cluster(p, d, health_interval_s=60) as r:
        assert p.thread.stop()
        resp = post(r.url, {"prompt": LONG, "max_tokens": 2})
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text(2)
        m = metrics(r.url)
        health = httpx.get(f"{r.url}/health").json()
    assert metric(m, "kvbaton:router_fallbacks_total", reason="prefill_connect") == 1
    assert metric(m, "kvbaton:router_worker_healthy", worker=p.url) == 0
    assert {w["url"]: w["healthy"] for w in health["workers"]} == {p.url: False, d.url: True}


def test_no_live_prefill_worker_means_local_prefill() -> None:
    d = FakeWorker("decode", "d")
    with cluster(d, workers=(d.url,), prefill_workers=(dead_url(),)) as r:
        assert post(r.url, {"prompt": LONG, "max_tokens": 2}).status_code == 200
        m = metrics(r.url)
    assert metric(m, "kvbaton:router_fallbacks_total", reason="no_prefill_worker") == 1


def test_prefill_4xx_is_passed_through_without_a_decode_leg() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    p.prefill_fault = "400"
    with cluster(p, d) as r:
        resp = post(r.url, {"prompt": LONG, "max_tokens": 2})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"] == "fake prefill 400"
    assert d.decodes == []


# ---- decode leg before the first token ----------------------------------------------------


def test_transfer_failure_502_is_a_clean_error_with_one_decoder() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    d.decode_fault = "502"
    with cluster(p, d) as r:
        status, events = stream_events(r.url, {"prompt": LONG, "max_tokens": 2})
        wait_until(lambda: p.releases == p.leases, what="the lease release")
        m = metrics(r.url)
    assert status == 502 and events[0]["error"]["message"] == "fake decode 502"
    assert metric(m, "kvbaton:router_transfer_failures_total", outcome="failed") == 1
    assert metric(m, "kvbaton:router_request_failures_total", stage="before_first_token") == 1


def test_transfer_failure_retries_on_another_decoder_without_the_handle() -> None:
    p, d1, d2 = FakeWorker("prefill", "p"), FakeWorker("decode", "d1"), FakeWorker("decode", "d2")
    d1.decode_fault = d2.decode_fault = "502"
    with cluster(p, d1, d2, decode_policy="round_robin") as r:
        d2.decode_fault = None  # round robin sends the first request to d1
        resp = post(r.url, {"prompt": LONG, "max_tokens": 3})
        m = metrics(r.url)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text(3)
    assert "kv_transfer_params" in d1.decodes[0] and "kv_transfer_params" not in d2.decodes[0]
    assert p.releases == p.leases
    assert metric(m, "kvbaton:router_retries_total", reason="transfer_failed") == 1


def test_transfer_failure_reported_as_an_error_event_is_retried_without_the_handle() -> None:
    p, d1, d2 = FakeWorker("prefill", "p"), FakeWorker("decode", "d1"), FakeWorker("decode", "d2")
    d1.decode_fault = "transfer_event"
    with cluster(p, d1, d2, decode_policy="round_robin") as r:
        resp = post(r.url, {"prompt": LONG, "max_tokens": 3})
        m = metrics(r.url)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text(3)
    assert "kv_transfer_params" in d1.decodes[0] and "kv_transfer_params" not in d2.decodes[0]
    assert metric(m, "kvbaton:router_transfer_failures_total", outcome="failed") == 1
    assert metric(m, "kvbaton:router_retries_total", reason="transfer_failed") == 1


def test_unreachable_decoder_is_retried_with_the_handle_kept() -> None:
    p, d1, d2 = FakeWorker("prefill", "p"), FakeWorker("decode", "d1"), FakeWorker("decode", "d2")
    with cluster(p, d1, d2, decode_policy="round_robin", health_interval_s=60) as r:
        assert d1.thread.stop()
        resp = post(r.url, {"prompt": LONG, "max_tokens": 3})
        m = metrics(r.url)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text(3)
    assert d2.decodes[0]["kv_transfer_params"]["lease_id"] == p.leases[0]
    assert p.releases == []
    assert metric(m, "kvbaton:router_retries_total", reason="connect") == 1
    assert metric(m, "kvbaton:router_requests_total", path="disagg") == 1


@pytest.mark.parametrize("fault, status", [("500", 500), ("hang", 504), ("error_event", 502)])
def test_decode_failure_before_first_token(fault: str, status: int) -> None:
    d1, d2 = FakeWorker("both", "d1"), FakeWorker("both", "d2")
    d1.decode_fault = fault
    with cluster(d1, d2, decode_policy="round_robin", request_timeout_s=0.5) as r:
        ok = post(r.url, {"prompt": SHORT, "max_tokens": 2})  # d1 fails, retried on d2
        d2.decode_fault = fault
        status_, events = stream_events(r.url, {"prompt": SHORT, "max_tokens": 2})  # d2 fails, retry fails
        m = metrics(r.url)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected_text(2)
    assert status_ == status and "error" in events[0]
    assert metric(m, "kvbaton:router_retries_total") == 2
    assert metric(m, "kvbaton:router_request_failures_total", stage="before_first_token") == 1


def test_decode_4xx_is_passed_through_and_not_retried() -> None:
    d1, d2 = FakeWorker("both", "d1"), FakeWorker("both", "d2")
    d1.decode_fault = d2.decode_fault = "400"
    with cluster(d1, d2) as r:
        resp = post(r.url, {"prompt": SHORT, "max_tokens": 2})
    assert resp.status_code == 400 and resp.json()["error"]["message"] == "fake decode 400"
    assert len(d1.decodes) + len(d2.decodes) == 1


def test_no_healthy_decoder_is_503() -> None:
    d = FakeWorker("both", "d")
    d.healthy = False
    with cluster(d) as r:
        resp = post(r.url, {"prompt": SHORT, "max_tokens": 2})
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "service_unavailable"
    assert d.decodes == []


def test_a_prefill_on_a_worker_marked_down_is_given_up_at_once() -> None:
    # The prefill worker freezes (no answer) and then fails its health polls: the leg in flight
    # there falls back to the decode worker as soon as the router marks it down, instead of
    # waiting out a long prefill timeout.
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    p.prefill_fault = "hang"
    with cluster(p, d, prefill_timeout_s=300, request_timeout_s=30) as r:
        def freeze() -> None:
            wait_until(lambda: len(p.prefills) == 1, what="the prefill leg to start")
            p.healthy = False

        resp = post_while(freeze, r.url, {"prompt": LONG, "max_tokens": 3})
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text(3)
        assert metric(metrics(r.url), "kvbaton:router_fallbacks_total", reason="prefill_worker_down") == 1


def test_a_decode_leg_on_a_worker_marked_down_is_retried_elsewhere_at_once() -> None:
    # Both decode workers hang; the one that got the leg then fails its health polls and the
    # other recovers: the leg moves there before its first token, instead of waiting out a
    # long request timeout on a worker the router has given up on.
    d1, d2 = FakeWorker("both", "d1"), FakeWorker("both", "d2")
    d1.decode_fault = d2.decode_fault = "hang"
    with cluster(d1, d2, request_timeout_s=300) as r:
        def freeze() -> None:
            wait_until(lambda: len(d1.decodes) + len(d2.decodes) == 1, what="the decode leg to start")
            stuck, other = (d1, d2) if d1.decodes else (d2, d1)
            other.decode_fault = None
            stuck.healthy = False

        resp = post_while(freeze, r.url, {"prompt": SHORT, "max_tokens": 3})
        assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == expected_text(3)
        assert metric(metrics(r.url), "kvbaton:router_retries_total", reason="worker_down") == 1


def test_prefill_timeout_grows_with_the_work_ahead_within_bounds() -> None:
    from kvbaton.router.orchestrator import prefill_timeout

    assert prefill_timeout(60, 0, 1000, None) == 60  # nothing measured yet: the flag's value
    assert prefill_timeout(60, 0, 1000, 1000.0) == 60  # 1 s expected: the flag's value
    assert prefill_timeout(60, 9000, 1000, 100.0) == 240  # 100 s expected: capped at 4x
    assert prefill_timeout(60, 1000, 1000, 50.0) == 120  # 40 s expected, 3x slack


# ---- mid-stream ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "stall"])
def test_decoder_dying_mid_stream_sends_an_error_event_then_done(fault: str) -> None:
    d1, d2 = FakeWorker("both", "d1"), FakeWorker("both", "d2")
    d1.decode_fault = d2.decode_fault = fault
    with cluster(d1, d2, request_timeout_s=0.5) as r:
        status, events = stream_events(r.url, {"prompt": SHORT, "max_tokens": 6})
        m = metrics(r.url)
    assert status == 200
    assert [e["choices"][0]["text"] for e in events[:2]] == ["t0 ", "t1 "]
    assert events[2]["error"]["code"] == "upstream_error" and events[3] == "[DONE]" and len(events) == 4
    assert len(d1.decodes) + len(d2.decodes) == 1  # tokens were sent: no retry
    assert metric(m, "kvbaton:router_request_failures_total", stage="mid_stream") == 1


@pytest.mark.parametrize("case", ["drop", "recomputed"])
def test_lease_the_decode_worker_did_not_confirm_is_released(case: str) -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    if case == "drop":
        d.decode_fault = "drop"
    else:
        d.transfer_outcome = "recomputed"
    with cluster(p, d) as r:
        status, events = stream_events(r.url, {"prompt": LONG, "max_tokens": 4,
                                               "stream_options": {"include_usage": True}})
        wait_until(lambda: p.releases == p.leases, what="the lease release")
        m = metrics(r.url)
    assert status == 200 and len(p.leases) == 1
    if case == "recomputed":
        assert events[-2]["usage"]["completion_tokens"] == 4
        assert metric(m, "kvbaton:router_transfer_failures_total", outcome="recomputed") == 1
    else:
        assert "error" in events[-2]


def test_non_streaming_request_is_retried_after_a_mid_stream_drop() -> None:
    d1, d2 = FakeWorker("both", "d1"), FakeWorker("both", "d2")
    d1.decode_fault = "drop"
    with cluster(d1, d2, decode_policy="round_robin") as r:
        ok = post(r.url, {"prompt": SHORT, "max_tokens": 5})
        d2.decode_fault = "drop"
        failed = post(r.url, {"prompt": SHORT, "max_tokens": 5})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == expected_text(5)
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "upstream_error"


# ---- client disconnects -------------------------------------------------------------------


def test_client_disconnect_mid_stream_aborts_the_worker_stream(caplog: pytest.LogCaptureFixture) -> None:
    d = FakeWorker("both", "d")
    d.chunk_delay_s = 0.1
    with cluster(d) as r:
        with httpx.stream("POST", f"{r.url}/v1/completions", timeout=10,
                          json={"prompt": SHORT, "max_tokens": 200, "stream": True}) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
        wait_until(lambda: d.counts()["aborted"] == 1, what="the worker stream to be aborted")
        wait_until(lambda: metric(metrics(r.url), "kvbaton:router_worker_in_flight_requests") == 0,
                   what="in-flight accounting to drop to zero")
    assert d.counts()["completed"] == 0
    # A disconnect is a normal end: nothing may be logged as an error (a stream closed while
    # its next chunk was awaited used to raise inside the response).
    assert not [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_client_disconnect_before_decode_releases_the_lease() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    d.decode_fault = "hang"
    with cluster(p, d, request_timeout_s=30) as r:
        for stream in (False, True):
            with pytest.raises(httpx.ReadTimeout):
                post(r.url, {"prompt": LONG, "max_tokens": 3, "stream": stream}, timeout=0.5)
        wait_until(lambda: len(p.releases) == 2, what="both leases to be released")
        assert sorted(p.releases) == sorted(p.leases)
        wait_until(lambda: metric(metrics(r.url), "kvbaton:router_worker_in_flight_requests") == 0,
                   what="in-flight accounting to drop to zero")


# ---- shutdown -----------------------------------------------------------------------------


def test_sigterm_ends_open_streams_with_an_error_event_and_done() -> None:
    d = FakeWorker("both", "d")
    d.chunk_delay_s = 0.2  # 200 tokens: far longer than the drain timeout (1 s)
    events: list[str] = []
    first = threading.Event()

    def read() -> None:
        with httpx.stream("POST", f"{r.url}/v1/completions", timeout=30,
                          json={"prompt": SHORT, "max_tokens": 200, "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    first.set()

    with d.thread:
        r = RouterThread(RouterConfig(**{**ROUTER_DEFAULTS, "workers": (d.url,)}), tokenizer=tokenizer()).start()
        reader = threading.Thread(target=read)
        reader.start()
        try:
            assert first.wait(30)
            assert r.stop()  # as SIGTERM: drain, then end what is still open
        finally:
            reader.join(30)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "service_unavailable"
    wait_until(lambda: d.counts()["aborted"] == 1, what="the worker stream to be closed")


# ---- health polls -------------------------------------------------------------------------


@pytest.mark.parametrize("answer, polls_to_down", [
    ("timeout", 3),  # a slow answer may only mean a busy machine: three in a row
    ("refused", 1),  # nothing listens: the worker is gone
    ("503", 1),  # the worker says it cannot serve (draining, engine dead)
])
def test_health_poll_failures_mark_a_worker_down(answer: str, polls_to_down: int) -> None:
    import asyncio

    from kvbaton.router.pool import WorkerPool

    def handler(request: httpx.Request) -> httpx.Response:
        if answer == "timeout":
            raise httpx.ReadTimeout("slow", request=request)
        if answer == "refused":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(503, json={"status": "draining"})

    async def run() -> list[bool]:
        pool = WorkerPool(RouterConfig(workers=("http://127.0.0.1:9",), model="tiny-random"))
        pool.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        w = pool.workers[0]
        w.set_healthy(True)
        seen = []
        for _ in range(3):
            await pool.check(w)
            seen.append(w.healthy)
        assert w.went_down.is_set()  # legs in flight there stop waiting
        await pool.client.aclose()
        return seen

    seen = asyncio.run(run())
    assert seen == [i + 1 < polls_to_down for i in range(3)]
