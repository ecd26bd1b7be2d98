"""Placement policies and the overlap seam (unit), placement through a live router, and the
router's config/flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from kvbaton.router.config import (
    DEFAULT_DISAGG_MIN_TOKENS,
    RouterConfig,
    add_router_args,
    router_config_from_args,
)
from kvbaton.router.policies import (
    POLICIES,
    LeastLoadPolicy,
    PrefixOverlap,
    RoundRobinPolicy,
    RoutingRequest,
    WorkerView,
    make_policy,
)
from router_fakes import FakeWorker, cluster


@dataclass
class W:
    url: str
    in_flight_requests: int = 0
    in_flight_tokens: int = 0
    role: str = "both"

    @property
    def worker_id(self) -> str:
        return self.url


REQ = RoutingRequest("r", (1, 2, 3), (), None, None, 4)


def test_round_robin_cycles_through_candidates() -> None:
    ws = [W("a", 5), W("b"), W("c")]
    p = RoundRobinPolicy()
    assert [p.choose(REQ, ws, "decode").url for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_load_picks_fewest_requests_for_decode_and_fewest_tokens_for_prefill() -> None:
    ws = [W("a", 2, 10), W("b", 1, 900), W("c", 3, 5)]
    p = LeastLoadPolicy()
    assert p.choose(REQ, ws, "decode").url == "b"
    assert p.choose(REQ, ws, "prefill").url == "c"


def test_least_load_rotates_among_ties() -> None:
    ws = [W("a"), W("b"), W("c", 1)]
    p = LeastLoadPolicy()
    assert {p.choose(REQ, ws, "decode").url for _ in range(4)} == {"a", "b"}


def test_registry_by_name() -> None:
    assert {"round_robin", "least_load"} <= set(POLICIES)
    assert isinstance(make_policy("least_load"), LeastLoadPolicy)
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        make_policy("nope")


class _Says(PrefixOverlap):
    def __init__(self, cached: dict[str, int]) -> None:
        self.cached = cached

    def cached_tokens(self, request: RoutingRequest, worker: WorkerView) -> int:
        return self.cached.get(worker.url, 0)


def test_overlap_provider_decides_conditional_disaggregation() -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    with cluster(p, d) as r:
        # 40-token prompt, 36 cached on the decoder: 4 uncached < 8 -> local prefill.
        r.state.orchestrator.overlap = _Says({d.url: 36})
        assert httpx.post(f"{r.url}/v1/completions", json={"prompt": "x" * 40, "max_tokens": 2}).status_code == 200
        r.state.orchestrator.overlap = _Says({d.url: 16})
        assert httpx.post(f"{r.url}/v1/completions", json={"prompt": "x" * 40, "max_tokens": 2}).status_code == 200
    assert len(p.prefills) == 1 and len(d.decodes) == 2
    assert "kv_transfer_params" not in d.decodes[0] and "kv_transfer_params" in d.decodes[1]


def test_least_load_through_the_router_avoids_the_busy_worker() -> None:
    a, b = FakeWorker("both", "a"), FakeWorker("both", "b")
    with cluster(a, b, decode_policy="least_load") as r:
        busy = next(w for w in r.state.pool.workers if w.url == a.url)
        busy.in_flight_requests += 1  # as if a long request were running there
        try:
            for _ in range(3):
                assert httpx.post(f"{r.url}/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
        finally:
            busy.in_flight_requests -= 1
    assert len(a.decodes) == 0 and len(b.decodes) == 3


def test_round_robin_through_the_router_alternates() -> None:
    a, b = FakeWorker("both", "a"), FakeWorker("both", "b")
    with cluster(a, b, decode_policy="round_robin") as r:
        for _ in range(4):
            assert httpx.post(f"{r.url}/v1/completions", json={"prompt": "a", "max_tokens": 1}).status_code == 200
    assert len(a.decodes) == 2 and len(b.decodes) == 2


def test_prefill_listed_worker_is_never_a_decoder_and_role_mismatch_is_excluded() -> None:
    both, dec = FakeWorker("both", "both"), FakeWorker("decode", "dec")
    with cluster(both, dec, workers=(), prefill_workers=(both.url,), decode_workers=(dec.url,)) as r:
        for prompt in ("x" * 40, "a"):
            assert httpx.post(f"{r.url}/v1/completions", json={"prompt": prompt, "max_tokens": 2}).status_code == 200
    assert len(both.prefills) == 1 and both.decodes == [] and len(dec.decodes) == 2
    dec2, b2 = FakeWorker("decode", "dec2"), FakeWorker("both", "b2")
    with cluster(dec2, b2, workers=(b2.url,), prefill_workers=(dec2.url,)) as r:
        info = {w["url"]: w for w in httpx.get(f"{r.url}/health").json()["workers"]}
        assert httpx.post(f"{r.url}/v1/completions", json={"prompt": "x" * 40, "max_tokens": 2}).status_code == 200
    assert "listed as prefill" in info[dec2.url]["problem"]
    assert dec2.prefills == [] and dec2.decodes == []


# ---- config and flags ---------------------------------------------------------------------


def parse(*argv: str) -> RouterConfig:
    p = argparse.ArgumentParser()
    add_router_args(p)
    return router_config_from_args(p.parse_args(list(argv)))


def test_flags_build_the_config() -> None:
    cfg = parse("--worker", "http://h:1/v1/", "--prefill", "http://h:2", "--decode", "http://h:3",
                "--policy", "round_robin", "--disagg-min-tokens", "0", "--request-timeout", "5")
    assert cfg.workers == ("http://h:1",) and cfg.prefill_workers == ("http://h:2",)
    assert cfg.worker_specs() == [("http://h:1", None), ("http://h:2", "prefill"), ("http://h:3", "decode")]
    assert (cfg.prefill_policy, cfg.decode_policy) == ("round_robin", "round_robin")
    assert cfg.disagg_min_tokens == 0 and cfg.request_timeout_s == 5
    default = parse("--worker", "http://h:1")
    assert default.disagg_min_tokens == DEFAULT_DISAGG_MIN_TOKENS == 32
    assert (default.prefill_policy, default.decode_policy) == ("least_load", "least_load")
    split = parse("--worker", "http://h:1", "--prefill-policy", "round_robin")
    assert (split.prefill_policy, split.decode_policy) == ("round_robin", "least_load")


@pytest.mark.parametrize("argv, flag", [
    ((), "--worker"),
    (("--prefill", "http://h:1"), "--decode"),
    (("--worker", "ftp://h:1"), "--worker"),
    (("--worker", "http://h:1", "--worker", "http://h:1/"), "--worker"),
    (("--worker", "http://h:1", "--policy", "nope"), "--prefill-policy"),
    (("--worker", "http://h:1", "--policy", "least_load", "--decode-policy", "round_robin"), "--policy"),
    (("--worker", "http://h:1", "--disagg-min-tokens", "-1"), "--disagg-min-tokens"),
    (("--worker", "http://h:1", "--request-timeout", "0"), "--request-timeout"),
    (("--worker", "http://h:1", "--max-retries", "-1"), "--max-retries"),
    (("--worker", "http://h:1", "--port", "70000"), "--port"),
])
def test_bad_flags_name_the_flag(argv: Any, flag: str) -> None:
    with pytest.raises(ValueError) as e:
        parse(*argv)
    assert str(e.value).startswith(flag)


def test_serve_can_add_only_the_router_specific_flags() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--port", type=int, default=8000)
    add_router_args(p, common=False)
    args = p.parse_args(["--disagg-min-tokens", "64"])
    cfg = router_config_from_args(args, workers=("http://127.0.0.1:8101",), decode_workers=())
    assert cfg.model == "tiny-random" and cfg.port == 8000 and cfg.disagg_min_tokens == 64
    assert cfg.workers == ("http://127.0.0.1:8101",)
