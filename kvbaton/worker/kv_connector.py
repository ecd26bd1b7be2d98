"""The worker's KV connector: the seam between one engine and the transfer data plane.

Prefill side: a transfer server serves the blocks of leased prompts, and each prefill-only
request's answer carries a :class:`~kvbaton.kv.handle.KVHandle`. Decode side: for a request
that arrives with a handle, reserve blocks on the engine thread, fetch the missing ones on a
worker thread straight into the KV tensor, release the lease, and let the engine decode from
the first token. A failed fetch has one of two outcomes, chosen by the operator: recompute
the prompt here (default) or fail the request with a 502.

Events: the block pool's event sink feeds a :class:`KVEventPublisher` (ZMQ PUB + replay,
docs/kv-events.md) whose endpoints ``/kv/info`` advertises, so routers can index this
worker's prefix cache; a router that lost events beyond replay gets a resync (the whole cache,
in-stream).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from kvbaton.engine.engine import LLMEngine
from kvbaton.engine.kv_handoff import HandleMismatch, ImportPlan
from kvbaton.engine.leases import LeaseError as EngineLeaseError
from kvbaton.engine.leases import LeaseTable
from kvbaton.engine.outputs import RequestOutput
from kvbaton.kv.event_stream import KVEventPublisher
from kvbaton.kv.handle import KVHandle
from kvbaton.kv.transfer.tcp import TransferClient
from kvbaton.kv.transfer.tcp_server import TransferServer
from kvbaton.kv.transfer.transport import LeaseError, TransferError
from kvbaton.worker.async_engine import AsyncEngine
from kvbaton.worker.config import WorkerConfig

log = logging.getLogger(__name__)

OUTCOMES = ("fetched", "local", "recomputed", "failed")


class _LeaseSource:
    """The transfer server's view of the engine's lease table (thread-safe)."""

    def __init__(self, leases: LeaseTable) -> None:
        self._leases = leases

    def resolve(self, lease_id: str, block_indexes: list[int]) -> Sequence[int]:
        try:
            return self._leases.begin_transfer(lease_id, block_indexes)
        except EngineLeaseError as e:
            raise LeaseError(str(e)) from None

    def end(self, lease_id: str) -> None:
        self._leases.end_transfer(lease_id)

    def release(self, lease_id: str) -> bool:
        return self._leases.release(lease_id)


@dataclass
class ImportResult:
    """How a decode request got its prompt's KV; reported to the router in the usage chunk."""

    outcome: str = "fetched"
    blocks_fetched: int = 0
    bytes: int = 0
    transfer_s: float = 0.0
    error: str | None = None
    plan: ImportPlan | None = field(default=None, repr=False)

    def report(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome, "blocks_fetched": self.blocks_fetched, "bytes": self.bytes,
            "transfer_s": round(self.transfer_s, 6), "error": self.error,
        }


class KVConnector:
    """Transfer server + client of one worker, and the handle/import logic around them."""

    def __init__(
        self, engine: LLMEngine, async_engine: AsyncEngine, config: WorkerConfig,
        worker_id: str, registry: CollectorRegistry,
    ) -> None:
        self.engine = engine
        self.async_engine = async_engine
        self.config = config
        self.worker_id = worker_id
        secret = config.kv_secret.encode() if config.kv_secret else None
        self._secret = secret  # signs the handles this worker gives out, checks those it gets
        self.server: TransferServer | None = None
        if config.role in ("prefill", "both"):
            self.server = TransferServer(
                engine.runner.kv_cache, engine.kv_spec, engine.model_fingerprint,
                _LeaseSource(engine.leases), host=config.host, port=config.kv_port, secret=secret,
            )
        self.client: TransferClient | None = None
        if config.role in ("decode", "both"):
            self.client = TransferClient(
                engine.kv_spec, engine.model_fingerprint, secret=secret,
                timeout_s=config.kv_transfer_timeout_s,
            )
        self.events: KVEventPublisher | None = None
        self._releases: set[asyncio.Future[None]] = set()
        labels = ["model_name"]
        name = engine.config.model
        self._outcomes = Counter(
            "kvbaton:kv_transfer_outcomes", "Decode requests with a KV handle, by outcome.",
            ["outcome"], registry=registry,
        )
        self._bytes = Counter(
            "kvbaton:kv_transfer_bytes", "KV bytes fetched from prefill workers.", labels,
            registry=registry,
        ).labels(name)
        self._seconds = Histogram(
            "kvbaton:kv_transfer_seconds", "Time to fetch one request's KV.", labels,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        ).labels(name)

    def start(self) -> None:
        """Start the event publisher and the transfer server. Call it before the engine thread
        starts: the event sink is attached while nothing else touches the pool."""
        if self.config.kv_events:
            self._start_events()
        if self.server is not None:
            self.server.start()

    def _start_events(self) -> None:
        host = "127.0.0.1" if self.config.host == "localhost" else self.config.host
        host = f"[{host}]" if ":" in host else host
        self.events = KVEventPublisher(
            f"tcp://{host}:{self.config.kv_events_port}",
            f"tcp://{host}:{self.config.kv_events_replay_port}",
            # A router that lost events asks for the whole cache: the engine thread sends it,
            # in order with the pool's other events.
            on_resync=lambda: self.async_engine.post(lambda eng: eng.publish_snapshot()),
            token_ids=self.config.kv_events_token_ids,
            curve_secret=self.config.kv_events_secret,
        )
        pool = self.engine.pool
        # The publisher's first batch is AllBlocksCleared: make it true, so an index that
        # follows this stream from seq 0 matches the pool exactly.
        if not pool.reset_prefix_cache():
            log.warning("KV events start while blocks are in use: routers will not see the "
                        "blocks cached before now (they only miss those hits)")
        previous = pool.event_sink
        publish = self.events.publish
        if previous is None:
            pool.event_sink = publish
        else:  # keep a sink the engine was built with (tests, embedding code)
            def both(event: Any) -> None:
                previous(event)
                publish(event)
            pool.event_sink = both
        offload = self.engine.offload
        if offload is not None:
            # The tiers' blocks (a restarted disk tier's above all) were announced before any
            # sink existed: say them again, after the AllBlocksCleared the stream starts with.
            for event in offload.snapshot_events():
                publish(event)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.client is not None:
            self.client.close()
        if self.events is not None:
            self.events.close()

    @property
    def transfer_address(self) -> tuple[str, int] | None:
        return self.server.address if self.server is not None else None

    def info(self) -> dict[str, Any]:
        addr = self.transfer_address
        return {
            "worker_id": self.worker_id, "role": self.config.role, "model": self.engine.config.model,
            "model_fingerprint": self.engine.model_fingerprint,
            "block_size": self.engine.config.block_size,
            "kv_spec": {
                "num_layers": self.engine.kv_spec.num_layers,
                "num_kv_heads": self.engine.kv_spec.num_kv_heads,
                "head_dim": self.engine.kv_spec.head_dim, "dtype": self.engine.kv_spec.dtype,
                "bytes_per_block": self.engine.kv_spec.bytes_per_block,
            },
            "transfer_address": list(addr) if addr else None,
            "lease_ttl_s": self.engine.leases.default_ttl_s,
            "kv_events": None if self.events is None else {
                "pub": self.events.endpoint, "replay": self.events.replay_endpoint,
                "topic": "kv-events", "encrypted": self.events.encrypted,
            },
            "kv_tiers": self.tiers_info(),
            "kv_remote": self.remote_info(),
        }

    def remote_info(self) -> dict[str, Any] | None:
        """The remote tier as operators see it (URL without its password, namespace, TTL, up);
        None without one."""
        r = self.async_engine.stats_snapshot.get("kv_remote") or {}
        return {k: r[k] for k in ("url", "namespace", "ttl_s", "up")} if r else None

    def tiers_info(self) -> dict[str, dict[str, Any]]:
        """The tiered KV store as routers see it: tier name -> {medium (what its KV events
        say), blocks_capacity, enabled}; {} without tiers. Read from the engine thread's last
        stats snapshot: a disk tier can disable itself at any time, on the engine's threads."""
        tiers = self.async_engine.stats_snapshot.get("kv_tiers") or {}
        return {name: {"medium": t["medium"], "blocks_capacity": t["blocks_capacity"], "enabled": t["enabled"]}
                for name, t in tiers.items()}

    # ---- prefill side ----------------------------------------------------------------------

    def handle_for(self, final: RequestOutput) -> dict[str, Any]:
        """The KV handle a finished prefill-only request answers with."""
        lease = final.kv_lease
        assert lease is not None and self.transfer_address is not None
        host, port = self.transfer_address
        # The first token already ends the request when it is a stop (EOS, stop string or
        # id): nobody will fetch, so free the blocks now. (A prefill-only request always asks
        # for one token, so max_tokens says nothing about the client's own limit; the router
        # knows that and releases the lease itself when the client wanted one token.)
        done = final.finish_reason == "stop"
        if done:
            self.engine.leases.release(lease.lease_id)
        handle = KVHandle(
            remote_engine_id=self.worker_id, remote_host=host, remote_port=port,
            lease_id=lease.lease_id, lease_ttl_s=lease.ttl_s,
            model_fingerprint=self.engine.model_fingerprint,
            block_size=self.engine.config.block_size, block_hashes=lease.block_hashes,
            num_prompt_tokens=lease.num_tokens, first_token_id=final.token_ids[0],
            first_token_logprob=final.logprobs[0] if final.logprobs else None,
            finish_reason=final.finish_reason if done else None,
        )
        if self._secret is not None:
            handle = handle.signed(self._secret)
        return handle.to_dict()

    # ---- decode side -----------------------------------------------------------------------

    async def import_kv(
        self, request_id: str, prompt: list[int], handle: KVHandle, cache_salt: str | None
    ) -> ImportResult:
        """Reserve blocks, fetch the missing ones and release the lease. On success the result
        holds the plan (commit it with the request); on failure nothing stays reserved."""
        assert self.client is not None
        res = ImportResult()
        # A handle this worker cannot verify names a server nobody vouched for: fetch nothing
        # from it, and do not contact it to release a lease either.
        trusted = self._secret is None or handle.verify(self._secret)
        try:
            if not trusted:
                raise TransferError("the handle's signature does not verify under this worker's KV "
                                    "transfer secret (forged, or the workers' --kv-secret differ)")
            if handle.model_fingerprint != self.engine.model_fingerprint:
                raise TransferError(
                    f"handle is for model {handle.model_fingerprint!r}, this worker serves "
                    f"{self.engine.model_fingerprint!r}"
                )
            if len(prompt) != handle.num_prompt_tokens:
                raise TransferError(
                    f"handle covers {handle.num_prompt_tokens} prompt tokens, the prompt has {len(prompt)}"
                )
            try:
                plan = await self.async_engine.call(
                    lambda e: e.reserve_import(prompt, handle.block_hashes, request_id, cache_salt)
                )
            except HandleMismatch as e:
                # Not the client's fault (another model or salt on the prefill side): recompute.
                # Any other InvalidRequestError is the prompt's own: a 400 for the caller.
                raise TransferError(str(e)) from None
            if plan is None:
                raise TransferError("no free KV blocks to receive the prompt now")
            res.plan = plan
            if plan.fetch_indexes:
                t0 = time.perf_counter()
                stats = await asyncio.to_thread(
                    self.client.fetch, handle.remote_host, handle.remote_port, handle.lease_id,
                    plan.fetch_indexes, self.engine.runner.kv_cache, plan.dst_block_ids,
                )
                res.transfer_s = time.perf_counter() - t0
                res.blocks_fetched, res.bytes = stats.blocks, stats.bytes
                self._bytes.inc(stats.bytes)
                self._seconds.observe(res.transfer_s)
            else:
                res.outcome = "local"
        except (TransferError, OSError) as e:
            res.outcome, res.error = "failed", f"{type(e).__name__}: {e}"
            log.warning("KV import for %s failed: %s", request_id, res.error)
            if res.plan is not None:
                self.cancel(request_id)
                res.plan = None
        except BaseException:
            if res.plan is not None:
                self.cancel(request_id)
            raise
        finally:
            if trusted:
                # Off the critical path: the decode can start while the release travels.
                task = asyncio.ensure_future(self._release_remote(handle))
                self._releases.add(task)
                task.add_done_callback(self._releases.discard)
        if res.outcome != "failed":
            self._outcomes.labels(res.outcome).inc()
        return res

    def count_failure(self, recomputed: bool) -> None:
        self._outcomes.labels("recomputed" if recomputed else "failed").inc()

    def cancel(self, request_id: str) -> None:
        """Free a reservation that will not be committed (fire and forget, any context)."""
        self.async_engine.post(lambda e: e.cancel_import(request_id))

    async def _release_remote(self, handle: KVHandle) -> None:
        assert self.client is not None
        try:
            await asyncio.to_thread(
                self.client.release, handle.remote_host, handle.remote_port, handle.lease_id
            )
        except (TransferError, OSError) as e:
            # The lease expires by itself; a dead prefill worker has nothing left to free.
            log.info("release of lease %s failed: %s", handle.lease_id, e)
