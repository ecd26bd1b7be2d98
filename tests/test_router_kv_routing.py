"""KV-aware routing through a real router in front of two real ``both`` workers (tiny random
model), fed by the workers' KV event streams: a cached prefix attracts its requests unless the
holder is overloaded past the configured margin, a restarted worker's entries disappear and
routing recovers, sibling requests follow the first one by prediction, and a gap the replay
cannot fill is repaired by the worker's resync (its whole cache, published in-stream)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from conftest import run_in_threads, wait_until
from kvbaton.engine.config import EngineConfig
from kvbaton.engine.engine import LLMEngine
from kvbaton.router.config import RouterConfig
from kvbaton.router.kv_feed import KVIndexFeed
from kvbaton.router.pool import Worker
from kvbaton.router.server import RouterThread
from kvbaton.worker.config import WorkerConfig
from kvbaton.worker.server import WorkerThread
from worker_support import ENGINE_DEFAULTS, MODEL, metric, parse_metrics, running_worker

BS = 16
SCALE = 2.0  # --prefill-load-scale: a cached block is worth 2 blocks of load


class Cluster:
    def __init__(self, router: RouterThread, a: WorkerThread, b: WorkerThread) -> None:
        self.router, self.a, self.b = router, a, b

    @property
    def feed(self) -> KVIndexFeed:
        feed = self.router.state.kv_feed
        assert feed is not None
        return feed

    def worker(self, w: WorkerThread) -> Worker:
        return next(x for x in self.router.state.pool.workers if x.url == w.url)

    def complete(self, prompt: list[int], max_tokens: int = 4) -> dict[str, Any]:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{self.router.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    def served(self) -> dict[str, float]:
        """Prompt tokens each worker served for the router (its per-worker metric)."""
        values = parse_metrics(httpx.get(f"{self.router.url}/metrics", timeout=10).text)
        return {w.url: metric(values, "kvbaton:router_kv_prompt_tokens_total", worker=w.url)
                for w in (self.a, self.b)}

    def holds(self, w: WorkerThread, blocks: int) -> bool:
        """The index holds at least ``blocks`` blocks for ``w`` from its events."""
        return self.feed.index.block_count(w.url) >= blocks


@contextmanager
def kv_cluster() -> Iterator[Cluster]:
    with running_worker() as a, running_worker() as b:
        cfg = RouterConfig(workers=(a.url, b.url), model=MODEL, port=0, decode_policy="kv_aware",
                           prefill_load_scale=SCALE, disagg_min_tokens=1 << 30, health_interval_s=0.2)
        router = RouterThread(cfg).start()
        try:
            c = Cluster(router, a, b)
            # Followed and resynced (each stream's AllBlocksCleared applied: within a heartbeat).
            wait_until(lambda: all(c.feed.following(w.url) and not c.feed.index.is_approximate(w.url)
                                 for w in (a, b)), what="both streams")
            yield c
        finally:
            assert router.stop()


def prefix(seed: int, blocks: int = 8) -> list[int]:
    return [1 + (seed * 31 + i) % 200 for i in range(blocks * BS)]


def cache_directly(c: Cluster, w: WorkerThread, tokens: list[int]) -> None:
    """Prefill ``tokens`` on ``w`` behind the router's back; wait until its events arrive."""
    before = c.feed.index.block_count(w.url)
    r = httpx.post(f"{w.url}/v1/completions", json={"prompt": tokens, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200, r.text
    wait_until(lambda: c.holds(w, before + len(tokens) // BS), what="the worker's events")


def test_cached_prefix_goes_to_its_worker_unless_overloaded_past_the_margin() -> None:
    with kv_cluster() as c:
        p = prefix(1)
        cache_directly(c, c.b, p)
        for i in range(3):
            out = c.complete(p + [7, i])
            assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == len(p)
        assert c.served() == {c.a.url: 0, c.b.url: 3 * (len(p) + 2)}
        # B holds 8 more leading blocks than A: a margin of SCALE * 8 = 16 blocks of load.
        wb = c.worker(c.b)
        margin = int(SCALE * len(p) // BS)
        wb.in_flight_blocks += margin - 1
        try:
            c.complete(p + [8])
            assert c.served()[c.a.url] == 0
            wb.in_flight_blocks += 2  # now margin + 1 over A
            out = c.complete(p + [9])
        finally:
            wb.in_flight_blocks -= margin + 1
        assert c.served()[c.a.url] == len(p) + 1
        assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        values = parse_metrics(httpx.get(f"{c.router.url}/metrics", timeout=10).text)
        assert metric(values, "kvbaton:router_kv_cache_hit_rate", worker=c.b.url) > 0.9
        assert metric(values, "kvbaton:router_kv_predicted_cached_tokens_total", worker=c.b.url) == 4 * len(p)
        assert metric(values, "kvbaton:router_kv_indexed_blocks", worker=c.b.url) >= len(p) // BS
        assert metric(values, "kvbaton:router_routing_decision_seconds_count") == 5
        assert metric(values, "kvbaton:router_kv_event_lag_seconds_count", worker=c.b.url) > 0


def test_sibling_requests_sent_back_to_back_follow_the_first_by_prediction() -> None:
    with kv_cluster() as c:
        p = prefix(2)
        errors = run_in_threads(lambda i: c.complete(p + [9, i], max_tokens=8), 4, timeout_s=60)
        assert not errors
        served = c.served()
        assert sorted(served.values()) == [0, 4 * (len(p) + 2)], served


def test_restarted_worker_loses_its_entries_and_routing_recovers() -> None:
    with kv_cluster() as c:
        p = prefix(3)
        cache_directly(c, c.b, p)
        old_id = c.worker(c.b).worker_id
        port = c.b.port
        assert c.b.stop()
        c.b = WorkerThread(LLMEngine(EngineConfig(model=MODEL, **ENGINE_DEFAULTS)), WorkerConfig(port=port)).start()
        try:
            new_id = c.b.state.worker_id

            def resynced() -> bool:
                w = c.worker(c.b)
                return (w.worker_id == new_id and w.usable and c.feed.following(c.b.url)
                        and not c.feed.index.is_approximate(c.b.url))

            wait_until(resynced, what="the router to follow the restarted worker")
            assert new_id != old_id and c.feed.index.block_count(c.b.url) == 0
            first = c.complete(p + [1])
            second = c.complete(p + [2])
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == len(p)
        finally:
            assert c.b.stop()


def test_gap_replay_cannot_fill_is_resynced_from_the_worker() -> None:
    with kv_cluster() as c:
        pub = c.b.state.kv.events
        assert pub is not None
        cache_directly(c, c.b, prefix(4))
        pub.max_queue_events = 0  # the publisher cannot keep up: events are dropped, one seq skipped
        r = httpx.post(f"{c.b.url}/v1/completions", json={"prompt": prefix(5), "max_tokens": 1}, timeout=60)
        assert r.status_code == 200
        pub.max_queue_events = 1_000_000
        r = httpx.post(f"{c.b.url}/v1/completions", json={"prompt": prefix(6), "max_tokens": 1}, timeout=60)
        assert r.status_code == 200
        chains = {p: c.router.state.orchestrator.new_job("x", prefix(p), 1, {}, 0.0).routing.block_hashes
                  for p in (4, 5, 6)}

        def resynced() -> bool:
            # prefix(5)'s events were dropped: only the worker's snapshot can bring them back.
            return (c.feed.resyncs >= 1
                    and not c.feed.index.is_approximate(c.b.url)
                    and all(c.feed.index.longest_prefix(ch) == {c.b.url: len(ch)} for ch in chains.values()))

        wait_until(resynced, what="the gap to be noticed and the worker resynced")
        values = parse_metrics(httpx.get(f"{c.router.url}/metrics", timeout=10).text)
        assert metric(values, "kvbaton:router_kv_event_gaps_total", worker=c.b.url) >= 1
        assert metric(values, "kvbaton:router_kv_index_approximate", worker=c.b.url) == 0
        assert metric(values, "kvbaton:router_kv_index_approximate", worker=c.a.url) == 0
        assert c.complete(prefix(5) + [1])["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prefix(5))
