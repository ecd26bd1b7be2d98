"""Bench metrics on synthetic timelines with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from kvbaton.bench.metrics import (
    RequestRecord,
    distribution_ms,
    find_knee,
    meets_slo,
    parse_slo,
    per_tag,
    percentile,
    summarize,
)


def rec(ttft: float, e2el: float, out: int, prompt: int = 10, itls: list[float] | None = None,
        tags: tuple[str, ...] = (), ok: bool = True, error: str | None = None) -> RequestRecord:
    return RequestRecord(session_id="s", turn=0, tags=tags, ok=ok, error=error, ttft_s=ttft,
                         e2el_s=e2el, itls_s=itls or [], prompt_tokens=prompt, output_tokens=out)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    assert rec(0.1, 1.1, 11).tpot_s == pytest.approx(0.1)
    assert rec(0.2, 0.5, 4).tpot_s == pytest.approx(0.1)
    assert rec(0.1, 0.1, 1).tpot_s is None  # no second token, no TPOT
    assert rec(0.1, 1.0, 5, ok=False).tpot_s is None


def test_percentile_matches_numpy_linear_interpolation():
    rng = np.random.default_rng(3)
    values = list(rng.exponential(size=37))
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q, method="linear")))
    # A hand-checkable case: between 2 and 3 at rank 0.9 * 3 = 2.7.
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([], 50) is None


def test_distribution_in_ms_with_population_std():
    d = distribution_ms([0.1, 0.2, 0.3, 0.4], "ttft")
    assert d["mean_ttft_ms"] == pytest.approx(250)
    assert d["median_ttft_ms"] == pytest.approx(250)
    assert d["std_ttft_ms"] == pytest.approx(float(np.std([100, 200, 300, 400])))
    assert d["p90_ttft_ms"] == pytest.approx(370)
    assert d["p99_ttft_ms"] == pytest.approx(397)
    assert all(v is None for v in distribution_ms([], "x").values())


def test_summarize_throughput_itl_and_tokens():
    records = [
        rec(0.1, 1.1, 11, prompt=20, itls=[0.1] * 10),
        rec(0.3, 0.7, 5, prompt=30, itls=[0.1, 0.1, 0.1, 0.1]),
        rec(0.0, 0.0, 0, ok=False, error="HTTP 500: boom"),
    ]
    s = summarize(records, duration_s=2.0)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["total_input_tokens"] == 50 and s["total_output_tokens"] == 16
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(8.0)
    assert s["total_token_throughput"] == pytest.approx(33.0)
    assert s["mean_ttft_ms"] == pytest.approx(200)
    assert s["mean_tpot_ms"] == pytest.approx(100)  # (1.0/10 + 0.4/4) / 2
    assert s["mean_itl_ms"] == pytest.approx(100) and len(s["itls"]) == 2
    assert s["mean_e2el_ms"] == pytest.approx(900)
    assert s["input_lens"] == [20, 30] and s["output_lens"] == [11, 5]
    assert s["ttfts"] == [0.1, 0.3]
    assert s["errors"] == ["HTTP 500: boom"]
    assert s["request_goodput"] is None  # no SLO given


def test_goodput_counts_requests_meeting_every_slo():
    slo = parse_slo("ttft=200,tpot=50")
    records = [
        rec(0.1, 0.1 + 9 * 0.04, 10),    # ttft 100 ms, tpot 40 ms: good
        rec(0.25, 0.25 + 9 * 0.01, 10),  # ttft too slow
        rec(0.1, 0.1 + 9 * 0.06, 10),    # tpot too slow
        rec(0.15, 0.15, 1),              # one token: no TPOT, meets the TPOT SLO
        rec(0, 0, 0, ok=False, error="x"),
    ]
    assert [meets_slo(r, slo) for r in records] == [True, False, False, True, False]
    s = summarize(records, duration_s=4.0, slo=slo)
    assert s["request_goodput"] == pytest.approx(0.5)
    e2el = parse_slo("ttft=200,tpot=50,e2el=500")
    assert summarize(records, 4.0, slo=e2el)["request_goodput"] == pytest.approx(0.5)
    assert summarize(records, 4.0, slo={"e2el": 300})["request_goodput"] == pytest.approx(0.25)


@pytest.mark.parametrize("bad, needle", [
    ("ttft", "METRIC=MS"), ("foo=3", "METRIC=MS"), ("ttft=abc", "not a number"),
    ("ttft=-1", "positive"), ("ttft=1,ttft=2", "twice"), ("tpot=inf", "positive"),
])
def test_parse_slo_rejects_bad_specs(bad, needle):
    with pytest.raises(ValueError, match=needle):
        parse_slo(bad)


def test_errors_are_distinct_and_capped_but_all_counted():
    records = [rec(0, 0, 0, ok=False, error=f"e{i % 15}") for i in range(40)]
    s = summarize(records, 1.0)
    assert s["failed"] == 40 and s["completed"] == 0
    assert s["errors"] == [f"e{i}" for i in range(10)]
    assert s["mean_ttft_ms"] is None and s["request_throughput"] == 0.0


def test_per_tag_splits_latencies_by_class():
    records = [rec(0.5, 1.5, 11, tags=("long",)), rec(0.7, 1.7, 11, tags=("long",)),
               rec(0.1, 0.2, 11, tags=("short",)), rec(0, 0, 0, ok=False, tags=("short",))]
    t = per_tag(records)
    assert set(t) == {"long", "short"}
    assert t["long"]["completed"] == 2 and t["long"]["p50_ttft_ms"] == pytest.approx(600)
    assert t["short"]["failed"] == 1 and t["short"]["p90_tpot_ms"] == pytest.approx(10)


def test_knee_of_an_exact_piecewise_linear_curve():
    xs = [1, 2, 4, 8, 16, 32, 64]
    ys = [min(10 * x, 80) + 0.5 * max(0, x - 8) for x in xs]
    k = find_knee(xs, ys)
    assert k is not None and k.x == 8 and k.index == 3
    assert k.slope_before == pytest.approx(10) and k.slope_after == pytest.approx(0.5)
    assert k.y == pytest.approx(80) and k.sse == pytest.approx(0, abs=1e-9)
    assert k.gain_after == pytest.approx(0.05)


def test_knee_of_a_noisy_curve_and_unsorted_input():
    rng = np.random.default_rng(0)
    xs = np.arange(1, 33)
    ys = np.where(xs <= 12, 25.0 * xs, 300 + 1.0 * (xs - 12)) + rng.normal(0, 8, xs.size)
    perm = rng.permutation(xs.size)
    k = find_knee(list(xs[perm]), list(ys[perm]))
    assert k is not None and 10 <= k.x <= 14
    assert k.slope_before == pytest.approx(25, rel=0.15) and abs(k.slope_after) < 3
    assert xs[perm][k.index] == k.x  # index points into the caller's order


def test_knee_needs_three_distinct_points_and_a_straight_line_has_no_bend():
    assert find_knee([1, 2], [1, 2]) is None
    assert find_knee([1, 1, 2], [1, 2, 3]) is None
    with pytest.raises(ValueError):
        find_knee([1, 2, 3], [1, 2])
    k = find_knee([1, 2, 4, 8], [3, 6, 12, 24])
    assert k is not None and k.gain_after == pytest.approx(1.0)


def test_knee_sentence_says_when_added_concurrency_stops_paying():
    from kvbaton.bench.report import describe_knee

    bent = find_knee([1, 2, 4, 8, 16], [10, 20, 40, 80, 82])
    assert describe_knee(bent.as_dict()).startswith("knee at concurrency 8")
    straight = find_knee([1, 2, 4, 8], [3, 6, 12, 24])
    assert describe_knee(straight.as_dict()).startswith("no knee")
    assert "three or more" in describe_knee(None)


def test_usage_cached_token_rate_counts_only_requests_that_reported_it() -> None:
    from kvbaton.bench.runner import usage_cached_rate

    recs = [
        RequestRecord("a", 0, ok=True, prompt_tokens=100, cached_tokens=50),
        RequestRecord("b", 0, ok=True, prompt_tokens=300, cached_tokens=250),
        RequestRecord("c", 0, ok=True, prompt_tokens=1000, cached_tokens=None),  # not reported
        RequestRecord("d", 0, ok=False, error="boom", prompt_tokens=0, cached_tokens=0),
    ]
    assert usage_cached_rate(recs) == 300 / 400
    assert usage_cached_rate(recs[2:]) is None
