"""The disaggregated flow (docs/architecture.md, "A request's path") and its failure outcomes.

For each request: choose a decode worker; if the prompt part it does not hold is at least
``disagg_min_tokens`` and a prefill worker is available, run the prefill leg there and send
the decode leg with the KV handle it returned, else send the decode leg alone (the decode
worker prefills). Outcomes, none of which hangs (every call has a timeout):

- prefill leg unreachable, timed out, 5xx or a bad handle: the decode worker prefills
  (a fallback, counted by reason); a 4xx is the client's fault and is returned as is;
- the first token already ends the request (EOS, a stop, or ``max_tokens`` 1): answered from
  the prefill response (path ``direct``) and the lease released;
- decode leg fails before its first chunk (unreachable, 5xx, transfer failure 502, error
  event, dropped, timed out): retried on another decode worker (``max_retries``), keeping the
  handle only if the failed worker never received it; else the client gets the error;
- a worker's 4xx: returned unchanged, never retried;
- an unconsumed handle (the decode leg never produced a chunk, the client left, an error) is
  released with ``POST /kv/release`` on the prefill worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import httpx

from kvbaton.api.protocol import KV_TRANSFER_FAILED, ApiError
from kvbaton.api.sse import unless
from kvbaton.kv.handle import KVHandle
from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.router.config import RouterConfig
from kvbaton.router.metrics import RouterMetrics
from kvbaton.router.placement import place
from kvbaton.router.policies import NoPrefixOverlap, PrefixOverlap, RoutingRequest, make_policy
from kvbaton.router.pool import Worker, WorkerPool
from kvbaton.router.relay import (
    CLEANUP_TIMEOUT_S,
    DONE,
    LegFailure,
    RelayStream,
    WorkerApiError,
    close_quietly,
    sse_events,
    transport_failure,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Prefilled:
    """A prefill leg's answer: the handle (``raw``, forwarded unchanged to the decode leg),
    where it lives, and whether the first token already ended the request. ``handle`` is our
    parsed KV handle, whose lease the router may release; None for a vLLM prefill worker's
    ``kv_transfer_params`` (vLLM frees the blocks itself once read, or after its timeout)."""

    worker: Worker
    handle: KVHandle | None
    raw: dict[str, Any]
    response: dict[str, Any]
    finish_reason: str | None = None


# What a vLLM prefill leg asks its P/D connector for (vLLM's own proxies send the same).
VLLM_PREFILL_PARAMS: dict[str, Any] = {"do_remote_decode": True, "do_remote_prefill": False,
                                       "remote_engine_id": None, "remote_block_ids": None,
                                       "remote_host": None, "remote_port": None}


@dataclass
class Job:
    """One client request as the orchestrator runs it.

    ``fields`` are the sampling fields forwarded verbatim to both legs (temperature, seed,
    stop, logprobs, cache_salt...). ``lease`` is a prefill answer whose handle no decode
    worker has consumed yet: whoever clears it owns releasing it.
    """

    routing: RoutingRequest
    fields: dict[str, Any]
    arrival: float
    retries_left: int
    routed_at: float = 0.0
    path: str | None = None  # set when the first chunk arrives (disagg, local, direct)
    tried: list[Worker] = field(default_factory=list)
    lease: Prefilled | None = None
    local_only: bool = False  # never disaggregated (see new_job)
    # Cached prompt tokens expected on each decode worker placed (for the prediction metrics).
    predicted: dict[str, int] = field(default_factory=dict)


class Orchestrator:
    """Runs requests over the worker pool: placement, the two legs, retries, fallbacks."""

    def __init__(
        self, config: RouterConfig, pool: WorkerPool, metrics: RouterMetrics,
        overlap: PrefixOverlap | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.metrics = metrics
        self.overlap = overlap or NoPrefixOverlap()
        options = config.policy_options()
        self.prefill_policy = make_policy(config.prefill_policy, self.overlap, options)
        self.decode_policy = make_policy(config.decode_policy, self.overlap, options)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def client(self) -> httpx.AsyncClient:
        assert self.pool.client is not None, "the worker pool is not started"
        return self.pool.client

    # ---- jobs and placement ------------------------------------------------------------

    def new_job(self, request_id: str, token_ids: list[int], max_tokens: int,
                fields: dict[str, Any], arrival: float) -> Job:
        """A job with the prompt's block hashes under the cluster's model fingerprint (a
        stand-in for it in a cluster of vLLM workers only)."""
        salt = fields.get("cache_salt")
        fp, bs = self.pool.cluster.hash_fingerprint, self.pool.cluster.block_size
        hashes = tuple(hash_block_chain(root_hash(fp, salt), token_ids, bs)) if fp and bs else ()
        routing = RoutingRequest(request_id, tuple(token_ids), hashes, bs, salt, max_tokens)
        job = Job(routing, fields, arrival, self.config.max_retries)
        # Prompt logprobs come from the forward pass over the prompt, which a decode worker
        # importing the KV never runs: such a request runs where it is decoded.
        job.local_only = ("prompt_logprobs" in fields or max_tokens == 0
                          or (bool(fields.get("echo")) and "logprobs" in fields))
        return job

    def place(self, job: Job) -> tuple[Worker, Worker | None]:
        """The decode worker and, when the request is worth disaggregating, a prefill one
        (:func:`kvbaton.router.placement.place`). Both are told to the overlap provider
        (``routed``), so siblings follow them."""
        started = time.perf_counter()
        req = job.routing
        candidates = self.pool.decode_candidates(exclude=job.tried)
        if not candidates:
            raise ApiError(503, "no healthy decode worker is available", None, "service_unavailable")
        p = place(req, candidates, self.pool.prefill_candidates(), self.overlap, self.decode_policy,
                  self.prefill_policy, self.config.disagg_min_tokens, self.pool.has_dedicated_prefill())
        self.metrics.routing_decision.observe(time.perf_counter() - started)
        job.predicted[p.decoder.url] = p.predicted_cached
        if p.fallback is not None:
            self.metrics.fallbacks.labels(p.fallback).inc()
        self.overlap.routed(req, p.decoder)
        if p.prefiller is not None:
            self.overlap.routed(req, p.prefiller)
        return p.decoder, p.prefiller

    # ---- the flow ------------------------------------------------------------------------

    async def open(self, job: Job) -> RelayStream:
        """Run the request up to its first chunk. Raises ApiError (incl. a worker's 4xx as
        WorkerApiError) if it fails before that; a cancelled call leaves nothing behind."""
        try:
            decoder, prefiller = self.place(job)
            if job.local_only:
                prefiller = None
            job.routed_at = time.monotonic()
            if prefiller is not None:
                job.lease = await self._prefill(job, prefiller)
                if job.lease is not None and self._finished_by_first_token(job, job.lease):
                    return self._direct(job, job.lease)
            return await self._decode(job, decoder)
        except BaseException:
            self.release_lease(job)
            raise

    async def retry(self, job: Job, reason: str) -> RelayStream:
        """After a mid-stream failure nobody saw (non-streaming clients): the whole request
        again on another decode worker, prefilled there. ApiError if none is left."""
        nxt = self._next_decoder(job)
        if nxt is None:
            raise ApiError(502, f"decode failed ({reason}) and no other decode worker is available",
                           None, "upstream_error")
        job.retries_left -= 1
        self.metrics.retries.labels(reason).inc()
        return await self._decode(job, nxt)

    def _next_decoder(self, job: Job) -> Worker | None:
        if job.retries_left <= 0:
            return None
        candidates = self.pool.decode_candidates(exclude=job.tried)
        if not candidates:
            return None
        # A policy returns one of the candidates it was given.
        return cast(Worker, self.decode_policy.choose(job.routing, candidates, "decode"))

    def _finished_by_first_token(self, job: Job, pre: Prefilled) -> bool:
        if job.routing.max_tokens == 1:
            return True
        # With min_tokens > 1 the first token cannot end the request: the prefill leg ran with
        # min_tokens 1, which checks stop strings from the first token on.
        return pre.finish_reason is not None and (job.fields.get("min_tokens") or 0) <= 1

    def _record_first(self, job: Job, path: str) -> None:
        """Routing time, TTFT and the path, once per request (a retry after a mid-stream
        failure is the same request)."""
        if job.path is None:
            job.path = path
            self.metrics.ttft_routing.labels(path).observe(job.routed_at - job.arrival)
            self.metrics.ttft.labels(path).observe(time.monotonic() - job.arrival)
            self.metrics.requests.labels(path).inc()

    # ---- prefill leg ---------------------------------------------------------------------

    async def _prefill(self, job: Job, worker: Worker) -> Prefilled | None:
        """The prefill leg; None (fallback counted) when the decode worker should prefill."""
        vllm = worker.kind == "vllm"
        body = {
            "model": worker.model_name, "prompt": list(job.routing.token_ids), **job.fields,
            "max_tokens": 1, "stream": False,
            "kv_transfer_params": dict(VLLM_PREFILL_PARAMS) if vllm else {"do_remote_decode": True},
        }
        if body.get("min_tokens"):
            body["min_tokens"] = 1  # (the first token is held to it; the decode leg to the rest)
        tokens = job.routing.num_prompt_tokens
        limit = prefill_timeout(self.config.prefill_timeout_s, worker.in_flight_tokens, tokens,
                                worker.prefill_tokens_per_s)
        timeout = httpx.Timeout(limit, connect=self.config.connect_timeout_s)
        started = time.monotonic()
        in_flight = self.pool.begin(worker, tokens, job.routing.block_hashes)
        try:
            r = await _unless_down(worker, self.client.post(f"{worker.url}/v1/completions", json=body,
                                                            timeout=timeout))
        except WorkerWentDown:
            return self._prefill_fallback(worker, "worker_down", worker.last_error or "marked down")
        except httpx.HTTPError as e:
            failure = transport_failure(worker, e, "prefill")
            if failure.kind == "connect":
                self.pool.mark_down(worker, str(failure))
            return self._prefill_fallback(worker, failure.kind, str(failure))
        finally:
            in_flight.done()
        if 400 <= r.status_code < 500:
            raise WorkerApiError(r.status_code, _json_or_text(r))
        if r.status_code != 200:
            return self._prefill_fallback(worker, "http_5xx", f"answered {r.status_code}")
        data = _json_or_text(r)
        raw = data.get("kv_transfer_params") if isinstance(data, dict) else None
        if vllm:
            return self._vllm_prefilled(job, worker, data, raw, started)
        try:
            handle = KVHandle.from_dict(raw)
            if handle.num_prompt_tokens != job.routing.num_prompt_tokens:
                raise ValueError("kv_transfer_params.num_prompt_tokens: not the prompt's length")
        except ValueError as e:
            if isinstance(raw, dict) and isinstance(raw.get("lease_id"), str):
                self._spawn(self._release(worker, raw["lease_id"]))
            return self._prefill_fallback(worker, "bad_handle", str(e))
        self._note_prefill(job, worker, started)
        return Prefilled(worker, handle, raw, data, handle.finish_reason)  # type: ignore[arg-type]

    def _note_prefill(self, job: Job, worker: Worker, started: float) -> None:
        took = time.monotonic() - started
        worker.note_prefill(job.routing.num_prompt_tokens, took)
        self.metrics.ttft_prefill.labels("disagg").observe(took)

    def _vllm_prefilled(self, job: Job, worker: Worker, data: Any, raw: Any, started: float) -> Prefilled | None:
        """A vLLM prefill worker's answer: its ``kv_transfer_params`` go to the decode leg as
        they are (vLLM's connector reads them); a first token that ended the request (EOS or a
        stop) is reported as ``finish_reason`` "stop" (``length`` is the leg's own max_tokens 1)."""
        if not isinstance(raw, dict) or not raw.get("remote_engine_id") or not raw.get("do_remote_prefill"):
            return self._prefill_fallback(worker, "bad_handle", "no kv_transfer_params from vLLM's P/D connector "
                                          "(is it started with --kv-transfer-config?)")
        choices = data.get("choices") if isinstance(data, dict) else None
        finish = choices[0].get("finish_reason") if isinstance(choices, list) and choices else None
        self._note_prefill(job, worker, started)
        return Prefilled(worker, None, raw, data, "stop" if finish == "stop" else None)

    def _prefill_fallback(self, worker: Worker, kind: str, detail: str) -> Prefilled | None:
        """Count a failed prefill leg; None: the decode worker prefills."""
        log.warning("prefill leg on %s failed (%s: %s); the decode worker prefills", worker.url, kind, detail)
        self.metrics.worker_errors.labels(worker.url, kind).inc()
        self.metrics.fallbacks.labels(f"prefill_{kind}").inc()
        return None

    def _direct(self, job: Job, pre: Prefilled) -> RelayStream:
        """Answer from the prefill response: its first token already ended the request."""
        self.release_lease(job)
        choice = dict((pre.response.get("choices") or [{}])[0])
        choice["finish_reason"] = pre.finish_reason or "length"
        self._record_first(job, "direct")
        stream = RelayStream(pre.worker, "direct", {"choices": [choice]})
        stream.usage = pre.response.get("usage")
        return stream

    # ---- decode leg ----------------------------------------------------------------------

    async def _decode(self, job: Job, decoder: Worker) -> RelayStream:
        """The decode leg up to its first chunk, retried on other decode workers."""
        while True:
            job.tried.append(decoder)
            try:
                return await self._open_decode(job, decoder)
            except LegFailure as f:
                self.metrics.worker_errors.labels(decoder.url, f.kind).inc()
                if f.kind == "connect":
                    self.pool.mark_down(decoder, str(f))
                if not f.handle_intact:
                    self.release_lease(job)
                nxt = self._next_decoder(job)
                if nxt is None:
                    self.metrics.request_failures.labels("before_first_token").inc()
                    raise f.client_error from None
                log.warning("decode leg on %s failed (%s); retrying on %s", decoder.url, f, nxt.url)
                job.retries_left -= 1
                self.metrics.retries.labels(f.kind).inc()
                decoder = nxt

    async def _open_decode(self, job: Job, worker: Worker) -> RelayStream:
        req = job.routing
        body: dict[str, Any] = {
            "model": worker.model_name, "prompt": list(req.token_ids), **job.fields,
            "max_tokens": req.max_tokens, "stream": True, "stream_options": {"include_usage": True},
        }
        lease = job.lease
        if lease is not None:
            body["kv_transfer_params"] = lease.raw
        path = "disagg" if lease is not None else "local"
        timeout = httpx.Timeout(self.config.request_timeout_s, connect=self.config.connect_timeout_s)
        request = self.client.build_request("POST", f"{worker.url}/v1/completions", json=body, timeout=timeout)
        predicted = job.predicted.get(worker.url)
        if predicted is None:  # a retry's worker: what it held before this leg was sent
            predicted = min(self.overlap.cached_tokens(req, worker), req.num_prompt_tokens)
        in_flight = self.pool.begin(worker, req.num_prompt_tokens + req.max_tokens, req.block_hashes)
        started = time.monotonic()
        response: httpx.Response | None = None
        events: AsyncIterator[dict[str, Any] | str] | None = None

        async def first_chunk() -> dict[str, Any] | str:
            nonlocal response, events
            response = await self.client.send(request, stream=True)
            if response.status_code != 200:
                await response.aread()
                raise self._decode_status_failure(job, worker, response)
            events = sse_events(response)
            return await anext(events, DONE)

        try:
            try:
                first = await _unless_down(worker, first_chunk())
            except httpx.HTTPError as e:
                raise transport_failure(worker, e, "decode") from None
            except WorkerWentDown:
                # The request reached it, so the handle may be in use there: retried without it.
                raise LegFailure("worker_down", ApiError(
                    503, f"decode worker {worker.url} was marked down before its first token", None,
                    "service_unavailable")) from None
            assert events is not None
            if first == DONE:
                raise LegFailure("dropped", ApiError(
                    502, f"decode worker {worker.url} ended the stream before any token", None,
                    "upstream_error"))
            assert isinstance(first, dict)
            if "error" in first:
                raise self._error_event_failure(job, first)
        except BaseException:
            in_flight.done()
            await close_quietly(response)
            raise
        first_at = time.monotonic()
        # From here the lease is the decode worker's: its tokens come after the transfer, and
        # it releases the lease. Only if its usage chunk never confirms that (the stream broke,
        # or it recomputed after a failed fetch) does the router release it too (idempotent).
        job.lease = None
        first_decode = job.path is None
        self._record_first(job, path)
        if path == "local" and first_decode:
            self.metrics.ttft_first_decode.labels(path).observe(first_at - started)
        confirmed = False

        def on_usage(chunk: dict[str, Any]) -> None:
            nonlocal confirmed
            actual = self._record_cache(worker, req.num_prompt_tokens, predicted, chunk.get("usage"))
            if actual is not None and path == "local":
                self.overlap.served(req, worker, actual, started)
            if path == "disagg":
                kv = chunk.get("kv_transfer_params")
                self._record_transfer(kv, first_at - started)
                confirmed = isinstance(kv, dict) and kv.get("outcome") in ("fetched", "local")

        def on_close() -> None:
            if lease is not None and not confirmed:
                self._release_prefilled(lease)

        return RelayStream(worker, path, first, events, response, in_flight, on_usage, on_close)

    def _decode_status_failure(self, job: Job, worker: Worker, r: httpx.Response) -> Exception:
        body = _json_or_text(r)
        if 400 <= r.status_code < 500:
            return WorkerApiError(r.status_code, body)
        err = body.get("error") if isinstance(body, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        if job.lease is not None and code == KV_TRANSFER_FAILED:
            self.metrics.transfer_failures.labels("failed").inc()
            return LegFailure("transfer_failed", WorkerApiError(502, body))
        return LegFailure("http_5xx", WorkerApiError(r.status_code, body))

    def _error_event_failure(self, job: Job, event: dict[str, Any]) -> LegFailure:
        # A streaming decode worker under the 'fail' transfer policy may report the failed
        # transfer as an error event instead of a 502; its error code says so.
        err = event.get("error")
        if job.lease is not None and isinstance(err, dict) and err.get("code") == KV_TRANSFER_FAILED:
            self.metrics.transfer_failures.labels("failed").inc()
            return LegFailure("transfer_failed", WorkerApiError(502, event))
        return LegFailure("error_event", WorkerApiError(502, event))

    def _record_cache(self, worker: Worker, prompt: int, predicted: int, usage: Any) -> int | None:
        """Record the cached prompt tokens the worker reported; returns them (None: not reported)."""
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        actual = details.get("cached_tokens") if isinstance(details, dict) else None
        if not isinstance(actual, int):
            return None
        self.metrics.record_cache(worker.url, prompt, predicted, actual)
        return actual

    def _record_transfer(self, kv: Any, first_chunk_s: float) -> None:
        """Metrics from the decode worker's report (the usage chunk's kv_transfer_params)."""
        if not isinstance(kv, dict):
            return
        outcome = str(kv.get("outcome", "unknown"))
        self.metrics.transfers.labels(outcome).inc()
        if outcome == "recomputed":
            self.metrics.transfer_failures.labels("recomputed").inc()
        nbytes = kv.get("bytes")
        if isinstance(nbytes, (int, float)) and nbytes > 0:
            self.metrics.transfer_bytes.inc(nbytes)
        transfer_s = kv.get("transfer_s")
        transfer_s = float(transfer_s) if isinstance(transfer_s, (int, float)) and transfer_s >= 0 else 0.0
        self.metrics.ttft_transfer.labels("disagg").observe(transfer_s)
        self.metrics.ttft_first_decode.labels("disagg").observe(max(0.0, first_chunk_s - transfer_s))

    def finished(self, job: Job) -> None:
        """The response to the client ended (however it ended)."""
        if job.path is not None:
            self.metrics.e2e.labels(job.path).observe(time.monotonic() - job.arrival)

    # ---- leases and background work ------------------------------------------------------

    def release_lease(self, job: Job) -> None:
        """Release the job's unconsumed lease, if any, in the background (safe to call from a
        cancelled task: the release runs in its own task)."""
        lease, job.lease = job.lease, None
        if lease is not None:
            self._release_prefilled(lease)

    def _release_prefilled(self, pre: Prefilled) -> None:
        """Release a prefill answer's lease in the background; a vLLM prefill worker's answer
        has none (vLLM frees its blocks itself)."""
        if pre.handle is not None:
            self._spawn(self._release(pre.worker, pre.handle.lease_id))

    async def _release(self, worker: Worker, lease_id: str) -> None:
        try:
            r = await self.client.post(f"{worker.url}/kv/release", json={"lease_id": lease_id},
                                       timeout=self.config.health_timeout_s)
            released = r.status_code == 200 and bool(_json_or_text(r).get("released"))
            result = "released" if released else ("gone" if r.status_code == 200 else "failed")
        except (httpx.HTTPError, AttributeError):
            result = "failed"
        if result == "failed":
            # The lease's TTL frees the blocks anyway; this only costs that long.
            log.warning("could not release lease %s on %s", lease_id, worker.url)
        self.metrics.lease_releases.labels(result).inc()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait (bounded) for background releases to finish; called at shutdown."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=CLEANUP_TIMEOUT_S + self.config.health_timeout_s)


class WorkerWentDown(Exception):
    """The health poller marked the worker down while a leg waited on it."""


async def _unless_down(worker: Worker, work: Awaitable[T]) -> T:
    """``await work``, unless ``worker`` goes down first: then the work is cancelled (which
    closes its connection, so a live worker aborts the request) and WorkerWentDown raised, so
    a leg never waits out its timeout for a worker the router has given up on. (``work``
    never yields None here: the posts and first chunks it awaits are values.)"""
    result = await unless(worker.went_down.wait(), work)
    if result is None:
        raise WorkerWentDown(worker.url)
    return result


# A prefill leg may wait at most this many times --prefill-timeout, however much work is ahead.
PREFILL_TIMEOUT_CAP = 4.0
# How many times the expected time a leg may take before it counts as timed out.
PREFILL_TIMEOUT_SLACK = 3.0


def prefill_timeout(base_s: float, tokens_ahead: int, tokens: int, tokens_per_s: float | None) -> float:
    """Seconds a prefill leg of ``tokens`` may take on a worker with ``tokens_ahead`` of the
    router's prompt tokens already in flight there, at the ``tokens_per_s`` its legs have
    taken so far: ``base_s`` (--prefill-timeout) at least, more when that work would take
    longer (3x its expected time), at most 4x ``base_s``. A fixed timeout recomputed a third
    of the prompts on the decode side under load on CPU, doing their prefill twice."""
    if not tokens_per_s or tokens_per_s <= 0:
        return base_s
    expected = (max(0, tokens_ahead) + max(0, tokens)) / tokens_per_s
    return min(PREFILL_TIMEOUT_CAP * base_s, max(base_s, PREFILL_TIMEOUT_SLACK * expected))


def _json_or_text(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return r.text
