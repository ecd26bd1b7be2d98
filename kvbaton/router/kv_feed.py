"""The router's view of every worker's prefix cache: KV event streams -> one ``KVIndex``.

:class:`KVIndexFeed` is the router's :class:`~kvbaton.router.policies.PrefixOverlap`. When
the pool discovers a worker that advertises ``kv_events`` in ``/kv/info``, the feed follows
its stream (``KVEventSubscriber``: ordered per worker, gaps replayed) and applies every batch
to the index under the worker's URL. Outcomes:

- a gap the replay cannot fill: the worker's entries are dropped and it is flagged
  approximate (the index then holds a subset of its cache: only hits are lost) until its
  stream starts over with ``AllBlocksCleared`` (a restart);
- a worker seen with a new ``worker_id`` (restarted at the same URL, possibly with new event
  endpoints) or new endpoints: its entries are forgotten and its stream followed afresh,
  approximate until the new stream's first batch (``AllBlocksCleared``) is applied;
- a worker that stops advertising events: unfollowed and forgotten.

A `vllm serve` worker's stream (``WorkerEndpoints.encoding == "vllm"``) is translated batch by
batch into kvbaton's events (:class:`~kvbaton.kv.vllm_events.VLLMBlockKeys`, keyed with the
worker's ``keying``: the cluster's fingerprint and block size), so its blocks are found by the
hashes the router computes for prompts. Its seq 0 counts as ``AllBlocksCleared`` (vLLM starts
empty and sends none); it has no resync, so after a gap replay cannot fill it stays
approximate until it restarts. A vLLM stream that stays silent while the worker serves
``SILENT_REQUESTS`` requests in a row that must have stored blocks (full prompt blocks beyond
what it reported cached, no batch since they were sent) is flagged approximate too, with a
warning: its events are not reaching the router (a wrong ``events=`` endpoint, a firewall).
When the keying changes (the cluster's first kvbaton worker
arrives after it) the worker is followed afresh, which replays its stream from seq 0.

``routed`` records each placement as a short-lived prediction (``predict``), so sibling
requests that arrive before the worker's events follow the first one.

``cached_tokens`` counts every held block whole; ``credited_tokens_each`` (what ``kv_aware``
scores with) weighs each block by the credit of the fastest medium holding it
(``medium_credit``, docs/router.md "Tiered KV"), since a block on the host tier or disk must
be loaded before it saves anything.

Blocks a worker put in the shared remote tier (``BlockStored`` with medium ``REMOTE``) are
reachable by every worker: both answers continue each candidate's run through them (the
``REMOTE`` credit for ``credited_tokens_each``), and give them to a candidate the index knows
nothing about too. ``remote_ttl_s`` is how long such a block counts after its last store
(the workers' ``--kv-remote-ttl``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from kvbaton.kv.event_stream import KVEventBatch
from kvbaton.kv.event_subscriber import KVEventSubscriber, WorkerEndpoints
from kvbaton.kv.index import DEFAULT_REMOTE_TTL_S, KVIndex
from kvbaton.kv.vllm_events import VLLMBlockKeys, VLLMEventBatch
from kvbaton.router.config import DEFAULT_KV_MEDIUM_CREDIT, UNKNOWN_KV_MEDIUM_CREDIT, check_medium_credit
from kvbaton.router.metrics import RouterMetrics
from kvbaton.router.policies import PrefixOverlap, RoutingRequest, WorkerView
from kvbaton.router.pool import Worker

log = logging.getLogger(__name__)

SILENT_REQUESTS = 3


class KVIndexFeed(PrefixOverlap):
    """Follows the workers' KV events into a :class:`KVIndex` and answers prefix overlap.

    ``start()`` starts the subscriber thread (callbacks run there; the index is
    thread-safe); ``close()`` stops it within its timeout. ``worker_discovered`` is the
    pool's discovery hook. ``medium_credit``: the credit of a cached block per KV medium, in
    [0, 1] (None: ``DEFAULT_KV_MEDIUM_CREDIT``; taken as the whole map, mediums it does not
    name get ``unknown_medium_credit``). ``remote_ttl_s``: the index's expiry of remote-tier
    blocks.
    """

    def __init__(self, metrics: RouterMetrics | None = None, prediction_ttl_s: float = 2.0,
                 replay_timeout_s: float = 1.0, medium_credit: Mapping[str, float] | None = None,
                 unknown_medium_credit: float = UNKNOWN_KV_MEDIUM_CREDIT, kv_secret: str | None = None,
                 remote_ttl_s: float = DEFAULT_REMOTE_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        credit = dict(DEFAULT_KV_MEDIUM_CREDIT if medium_credit is None else medium_credit)
        check_medium_credit(credit)
        if not 0.0 <= unknown_medium_credit <= 1.0:
            raise ValueError(f"unknown_medium_credit must be in [0, 1], got {unknown_medium_credit}")
        self.medium_credit: Mapping[str, float] = MappingProxyType(credit)
        self.unknown_medium_credit = unknown_medium_credit
        self.index = KVIndex(clock, remote_ttl_s=remote_ttl_s)  # clock: a simulator's virtual one
        self.metrics = metrics
        self.prediction_ttl_s = prediction_ttl_s
        self._replay_timeout_s = replay_timeout_s
        self._kv_secret = kv_secret
        self._subscriber: KVEventSubscriber | None = None
        # url -> (worker id, endpoints, keying of a vLLM worker's events)
        self._followed: dict[str, tuple[str, WorkerEndpoints, tuple[str, int] | None]] = {}
        self._vllm_keys: dict[str, VLLMBlockKeys] = {}  # url -> a vLLM worker's block keys
        # A vLLM worker's last batch (monotonic) and the requests since that stored blocks
        # without one (written by the subscriber thread and the event loop: single dict ops).
        self._last_batch: dict[str, float] = {}
        self._unconfirmed: dict[str, int] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._subscriber = KVEventSubscriber(
            {}, self._on_batch, self._on_gap, replay_timeout_s=self._replay_timeout_s,
            curve_secret=self._kv_secret)

    def close(self, timeout_s: float = 2.0) -> None:
        if self._subscriber is not None:
            self._subscriber.close(timeout_s)
            self._subscriber = None

    @property
    def resyncs(self) -> int:
        """Whole-cache resyncs the subscriber has asked workers for (0 before ``start``)."""
        return self._subscriber.resyncs if self._subscriber is not None else 0

    # ---- following workers (event loop) ----------------------------------------------------

    def worker_discovered(self, worker: Worker, previous_id: str) -> None:
        """Follow, refollow or drop ``worker``'s event stream after a discovery."""
        url, eps = worker.url, worker.kv_events
        followed = self._followed.get(url)
        vllm = eps is not None and eps.encoding == "vllm"
        if eps is None or (vllm and worker.keying is None):
            if followed is not None:
                self.forget(url)
            return
        state = (worker.worker_id, eps, worker.keying if vllm else None)
        if followed == state:
            return  # the same process back after a blip: its stream was followed throughout
        if followed is not None:
            log.info("worker %s restarted or moved its KV events; its index entries are dropped", url)
        self.index.remove_worker(url)
        # Until the stream's AllBlocksCleared is applied, nothing known is complete.
        self.index.mark_approximate(url)
        if self._subscriber is None:
            raise RuntimeError("KVIndexFeed.start() was not called")
        if vllm:
            assert worker.keying is not None
            self._vllm_keys[url] = VLLMBlockKeys(*worker.keying)
        try:
            self._subscriber.add_worker(url, eps)
        except ValueError as e:
            log.error("worker %s: cannot follow its KV events: %s", url, e)
            self._followed.pop(url, None)
            self._vllm_keys.pop(url, None)
            return
        self._followed[url] = state

    def forget(self, url: str) -> None:
        """Stop following ``url`` and drop its entries."""
        if self._subscriber is not None:
            self._subscriber.remove_worker(url)
        self._followed.pop(url, None)
        self._vllm_keys.pop(url, None)
        self._unconfirmed.pop(url, None)
        self.index.remove_worker(url)

    def adopt(self, url: str) -> None:
        """Count ``url`` as followed though no stream is subscribed: its events reach
        ``index.apply`` directly (the simulator's workers, in the same process)."""
        self._followed[url] = (url, WorkerEndpoints(f"sim://{url}", f"sim://{url}"), None)

    def following(self, url: str) -> bool:
        return url in self._followed

    # ---- subscriber thread -----------------------------------------------------------------

    def _on_batch(self, url: object, seq: int, batch: KVEventBatch | VLLMEventBatch) -> None:
        if isinstance(batch, VLLMEventBatch):
            keys = self._vllm_keys.get(str(url))
            if keys is None:
                return  # unfollowed meanwhile
            batch = keys.translate(seq, batch)
            self._last_batch[str(url)] = time.monotonic()
            self._unconfirmed.pop(str(url), None)
        self.index.apply(url, seq, batch)
        if self.metrics is not None:
            self.metrics.kv_event_lag.labels(str(url)).observe(max(0.0, time.time() - batch.ts))

    def _on_gap(self, url: object) -> None:
        log.warning("worker %s: KV events lost beyond replay; its index entries are approximate", url)
        self._flag_approximate(url)

    def _flag_approximate(self, url: object) -> None:
        """Drop the worker's entries and flag it approximate; counted as a gap."""
        self.index.mark_approximate(url)
        if self.metrics is not None:
            self.metrics.kv_event_gaps.labels(str(url)).inc()

    # ---- PrefixOverlap ---------------------------------------------------------------------

    def cached_tokens(self, request: RoutingRequest, worker: WorkerView) -> int:
        return self.cached_tokens_each(request, [worker])[0]

    def cached_tokens_each(self, request: RoutingRequest, workers: Sequence[WorkerView]) -> list[int]:
        if not request.block_hashes or not request.block_size:
            return [0] * len(workers)
        held = self.index.longest_prefix(request.block_hashes)
        bs = request.block_size
        # .of: a worker the index has no entry for still reaches the remote tier's run.
        return [held.of(w.url) * bs for w in workers]

    def credited_tokens_each(self, request: RoutingRequest, workers: Sequence[WorkerView]) -> list[float]:
        if not request.block_hashes or not request.block_size:
            return [0.0] * len(workers)
        held = self.index.weighted_prefix(request.block_hashes, self.medium_credit, self.unknown_medium_credit)
        bs = request.block_size
        return [held.of(w.url)[1] * bs for w in workers]

    def served(self, request: RoutingRequest, worker: WorkerView, cached_tokens: int, sent_at: float) -> None:
        url, bs = worker.url, request.block_size
        if url not in self._vllm_keys or not bs or request.num_prompt_tokens // bs * bs <= cached_tokens:
            return
        if self._last_batch.get(url, -float("inf")) >= sent_at:
            return  # its stream spoke since the request was sent
        n = self._unconfirmed[url] = self._unconfirmed.get(url, 0) + 1
        if n == SILENT_REQUESTS and not self.index.is_approximate(url):
            log.warning("vLLM worker %s stored KV blocks for %d requests without one KV event reaching the "
                        "router: its events= endpoint is wrong or unreachable; its index entries are "
                        "approximate", url, n)
            self._flag_approximate(url)

    def routed(self, request: RoutingRequest, worker: WorkerView) -> None:
        if request.block_hashes and self.following(worker.url):
            self.index.predict(worker.url, request.block_hashes, self.prediction_ttl_s)
