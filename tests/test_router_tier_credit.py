"""Tier-discounted cache credit: kv_aware weighs a cached block by the medium it is held in
(device, host tier, disk), while conditional disaggregation and the metrics keep counting
whole cached tokens; and the ``--kv-medium-credit`` flag that sets the credits."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pytest

from kvbaton.cli import build_parser
from kvbaton.kv.events import AllBlocksCleared, BlockStored
from kvbaton.router.config import (
    DEFAULT_KV_MEDIUM_CREDIT,
    RouterConfig,
    add_router_args,
    parse_medium_credit,
    router_config_from_args,
)
from kvbaton.router.kv_feed import KVIndexFeed
from kvbaton.router.placement import place
from kvbaton.router.policies import (
    KVAwarePolicy,
    NoPrefixOverlap,
    PolicyOptions,
    RoutingRequest,
    WorkerView,
    make_policy,
)

BS = 16
PROMPT_BLOCKS = 16


def H(i: int) -> bytes:
    return i.to_bytes(16, "big")


@dataclass
class View:
    url: str
    active_blocks: int = 0
    active_requests: int = 0
    role: str = "both"
    in_flight_requests: int = 0
    in_flight_tokens: int = 0
    model_fingerprint: str | None = "fp"
    kv_protocol: str | None = "kvbaton"

    @property
    def worker_id(self) -> str:
        return self.url

    def shared_active_blocks(self, block_hashes: Sequence[bytes]) -> int:
        return 0


def req(blocks: int = PROMPT_BLOCKS, extra_tokens: int = 5) -> RoutingRequest:
    n = blocks * BS + extra_tokens
    return RoutingRequest("r", tuple(range(n)), tuple(H(i) for i in range(blocks)), BS, None, 8)


def feed_with(held: Mapping[str, Sequence[tuple[int, str | None]]],
              medium_credit: Mapping[str, float] | None = None) -> KVIndexFeed:
    """A feed whose index is fed by hand (no subscriber: nothing is followed), keyed by URL as
    the feed keys it: url -> [(leading blocks of the prompt stored, their medium)]."""
    feed = KVIndexFeed(medium_credit=medium_credit)
    for url, runs in held.items():
        events = [AllBlocksCleared()] + [
            BlockStored([H(i) for i in range(n)], None, [], BS, medium=medium) for n, medium in runs
        ]
        feed.index.apply(url, 0, events)
    return feed


def kv_aware(feed: KVIndexFeed) -> KVAwarePolicy:
    p = make_policy("kv_aware", feed, PolicyOptions(seed=0))
    assert isinstance(p, KVAwarePolicy)
    return p


# ---- kv_aware with tiered holders ---------------------------------------------------------


def test_disk_prefix_loses_to_a_slightly_shorter_device_prefix() -> None:
    # 10 blocks on disk at the default 0.6 are worth 6 device blocks: 8 on the GPU win,
    # although longest_prefix alone (every medium alike) would pick the disk worker.
    feed = feed_with({"disk": [(10, "DISK")], "dev": [(8, "GPU")]})
    disk, dev = View("disk"), View("dev")
    r = req()
    assert feed.cached_tokens_each(r, [disk, dev]) == [10 * BS, 8 * BS]
    assert feed.credited_tokens_each(r, [disk, dev]) == pytest.approx([6 * BS, 8 * BS])
    p = kv_aware(feed)
    assert p.costs(r, [disk, dev]) == pytest.approx([17 - 6, 17 - 8])
    assert p.choose(r, [disk, dev], "decode").url == "dev"


def test_a_long_enough_disk_prefix_wins() -> None:
    # 14 disk blocks * 0.6 = 8.4 > 8 device blocks.
    feed = feed_with({"disk": [(14, "DISK")], "dev": [(8, "GPU")]})
    assert kv_aware(feed).choose(req(), [View("disk"), View("dev")], "decode").url == "disk"


def test_the_credit_decides() -> None:
    """The same holders with disk credited as much as the device: the longer run wins."""
    held = {"disk": [(10, "DISK")], "dev": [(8, "GPU")]}
    full = feed_with(held, medium_credit={**DEFAULT_KV_MEDIUM_CREDIT, "DISK": 1.0})
    assert kv_aware(full).choose(req(), [View("disk"), View("dev")], "decode").url == "disk"
    none = feed_with(held, medium_credit={**DEFAULT_KV_MEDIUM_CREDIT, "DISK": 0.0})
    assert none.credited_tokens_each(req(), [View("disk")]) == [0.0]


def test_a_block_counts_at_its_fastest_medium_and_unknown_mediums_count_whole() -> None:
    # "both": 10 blocks on disk, of which the first 4 are also on the host tier.
    # "foreign": an engine reporting a medium the map does not name, and one with none.
    feed = feed_with({"both": [(10, "DISK"), (4, "CPU_TIER")], "foreign": [(6, "HBM")], "old": [(5, None)]})
    r = req()
    views = [View("both"), View("foreign"), View("old"), View("nobody")]
    assert feed.credited_tokens_each(r, views) == pytest.approx([(4 * 0.95 + 6 * 0.6) * BS, 6 * BS, 5 * BS, 0.0])


def test_vllm_cpu_offload_is_credited_as_the_host_tier_when_told() -> None:
    # vLLM's own "CPU" medium is its offload tier; the default map treats "CPU" as our CPU
    # device pool (1.0), so with vLLM workers the operator sets CPU=0.95.
    cfg = RouterConfig(workers=("http://h:1",), kv_medium_credit=(("CPU", 0.95),))
    feed = feed_with({"vllm": [(8, "CPU")]}, medium_credit=cfg.medium_credit)
    assert feed.credited_tokens_each(req(), [View("vllm")]) == pytest.approx([8 * 0.95 * BS])


def test_predicted_blocks_are_credited_whole() -> None:
    feed = feed_with({"disk": [(4, "DISK")]})
    r = req(8)
    feed.index.predict("disk", r.block_hashes, ttl_s=5.0)  # what routed() does for a followed worker
    # Blocks 0-3 stay disk blocks (already held: the prediction skips them), 4-7 are predicted.
    assert feed.credited_tokens_each(r, [View("disk")]) == pytest.approx([(4 * 0.6 + 4) * BS])
    assert feed.cached_tokens(r, View("disk")) == 8 * BS


def test_whole_cached_tokens_still_decide_disaggregation() -> None:
    """A worker holding the whole prompt on disk is credited 60% of it, but it holds all of
    it: nothing is left to prefill, so no remote prefill and the metrics expect every token."""
    feed = feed_with({"disk": [(PROMPT_BLOCKS, "DISK")]})
    r = req(extra_tokens=0)
    disk, prefiller = View("disk"), View("p", role="prefill")
    assert feed.credited_tokens_each(r, [disk])[0] < r.num_prompt_tokens - 32
    policy = kv_aware(feed)
    placed = place(r, [disk], [prefiller], feed, policy, policy, disagg_min_tokens=32, dedicated_prefill=False)
    assert placed.decoder is disk and placed.prefiller is None
    assert placed.predicted_cached == r.num_prompt_tokens == feed.cached_tokens(r, disk)


def test_default_credit_is_the_whole_cached_tokens() -> None:
    class Says(NoPrefixOverlap):
        def cached_tokens(self, request: RoutingRequest, worker: WorkerView) -> int:
            return 3 * BS

    assert Says().credited_tokens_each(req(), [View("a"), View("b")]) == [3.0 * BS, 3.0 * BS]
    assert NoPrefixOverlap().credited_tokens_each(req(), [View("a")]) == [0.0]


def test_costs_are_unchanged_for_whole_cached_blocks() -> None:
    """ceil((prompt - cached) / bs) as before, for every whole-block credit up to the prompt."""
    p = make_policy("kv_aware", NoPrefixOverlap(), PolicyOptions(2.0))
    assert isinstance(p, KVAwarePolicy)
    for prompt in (16 * 5, 16 * 5 + 7):
        blocks = -(-prompt // BS)
        for k in range(blocks + 1):
            cached = min(k * BS, prompt)
            assert p._blocks_to_prefill(blocks, prompt, float(cached), BS) == -(-(prompt - cached) // BS)


# ---- defaults and flags -------------------------------------------------------------------


DEFAULTS = {"GPU": 1.0, "CPU": 1.0, "device": 1.0, "CPU_TIER": 0.95, "DISK": 0.6, "REMOTE": 0.5}


def test_default_credit_map() -> None:
    assert dict(DEFAULT_KV_MEDIUM_CREDIT) == DEFAULTS
    assert RouterConfig(workers=("http://h:1",)).medium_credit == DEFAULTS
    assert dict(KVIndexFeed().medium_credit) == DEFAULTS and KVIndexFeed().unknown_medium_credit == 1.0
    with pytest.raises(TypeError):
        DEFAULT_KV_MEDIUM_CREDIT["DISK"] = 0.1  # type: ignore[index]  # shared: read-only


def parse(*argv: str) -> RouterConfig:
    p = argparse.ArgumentParser()
    add_router_args(p)
    return router_config_from_args(p.parse_args(["--worker", "http://h:1", *argv]))


def test_medium_credit_flag() -> None:
    assert parse().medium_credit == DEFAULTS
    cfg = parse("--kv-medium-credit", "DISK=0.5, CPU_TIER=0.9", "--kv-medium-credit", "SSD=0", "--kv-medium-credit",
                "DISK=0.25")
    assert cfg.medium_credit == {**DEFAULTS, "DISK": 0.25, "CPU_TIER": 0.9, "SSD": 0.0}
    assert parse("--kv-medium-credit", "CPU=0.95").medium_credit["CPU"] == 0.95
    assert parse("--kv-medium-credit", "GPU=1").kv_medium_credit == tuple(sorted(DEFAULTS.items()))
    assert hash(cfg) == hash(parse("--kv-medium-credit", "SSD=0,CPU_TIER=0.9,DISK=0.25"))
    assert parse_medium_credit(["A=1,B=0.5", "A=0"]) == {"A": 0.0, "B": 0.5}


@pytest.mark.parametrize("value", [
    "DISK", "=0.5", "DISK=", "DISK=fast", "DISK=0.5,", "DISK:0.5",  # syntax
    "DISK=1.5", "DISK=-0.1", "DISK=nan", "DISK=inf",  # out of [0, 1]
])
def test_bad_medium_credit_names_the_flag(value: str) -> None:
    with pytest.raises(ValueError) as e:
        parse("--kv-medium-credit", value)
    assert str(e.value).startswith("--kv-medium-credit:")


def test_bad_credit_is_refused_by_the_config_and_the_feed() -> None:
    with pytest.raises(ValueError, match="^--kv-medium-credit:"):
        RouterConfig(workers=("http://h:1",), kv_medium_credit=(("DISK", 2.0),))
    with pytest.raises(ValueError, match="^--kv-medium-credit:"):
        RouterConfig(workers=("http://h:1",), kv_medium_credit=(("", 0.5),))
    with pytest.raises(ValueError, match="DISK"):
        KVIndexFeed(medium_credit={"DISK": -1.0})
    with pytest.raises(ValueError, match="unknown_medium_credit"):
        KVIndexFeed(unknown_medium_credit=1.5)


def test_serve_takes_the_flag() -> None:
    args = build_parser().parse_args(["serve", "--kv-medium-credit", "DISK=0.5"])
    cfg = router_config_from_args(args, workers=("http://h:1",), prefill_workers=(), decode_workers=())
    assert cfg.medium_credit == {**DEFAULTS, "DISK": 0.5}


def test_the_router_app_uses_the_configured_credit() -> None:
    from kvbaton.router.app import create_app
    from kvbaton.router.config import RouterConfig

    cfg = RouterConfig(workers=("http://127.0.0.1:9",), model="tiny-random", kv_medium_credit=(("DISK", 0.25),))
    feed = create_app(cfg).state.router.kv_feed
    assert feed is not None and feed.medium_credit["DISK"] == 0.25 and feed.medium_credit["CPU_TIER"] == 0.95
