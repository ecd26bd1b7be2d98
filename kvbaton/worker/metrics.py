"""Prometheus metrics of one worker, named like vLLM's with a ``kvbaton:`` prefix.

Each :class:`WorkerMetrics` owns its own ``CollectorRegistry`` (never the global one), so a
process can host several workers, as the tests do. Request-level histograms and counters are
fed on the event loop by :class:`AsyncEngine`'s observer hook; engine-level gauges and the
prefix-cache counters are read at scrape time from the snapshot the engine thread publishes,
and so are the tiered KV store's series (``kv_tier_*``, labelled by ``tier``; present only
when the engine has tiers), from the snapshot's ``kv_tiers``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kvbaton.api.metrics import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS
from kvbaton.engine.offload import LOAD_BUCKETS
from kvbaton.engine.outputs import RequestOutput
from kvbaton.worker.stream import RequestStream

PREFIX = "kvbaton:"
FINISH_REASONS = ("stop", "length", "abort", "error")

# Per-tier series: (name, help, key in KVOffload.tier_stats()).
TIER_GAUGES = (
    ("kv_tier_blocks_used", "KV blocks held by the tier.", "blocks_used"),
    ("kv_tier_blocks_capacity", "KV blocks the tier can hold (0 once a disk tier disabled itself).",
     "blocks_capacity"),
    ("kv_tier_bytes_used", "Bytes of KV held by the tier.", "bytes_used"),
    ("kv_tier_bytes_capacity", "Bytes of KV the tier can hold.", "bytes_capacity"),
    ("kv_tier_blocks_pinned", "KV blocks of the tier pinned (POST /kv/pin).", "blocks_pinned"),
    ("kv_tier_enabled", "1 while the tier takes new blocks; 0 once it disabled itself (a full or "
     "unwritable disk: the worker serves on without it).", "enabled"),
)
TIER_COUNTERS = (
    ("kv_tier_hit_tokens", "Prompt tokens loaded from the tier instead of computed.", "hit_tokens"),
    ("kv_tier_stores", "KV blocks stored in the tier.", "stores"),
    ("kv_tier_store_bytes", "Bytes of KV stored in the tier.", "store_bytes"),
    ("kv_tier_loads", "Prefix loads from the tier that brought back at least one block.", "loads"),
    ("kv_tier_load_bytes", "Bytes of KV loaded from the tier.", "load_bytes"),
    ("kv_tier_evictions", "KV blocks the tier evicted to make room.", "evictions"),
    ("kv_tier_expirations", "KV blocks the tier dropped after its idle TTL.", "expirations"),
    ("kv_tier_failed_loads", "Prefix loads from the tier that failed, timed out or were abandoned.",
     "failed_loads"),
    ("kv_tier_failed_stores", "Stores into the tier that failed.", "failed_stores"),
)


def _tier_metrics(model: str, tiers: dict[str, dict[str, Any]], sync_stores: float) -> Iterable[Metric]:
    """The tiered KV store's series from a stats snapshot's ``kv_tiers`` (none without tiers)."""
    if not tiers:
        return
    labels = ["model_name", "tier"]
    for name, doc, key in TIER_GAUGES:
        g = GaugeMetricFamily(PREFIX + name, doc, labels=labels)
        for tier, st in tiers.items():
            g.add_metric([model, tier], float(st.get(key, 0)))
        yield g
    for name, doc, key in TIER_COUNTERS:
        c = CounterMetricFamily(PREFIX + name, doc, labels=labels)
        for tier, st in tiers.items():
            c.add_metric([model, tier], float(st.get(key, 0)))
        yield c
    h = HistogramMetricFamily(PREFIX + "kv_tier_load_seconds", "Time from a prefix load's start to "
                              "its blocks arriving on the device.", labels=labels)
    bounds = [floatToGoString(b) for b in LOAD_BUCKETS] + ["+Inf"]
    for tier, st in tiers.items():
        # The engine counts loads per bucket; Prometheus buckets are cumulative ("<= le").
        counts = list(st.get("load_seconds_buckets") or [0] * len(bounds))
        running, buckets = 0.0, []
        for le, n in zip(bounds, counts):
            running += n
            buckets.append((le, running))
        h.add_metric([model, tier], buckets, float(st.get("load_seconds_sum", 0.0)))
    yield h
    c = CounterMetricFamily(PREFIX + "kv_offload_sync_stores", "KV blocks copied down at eviction "
                            "time because write-back readahead had not reached them (on the step's "
                            "critical path).", labels=["model_name"])
    c.add_metric([model], sync_stores)
    yield c


# The remote tier's own series: (name, help, key in KVOffload.remote_stats(), counter?).
REMOTE_SERIES = (
    ("kv_remote_up", "1 while the remote KV tier's server answers; 0 while it is down (the worker "
     "serves from its local tiers and retries with backoff).", "up", False),
    ("kv_remote_outages", "Times the remote KV tier's server became unreachable.", "outages", True),
    ("kv_remote_down_seconds", "Seconds the remote KV tier has been down, all outages together.",
     "down_seconds", True),
    ("kv_remote_errors", "Remote KV tier calls that failed: unreachable, timed out.", "errors", True),
    ("kv_remote_probes", "Lookups of a request's prefix in the remote KV tier.", "probes", True),
    ("kv_remote_missing_blocks", "Blocks a lookup found that were gone (evicted, expired) when read: "
     "recomputed.", "missing", True),
    ("kv_remote_bad_values", "Remote values refused (wrong model, layout, size, checksum or tokens) and "
     "deleted.", "bad_values", True),
    ("kv_remote_put_failures", "Blocks the remote server refused to store (maxmemory with noeviction).",
     "put_failures", True),
    ("kv_remote_dropped_puts", "Blocks not sent to the remote tier: it was down or its queue full.",
     "dropped_puts", True),
)


def _remote_metrics(model: str, remote: dict[str, Any]) -> Iterable[Metric]:
    """The remote tier's series (none without one)."""
    if not remote:
        return
    for name, doc, key, counter in REMOTE_SERIES:
        family = CounterMetricFamily if counter else GaugeMetricFamily
        m = family(PREFIX + name, doc, labels=["model_name"])
        m.add_metric([model], float(remote.get(key) or 0))
        yield m


class _EngineCollector(Collector):
    """Gauges and cumulative counters read from the engine thread's stats snapshot."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], model_name: str) -> None:
        self._snapshot = snapshot
        self._model = model_name

    def collect(self) -> Iterable[Metric]:
        s = self._snapshot()
        gauges = (
            ("num_requests_running", "Requests scheduled in the running batch.", "num_running"),
            ("num_requests_waiting", "Requests waiting to be admitted.", "num_waiting"),
            ("kv_blocks_used", "KV cache blocks in use (not free or evictable).", "kv_blocks_used"),
            ("kv_blocks_total", "KV cache blocks in the pool.", "kv_blocks_total"),
        )
        for name, doc, key in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric([self._model], float(s.get(key, 0)))
            yield g
        counters = (
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", "prefix_cache_hits"),
            ("num_preemptions", "Requests preempted for lack of KV blocks.", "num_preemptions"),
            ("inflight_prefix_waits", "Steps a waiting request was passed over to reuse a prefix "
             "another request is prefilling.", "num_inflight_prefix_waits"),
            ("engine_failed_steps", "Engine steps whose forward pass or sampling raised: their "
             "requests failed (HTTP 500), the engine went on.", "num_failed_steps"),
        )
        for name, doc, key in counters:
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric([self._model], float(s.get(key, 0)))
            yield c
        yield from _tier_metrics(self._model, s.get("kv_tiers") or {}, float(s.get("kv_offload_sync_stores", 0)))
        yield from _remote_metrics(self._model, s.get("kv_remote") or {})


class WorkerMetrics:
    """The worker's Prometheus registry and the observer that feeds it."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds", "Time from arrival to the first token.",
            labels, buckets=TTFT_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds", "Time between output tokens.",
            labels, buckets=TPOT_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds", "Time from arrival to the end of a request.",
            labels, buckets=E2E_BUCKETS, registry=self.registry,
        ).labels(model_name)
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of requests that started generating.",
            labels, registry=self.registry,
        ).labels(model_name)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens.", labels, registry=self.registry,
        ).labels(model_name)
        success = Counter(
            PREFIX + "request_success", "Finished requests by finish reason.",
            [*labels, "finished_reason"], registry=self.registry,
        )
        self.success = {r: success.labels(model_name, r) for r in FINISH_REASONS}
        self._success_family = success
        self.registry.register(_EngineCollector(snapshot, model_name))

    # ---- StreamObserver --------------------------------------------------------------------

    def on_output(self, stream: RequestStream, output: RequestOutput, now: float) -> None:
        n_new = len(output.token_ids) - stream.num_output_tokens
        if n_new > 0:
            if stream.first_token_time is None:
                self.ttft.observe(now - stream.arrival_time)
                self.prompt_tokens.inc(len(output.prompt_token_ids))
            elif stream.last_token_time is not None:
                gap = (now - stream.last_token_time) / n_new
                for _ in range(n_new):
                    self.tpot.observe(gap)
            self.generation_tokens.inc(n_new)
        if output.finished:
            self._finish(stream, output.finish_reason or "stop", now)

    def on_abort(self, stream: RequestStream, now: float) -> None:
        self._finish(stream, "abort", now)

    def _finish(self, stream: RequestStream, reason: str, now: float) -> None:
        self.e2e.observe(now - stream.arrival_time)
        counter = self.success.get(reason) or self._success_family.labels(self.model_name, reason)
        counter.inc()

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
