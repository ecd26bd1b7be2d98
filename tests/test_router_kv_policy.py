"""kv_aware placement (unit, fake worker views), the router's load accounting it relies on,
the index-backed overlap, and the routing flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from conftest import free_port
from kvbaton.cli import build_parser
from kvbaton.kv.event_subscriber import WorkerEndpoints
from kvbaton.kv.events import AllBlocksCleared, BlockStored
from kvbaton.router.config import RouterConfig, add_router_args, router_config_from_args
from kvbaton.router.kv_feed import KVIndexFeed
from kvbaton.router.policies import (
    KVAwarePolicy,
    PolicyOptions,
    PrefixOverlap,
    RoutingRequest,
    WorkerView,
    make_policy,
)
from kvbaton.router.pool import Worker, WorkerPool

BS = 16


def H(i: int) -> bytes:
    return i.to_bytes(16, "big")


@dataclass
class View:
    url: str
    active_blocks: int = 0
    active_requests: int = 0
    shared: set[bytes] = field(default_factory=set)
    role: str = "both"
    in_flight_requests: int = 0
    in_flight_tokens: int = 0

    @property
    def worker_id(self) -> str:
        return self.url

    def shared_active_blocks(self, block_hashes: Sequence[bytes]) -> int:
        return sum(1 for h in block_hashes if h in self.shared)


class Cached(PrefixOverlap):
    def __init__(self, blocks: dict[str, int]) -> None:
        self.blocks = blocks

    def cached_tokens(self, request: RoutingRequest, worker: WorkerView) -> int:
        return self.blocks.get(worker.url, 0) * BS


def req(blocks: int, extra_tokens: int = 5) -> RoutingRequest:
    n = blocks * BS + extra_tokens
    return RoutingRequest("r", tuple(range(n)), tuple(H(i) for i in range(blocks)), BS, None, 8)


def policy(cached: dict[str, int], scale: float = 1.0, temperature: float = 0.0) -> KVAwarePolicy:
    p = make_policy("kv_aware", Cached(cached), PolicyOptions(scale, temperature, seed=0))
    assert isinstance(p, KVAwarePolicy)
    return p


def test_cost_is_scaled_uncached_blocks_plus_unshared_active_blocks() -> None:
    # 10 full blocks + 5 tokens = 11 prompt blocks; B holds 6 of them.
    a, b = View("a", active_blocks=3), View("b", active_blocks=7, shared={H(0), H(1)})
    assert policy({"b": 6}, scale=2.0).costs(req(10), [a, b]) == [2.0 * 11 + 3, 2.0 * 5 + 7 - 2]


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_cached_worker_wins_until_overloaded_by_the_margin(scale: float) -> None:
    k = 8  # blocks cached on B only: the margin is scale * k blocks of load
    margin = scale * k
    p = policy({"b": k}, scale=scale)
    a = View("a", active_blocks=10)
    below = View("b", active_blocks=int(10 + margin) - 1)
    above = View("b", active_blocks=int(10 + margin) + 1)
    assert p.choose(req(k), [a, below], "decode").url == "b"
    assert p.choose(req(k), [a, above], "decode").url == "a"


def test_sibling_blocks_in_flight_are_not_extra_load() -> None:
    # A sibling with the same 8-block prefix runs on B: B's 8 + 1 active blocks are mostly
    # the ones this request shares, so it still goes to B.
    p = policy({"b": 8})
    b = View("b", active_blocks=9, shared={H(i) for i in range(8)})
    assert p.choose(req(8), [View("a"), b], "decode").url == "b"


def test_ties_go_to_fewer_requests_then_at_random() -> None:
    p = policy({})
    busy, idle = View("a", active_requests=2), View("b", active_requests=0)
    assert {p.choose(req(4), [busy, idle], "decode").url for _ in range(20)} == {"b"}
    seen = {p.choose(req(4), [View("a"), View("b"), View("c")], "decode").url for _ in range(60)}
    assert seen == {"a", "b", "c"}


def test_temperature_samples_by_softmax_of_negative_cost() -> None:
    cold = policy({"b": 4}, temperature=0.0)
    assert {cold.choose(req(4), [View("a"), View("b")], "decode").url for _ in range(20)} == {"b"}
    warm = policy({"b": 4}, temperature=4.0)  # cost gap 4 blocks: P(a) = 1 / (1 + e) ~ 0.27
    picks = [warm.choose(req(4), [View("a"), View("b")], "decode").url for _ in range(400)]
    assert 40 < picks.count("a") < 180


# ---- the pool's accounting and the index-backed overlap -----------------------------------


def test_in_flight_legs_share_prompt_blocks_and_reports_add_external_load() -> None:
    pool = WorkerPool(RouterConfig(workers=("http://h:1",)))
    pool.cluster.block_size = BS
    w = pool.workers[0]
    hashes = [H(i) for i in range(4)]
    first = pool.begin(w, 4 * BS + 20, hashes)   # 6 blocks: 4 shared + 2 private
    second = pool.begin(w, 4 * BS + 20, hashes)
    assert w.active_blocks == 4 + 2 + 2 and w.shared_active_blocks(hashes + [H(9)]) == 4
    w.note_load({"num_requests_running": 3, "num_requests_waiting": 1, "kv_blocks_used": 20})
    assert (w.external_requests, w.external_blocks) == (2, 12)
    assert (w.active_requests, w.active_blocks) == (4, 20)
    first.done()
    second.done()
    first.done()  # idempotent
    assert (w.in_flight_blocks, dict(w.active_hashes), w.active_blocks) == (0, {}, 12)


def test_feed_answers_overlap_from_the_index_and_predictions() -> None:
    feed = KVIndexFeed(prediction_ttl_s=5.0)
    feed.start()
    # Followed (predictions count only for workers whose events the feed follows); nothing
    # listens on these ports, and no event is needed: the index is fed by hand below.
    a = Worker("http://a", worker_id="a", kv_events=WorkerEndpoints(f"tcp://127.0.0.1:{free_port()}"))
    b = Worker("http://b", worker_id="b", kv_events=WorkerEndpoints(f"tcp://127.0.0.1:{free_port()}"))
    for w in (a, b):
        feed.worker_discovered(w, "")
    assert feed.following(a.url) and feed.following(b.url)
    r = req(3)
    feed.index.apply(b.url, 0, [AllBlocksCleared(), BlockStored([H(0), H(1)], None, [], BS)])
    assert feed.cached_tokens_each(r, [a, b]) == [0, 2 * BS]
    feed.routed(r, a)
    assert feed.cached_tokens_each(r, [a, b]) == [3 * BS, 2 * BS]
    # Device blocks and predictions are credited whole (tiers: tests/test_router_tier_credit.py).
    assert feed.credited_tokens_each(r, [a, b]) == [3.0 * BS, 2.0 * BS]
    assert feed.cached_tokens(RoutingRequest("x", (1,), (), None, None, 1), a) == 0
    feed.close()


# ---- flags -------------------------------------------------------------------------------


def parse(*argv: str) -> RouterConfig:
    p = argparse.ArgumentParser()
    add_router_args(p)
    return router_config_from_args(p.parse_args(["--worker", "http://h:1", *argv]))


def test_routing_flags() -> None:
    cfg = parse("--policy", "kv_aware", "--prefill-load-scale", "2", "--routing-temperature", "0.5",
                "--kv-prediction-ttl", "3", "--no-kv-events")
    assert (cfg.prefill_policy, cfg.decode_policy) == ("kv_aware", "kv_aware")
    assert cfg.policy_options() == PolicyOptions(2.0, 0.5)
    assert (cfg.kv_prediction_ttl_s, cfg.kv_events) == (3.0, False)
    assert parse("--decode-policy", "kv_aware").prefill_policy == "least_load"
    assert parse().kv_events is True
    serve = build_parser().parse_args(["serve", "--colocated", "2", "--policy", "kv_aware", "--no-kv-events"])
    cfg = router_config_from_args(serve, workers=("http://h:1",), prefill_workers=(), decode_workers=())
    assert cfg.decode_policy == "kv_aware" and cfg.kv_events is False


@pytest.mark.parametrize("argv, flag", [
    (("--prefill-load-scale", "-1"), "--prefill-load-scale"),
    (("--prefill-load-scale", "nan"), "--prefill-load-scale"),
    (("--routing-temperature", "-0.1"), "--routing-temperature"),
    (("--kv-prediction-ttl", "0"), "--kv-prediction-ttl"),
])
def test_bad_routing_flags_name_the_flag(argv: tuple[str, ...], flag: str) -> None:
    with pytest.raises(ValueError) as e:
        parse(*argv)
    assert str(e.value).startswith(flag)


def test_serve_refuses_fixed_event_ports(capsys: pytest.CaptureFixture[str]) -> None:
    from kvbaton.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "tiny-random", "--kv-events-port", "5557"])
    assert e.value.code == 2 and "--kv-events-port" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (("--long-prefill-token-threshold", "-1"), "--long-prefill-token-threshold"),
    (("--max-num-seqs", "0"), "--max-num-seqs"),
])
def test_serve_refuses_bad_engine_flags_before_starting_workers(
        argv: tuple[str, ...], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kvbaton.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "tiny-random", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"serve: error: {flag}:" in err and "exited" not in err
