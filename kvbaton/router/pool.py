"""The worker pool: which workers exist, what they are, whether they are healthy, and how
much work the router has in flight on each.

Workers are registered from URLs. Discovery reads ``GET /kv/info`` (worker id, role, model
fingerprint, block size, transfer address) and ``GET /v1/models`` (served name, context
length); a worker without ``/kv/info`` (404: one that predates disaggregation) is still usable
for whole requests, with its role read from ``/v1/models``. Health is polled every
``health_interval_s``; a worker that fails a poll, or refuses a connection during a request,
is left out of placement until a poll succeeds again, and every recovery re-runs discovery
(a restarted worker has a new id and may have a new model).

Load is what the router itself has sent and not yet seen finish (requests, tokens, and the
KV blocks they need), corrected by what each worker's ``/health`` reports (``load``: running
requests and KV blocks in use): whatever the worker holds beyond the router's own work at the
last poll (other clients, other routers, leases) is added to the router's count.

`vllm serve` workers (``kind == "vllm"``, from ``--vllm-worker``) are discovered from
``/v1/models``, ``/metrics`` and ``/tokenize`` instead (``kvbaton.router.vllm_worker``), and
their load comes from ``/metrics`` at every poll. They serve whole requests (role ``both``, no
KV transfer); their KV events are keyed with the cluster's fingerprint and block size
(``Worker.keying``), so the index compares their blocks with prompts as it does ours.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from kvbaton.kv.event_subscriber import WorkerEndpoints
from kvbaton.kv.hashing import BlockHash
from kvbaton.router.config import RouterConfig, VLLMWorkerSpec
from kvbaton.router.vllm_worker import VLLMMetrics, scrape, tokenizer_mismatch, vllm_worker_id

# Health polls in a row that must time out before a worker that was healthy is marked down;
# a refused connection or a non-200 answer marks it down at once.
HEALTH_FAILURES_TO_DOWN = 3

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Worker:
    """One worker as the router knows it (a :class:`~kvbaton.router.policies.WorkerView`)."""

    url: str
    declared_role: str | None = None
    # "kvbaton" (ours) or "vllm" (a `vllm serve` process; ``vllm`` is its flag's spec).
    kind: str = "kvbaton"
    vllm: VLLMWorkerSpec | None = None
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
    # KV the router's in-flight legs need there: their prompts' full blocks by hash (counted
    # once however many legs share them, as the worker's prefix cache does) and their
    # private blocks (partial tail, generated tokens).
    active_hashes: Counter[BlockHash] = field(default_factory=Counter)
    in_flight_blocks: int = 0
    # Where the worker publishes KV events (from /kv/info or --vllm-worker; None: it does not).
    kv_events: WorkerEndpoints | None = None
    # A vLLM worker's events are re-keyed into the router's hash chain: the (fingerprint, block
    # size) the router hashes prompts with (None until both are known).
    keying: tuple[str, int] | None = None
    # The last /metrics scrape of a vLLM worker.
    vllm_metrics: VLLMMetrics | None = None
    # Work the worker reported beyond the router's own at the last /health poll.
    external_requests: int = 0
    external_blocks: int = 0
    # Prompt tokens per second its prefill legs took, smoothed (None until one finished): what
    # a prefill leg's timeout is sized by (``prefill_timeout``).
    prefill_tokens_per_s: float | None = None
    failed_polls: int = 0  # /health polls failed in a row
    # Set when the worker goes down (a failed poll or mark_down), replaced when it comes back:
    # legs in flight there wait on it, so they stop waiting for a worker the router gave up on.
    went_down: asyncio.Event = field(default_factory=asyncio.Event)

    def set_healthy(self, ok: bool) -> None:
        """Record a health verdict; a change to down wakes the legs waiting on ``went_down``."""
        if ok and not self.healthy:
            self.went_down = asyncio.Event()
        elif not ok:
            self.went_down.set()
        self.healthy = ok

    def note_prefill(self, tokens: int, seconds: float) -> None:
        """A prefill leg of ``tokens`` took ``seconds`` (queueing included)."""
        if tokens <= 0 or seconds <= 0:
            return
        rate = tokens / seconds
        prev = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = rate if prev is None else 0.7 * prev + 0.3 * rate

    @property
    def active_requests(self) -> int:
        """Requests running or waiting there: the router's own plus the others reported."""
        return self.in_flight_requests + self.external_requests

    @property
    def active_blocks(self) -> int:
        """KV blocks held there: the router's in-flight legs' plus the others reported."""
        return len(self.active_hashes) + self.in_flight_blocks + self.external_blocks

    def shared_active_blocks(self, block_hashes: Sequence[BlockHash]) -> int:
        """How many of ``block_hashes`` in-flight legs already hold there."""
        held = self.active_hashes
        return sum(1 for h in block_hashes if h in held) if held else 0

    def note_load(self, load: Any) -> None:
        """Take a /health ``load`` report (ignored unless well-formed)."""
        if not isinstance(load, dict):
            return
        running, waiting, used = (load.get(k) for k in
                                  ("num_requests_running", "num_requests_waiting", "kv_blocks_used"))
        if isinstance(running, int) and isinstance(waiting, int):
            self.external_requests = max(0, running + waiting - self.in_flight_requests)
        if isinstance(used, int):
            self.external_blocks = max(0, used - len(self.active_hashes) - self.in_flight_blocks)

    def __post_init__(self) -> None:
        self.worker_id = self.worker_id or self.url

    @property
    def usable(self) -> bool:
        return self.healthy and self.discovered and self.problem is None

    @property
    def can_decode(self) -> bool:
        return self.usable and self.role in ("decode", "both")

    @property
    def kv_protocol(self) -> str | None:
        """How the worker hands a prompt's KV to another, or takes it: ``"kvbaton"`` (our KV
        handles: it reported a model fingerprint), ``"vllm"`` (vLLM's ``kv_transfer_params``
        through its P/D connector: listed with ``role=``), None (it cannot)."""
        if self.kind == "vllm":
            return "vllm" if self.vllm is not None and self.vllm.role is not None else None
        return "kvbaton" if self.model_fingerprint is not None else None

    @property
    def can_prefill(self) -> bool:
        """Able to run a prefill leg for another worker: it must serve KV transfers."""
        if not (self.usable and self.role in ("prefill", "both")):
            return False
        if self.kind == "vllm":
            return self.kv_protocol == "vllm"
        return self.transfer_address is not None and self.model_fingerprint is not None

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url, "worker_id": self.worker_id, "role": self.role,
            "healthy": self.healthy, "problem": self.problem, "last_error": self.last_error,
            "in_flight_requests": self.in_flight_requests, "in_flight_tokens": self.in_flight_tokens,
            "active_blocks": self.active_blocks, "kv_events": self.kv_events is not None,
            "kind": self.kind,
        }


def charge(worker: Worker, tokens: int, block_size: int | None, block_hashes: Sequence[BlockHash] = ()) -> InFlight:
    """Charge a leg of ``tokens`` to ``worker`` (its blocks at ``block_size``; none when the
    cluster's block size is unknown) until ``done()``: the router's rule, the simulator's too."""
    return InFlight(worker, tokens, -(-tokens // block_size) if block_size else 0, block_hashes if block_size else ())


class InFlight:
    """Work charged to a worker until ``done()`` (idempotent)."""

    def __init__(self, worker: Worker, tokens: int, blocks: int = 0,
                 block_hashes: Sequence[BlockHash] = ()) -> None:
        self.worker = worker
        self.tokens = tokens
        self.hashes = tuple(block_hashes)
        self.blocks = max(0, blocks - len(self.hashes))  # the leg's private blocks
        self._open = True
        worker.in_flight_requests += 1
        worker.in_flight_tokens += tokens
        worker.in_flight_blocks += self.blocks
        worker.active_hashes.update(self.hashes)

    def done(self) -> None:
        if self._open:
            self._open = False
            w = self.worker
            w.in_flight_requests -= 1
            w.in_flight_tokens -= self.tokens
            w.in_flight_blocks -= self.blocks
            w.active_hashes.subtract(self.hashes)
            for h in self.hashes:
                if w.active_hashes.get(h, 1) <= 0:
                    del w.active_hashes[h]


class DiscoveryError(Exception):
    """A worker's /kv/info or /v1/models answer was missing or malformed."""


@dataclass
class ClusterModel:
    """The KV identity every disaggregating worker must share (from the first one found)."""

    fingerprint: str | None = None
    block_size: int | None = None
    workers: set[str] = field(default_factory=set)
    # vLLM workers have no fingerprint: a cluster of only them hashes prompts from a root named
    # after their model; their block size is the cluster's when they came first.
    vllm_fingerprint: str | None = None
    vllm_workers: set[str] = field(default_factory=set)

    @property
    def hash_fingerprint(self) -> str | None:
        """What the router roots prompts' block hashes in (our workers' fingerprint first)."""
        return self.fingerprint or self.vllm_fingerprint

    def keying(self) -> tuple[str, int] | None:
        fp = self.hash_fingerprint
        return (fp, self.block_size) if fp and self.block_size else None


class WorkerPool:
    """Registered workers, their discovery and health polling, and in-flight accounting.

    Owns the ``httpx.AsyncClient`` (connection pooling) that every router→worker call uses.
    ``start()`` discovers every worker once (so a router started after its workers is ready
    at once) and starts the poller; ``stop()`` ends it and closes the client.
    """

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.workers = [Worker(url, declared_role=role) for url, role in config.worker_specs()]
        self.workers += [Worker(v.url, declared_role=v.role, kind="vllm", vllm=v) for v in config.vllm_worker_specs()]
        self.cluster = ClusterModel()
        # The router's tokenizer (text -> ids), which vLLM workers' /tokenize must agree with;
        # None: not checked.
        self.router_ids: Callable[[str], list[int]] | None = None
        self.client: httpx.AsyncClient | None = None
        self._poller: asyncio.Task[None] | None = None
        # Called after every successful discovery with the worker and its previous id (the
        # KV index follows the worker's events and forgets a restarted worker's entries).
        self.on_discovered: list[Callable[[Worker, str], None]] = []

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

    def begin(self, worker: Worker, tokens: int, block_hashes: Sequence[BlockHash] = ()) -> InFlight:
        """Charge a leg of ``tokens`` (its KV: prompt, plus max_tokens for decode legs; the
        prompt's full blocks are ``block_hashes``) to ``worker`` until ``done()``."""
        return charge(worker, tokens, self.cluster.block_size, block_hashes)

    def mark_down(self, worker: Worker, reason: str) -> None:
        """Leave ``worker`` out of placement until its next successful health poll."""
        if worker.healthy:
            log.warning("worker %s marked down: %s", worker.url, reason)
        worker.set_healthy(False)
        worker.last_error = reason

    async def scrape_workers(self) -> dict[str, str]:
        """Each discovered worker's ``/metrics`` text (URL -> text), fetched at once with the
        health timeout; a worker that does not answer is left out of this scrape."""
        if self.client is None:
            return {}
        targets = [w for w in self.workers if w.discovered]

        async def one(w: Worker) -> tuple[str, str | None]:
            assert self.client is not None
            try:
                r = await self.client.get(f"{w.url}/metrics")
            except httpx.HTTPError:
                return w.url, None
            return w.url, r.text if r.status_code == 200 else None

        got = await asyncio.gather(*(one(w) for w in targets))
        return {url: text for url, text in got if text is not None}

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
        body: Any = None
        try:
            r = await self.client.get(f"{worker.url}/health")
            ok = r.status_code == 200
            error = None if ok else f"/health answered {r.status_code}"
            if ok:
                try:
                    body = r.json()
                except ValueError:
                    body = None
        except httpx.HTTPError as e:
            ok, error = False, f"/health: {type(e).__name__}: {e}"
            slow = isinstance(e, httpx.TimeoutException)
        else:
            slow = False
        if ok:
            worker.failed_polls = 0
        else:
            worker.failed_polls += 1
            # A refused connection or a non-200 answer (draining, engine dead) says the worker
            # cannot serve; a poll that timed out may only mean a busy machine (a restarting
            # neighbour loading its model, a burst of tokenization): it counts after a few.
            if worker.healthy and slow and worker.failed_polls < HEALTH_FAILURES_TO_DOWN:
                log.info("worker %s missed a health poll (%d in a row): %s", worker.url, worker.failed_polls, error)
                return
        reported_id = body.get("worker_id") if isinstance(body, dict) else None
        metrics: VLLMMetrics | None = None
        if ok and worker.kind == "vllm":
            metrics = await self._scrape_vllm(worker)
            if metrics is not None and metrics.start_time is not None:
                reported_id = vllm_worker_id(worker.url, metrics)
        # A new id between two polls: the worker restarted (and its KV cache is empty).
        restarted = worker.discovered and isinstance(reported_id, str) and reported_id != worker.worker_id
        if ok and (not worker.healthy or restarted):
            try:
                await self.discover(worker)
            except (httpx.HTTPError, DiscoveryError) as e:
                ok, error = False, f"discovery: {e}"
        if ok != worker.healthy:
            log.log(logging.INFO if ok else logging.WARNING, "worker %s is %s%s", worker.url,
                    "healthy" if ok else "unhealthy", "" if ok else f": {error}")
        worker.set_healthy(ok)
        worker.last_error = error
        if ok and isinstance(body, dict):
            worker.note_load(body.get("load"))
        elif ok and metrics is not None:
            worker.vllm_metrics = metrics
            worker.note_load(metrics.load())

    async def _scrape_vllm(self, worker: Worker) -> VLLMMetrics | None:
        """A vLLM worker's /metrics (None when it does not answer: the worker stays usable,
        its load is what the router itself sent)."""
        assert self.client is not None
        try:
            return await scrape(self.client, worker.url)
        except (httpx.HTTPError, ValueError) as e:
            log.info("worker %s: /metrics: %s", worker.url, e)
            return None

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
        if worker.kind == "vllm":
            await self._discover_vllm(worker)
            return
        keying = self.cluster.keying()
        status, info = await self._get_json(f"{worker.url}/kv/info")
        if status not in (200, 404):
            raise DiscoveryError(f"/kv/info answered {status}")
        status, models = await self._get_json(f"{worker.url}/v1/models")
        entry = _model_entry(status, models)
        try:
            if info is not None:
                reported = str(info["role"])
                worker.worker_id = str(info["worker_id"])
                worker.model_fingerprint = str(info["model_fingerprint"])
                worker.block_size = int(info["block_size"])
                addr = info.get("transfer_address")
                worker.transfer_address = (str(addr[0]), int(addr[1])) if addr else None
                worker.kv_events = _event_endpoints(info.get("kv_events"), worker.url)
            else:
                reported = str(entry.get("role", "both"))
            mml = entry.get("max_model_len")
            worker.max_model_len = int(mml) if isinstance(mml, int) else None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise DiscoveryError(f"malformed answer: {type(e).__name__}: {e}") from None
        previous_id = worker.worker_id
        worker.model_name = entry["id"]
        worker.role = reported if worker.declared_role is None else worker.declared_role
        worker.problem = self._problem(worker, reported)
        self._discovered(worker, previous_id, keying)

    async def _discover_vllm(self, worker: Worker) -> None:
        """Discovery of a `vllm serve` worker (``kvbaton.router.vllm_worker``)."""
        assert self.client is not None and worker.vllm is not None
        keying = self.cluster.keying()
        status, models = await self._get_json(f"{worker.url}/v1/models")
        entry = _model_entry(status, models)
        try:
            metrics = await scrape(self.client, worker.url)
        except ValueError as e:
            raise DiscoveryError(f"{e} (a vLLM worker's block size and load come from it)") from None
        mismatch = None
        if self.router_ids is not None:
            mismatch = await tokenizer_mismatch(self.client, worker.url, entry["id"], self.router_ids)
        previous_id = worker.worker_id
        worker.worker_id = vllm_worker_id(worker.url, metrics)
        worker.model_name = entry["id"]
        mml = entry.get("max_model_len")
        worker.max_model_len = int(mml) if isinstance(mml, int) else None
        worker.block_size = metrics.block_size
        worker.vllm_metrics = metrics
        worker.role = worker.declared_role or "both"  # (role= is prefill, decode or both)
        spec = worker.vllm
        worker.kv_events = WorkerEndpoints(spec.events, spec.replay, encoding="vllm") if spec.events else None
        if worker.kv_events is not None and metrics.prefix_caching is False:
            log.warning("vLLM worker %s runs without prefix caching: its KV events will be empty", worker.url)
        worker.problem = mismatch or self._vllm_problem(worker)
        worker.keying = self.cluster.keying() if worker.problem is None else None
        self._discovered(worker, previous_id, keying)

    def _discovered(self, worker: Worker, previous_id: str, keying: tuple[str, int] | None) -> None:
        """The end of either kind's discovery: log a problem, tell the listeners, and re-key
        the vLLM workers if this discovery changed the cluster's keying (``keying``: before)."""
        if worker.problem:
            log.error("worker %s cannot be used: %s", worker.url, worker.problem)
        worker.discovered = True
        for listener in self.on_discovered:
            listener(worker, previous_id)
        if self.cluster.keying() != keying:
            self._rekey_vllm()

    def _vllm_problem(self, worker: Worker) -> str | None:
        if worker.block_size is None:
            if worker.kv_events is not None:
                return ("its /metrics has no vllm:cache_config_info block_size, so its KV events "
                        "cannot be compared with prompts")
            return None
        c = self.cluster
        if c.block_size is None or (c.fingerprint is None and c.vllm_workers <= {worker.url}):
            c.block_size = worker.block_size
        c.vllm_workers.add(worker.url)
        if c.vllm_fingerprint is None and worker.model_name:
            c.vllm_fingerprint = f"vllm:{worker.model_name}"
        if worker.block_size != c.block_size:
            return (f"block size {worker.block_size} differs from the cluster's {c.block_size} "
                    f"(start it with --block-size {c.block_size})")
        return None

    def _rekey_vllm(self) -> None:
        """The cluster's hash root or block size changed (its first kvbaton worker arrived):
        the vLLM workers' events are keyed afresh (the feed replays their streams)."""
        keying = self.cluster.keying()
        for w in self.workers:
            if w.kind == "vllm" and w.discovered and w.problem is None and w.keying != keying:
                w.keying = keying
                for listener in self.on_discovered:
                    listener(w, w.worker_id)

    def _problem(self, worker: Worker, reported: str) -> str | None:
        if reported not in ("prefill", "decode", "both"):
            return f"unknown role {reported!r}"
        if worker.declared_role is not None and reported not in (worker.declared_role, "both"):
            return f"listed as {worker.declared_role} but the worker's role is {reported}"
        if worker.model_fingerprint is None:
            return None
        c = self.cluster
        if c.fingerprint is None or c.workers <= {worker.url}:
            vllm_size = c.block_size if c.vllm_workers else None
            if vllm_size is not None and worker.block_size != vllm_size:
                return (f"block size {worker.block_size} differs from the vLLM workers' {vllm_size} "
                        f"(start it with --block-size {vllm_size})")
            c.fingerprint, c.block_size = worker.model_fingerprint, worker.block_size
        c.workers.add(worker.url)
        if (worker.model_fingerprint, worker.block_size) != (c.fingerprint, c.block_size):
            return (
                f"model fingerprint/block size {worker.model_fingerprint}/{worker.block_size} differ "
                f"from the cluster's {c.fingerprint}/{c.block_size}"
            )
        return None


def _model_entry(status: int, models: Any) -> dict[str, Any]:
    """The first model a worker's ``/v1/models`` lists; DiscoveryError if it lists none."""
    try:
        entry = models["data"][0] if status == 200 else None
    except (KeyError, TypeError, IndexError):
        entry = None
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        raise DiscoveryError(f"/v1/models answered {status} without a model")
    return entry


def _event_endpoints(raw: Any, worker_url: str) -> WorkerEndpoints | None:
    """The worker's advertised KV event endpoints; a wildcard bind address (``0.0.0.0``,
    ``*``, ``::``) is replaced by the host the router reaches the worker at."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("pub"), str):
        raise DiscoveryError("kv_events: expected {'pub': 'tcp://...', 'replay': ...}")
    host = httpx.URL(worker_url).host
    host = f"[{host}]" if ":" in host else host

    def fix(ep: str) -> str:
        for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
            if ep.startswith(wildcard):
                return f"tcp://{host}:{ep[len(wildcard):]}"
        return ep

    replay = raw.get("replay")
    if replay is not None and not isinstance(replay, str):
        raise DiscoveryError("kv_events.replay: expected a ZMQ endpoint or null")
    return WorkerEndpoints(fix(raw["pub"]), fix(replay) if replay else None, encrypted=raw.get("encrypted") is True)
