"""A real worker publishes its block pool's KV events: /kv/info advertises the endpoints, a
subscriber following them rebuilds an index equal to the pool's prefix cache (stores and
evictions), /health carries the worker id and load, and --no-kv-events turns it all off."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import wait_until
from kvbaton.cli import build_parser, main
from kvbaton.errors import ConfigError
from kvbaton.kv.event_stream import KVEventBatch
from kvbaton.kv.event_subscriber import KVEventSubscriber, WorkerEndpoints
from kvbaton.kv.index import KVIndex
from kvbaton.worker.config import WorkerConfig
from kvbaton.worker.server import WorkerThread
from worker_support import running_worker, wait_idle

BODY = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}


def _pool_hashes(w: WorkerThread) -> set[bytes]:
    # Read between steps (the worker is idle): the pool's cached hashes are the ground truth.
    return w.state.engine.engine.pool.cached_hashes()


@pytest.fixture
def small_worker() -> Iterator[WorkerThread]:
    # 24 blocks of 16 tokens: the prompts below evict each other, so BlockRemoved shows up.
    with running_worker(num_kv_blocks=24) as w:
        yield w


def test_events_rebuild_the_pool_prefix_cache(small_worker: WorkerThread) -> None:
    w = small_worker
    info = httpx.get(f"{w.url}/kv/info", timeout=10).json()
    eps = info["kv_events"]
    assert eps["pub"].startswith("tcp://127.0.0.1:") and eps["replay"].startswith("tcp://127.0.0.1:")
    index = KVIndex()
    kinds: set[str] = set()

    def on_batch(worker: Any, seq: int, batch: KVEventBatch) -> None:
        kinds.update(type(e).__name__ for e in batch.events)
        index.apply(worker, seq, batch)

    sub = KVEventSubscriber({"w": WorkerEndpoints(eps["pub"], eps["replay"])}, on_batch)
    try:
        for i in range(6):  # ~150 tokens each: 9 full blocks; 6 of them do not fit in 24
            prompt = f"prompt number {i}: " + "lorem ipsum dolor sit amet " * 5
            r = httpx.post(f"{w.url}/v1/completions", json={"prompt": prompt, **BODY}, timeout=60)
            assert r.status_code == 200, r.text
        wait_idle(w.url, 0)
        truth = _pool_hashes(w)
        assert truth, "the pool cached nothing"

        def same() -> bool:
            stats = index.stats().get("w")
            return stats is not None and not stats.approximate and index.block_count("w") == len(truth) \
                and all(("w", "CPU") in index.holders(h) for h in truth)

        wait_until(same, timeout_s=10, what="the index to match the pool")
        assert {"AllBlocksCleared", "BlockStored", "BlockRemoved"} <= kinds
    finally:
        sub.close()


def test_health_reports_worker_id_and_load(small_worker: WorkerThread) -> None:
    body = httpx.get(f"{small_worker.url}/health", timeout=10).json()
    info = httpx.get(f"{small_worker.url}/kv/info", timeout=10).json()
    assert body["worker_id"] == info["worker_id"]
    assert body["load"] == {"num_requests_running": 0, "num_requests_waiting": 0,
                            "kv_blocks_used": 0, "kv_blocks_total": 24}


def test_no_kv_events_publishes_nothing() -> None:
    with running_worker({"kv_events": False}) as w:
        assert httpx.get(f"{w.url}/kv/info", timeout=10).json()["kv_events"] is None
        assert w.state.engine.engine.pool.event_sink is None


def test_event_flags() -> None:
    args = build_parser().parse_args(
        ["worker", "--kv-events-port", "5557", "--kv-events-replay-port", "5558", "--no-kv-events"])
    assert (args.kv_events_port, args.kv_events_replay_port, args.no_kv_events) == (5557, 5558, True)
    with pytest.raises(ConfigError) as bad_port:
        WorkerConfig(kv_events_port=70000)
    assert bad_port.value.field == "kv_events_port"
    with pytest.raises(ConfigError) as same_port:
        WorkerConfig(kv_events_port=5557, kv_events_replay_port=5557)
    assert same_port.value.field == "kv_events_replay_port"


@pytest.mark.parametrize("argv, flag", [
    (["--kv-events-port", "70000"], "--kv-events-port"),
    (["--kv-events-port", "5557", "--kv-events-replay-port", "5557"], "--kv-events-replay-port"),
])
def test_worker_cli_names_the_bad_event_flag(argv, flag, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["worker", "--model", "tiny-random", *argv])
    assert exited.value.code == 2
    assert f"error: {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("with_tokens", [False, True])
def test_block_events_carry_token_ids_only_when_asked(with_tokens: bool) -> None:
    # The event port is unauthenticated: by default it must not hand out the prompts' tokens.
    with running_worker({"kv_events_token_ids": with_tokens}) as w:
        eps = httpx.get(f"{w.url}/kv/info", timeout=10).json()["kv_events"]
        stored: list[Any] = []

        def on_batch(worker: Any, seq: int, batch: KVEventBatch) -> None:
            stored.extend(e for e in batch.events if type(e).__name__ == "BlockStored")

        sub = KVEventSubscriber({"w": WorkerEndpoints(eps["pub"], eps["replay"])}, on_batch)
        try:
            prompt = list(range(1, 40))  # two full blocks
            r = httpx.post(f"{w.url}/v1/completions", json={"prompt": prompt, **BODY}, timeout=60)
            assert r.status_code == 200, r.text
            # (A step's commit publishes its new blocks as one event: count blocks, not events.)
            wait_until(lambda: sum(len(e.block_hashes) for e in stored) >= 2, timeout_s=10,
                       what="the BlockStored events")
        finally:
            sub.close()
        assert sum(len(e.block_hashes) for e in stored) == 2
        tokens = [t for e in stored for t in e.token_ids]
        assert tokens == (prompt[:32] if with_tokens else [])


@pytest.mark.parametrize("router_secret", ["cluster-secret", None])
def test_encrypted_events_are_followed_only_by_a_router_with_the_secret(router_secret: str | None) -> None:
    from kvbaton.router.config import RouterConfig
    from kvbaton.router.server import RouterThread
    from worker_support import metric, parse_metrics

    with running_worker({"kv_events_secret": "cluster-secret"}) as w:
        assert httpx.get(f"{w.url}/kv/info", timeout=10).json()["kv_events"]["encrypted"] is True
        cfg = RouterConfig(workers=(w.url,), model="tiny-random", port=0, health_interval_s=0.2,
                           kv_secret=router_secret)
        with RouterThread(cfg) as r:
            prompt = list(range(1, 50))
            resp = httpx.post(f"{r.url}/v1/completions", json={"prompt": prompt, **BODY}, timeout=60)
            assert resp.status_code == 200, resp.text
            wait_idle(w.url, 0)
            feed = r.state.kv_feed
            assert feed is not None
            if router_secret is None:
                assert not feed.following(w.url)  # refused up front (logged), not a silent stall
                return

            def indexed() -> bool:
                m = parse_metrics(httpx.get(f"{r.url}/metrics", timeout=10).text)
                return (metric(m, "kvbaton:router_kv_indexed_blocks", worker=w.url) or 0) >= 3

            wait_until(indexed, what="the router's index to hold the prompt's blocks")
