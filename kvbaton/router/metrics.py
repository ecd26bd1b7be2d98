"""Prometheus metrics of the router, all named ``kvbaton:router_*`` (the workers' series are
``kvbaton:*``, so one dashboard sees both without clashes).

Own ``CollectorRegistry`` per router (tests run several in one process). Time to first token
is split along the path of a request: ``routing`` (tokenize, hash, choose workers),
``prefill`` (the prefill leg), ``transfer`` (the KV transfer time the decode worker reports)
and ``first_decode`` (decode leg start to its first chunk, minus the transfer). Per-worker
gauges are read from the pool (and the KV index) at scrape time.

KV-aware routing: per decode worker, the cached prompt tokens the router predicted when it
placed a request (the index's longest prefix there) against what the worker then reported
(``usage.prompt_tokens_details.cached_tokens``), the resulting hit rate, the index's size and
state per worker, the size of the shared remote tier it knows of, and the event stream's lag
and unrecoverable gaps.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from kvbaton.api.metrics import CONTENT_TYPE, E2E_BUCKETS, TTFT_BUCKETS
from kvbaton.kv.index import KVIndex
from kvbaton.router.pool import WorkerPool

log = logging.getLogger(__name__)

PREFIX = "kvbaton:router_"
PATHS = ("disagg", "local", "direct")
# Label values created up front, so every series exists (at 0) from the first scrape.
FALLBACK_REASONS = ("prefill_connect", "prefill_timeout", "prefill_http_5xx", "prefill_bad_handle",
                    "prefill_worker_down",
                    "prefill_dropped", "no_prefill_worker")
LEG_FAILURES = ("connect", "timeout", "http_5xx", "transfer_failed", "error_event", "dropped", "worker_down")

DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

__all__ = ["CONTENT_TYPE", "PATHS", "PREFIX", "RouterMetrics"]


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool, metrics: RouterMetrics) -> None:
        self._pool = pool
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        labels = ["worker", "role"]
        healthy = GaugeMetricFamily(PREFIX + "worker_healthy", "1 if the worker is in placement.", labels=labels)
        reqs = GaugeMetricFamily(PREFIX + "worker_in_flight_requests",
                                 "Legs the router has in flight on the worker.", labels=labels)
        toks = GaugeMetricFamily(PREFIX + "worker_in_flight_tokens",
                                 "Tokens (prompt + max_tokens) of the router's legs in flight on the worker.",
                                 labels=labels)
        blocks = GaugeMetricFamily(PREFIX + "worker_active_blocks",
                                   "KV blocks active on the worker as kv_aware sees them (the router's "
                                   "in-flight legs plus what the worker reported beyond them).", labels=labels)
        for w in self._pool.workers:
            key = [w.url, w.role]
            healthy.add_metric(key, 1.0 if w.usable else 0.0)
            reqs.add_metric(key, float(w.in_flight_requests))
            toks.add_metric(key, float(w.in_flight_tokens))
            blocks.add_metric(key, float(w.active_blocks))
        yield healthy
        yield reqs
        yield toks
        yield blocks
        yield from self._metrics.kv_gauges([w.url for w in self._pool.workers])


class RouterMetrics:
    """The router's series; the orchestrator records, ``render()`` answers ``/metrics``."""

    def __init__(self, pool: WorkerPool) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...] = TTFT_BUCKETS) -> Histogram:
            return Histogram(PREFIX + name, doc, ["path"], buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Arrival to the first token relayed to the client.")
        self.ttft_routing = hist("ttft_routing_seconds", "TTFT part: tokenize, hash and choose workers.")
        self.ttft_prefill = hist("ttft_prefill_seconds", "TTFT part: the prefill leg (disaggregated requests).")
        self.ttft_transfer = hist("ttft_transfer_seconds", "TTFT part: KV transfer time reported by the decode worker.")
        self.ttft_first_decode = hist(
            "ttft_first_decode_seconds", "TTFT part: decode leg start to its first chunk, minus the transfer.")
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to the end of the response.", E2E_BUCKETS)
        self.requests = Counter(PREFIX + "requests", "Requests answered, by path: disagg (prefill + decode "
                                "workers), local (the decode worker prefilled), direct (from the prefill leg).",
                                ["path"], registry=r)
        self.transfers = Counter(PREFIX + "transfers", "Decode legs that carried a KV handle, by the decode "
                                 "worker's outcome (fetched, local, recomputed).", ["outcome"], registry=r)
        self.transfer_bytes = Counter(PREFIX + "transfer_bytes", "KV bytes the decode workers fetched.", registry=r)
        self.transfer_failures = Counter(PREFIX + "transfer_failures", "KV transfers that failed: recomputed "
                                         "(the decode worker recovered) or failed (it answered 502).",
                                         ["outcome"], registry=r)
        self.fallbacks = Counter(PREFIX + "fallbacks", "Requests meant for a prefill worker that the decode "
                                 "worker prefilled instead, by reason.", ["reason"], registry=r)
        self.retries = Counter(PREFIX + "retries", "Decode legs retried on another worker, by reason.",
                               ["reason"], registry=r)
        self.worker_errors = Counter(PREFIX + "worker_errors", "Failed calls to workers, by worker and kind.",
                                     ["worker", "kind"], registry=r)
        self.request_failures = Counter(PREFIX + "request_failures", "Requests that ended in an error "
                                        "for the client, by stage (before_first_token, mid_stream).",
                                        ["stage"], registry=r)
        self.lease_releases = Counter(PREFIX + "lease_releases", "POST /kv/release calls for unconsumed "
                                      "KV handles, by result (released, gone, failed).", ["result"], registry=r)
        self.routing_decision = Histogram(
            PREFIX + "routing_decision_seconds", "Placement time: overlap lookups and policy choice.",
            buckets=DECISION_BUCKETS, registry=r)
        kv = ["worker"]
        self.kv_predicted_cached = Counter(
            PREFIX + "kv_predicted_cached_tokens", "Prompt tokens the router expected the chosen decode "
            "worker to hold (its prefix overlap at placement), over decode legs that reported usage.",
            kv, registry=r)
        self.kv_actual_cached = Counter(
            PREFIX + "kv_actual_cached_tokens", "Prompt tokens the decode worker reported as cached "
            "(usage.prompt_tokens_details.cached_tokens).", kv, registry=r)
        self.kv_prompt_tokens = Counter(
            PREFIX + "kv_prompt_tokens", "Prompt tokens of the decode legs that reported usage.", kv, registry=r)
        self.kv_event_lag = Histogram(
            PREFIX + "kv_event_lag_seconds", "Arrival time minus the worker's timestamp of each KV event "
            "batch applied to the index.", kv, buckets=LAG_BUCKETS, registry=r)
        self.kv_event_gaps = Counter(
            PREFIX + "kv_event_gaps", "KV event batches lost beyond replay (the worker's index entries "
            "become approximate).", kv, registry=r)
        self.index: KVIndex | None = None
        self._cache_lock = threading.Lock()
        self._cache_sums: dict[str, list[int]] = {}  # worker -> [prompt, actual]
        for w in pool.workers:
            for family in (self.kv_predicted_cached, self.kv_actual_cached, self.kv_prompt_tokens,
                           self.kv_event_gaps):
                family.labels(w.url)
        r.register(_PoolCollector(pool, self))
        initial = (
            (self.requests, PATHS), (self.transfers, ("fetched", "local", "recomputed")),
            (self.transfer_failures, ("recomputed", "failed")), (self.fallbacks, FALLBACK_REASONS),
            (self.retries, LEG_FAILURES), (self.request_failures, ("before_first_token", "mid_stream")),
            (self.lease_releases, ("released", "gone", "failed")),
        )
        for family, values in initial:
            for v in values:
                family.labels(v)

    def record_cache(self, worker: str, prompt_tokens: int, predicted: int, actual: int) -> None:
        """One decode leg's predicted vs reported cached prompt tokens."""
        self.kv_predicted_cached.labels(worker).inc(predicted)
        self.kv_actual_cached.labels(worker).inc(actual)
        self.kv_prompt_tokens.labels(worker).inc(prompt_tokens)
        with self._cache_lock:
            sums = self._cache_sums.setdefault(worker, [0, 0])
            sums[0] += prompt_tokens
            sums[1] += actual

    def kv_gauges(self, workers: list[str]) -> Iterable[Metric]:
        """Hit rate per worker, the index's size and state per worker and its remote-tier
        blocks (if there is an index)."""
        hit = GaugeMetricFamily(PREFIX + "kv_cache_hit_rate", "Cached / prompt tokens the decode worker "
                                "reported, over the router's decode legs (0 before any).", labels=["worker"])
        with self._cache_lock:
            sums = {w: list(v) for w, v in self._cache_sums.items()}
        for w in workers:
            prompt, actual = sums.get(w, (0, 0))
            hit.add_metric([w], actual / prompt if prompt else 0.0)
        yield hit
        if self.index is None:
            return
        stats = self.index.stats()
        families = (
            ("kv_indexed_blocks", "KV blocks the index holds for the worker (from its events).", "blocks"),
            ("kv_predicted_blocks", "Blocks counted on the worker by recent placements, not yet "
             "confirmed by its events.", "predicted"),
            ("kv_index_approximate", "1 while the worker's index entries may miss blocks (a gap, or "
             "its stream not yet resynced).", "approximate"),
        )
        for name, doc, attr in families:
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["worker"])
            for w in workers:
                st = stats.get(w)
                g.add_metric([w], float(getattr(st, attr)) if st is not None else 0.0)
            yield g
        yield GaugeMetricFamily(
            PREFIX + "kv_index_remote_blocks", "KV blocks of the shared remote tier the index holds "
            "(stored there by any worker, reachable by every worker; unexpired).",
            value=float(self.index.remote_block_count()))

    def render(self, federated: Iterable[Metric] = ()) -> bytes:
        """The router's series, then ``federated`` ones (its workers', from :func:`federate`)."""
        text = generate_latest(self.registry)
        families = list(federated)
        if families:
            extra = CollectorRegistry(auto_describe=False)
            extra.register(_Fixed(families))
            text += generate_latest(extra)
        return text


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def federate(texts: dict[str, str]) -> list[Metric]:
    """Merge workers' Prometheus texts (worker URL -> text) into one family per metric name,
    each sample labelled with its ``worker``: the router's ``/metrics`` shows its workers'
    series (their ports are private under ``kvbaton serve``), and a client summing a counter
    over every label set (``kvbaton bench``'s prefix-cache hit rate) gets the cluster's."""
    merged: dict[str, Metric] = {}
    for url, text in texts.items():
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            log.warning("worker %s sent metrics that do not parse; left out", url)
            continue
        for fam in families:
            if fam.name.startswith(PREFIX):  # a worker never has router series; be safe
                continue
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for sample in fam.samples:
                out.samples.append(sample._replace(labels={"worker": url, **sample.labels}))
    return list(merged.values())
