"""Prometheus metrics of the router, all named ``kvbaton:router_*`` (the workers' series are
``kvbaton:*``, so one dashboard sees both without clashes).

Own ``CollectorRegistry`` per router (tests run several in one process). Time to first token
is split along the path of a request: ``routing`` (tokenize, hash, choose workers),
``prefill`` (the prefill leg), ``transfer`` (the KV transfer time the decode worker reports)
and ``first_decode`` (decode leg start to its first chunk, minus the transfer). Per-worker
gauges are read from the pool at scrape time.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvbaton.router.pool import WorkerPool
from kvbaton.worker.metrics import CONTENT_TYPE, E2E_BUCKETS, TTFT_BUCKETS

PREFIX = "kvbaton:router_"
PATHS = ("disagg", "local", "direct")
# Label values created up front, so every series exists (at 0) from the first scrape.
FALLBACK_REASONS = ("prefill_connect", "prefill_timeout", "prefill_http_5xx", "prefill_bad_handle",
                    "prefill_dropped", "no_prefill_worker")
LEG_FAILURES = ("connect", "timeout", "http_5xx", "transfer_failed", "error_event", "dropped")

__all__ = ["CONTENT_TYPE", "PATHS", "PREFIX", "RouterMetrics"]


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterable[Metric]:
        labels = ["worker", "role"]
        healthy = GaugeMetricFamily(PREFIX + "worker_healthy", "1 if the worker is in placement.", labels=labels)
        reqs = GaugeMetricFamily(PREFIX + "worker_in_flight_requests",
                                 "Legs the router has in flight on the worker.", labels=labels)
        toks = GaugeMetricFamily(PREFIX + "worker_in_flight_tokens",
                                 "Tokens (prompt + max_tokens) of the router's legs in flight on the worker.",
                                 labels=labels)
        for w in self._pool.workers:
            key = [w.url, w.role]
            healthy.add_metric(key, 1.0 if w.usable else 0.0)
            reqs.add_metric(key, float(w.in_flight_requests))
            toks.add_metric(key, float(w.in_flight_tokens))
        yield healthy
        yield reqs
        yield toks


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
        r.register(_PoolCollector(pool))
        initial = (
            (self.requests, PATHS), (self.transfers, ("fetched", "local", "recomputed")),
            (self.transfer_failures, ("recomputed", "failed")), (self.fallbacks, FALLBACK_REASONS),
            (self.retries, LEG_FAILURES), (self.request_failures, ("before_first_token", "mid_stream")),
            (self.lease_releases, ("released", "gone", "failed")),
        )
        for family, values in initial:
            for v in values:
                family.labels(v)

    def render(self) -> bytes:
        return generate_latest(self.registry)
