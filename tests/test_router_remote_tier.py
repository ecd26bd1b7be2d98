"""The shared remote KV tier in the router: a block any worker stored with medium REMOTE is
reachable by every worker (the index keeps one cluster-wide set, with a TTL), so kv_aware
credits it to every candidate at the REMOTE credit, conditional disaggregation counts it as
cached, and the set survives what happens to the worker that filled it. Plus the
``--kv-remote-ttl`` flag, the default credit and the gauge."""

from __future__ import annotations

import argparse

import pytest

from kvbaton.cli import build_parser
from kvbaton.kv.events import REMOTE_MEDIUM, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbaton.kv.index import DEFAULT_REMOTE_TTL_S, KVIndex
from kvbaton.router.config import (
    DEFAULT_KV_MEDIUM_CREDIT,
    RouterConfig,
    add_router_args,
    router_config_from_args,
)
from kvbaton.router.kv_feed import KVIndexFeed
from kvbaton.router.metrics import RouterMetrics
from kvbaton.router.placement import place
from kvbaton.router.policies import KVAwarePolicy, PolicyOptions, make_policy
from kvbaton.router.pool import WorkerPool
from test_router_tier_credit import BS, PROMPT_BLOCKS, H, View, req
from worker_support import metric, parse_metrics

REMOTE = DEFAULT_KV_MEDIUM_CREDIT[REMOTE_MEDIUM]



class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stored(first: int, n: int, medium: str | None = "GPU") -> BlockStored:
    return BlockStored([H(i) for i in range(first, first + n)], None, [], BS, medium=medium)


def removed(first: int, n: int, medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved([H(i) for i in range(first, first + n)], medium=medium)


class Stream:
    """A worker's event stream into an index, numbered as its publisher numbers it."""

    def __init__(self, index: KVIndex, url: str) -> None:
        self.index, self.url, self.seq = index, url, 0
        self.send(AllBlocksCleared())

    def send(self, *events: KVEvent) -> None:
        self.index.apply(self.url, self.seq, list(events))
        self.seq += 1


def kv_aware(feed: KVIndexFeed) -> KVAwarePolicy:
    p = make_policy("kv_aware", feed, PolicyOptions(seed=0))
    assert isinstance(p, KVAwarePolicy)
    return p


# ---- the index's cluster-wide set ---------------------------------------------------------


def test_remote_blocks_from_one_worker_are_every_workers() -> None:
    idx = KVIndex()
    a, b = Stream(idx, "a"), Stream(idx, "b")
    a.send(stored(0, 6), stored(0, 4, REMOTE_MEDIUM))  # a: 6 on its device, the first 4 in Redis
    b.send(stored(10, 2))  # b holds nothing of this chain
    chain = [H(i) for i in range(8)]
    runs = idx.longest_prefix(chain)
    assert runs == {"a": 6, "b": 4} and runs.others == 4 and runs.of("never-seen") == 4
    assert idx.longest_prefix(chain, include_remote=False) == {"a": 6}
    assert idx.holders(H(0)) == {("a", "GPU")}  # per-worker holders: the tier is no worker's
    assert idx.in_remote(H(3)) and not idx.in_remote(H(4)) and idx.remote_block_count() == 4
    assert idx.block_count("a") == 6 and idx.block_count("b") == 2


def test_a_run_continues_through_the_remote_tier_into_own_blocks() -> None:
    idx = KVIndex()
    a = Stream(idx, "a")
    a.send(stored(0, 2), stored(4, 2))  # a holds blocks 0-1 and 4-5 (lost 2-3)
    a.send(stored(2, 2, REMOTE_MEDIUM))  # ... which are in Redis
    chain = [H(i) for i in range(8)]
    runs = idx.weighted_prefix(chain, {"GPU": 1.0, REMOTE_MEDIUM: 0.5})
    assert runs == {"a": (6, 2 + 2 * 0.5 + 2)} and runs.others == (0, 0.0)


def test_removed_from_the_remote_tier_by_any_worker() -> None:
    idx = KVIndex()
    a, b = Stream(idx, "a"), Stream(idx, "b")
    a.send(stored(0, 4, REMOTE_MEDIUM))
    b.send(removed(2, 1, REMOTE_MEDIUM))  # b found block 2's key gone (or bad) and said so
    assert idx.longest_prefix([H(i) for i in range(4)]) == {"a": 2, "b": 2}
    b.send(removed(0, 1, "GPU"))  # a device removal is b's own: the tier keeps block 0
    assert idx.in_remote(H(0)) and idx.remote_block_count() == 3


def test_remote_entries_expire_unless_stored_again() -> None:
    clock = FakeClock()
    idx = KVIndex(clock=clock, remote_ttl_s=100.0)
    a = Stream(idx, "a")
    a.send(stored(0, 4, REMOTE_MEDIUM))
    clock.now += 60
    a.send(stored(0, 2, REMOTE_MEDIUM))  # written again (or a hit the worker reports): refreshed
    chain = [H(i) for i in range(4)]
    assert idx.longest_prefix(chain).others == 4
    clock.now += 40  # 100 s after the first store: blocks 2-3 are gone, 0-1 have 60 s left
    assert idx.longest_prefix(chain).others == 2 and not idx.in_remote(H(2))
    assert idx.remote_block_count() == 2
    clock.now += 60
    assert idx.longest_prefix(chain) == {} and idx.remote_block_count() == 0
    assert idx.remote_ttl_s == 100.0 and KVIndex().remote_ttl_s == DEFAULT_REMOTE_TTL_S == 3600.0


def test_the_ttl_can_be_changed_and_must_be_positive() -> None:
    clock = FakeClock()
    idx = KVIndex(clock=clock)
    Stream(idx, "a").send(stored(0, 3, REMOTE_MEDIUM))
    clock.now += 10
    idx.remote_ttl_s = 10.0  # applies to the entries already there: they are kept by store time
    assert idx.remote_block_count() == 0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="remote_ttl_s"):
            KVIndex(remote_ttl_s=bad)
        with pytest.raises(ValueError, match="remote_ttl_s"):
            idx.remote_ttl_s = bad


def test_clear_gap_and_removal_of_the_worker_keep_the_remote_tier() -> None:
    idx = KVIndex()
    a = Stream(idx, "a")
    Stream(idx, "b")
    a.send(stored(0, 4), stored(0, 4, REMOTE_MEDIUM))
    chain = [H(i) for i in range(4)]
    a.send(AllBlocksCleared())  # a restarted: its device cache is gone, Redis still has the blocks
    assert idx.block_count("a") == 0 and idx.longest_prefix(chain) == {"a": 4, "b": 4}
    a.seq += 3  # a gap: a's entries are dropped, it is approximate
    a.send(stored(9, 1))
    assert idx.is_approximate("a") and idx.longest_prefix(chain).of("a") == 4
    idx.mark_approximate("b")
    idx.remove_worker("a")
    runs = idx.longest_prefix(chain)
    assert runs == {"b": 4} and runs.of("a") == 4 and idx.remote_block_count() == 4


# ---- what the feed answers ----------------------------------------------------------------


def feed_with_remote(remote_credit: float = REMOTE) -> tuple[KVIndexFeed, Stream, Stream]:
    """A feed fed by hand (nothing followed), keyed by URL as the feed keys it."""
    feed = KVIndexFeed(medium_credit={**DEFAULT_KV_MEDIUM_CREDIT, REMOTE_MEDIUM: remote_credit})
    return feed, Stream(feed.index, "a"), Stream(feed.index, "b")


def test_remote_blocks_credit_every_candidate_including_unknown_ones() -> None:
    feed, a, b = feed_with_remote()
    a.send(stored(0, 10), stored(0, 8, REMOTE_MEDIUM))  # a computed 10 blocks, put 8 in Redis
    b.send(stored(0, 2))  # b holds the first 2 on its device
    r = req()
    views = [View("a"), View("b"), View("c")]  # c: never sent an event
    assert feed.cached_tokens_each(r, views) == [10 * BS, 8 * BS, 8 * BS]
    assert feed.credited_tokens_each(r, views) == pytest.approx(
        [10 * BS, (2 + 6 * REMOTE) * BS, 8 * REMOTE * BS])
    assert feed.cached_tokens(r, View("c")) == 8 * BS


def test_a_block_held_locally_keeps_its_own_credit() -> None:
    feed, a, b = feed_with_remote()
    a.send(stored(0, 4, REMOTE_MEDIUM))
    b.send(stored(0, 4, "GPU"), stored(0, 4, "DISK"))  # also on b's device / disk
    r = req(4, extra_tokens=0)
    assert feed.credited_tokens_each(r, [View("b"), View("a")]) == pytest.approx([4 * BS, 4 * REMOTE * BS])
    b.send(removed(0, 4, "GPU"))  # only on disk now: DISK 0.6 beats REMOTE 0.5
    assert feed.credited_tokens_each(r, [View("b")]) == pytest.approx([4 * 0.6 * BS])
    # Credit the remote tier above disk and it is the better source of the same block.
    fast, a, b = feed_with_remote(0.8)
    a.send(stored(0, 4, REMOTE_MEDIUM))
    b.send(stored(0, 4, "DISK"))
    assert fast.credited_tokens_each(r, [View("b")]) == pytest.approx([4 * 0.8 * BS])


def test_a_predicted_block_in_the_remote_tier_counts_whole() -> None:
    feed, a, b = feed_with_remote()
    a.send(stored(0, 8, REMOTE_MEDIUM))
    r = req(8, extra_tokens=0)
    feed.index.predict("b", r.block_hashes[:4], ttl_s=5.0)  # routed() there a moment ago
    assert feed.credited_tokens_each(r, [View("b"), View("a")]) == pytest.approx(
        [(4 + 4 * REMOTE) * BS, 8 * REMOTE * BS])


def test_kv_aware_goes_to_the_idle_worker_when_the_prefix_is_in_the_remote_tier() -> None:
    """Worker a computed the prompt and holds it on its device; with the prefix only there, b
    is worth 17 blocks of prefill, so a wins until it carries 16 more active blocks than b.
    Once a has put the prefix in the shared tier, b can load it (credit 0.5: 8 blocks saved),
    and a busy a loses to an idle b instead of queueing the request behind its work."""
    pool = WorkerPool(RouterConfig(workers=("http://a:1", "http://b:1")))
    pool.cluster.block_size = BS
    a, b = pool.workers
    for i in range(3):  # a runs three unrelated requests of 4 blocks each: 12 active blocks
        pool.begin(a, 4 * BS, [H(100 + 10 * i + j) for j in range(3)])
    assert (a.active_blocks, b.active_blocks) == (12, 0)
    feed = KVIndexFeed()
    sa, _ = Stream(feed.index, a.url), Stream(feed.index, b.url)
    sa.send(stored(0, PROMPT_BLOCKS))
    r = req()  # 16 full blocks + 5 tokens: 17 prompt blocks
    policy = kv_aware(feed)
    assert policy.costs(r, [a, b]) == pytest.approx([1 + 12, 17])
    assert policy.choose(r, [a, b], "decode") is a  # device-only prefix: worth waiting for
    sa.send(stored(0, PROMPT_BLOCKS, REMOTE_MEDIUM))
    assert policy.costs(r, [a, b]) == pytest.approx([1 + 12, 17 - PROMPT_BLOCKS * REMOTE])
    assert policy.choose(r, [a, b], "decode") is b
    # Not by a blanket rule: a lightly loaded holder still wins with its device copy.
    light = WorkerPool(RouterConfig(workers=(a.url, b.url)))
    light.cluster.block_size = BS
    la, lb = light.workers
    light.begin(la, 4 * BS, [H(200 + j) for j in range(3)])  # 4 active blocks
    assert policy.choose(r, [la, lb], "decode") is la


def test_remote_prefix_counts_as_cached_for_disaggregation() -> None:
    """The decode worker can load the prompt from the shared tier itself, so a remote prefill
    is not worth it: the placement prefills locally and expects every token cached."""
    feed, a, _ = feed_with_remote()
    a.send(stored(0, PROMPT_BLOCKS, REMOTE_MEDIUM))
    r = req(extra_tokens=0)
    decoder, prefiller = View("d", role="decode"), View("p", role="prefill")
    policy = kv_aware(feed)
    placed = place(r, [decoder], [prefiller], feed, policy, policy, disagg_min_tokens=32, dedicated_prefill=True)
    assert placed.prefiller is None and placed.fallback is None
    assert placed.predicted_cached == r.num_prompt_tokens
    # With the tier left out (or empty) the same request goes to the prefill worker.
    empty = KVIndexFeed()
    placed = place(r, [decoder], [prefiller], empty, policy, policy, disagg_min_tokens=32, dedicated_prefill=True)
    assert placed.prefiller is prefiller


# ---- defaults, flags, app, metrics --------------------------------------------------------


def test_default_remote_credit() -> None:
    assert REMOTE == 0.5  # max(0, 1 - ~0.8 ms load / ~1.6 ms prefill): docs/router.md
    assert dict(KVIndexFeed().medium_credit)[REMOTE_MEDIUM] == 0.5


def parse(*argv: str) -> RouterConfig:
    p = argparse.ArgumentParser()
    add_router_args(p)
    return router_config_from_args(p.parse_args(["--worker", "http://h:1", *argv]))


def test_remote_flags() -> None:
    assert parse().kv_remote_ttl_s == 3600.0
    assert parse("--kv-remote-ttl", "90").kv_remote_ttl_s == 90.0
    assert parse("--kv-medium-credit", "REMOTE=0.7").medium_credit[REMOTE_MEDIUM] == 0.7
    assert parse("--kv-medium-credit", "DISK=0.5,REMOTE=0").medium_credit[REMOTE_MEDIUM] == 0.0


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_bad_remote_ttl_names_the_flag(value: str) -> None:
    with pytest.raises(ValueError, match="^--kv-remote-ttl: must be > 0"):
        parse("--kv-remote-ttl", value)
    with pytest.raises(ValueError, match="^--kv-remote-ttl:"):
        RouterConfig(workers=("http://h:1",), kv_remote_ttl_s=float(value))


def test_bad_remote_credit_names_the_flag() -> None:
    with pytest.raises(ValueError, match="^--kv-medium-credit: REMOTE"):
        parse("--kv-medium-credit", "REMOTE=1.5")


def test_serve_matches_its_workers_ttl() -> None:
    """Under serve the router's TTL is the workers' own --kv-remote-ttl (one flag for both)."""
    try:
        args = build_parser().parse_args(["serve", "--kv-remote-ttl", "120"])
    except SystemExit:
        pytest.skip("the workers' --kv-remote-ttl is not in `kvbaton serve` yet")
    cfg = router_config_from_args(args, workers=("http://h:1",), prefill_workers=(), decode_workers=())
    assert cfg.kv_remote_ttl_s == 120.0


def test_the_router_app_uses_the_configured_ttl() -> None:
    from kvbaton.router.app import create_app

    cfg = RouterConfig(workers=("http://127.0.0.1:9",), model="tiny-random", kv_remote_ttl_s=60.0)
    feed = create_app(cfg).state.router.kv_feed
    assert feed is not None and feed.index.remote_ttl_s == 60.0


def test_remote_blocks_gauge() -> None:
    pool = WorkerPool(RouterConfig(workers=("http://a:1",)))
    metrics = RouterMetrics(pool)
    metrics.index = KVIndex()
    name = "kvbaton:router_kv_index_remote_blocks"
    assert metric(parse_metrics(metrics.render().decode()), name) == 0.0
    a = Stream(metrics.index, "http://a:1")
    a.send(stored(0, 5, REMOTE_MEDIUM), stored(3, 4, REMOTE_MEDIUM))
    assert metric(parse_metrics(metrics.render().decode()), name) == 7.0
    assert f"\n{name} 7.0\n" in metrics.render().decode()
