"""The router over `vllm serve` workers (``--vllm-worker``), against the stand-in of
tests/vllm_fakes.py (vLLM 0.32's surfaces as recorded from the real server): discovery from
/v1/models, /metrics and /tokenize, KV events re-keyed into the router's hash chain so
``kv_aware`` follows vLLM's prefix cache (both event encodings), mixed clusters with kvbaton
workers, and the faults: another block size or tokenizer refused with the reason, a gapped
or silent stream, a restarted or dead vLLM worker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest

from conftest import wait_until
from kvbaton.router.config import RouterConfig
from kvbaton.router.kv_feed import SILENT_REQUESTS, KVIndexFeed
from kvbaton.router.pool import Worker
from kvbaton.router.server import RouterThread
from router_fakes import BLOCK_SIZE, FINGERPRINT, ROUTER_DEFAULTS, FakeWorker, expected_text, tokenizer
from vllm_fakes import FakeVLLMWorker
from worker_support import metric, parse_metrics, running_worker

PREFIX = list(range(40, 80))  # 10 blocks of 4


@contextmanager
def routed(*workers: FakeVLLMWorker | FakeWorker, **router: Any) -> Iterator[RouterThread]:
    with ExitStack() as stack:
        for w in workers:
            if isinstance(w, FakeVLLMWorker):
                stack.enter_context(w)
            else:
                stack.enter_context(w.thread)
        r = RouterThread(_config(workers, router), tokenizer=tokenizer()).start()
        try:
            yield r
        finally:
            assert r.stop()


def _config(workers: tuple[FakeVLLMWorker | FakeWorker, ...], router: dict[str, Any]) -> RouterConfig:
    """kv_aware over the workers (the vLLM ones as --vllm-worker specs)."""
    return RouterConfig(**{
        **ROUTER_DEFAULTS, "decode_policy": "kv_aware", "prefill_policy": "kv_aware", **router,
        "vllm_workers": tuple(w.spec for w in workers if isinstance(w, FakeVLLMWorker)),
        "workers": tuple(w.url for w in workers if isinstance(w, FakeWorker))})


def feed(r: RouterThread) -> KVIndexFeed:
    assert r.state.kv_feed is not None
    return r.state.kv_feed


def worker(r: RouterThread, url: str) -> Worker:
    return next(w for w in r.state.pool.workers if w.url == url)


def complete(r: RouterThread, prompt: list[int], max_tokens: int = 3, **fields: Any) -> dict[str, Any]:
    resp = httpx.post(f"{r.url}/v1/completions", timeout=30,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **fields})
    assert resp.status_code == 200, resp.text
    return resp.json()


def who(*workers: FakeVLLMWorker) -> list[int]:
    return [len(w.requests) for w in workers]


@pytest.mark.parametrize("encoding", ["map", "array"])
def test_kv_aware_follows_the_vllm_prefix_cache(encoding: str) -> None:
    a, b = FakeVLLMWorker(encoding=encoding), FakeVLLMWorker(encoding=encoding)
    with routed(a, b) as r:
        wait_until(lambda: all(worker(r, w.url).usable for w in (a, b)), what="vLLM workers discovered")
        assert {worker(r, w.url).kind for w in (a, b)} == {"vllm"}
        assert worker(r, a.url).block_size == BLOCK_SIZE and worker(r, a.url).role == "both"
        out = complete(r, PREFIX + [1, 2])
        assert out["choices"][0]["text"] == expected_text(3)
        holder, other = (a, b) if a.requests else (b, a)
        # The holder's events, re-keyed, put the prompt's 10 blocks in the index.
        wait_until(lambda: feed(r).index.block_count(holder.url) == 10, what="blocks indexed")
        assert feed(r).index.block_count(other.url) == 0
        assert not feed(r).index.is_approximate(holder.url)
        for i in range(4):  # each shares the 10-block prefix: all go to the holder
            complete(r, PREFIX + [5 + i] * 6)
        assert len(holder.requests) == 5 and not other.requests
        # The holder reported those as cached (vLLM's usage), which the router's cache metrics count.
        values = parse_metrics(httpx.get(f"{r.url}/metrics").text)
        assert metric(values, "kvbaton:router_kv_actual_cached_tokens_total", worker=holder.url) == 160
        assert metric(values, "kvbaton:router_kv_predicted_cached_tokens_total", worker=holder.url) == 160


def test_a_salted_prompt_does_not_match_the_unsalted_chain() -> None:
    a, b = FakeVLLMWorker(), FakeVLLMWorker()
    with routed(a, b) as r:
        wait_until(lambda: all(worker(r, w.url).usable for w in (a, b)), what="discovered")
        complete(r, PREFIX, cache_salt="tenant-a")
        holder = a if a.requests else b
        wait_until(lambda: feed(r).index.block_count(holder.url) == 10, what="salted blocks indexed")
        # The same tokens unsalted hash from another root: nothing of them is cached anywhere.
        req = r.state.orchestrator.new_job("x", PREFIX, 4, {}, 0.0).routing
        assert feed(r).cached_tokens_each(req, [worker(r, a.url), worker(r, b.url)]) == [0, 0]
        salted = r.state.orchestrator.new_job("y", PREFIX, 4, {"cache_salt": "tenant-a"}, 0.0).routing
        assert feed(r).cached_tokens(salted, worker(r, holder.url)) == 40


def test_mixed_cluster_keys_vllm_blocks_with_the_kvbaton_fingerprint() -> None:
    ours, theirs = FakeWorker(name="ours"), FakeVLLMWorker()
    with routed(ours, theirs) as r:
        wait_until(lambda: worker(r, theirs.url).usable and worker(r, ours.url).usable, what="discovered")
        assert r.state.pool.cluster.hash_fingerprint == FINGERPRINT
        assert worker(r, theirs.url).keying == (FINGERPRINT, BLOCK_SIZE)
        # A first request lands somewhere; put the prefix on the vLLM worker explicitly.
        with httpx.Client() as c:
            c.post(f"{theirs.url}/v1/completions", json={"prompt": PREFIX, "max_tokens": 1}).read()
        wait_until(lambda: feed(r).index.block_count(theirs.url) == 10, what="vLLM blocks indexed")
        for i in range(3):
            complete(r, PREFIX + [9, i])
        assert len(theirs.requests) == 4 and not ours.decodes


def test_another_block_size_or_tokenizer_is_refused_with_the_reason() -> None:
    good, odd, other_model = FakeVLLMWorker(), FakeVLLMWorker(block_size=8), FakeVLLMWorker()
    other_model.wrong_tokenizer = True
    odd.healthy = other_model.healthy = False  # found after the first: the cluster's block size is 4
    with routed(good, odd, other_model) as r:
        wait_until(lambda: worker(r, good.url).usable, what="the first discovered")
        odd.healthy = other_model.healthy = True
        wait_until(lambda: all(worker(r, w.url).discovered for w in (good, odd, other_model)), what="discovered")
        problems = {w.url: worker(r, w.url).problem for w in (good, odd, other_model)}
        assert problems[good.url] is None
        assert "block size 8 differs from the cluster's 4" in str(problems[odd.url])
        assert "tokenizer differs" in str(problems[other_model.url])
        health = httpx.get(f"{r.url}/health").json()
        assert {w["url"]: w["problem"] for w in health["workers"]} == problems
        for i in range(4):
            complete(r, [i] * 9)
        assert len(good.requests) == 4 and not odd.requests and not other_model.requests
        assert not feed(r).following(odd.url)


def test_a_gap_replay_cannot_fill_leaves_the_worker_approximate_and_routing_goes_on() -> None:
    a = FakeVLLMWorker()
    with routed(a) as r:
        wait_until(lambda: worker(r, a.url).usable, what="discovered")
        complete(r, PREFIX)
        wait_until(lambda: feed(r).index.block_count(a.url) == 10, what="indexed")
        assert a.publisher is not None
        a.publisher.skip_next = True  # the next batch never reaches anyone: replay lacks it too
        complete(r, list(range(100, 120)))
        complete(r, list(range(200, 220)))  # its seq reveals the gap
        wait_until(lambda: feed(r).index.is_approximate(a.url), what="approximate")
        # The entries from before the gap are dropped; the batch that revealed it counts.
        wait_until(lambda: feed(r).index.block_count(a.url) == 5, what="the batch after the gap")
        # vLLM has no resync: it stays approximate, later stores still count, requests work.
        complete(r, list(range(300, 320)))
        wait_until(lambda: feed(r).index.block_count(a.url) == 10, what="later blocks indexed")
        assert feed(r).index.is_approximate(a.url)
        values = parse_metrics(httpx.get(f"{r.url}/metrics").text)
        assert metric(values, "kvbaton:router_kv_event_gaps_total", worker=a.url) == 1


def test_a_restarted_vllm_worker_is_followed_afresh() -> None:
    a = FakeVLLMWorker()
    with routed(a) as r:
        wait_until(lambda: worker(r, a.url).usable, what="discovered")
        complete(r, PREFIX)
        wait_until(lambda: feed(r).index.block_count(a.url) == 10, what="indexed")
        first_id = worker(r, a.url).worker_id
        a.restart()  # new start time in /metrics, empty cache, seq from 0
        wait_until(lambda: worker(r, a.url).worker_id != first_id, what="restart noticed")
        wait_until(lambda: feed(r).index.block_count(a.url) == 0, what="old entries dropped")
        complete(r, list(range(500, 520)))
        wait_until(lambda: feed(r).index.block_count(a.url) == 5, what="new stream indexed")
        assert not feed(r).index.is_approximate(a.url)


def test_load_comes_from_vllm_metrics() -> None:
    a, b = FakeVLLMWorker(), FakeVLLMWorker()
    # Other clients keep six requests running there, holding half of its 48 KV blocks.
    a.extra_running, a.kv_usage = 6, 0.5
    with routed(a, b) as r:
        wait_until(lambda: worker(r, a.url).external_requests == 6, what="load scraped")
        assert worker(r, a.url).external_blocks == 24 and worker(r, b.url).external_blocks == 0
        for i in range(3):  # kv_aware: nothing cached anywhere, so the lighter worker wins
            complete(r, [i] * 5)
        assert not a.requests and len(b.requests) == 3


def test_a_dead_vllm_worker_is_removed_and_requests_retried() -> None:
    a, b = FakeVLLMWorker(), FakeVLLMWorker()
    with routed(a, b, decode_policy="round_robin", prefill_policy="round_robin") as r:
        wait_until(lambda: all(worker(r, w.url).usable for w in (a, b)), what="discovered")
        b.thread.stop()  # connections refused from now on
        for i in range(4):
            assert complete(r, [i] * 5)["choices"][0]["text"] == expected_text(3)
        assert len(a.requests) == 4
        wait_until(lambda: not worker(r, b.url).healthy, what="marked down")
        a.healthy = False  # /health 503: nothing is left
        wait_until(lambda: not worker(r, a.url).healthy, what="a down")
        resp = httpx.post(f"{r.url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=10)
        assert resp.status_code == 503


def test_a_silent_stream_is_flagged_approximate_and_serving_goes_on() -> None:
    a = FakeVLLMWorker()
    with routed(a) as r:
        wait_until(lambda: worker(r, a.url).usable, what="discovered")
        complete(r, PREFIX)  # spoken: seq 0
        wait_until(lambda: feed(r).index.block_count(a.url) == 10, what="indexed")
        a.silent = True  # stores blocks, publishes nothing
        for i in range(SILENT_REQUESTS - 1):
            complete(r, [i + 1] * 12)
        # Hits (nothing new to store) and prompts under a block say nothing about the stream.
        complete(r, PREFIX)
        complete(r, [7, 7, 7])
        assert not feed(r).index.is_approximate(a.url)
        complete(r, [9] * 12)  # the third request that stored blocks without an event
        assert feed(r).index.is_approximate(a.url)
        assert feed(r).index.block_count(a.url) == 0
        assert complete(r, PREFIX)["usage"]["prompt_tokens_details"]["cached_tokens"] == 40


def test_a_router_started_late_replays_the_stream_from_seq_0() -> None:
    a = FakeVLLMWorker()
    with a:
        with httpx.Client() as c:  # cached before any router follows it: seq 0 and 1
            for prompt in (PREFIX, list(range(100, 120))):
                c.post(f"{a.url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}).read()
        wait_until(lambda: a.publisher is not None and a.publisher.seq == 2, what="published")
        cfg = _config((a,), {})
        r = RouterThread(cfg, tokenizer=tokenizer()).start()
        try:
            wait_until(lambda: worker(r, a.url).usable, what="discovered")
            complete(r, list(range(200, 212)))  # seq 2 arrives live: 0 and 1 come by replay
            wait_until(lambda: feed(r).index.block_count(a.url) == 10 + 5 + 3, what="replayed")
            assert not feed(r).index.is_approximate(a.url)
        finally:
            assert r.stop()


@pytest.mark.parametrize(("spec", "message"), [
    ("http://h:1,events=tcp://h:2,events=tcp://h:3", "events= given twice"),
    ("http://h:1,replay=tcp://h:3", "replay= needs events="),
    ("http://h:1,event=tcp://h:2", "expected URL[,events="),
    ("http://h:1,events=h:2", "--vllm-worker events: expected a ZMQ endpoint"),
    ("ftp://h:1", "--vllm-worker: expected http://HOST:PORT"),
    ("http://h:1,role=router", "role= must be prefill, decode or both"),
    ("http://h:1,role=prefill,role=decode", "role= given twice"),
])
def test_bad_vllm_worker_flags_name_the_flag(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        RouterConfig(vllm_workers=(spec,))


def test_a_url_listed_as_both_kinds_is_refused() -> None:
    with pytest.raises(ValueError, match="--vllm-worker: worker http://h:1 is listed twice"):
        RouterConfig(workers=("http://h:1",), vllm_workers=("http://h:1",))
    cfg = RouterConfig(vllm_workers=("http://h:1/v1/,events=tcp://h:2", "http://h:3,role=decode"))
    first, second = cfg.vllm_worker_specs()
    assert (first.url, first.replay, first.role) == ("http://h:1", None, None) and second.role == "decode"
    # Prefill-only vLLM workers alone cannot serve: a decode-capable worker is required.
    with pytest.raises(ValueError, match="--decode: at least one decode-capable worker"):
        RouterConfig(vllm_workers=("http://h:1,role=prefill",))


def test_a_real_kvbaton_worker_and_a_vllm_worker_share_one_index() -> None:
    theirs = FakeVLLMWorker(block_size=16)
    with theirs, running_worker(block_size=16) as ours:
        cfg = RouterConfig(**{**ROUTER_DEFAULTS, "decode_policy": "kv_aware", "prefill_policy": "kv_aware",
                              "workers": (ours.url,), "vllm_workers": (theirs.spec,)})
        r = RouterThread(cfg, tokenizer=tokenizer()).start()
        try:
            wait_until(lambda: worker(r, ours.url).usable and worker(r, theirs.url).usable, what="discovered")
            fp = r.state.pool.cluster.fingerprint
            assert fp is not None and worker(r, theirs.url).keying == (fp, 16)
            prompts = {ours.url: list(range(1, 65)), theirs.url: list(range(101, 165))}
            # Each prefix computed on one worker directly, outside the router.
            httpx.post(f"{ours.url}/v1/completions", json={"prompt": prompts[ours.url], "max_tokens": 1},
                       timeout=30).raise_for_status()
            httpx.post(f"{theirs.url}/v1/completions", json={"prompt": prompts[theirs.url], "max_tokens": 1},
                       timeout=30).read()
            for url in prompts:
                wait_until(lambda u=url: feed(r).index.block_count(u) >= 4, what=f"{url} indexed")
            before = len(theirs.requests)
            # Both chains live in one index, keyed alike: each request goes where its prefix is
            # (the other worker holds none of it, and would report 0 cached).
            for prefix in prompts.values():
                out = complete(r, prefix + [7] * 5, max_tokens=2)
                assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
            assert len(theirs.requests) == before + 1
        finally:
            assert r.stop()


def test_disaggregated_vllm_workers_pass_kv_transfer_params_through() -> None:
    p, d = FakeVLLMWorker(), FakeVLLMWorker()
    with p, d:
        cfg = RouterConfig(**{**ROUTER_DEFAULTS, "vllm_workers": (f"{p.spec},role=prefill", f"{d.spec},role=decode")})
        r = RouterThread(cfg, tokenizer=tokenizer()).start()
        try:
            wait_until(lambda: worker(r, p.url).can_prefill and worker(r, d.url).can_decode, what="discovered")
            assert worker(r, p.url).kv_protocol == worker(r, d.url).kv_protocol == "vllm"
            out = complete(r, list(range(1, 41)), max_tokens=4)  # 40 tokens >= disagg_min_tokens 8
            assert out["choices"][0]["text"] == expected_text(4)
            pre, = p.requests
            assert pre["max_tokens"] == 1 and pre["kv_transfer_params"]["do_remote_decode"] is True
            # The decode leg carried the prefill worker's params unchanged.
            assert d.imports == [{**d.imports[0], "remote_engine_id": p.engine_id}]
            assert d.imports[0]["remote_block_ids"] == [[1, 2, 3]]
            values = parse_metrics(httpx.get(f"{r.url}/metrics").text)
            assert metric(values, "kvbaton:router_requests_total", path="disagg") == 1
            # A first token that ends the request is answered from the prefill leg.
            p.prefill_answer = "stop"
            out = complete(r, list(range(50, 90)), max_tokens=4)
            assert out["choices"][0]["finish_reason"] == "stop" and len(d.imports) == 1
            # A vLLM without a P/D connector answers no params: the decode worker prefills.
            p.prefill_answer = "no_params"
            out = complete(r, list(range(100, 140)), max_tokens=4)
            assert out["choices"][0]["text"] == expected_text(4) and len(d.imports) == 1
            values = parse_metrics(httpx.get(f"{r.url}/metrics").text)
            assert metric(values, "kvbaton:router_fallbacks_total", reason="prefill_bad_handle") == 1
        finally:
            assert r.stop()


def test_prefill_and_decode_pair_only_within_one_kv_protocol() -> None:
    theirs, ours = FakeVLLMWorker(), FakeWorker(role="decode", name="ours")
    with theirs, ours.thread:
        cfg = RouterConfig(**{**ROUTER_DEFAULTS, "decode_workers": (ours.url,),
                              "vllm_workers": (f"{theirs.spec},role=prefill",)})
        r = RouterThread(cfg, tokenizer=tokenizer()).start()
        try:
            wait_until(lambda: worker(r, theirs.url).can_prefill and worker(r, ours.url).can_decode, what="up")
            complete(r, list(range(1, 41)))
            # Our decode worker cannot read vLLM's KV: it prefilled itself, a counted fallback.
            assert not theirs.requests and len(ours.decodes) == 1 and "kv_transfer_params" not in ours.decodes[0]
            values = parse_metrics(httpx.get(f"{r.url}/metrics").text)
            assert metric(values, "kvbaton:router_fallbacks_total", reason="no_prefill_worker") == 1
        finally:
            assert r.stop()
