"""Bench load generation and the streaming client, against fakes (no model, no sockets)."""

from __future__ import annotations

import asyncio
import json
import math
import selectors
import time

import httpx
import numpy as np
import pytest

from kvbaton.bench.client import Endpoint, build_body, scrape_prefix_cache, send_turn
from kvbaton.bench.load import LoadConfig, arrival_intervals, arrival_offsets, drive
from kvbaton.bench.metrics import RequestRecord
from kvbaton.bench.workloads import Session, Turn


def sessions(n: int, turns: int = 1, think: float = 0.0, **kw) -> list[Session]:
    return [Session(f"s{i}", tuple(Turn(f"u{i}.{t} ", 4, think) for t in range(turns)), **kw)
            for i in range(n)]


def ok_record(session: Session, i: int, t0: float, text: str = "ans") -> RequestRecord:
    return RequestRecord(session.session_id, i, session.tags, ok=True, ttft_s=0.01, e2el_s=0.02,
                         prompt_tokens=3, output_tokens=4, text=text)


class _JumpSelector(selectors.DefaultSelector):
    """Never blocks: with nothing to read, it moves its loop's clock on by the timeout it was
    asked to wait, which is the time until the loop's next timer."""

    loop: _VirtualClockLoop

    def select(self, timeout: float | None = None):
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("virtual clock: every task waits and no timer is set")
        self.loop.now += timeout
        return []


class _VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock: whenever nothing is ready to run, the clock jumps to
    the next timer instead of sleeping. Sleeps and timeouts take no real time, and every time
    the driver sees is exact, so tests assert the schedule itself, not how long sleeping took."""

    def __init__(self) -> None:
        self.now = 1000.0
        selector = _JumpSelector()
        selector.loop = self
        super().__init__(selector)

    def time(self) -> float:
        return self.now


def run_virtual(coro):
    """Run ``coro`` on a virtual clock. The driver's clock is ``time.perf_counter`` (SendTurn's
    ``run_start`` is on it), so meanwhile that reads the same virtual clock."""
    loop = _VirtualClockLoop()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(time, "perf_counter", loop.time)
        with asyncio.Runner(loop_factory=lambda: loop) as runner:
            return runner.run(coro)


def now_s(t0: float) -> float:
    """Seconds since the run started, for a fake ``send``: on the virtual clock, exact."""
    return time.perf_counter() - t0


# ---- arrivals ----------------------------------------------------------------------------

@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_gamma_intervals_are_seeded_and_have_the_requested_mean(burstiness):
    a = arrival_intervals(20000, request_rate=5.0, burstiness=burstiness, seed=7)
    assert np.array_equal(a, arrival_intervals(20000, 5.0, burstiness, seed=7))
    assert not np.array_equal(a, arrival_intervals(20000, 5.0, burstiness, seed=8))
    assert a.mean() == pytest.approx(0.2, rel=0.03)
    # Gamma with shape k has squared coefficient of variation 1/k: burstiness shapes the spread.
    assert a.var() / a.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.1)


def test_infinite_rate_sends_everything_at_once_and_bad_rates_raise():
    assert not arrival_intervals(5, math.inf).any()
    for bad in (dict(request_rate=0.0), dict(request_rate=-1.0), dict(request_rate=1.0, burstiness=0.0)):
        with pytest.raises(ValueError):
            arrival_intervals(3, **bad)


def test_arrival_offsets_start_at_zero_and_scale_trace_times():
    ss = sessions(3) + [Session("t", (Turn("x", 1),), arrival_s=2.0)]
    off = arrival_offsets(ss, request_rate=2.0, seed=1, time_scale=0.5)
    gaps = arrival_intervals(3, 2.0, seed=1)
    assert off[:3] == pytest.approx([0.0, gaps[0], gaps[0] + gaps[1]])
    assert off[3] == 1.0


def test_load_config_rejects_bad_values():
    for bad in (dict(max_concurrency=0), dict(duration_s=0), dict(drain_timeout_s=-1),
                dict(time_scale=0), dict(burstiness=-1)):
        with pytest.raises(ValueError):
            LoadConfig(**bad)


# ---- the driver --------------------------------------------------------------------------

def test_concurrency_bound_is_respected_and_reached():
    """A fake server counts the streams it is serving; the driver must never exceed the bound."""
    state = {"now": 0, "max": 0, "served": 0}

    async def body():
        for piece in ("a", "b"):
            await asyncio.sleep(0.005)
            yield sse({"choices": [{"text": piece, "finish_reason": None}]})
        # Done before the last event goes out: the client stops reading at [DONE], so a
        # generator's finally would only run whenever it is garbage-collected.
        state["now"] -= 1
        yield sse("[DONE]")

    async def handler(request: httpx.Request) -> httpx.Response:
        state["now"] += 1
        state["served"] += 1
        state["max"] = max(state["max"], state["now"])
        return httpx.Response(200, content=body())

    ep = Endpoint("http://fake", model="m")

    async def main():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            async def send(session, i, history, t0):
                return await send_turn(client, ep, session, i, history, t0)

            return await drive(sessions(20), send, LoadConfig(max_concurrency=3))

    res = asyncio.run(main())
    assert state["max"] == 3 and res.max_in_flight == 3 and state["served"] == 20
    assert len(res.records) == 20 and all(r.ok for r in res.records)
    assert res.stopped_by == "completed" and res.cancelled == 0


def test_multi_turn_sessions_send_history_in_order_and_a_failure_ends_the_session():
    think, answer = 0.25, 1.0  # s
    seen: list[tuple[str, int, list, float]] = []

    async def send(session, i, history, t0):
        seen.append((session.session_id, i, list(history), now_s(t0)))
        await asyncio.sleep(answer)
        if session.session_id == "s1" and i == 1:
            return RequestRecord(session.session_id, i, ok=False, error="HTTP 500: no")
        return ok_record(session, i, t0, text=f"a{i}")

    res = run_virtual(drive(sessions(2, turns=3, think=think), send, LoadConfig(max_concurrency=1)))
    s0 = [h for sid, _, h, _ in seen if sid == "s0"]
    assert s0 == [[], [("u0.0 ", "a0")], [("u0.0 ", "a0"), ("u0.1 ", "a1")]]
    assert [i for sid, i, _, _ in seen if sid == "s1"] == [0, 1]  # turn 2 needs turn 1's answer
    assert res.turns_not_sent == 1 and len(res.records) == 5
    # One slot: the whole of s0, think times included, before s1 starts.
    assert [sid for sid, _, _, _ in seen] == ["s0"] * 3 + ["s1"] * 2
    # A later turn goes out one think time after the previous answer; s1's first turn the moment
    # s0's last answer frees the slot; the run ends with s1's failed answer.
    expected, t = [], 0.0
    for i in (0, 1, 2, 0, 1):
        t += think if i > 0 else 0.0
        expected.append(t)
        t += answer
    assert [at for _, _, _, at in seen] == pytest.approx(expected, abs=1e-9)
    assert res.duration_s == pytest.approx(t, abs=1e-9)


def test_sessions_are_sent_at_their_arrival_time_in_arrival_order():
    ss = sessions(6) + [Session("trace", (Turn("x", 1),), arrival_s=0.5)]
    offsets = arrival_offsets(ss, 5.0, seed=3)
    sent: list[tuple[str, float]] = []

    async def send(session, i, history, t0):
        sent.append((session.session_id, now_s(t0)))
        return ok_record(session, i, t0)

    res = run_virtual(drive(ss, send, LoadConfig(request_rate=5.0, seed=3)))
    schedule = sorted(zip(offsets, (s.session_id for s in ss)))
    assert [sid for sid, _ in sent] == [sid for _, sid in schedule]
    # Neither early nor late: each session's first request goes out at the offset drawn for it.
    assert [at for _, at in sent] == pytest.approx([off for off, _ in schedule], abs=1e-9)
    assert res.stopped_by == "completed" and res.duration_s == pytest.approx(max(offsets), abs=1e-9)


def test_an_arrived_session_waits_for_a_free_slot():
    arrivals = [0.0, 0.5, 0.75, 4.0]
    ss = [Session(f"t{i}", (Turn("x", 1),), arrival_s=a) for i, a in enumerate(arrivals)]
    sent: dict[str, float] = {}

    async def send(session, i, history, t0):
        sent[session.session_id] = now_s(t0)
        await asyncio.sleep(1.0)
        return ok_record(session, i, t0)

    res = run_virtual(drive(ss, send, LoadConfig(max_concurrency=1)))
    # One slot, 1 s per request: a session starts when it arrives or when the slot frees, if later.
    expected, free = {}, 0.0
    for s, a in zip(ss, arrivals):
        expected[s.session_id] = max(a, free)
        free = expected[s.session_id] + 1.0
    assert sent == pytest.approx(expected, abs=1e-9)
    assert res.max_in_flight == 1 and res.duration_s == pytest.approx(free, abs=1e-9)


def test_duration_bound_cancels_what_is_still_in_flight_after_the_drain_bound():
    async def send(session, i, history, t0):
        await asyncio.Event().wait()  # a server that never answers

    res = run_virtual(drive(sessions(50), send,
                             LoadConfig(max_concurrency=4, duration_s=5.0, drain_timeout_s=2.0)))
    assert res.stopped_by == "duration" and res.cancelled == 4
    assert res.records == [] and res.sessions_started == 4 and res.sessions_not_started == 46
    assert res.duration_s == pytest.approx(5.0 + 2.0, abs=1e-9)  # the whole drain bound, no more


def test_duration_bound_lets_in_flight_requests_finish_within_the_drain_bound():
    async def send(session, i, history, t0):
        await asyncio.sleep(3.0)
        return ok_record(session, i, t0)

    res = run_virtual(drive(sessions(50, turns=2), send,
                             LoadConfig(max_concurrency=2, duration_s=1.0, drain_timeout_s=30.0)))
    assert res.stopped_by == "duration" and res.cancelled == 0
    # The two first turns finish; their second turns and every other session never start.
    assert len(res.records) == 2 and all(r.ok for r in res.records)
    assert res.turns_not_sent == 2 and res.sessions_not_started == 48
    assert res.duration_s == pytest.approx(3.0, abs=1e-9)  # ends when they do, not at the drain bound


# ---- the client against a fake OpenAI server (httpx.MockTransport) ------------------------

def sse(*events: object) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def fake_server(handler_body) -> httpx.AsyncClient:
    """An AsyncClient whose requests are answered by ``handler_body(request) -> Response``."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return handler_body(request)

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


COMPLETION_STREAM = sse(
    {"choices": [{"text": "He", "finish_reason": None}], "usage": None},
    {"choices": [{"text": "llo", "finish_reason": None}], "usage": None},
    {"choices": [{"text": "!", "finish_reason": "length"}], "usage": None},
    {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                              "prompt_tokens_details": {"cached_tokens": 4}}},
    "[DONE]",
)


def run_turn(client: httpx.AsyncClient, endpoint_type: str = "completions",
             session: Session | None = None, history=()) -> RequestRecord:
    ep = Endpoint("http://fake", model="m", endpoint_type=endpoint_type)
    s = session or sessions(1)[0]

    async def go():
        async with client:
            return await send_turn(client, ep, s, 0, list(history), 0.0)

    return asyncio.run(go())


def test_client_times_a_completion_stream_and_reads_usage():
    bodies = []

    def answer(req):
        bodies.append(json.loads(req.content))
        return httpx.Response(200, content=COMPLETION_STREAM)

    r = run_turn(fake_server(answer))
    assert r.ok and r.text == "Hello!" and (r.prompt_tokens, r.output_tokens, r.cached_tokens) == (7, 3, 4)
    assert len(r.itls_s) == 2 and 0 <= r.ttft_s <= r.e2el_s
    b = bodies[0]
    assert b["stream"] and b["stream_options"] == {"include_usage": True} and b["ignore_eos"]
    assert b["temperature"] == 0.0 and b["max_tokens"] == 4 and b["prompt"] == "u0.0 "


def test_client_reads_chat_deltas_and_skips_the_empty_role_chunk():
    stream = sse({"choices": [{"delta": {"role": "assistant", "content": ""}}]},
                 {"choices": [{"delta": {"content": "Hi"}, "finish_reason": None}]},
                 {"choices": [{"delta": {"content": " you"}, "finish_reason": "length"}]},
                 "[DONE]")
    r = run_turn(fake_server(lambda req: httpx.Response(200, content=stream)), "chat")
    assert r.ok and r.text == "Hi you" and r.output_tokens == 2  # no usage: one token per chunk
    assert len(r.itls_s) == 1


def test_bodies_carry_prefix_and_history_for_both_endpoints():
    s = Session("s", (Turn("q1 ", 2), Turn("q2 ", 3)), prefix="SYS ")
    hist = [("q1 ", "a1 ")]
    comp = build_body(Endpoint("http://x", "m"), s, 1, hist)
    assert comp["prompt"] == "SYS q1 a1 q2 " and comp["max_tokens"] == 3
    chat = build_body(Endpoint("http://x", "m", endpoint_type="chat"), s, 1, hist)
    assert chat["messages"] == [{"role": "system", "content": "SYS "}, {"role": "user", "content": "q1 "},
                                {"role": "assistant", "content": "a1 "}, {"role": "user", "content": "q2 "}]


@pytest.mark.parametrize("response, needle", [
    (lambda req: httpx.Response(500, json={"error": {"message": "engine died"}}), "HTTP 500: engine died"),
    (lambda req: httpx.Response(200, content=sse({"error": {"message": "oom"}}, "[DONE]")), "stream error: oom"),
    (lambda req: httpx.Response(200, content=sse({"choices": [{"text": "a"}]})), "before [DONE]"),
    (lambda req: httpx.Response(200, content=b"data: {not json\n\n"), "bad stream chunk"),
    (lambda req: (_ for _ in ()).throw(httpx.ConnectError("refused")), "ConnectError: refused"),
])
def test_client_failures_become_records_not_exceptions(response, needle):
    r = run_turn(fake_server(response))
    assert not r.ok and needle in r.error


def test_prefix_cache_counters_are_scraped_for_kvbaton_and_vllm_names():
    kv = ('# TYPE kvbaton:prefix_cache_queries counter\n'
          'kvbaton:prefix_cache_queries_total{model_name="a"} 100.0\n'
          'kvbaton:prefix_cache_queries_total{model_name="b"} 20.0\n'
          '# TYPE kvbaton:prefix_cache_hits counter\n'
          'kvbaton:prefix_cache_hits_total{model_name="a"} 30.0\n')
    vl = 'vllm:prefix_cache_queries{engine="0"} 10\nvllm:prefix_cache_hits{engine="0"} 5\n'

    def scrape(text, status=200):
        client = fake_server(lambda req: httpx.Response(status, text=text))

        async def go():
            async with client:
                return await scrape_prefix_cache(client, "http://fake/v1")

        return asyncio.run(go())

    assert scrape(kv) == (120.0, 30.0)
    assert scrape(vl) == (10.0, 5.0)
    assert scrape("other_metric 1\n") is None
    assert scrape("", status=404) is None


# ---- compare's rounds ----------------------------------------------------------------------

def test_compare_rounds_are_contiguous_and_restart_trace_time():
    from kvbaton.bench.runner import compare_ratios, split_rounds

    ss = [Session(f"t{i}", (Turn("x", 1),), arrival_s=float(i)) for i in range(10)]
    rounds = split_rounds(ss, 4)
    assert [[s.session_id for s in r] for r in rounds] == [
        ["t0", "t1"], ["t2", "t3", "t4"], ["t5", "t6"], ["t7", "t8", "t9"]]
    assert [[s.arrival_s for s in r] for r in rounds][1] == [0.0, 1.0, 2.0]
    assert len(split_rounds(ss[:2], 4)) == 2  # never an empty round
    ratios = compare_ratios([{"name": "a", "output_throughput": 10.0, "p90_ttft_ms": None},
                             {"name": "b", "output_throughput": 25.0, "p90_ttft_ms": 3.0}])
    assert ratios["a"]["output_throughput"] == 1.0 and ratios["b"]["output_throughput"] == 2.5
    assert ratios["b"]["p90_ttft_ms"] is None  # no baseline value, no ratio
