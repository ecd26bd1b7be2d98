"""The worker pool: which workers exist, what they are, whether they are healthy, and how
much work the router has in flight on each.

Workers are registered from URLs. Discovery reads ``GET /kv/info`` (worker id, role, model
fingerprint, block size, transfer address) and ``GET /v1/models`` (served name, context
length); a worker without ``/kv/info`` (404: one that predates disaggregation) is still usable
for whole requests, with its role read from ``/v1/models``. Health is polled every
``health_interval_s``; a worker that fails a poll, or refuses a connection during a request,
is left out of placement until a poll succeeds again, and every recovery re-runs discovery
(a restarted worker has a new id and may have a new model).

Load is what the router itself has sent and not yet seen finish, so it is exact for this
router and blind to other clients of the same workers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import httpx

from kvbaton.router.config import RouterConfig

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Worker:
    """One worker as the router knows it (a :class:`~kvbaton.router.policies.WorkerView`)."""

    url: str
    declared_role: str | None = None
    role: str = "unknown"
    worker_id: str = ""
    model_name: str | None = None
    model_fingerprint: str | None = None
    block_size: int | None = None
    transfer_address: tuple[str, int] | None = None
    max_model_len: int | None = None
    discovered: bool = False
    healthy: bool = False
    # Why the worker cannot be used even when healthy (role or model mismatch); None if usable.
    problem: str | None = None
    last_error: str | None = None
    in_flight_requests: int = 0
    in_flight_tokens: int = 0

    def __post_init__(self) -> None:
        self.worker_id = self.worker_id or self.url

    @property
    def usable(self) -> bool:
        return self.healthy and self.discovered and self.problem is None

    @property
    def can_decode(self) -> bool:
        return self.usable and self.role in ("decode", "both")

    @property
    def can_prefill(self) -> bool:
        """Able to run a prefill leg for another worker: it must serve KV transfers."""
        return (
            self.usable and self.role in ("prefill", "both")
            and self.transfer_address is not None and self.model_fingerprint is not None
        )

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url, "worker_id": self.worker_id, "role": self.role,
            "healthy": self.healthy, "problem": self.problem, "last_error": self.last_error,
            "in_flight_requests": self.in_flight_requests, "in_flight_tokens": self.in_flight_tokens,
        }


class InFlight:
    """Work charged to a worker until ``done()`` (idempotent)."""

    def __init__(self, worker: Worker, tokens: int) -> None:
        self.worker = worker
        self.tokens = tokens
        self._open = True
        worker.in_flight_requests += 1
        worker.in_flight_tokens += tokens

    def done(self) -> None:
        if self._open:
            self._open = False
            self.worker.in_flight_requests -= 1
            self.worker.in_flight_tokens -= self.tokens


class DiscoveryError(Exception):
    """A worker's /kv/info or /v1/models answer was missing or malformed."""


@dataclass
class ClusterModel:
    """The KV identity every disaggregating worker must share (from the first one found)."""

    fingerprint: str | None = None
    block_size: int | None = None
    workers: set[str] = field(default_factory=set)


class WorkerPool:
    """Registered workers, their discovery and health polling, and in-flight accounting.

    Owns the ``httpx.AsyncClient`` (connection pooling) that every router→worker call uses.
    ``start()`` discovers every worker once (so a router started after its workers is ready
    at once) and starts the poller; ``stop()`` ends it and closes the client.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.workers = [Worker(url, declared_role=role) for url, role in config.worker_specs()]
        self.cluster = ClusterModel()
        self.client: httpx.AsyncClient | None = None
        self._poller: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.config.worker_api_key}"} if self.config.worker_api_key else {}
        self.client = httpx.AsyncClient(
            headers=headers,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            timeout=httpx.Timeout(self.config.health_timeout_s, connect=self.config.connect_timeout_s),
        )
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_forever(), name="kvbaton-router-health")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
        if self.client is not None:
            await self.client.aclose()

    # ---- placement views -----------------------------------------------------------------

    def decode_candidates(self, exclude: Iterable[Worker] = ()) -> list[Worker]:
        skip = set(map(id, exclude))
        return [w for w in self.workers if w.can_decode and id(w) not in skip]

    def prefill_candidates(self, exclude: Iterable[Worker] = ()) -> list[Worker]:
        skip = set(map(id, exclude))
        return [w for w in self.workers if w.can_prefill and id(w) not in skip]

    def has_dedicated_prefill(self) -> bool:
        """Whether some worker is meant for prefill only (then a missing one is a fallback)."""
        return any(w.declared_role == "prefill" or w.role == "prefill" for w in self.workers)

    def max_model_len(self) -> int | None:
        """The smallest context any usable decode worker serves (None if none reported it)."""
        lens = [w.max_model_len for w in self.workers if w.can_decode and w.max_model_len]
        return min(lens) if lens else None

    def begin(self, worker: Worker, tokens: int) -> InFlight:
        return InFlight(worker, tokens)

    def mark_down(self, worker: Worker, reason: str) -> None:
        """Leave ``worker`` out of placement until its next successful health poll."""
        if worker.healthy:
            log.warning("worker %s marked down: %s", worker.url, reason)
        worker.healthy = False
        worker.last_error = reason

    # ---- health and discovery ------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.poll_once()
            except Exception:  # never let one bad answer stop the poller
                log.exception("health poll failed")

    async def poll_once(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.workers))

    async def check(self, worker: Worker) -> None:
        """Poll ``/health``; on a (re)covery also rediscover the worker."""
        assert self.client is not None
        try:
            r = await self.client.get(f"{worker.url}/health")
            ok = r.status_code == 200
            error = None if ok else f"/health answered {r.status_code}"
        except httpx.HTTPError as e:
            ok, error = False, f"/health: {type(e).__name__}: {e}"
        if ok and not worker.healthy:
            try:
                await self.discover(worker)
            except (httpx.HTTPError, DiscoveryError) as e:
                ok, error = False, f"discovery: {e}"
        if ok != worker.healthy:
            log.log(logging.INFO if ok else logging.WARNING, "worker %s is %s%s", worker.url,
                    "healthy" if ok else "unhealthy", "" if ok else f": {error}")
        worker.healthy = ok
        worker.last_error = error

    async def _get_json(self, url: str) -> tuple[int, Any]:
        assert self.client is not None
        r = await self.client.get(url)
        if r.status_code != 200:
            return r.status_code, None
        try:
            return 200, r.json()
        except ValueError:
            raise DiscoveryError(f"{url}: not JSON") from None

    async def discover(self, worker: Worker) -> None:
        status, info = await self._get_json(f"{worker.url}/kv/info")
        if status not in (200, 404):
            raise DiscoveryError(f"/kv/info answered {status}")
        status, models = await self._get_json(f"{worker.url}/v1/models")
        try:
            entry = models["data"][0] if status == 200 else None
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                raise DiscoveryError(f"/v1/models answered {status} without a model")
            if info is not None:
                reported = str(info["role"])
                worker.worker_id = str(info["worker_id"])
                worker.model_fingerprint = str(info["model_fingerprint"])
                worker.block_size = int(info["block_size"])
                addr = info.get("transfer_address")
                worker.transfer_address = (str(addr[0]), int(addr[1])) if addr else None
            else:
                reported = str(entry.get("role", "both"))
            mml = entry.get("max_model_len")
            worker.max_model_len = int(mml) if isinstance(mml, int) else None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DiscoveryError(f"malformed answer: {type(e).__name__}: {e}") from None
        worker.model_name = entry["id"]
        worker.role = reported if worker.declared_role is None else worker.declared_role
        worker.problem = self._problem(worker, reported)
        if worker.problem:
            log.error("worker %s cannot be used: %s", worker.url, worker.problem)
        worker.discovered = True

    def _problem(self, worker: Worker, reported: str) -> str | None:
        if reported not in ("prefill", "decode", "both"):
            return f"unknown role {reported!r}"
        if worker.declared_role is not None and reported not in (worker.declared_role, "both"):
            return f"listed as {worker.declared_role} but the worker's role is {reported}"
        if worker.model_fingerprint is None:
            return None
        c = self.cluster
        if c.fingerprint is None or c.workers <= {worker.url}:
            c.fingerprint, c.block_size = worker.model_fingerprint, worker.block_size
        c.workers.add(worker.url)
        if (worker.model_fingerprint, worker.block_size) != (c.fingerprint, c.block_size):
            return (
                f"model fingerprint/block size {worker.model_fingerprint}/{worker.block_size} differ "
                f"from the cluster's {c.fingerprint}/{c.block_size}"
            )
        return None
