"""The router's FastAPI app: the cluster's OpenAI-compatible front door.

``/v1/completions`` and ``/v1/chat/completions`` (streaming or not), ``/v1/models``,
``/health`` (200 while at least one decode-capable worker is healthy, else 503) and
``/metrics``. Requests are validated and tokenized here (:mod:`frontend`), run over the
workers by the :class:`Orchestrator`, and formatted for the client (:mod:`responses`).

Client disconnects: while the router waits for the first token or collects a whole response
it watches the connection, and a client that leaves cancels the work (the worker streams
are closed, which aborts the requests there, and an unconsumed KV lease is released); a
streaming response closes its worker stream however it ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvbaton.api.fanout import Fanout, gather_all
from kvbaton.api.guard import RequestGuard, bearer_matches, install_error_handlers
from kvbaton.api.protocol import ApiError, ChatCompletionRequest, CompletionRequest
from kvbaton.api.server import call_later_threadsafe
from kvbaton.api.sse import EventStreamResponse, sse, until_disconnect, until_stopped
from kvbaton.models.tokenizer import encode_text
from kvbaton.router.config import RouterConfig
from kvbaton.router.frontend import Frontend, Prepared
from kvbaton.router.kv_feed import KVIndexFeed
from kvbaton.router.metrics import CONTENT_TYPE, RouterMetrics, federate
from kvbaton.router.orchestrator import Job, Orchestrator
from kvbaton.router.policies import PrefixOverlap
from kvbaton.router.pool import WorkerPool
from kvbaton.router.relay import MidStreamError, RelayStream
from kvbaton.router.responses import ClientView


class RouterState:
    """What the routes share: config, pool, metrics, frontend, orchestrator, and the KV index
    feed (``kv_feed``: None when an ``overlap`` provider is given or KV events are off)."""

    def __init__(self, config: RouterConfig, tokenizer: Any | None = None,
                 overlap: PrefixOverlap | None = None) -> None:
        self.config = config
        self.pool = WorkerPool(config)
        self.metrics = RouterMetrics(self.pool)
        self.kv_feed: KVIndexFeed | None = None
        if overlap is None and config.kv_events:
            self.kv_feed = KVIndexFeed(self.metrics, config.kv_prediction_ttl_s,
                                       medium_credit=config.medium_credit, kv_secret=config.kv_secret,
                                       remote_ttl_s=config.kv_remote_ttl_s)
            self.metrics.index = self.kv_feed.index
            self.pool.on_discovered.append(self.kv_feed.worker_discovered)
            overlap = self.kv_feed
        self.frontend = Frontend(config, tokenizer)
        # vLLM workers must tokenize as the router does (another model otherwise).
        self.pool.router_ids = lambda text: encode_text(self.frontend.tokenizer, text)
        self.orchestrator = Orchestrator(config, self.pool, self.metrics, overlap)
        self.created = int(time.time())
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the lifespan
        # Set drain_timeout_s after SIGTERM: streams still open then end with an error event and
        # [DONE] (uvicorn's own cut, a little later, would only drop their connections).
        self.drain_deadline = asyncio.Event()

    def begin_drain(self) -> None:
        """Called on SIGTERM (from the signal handler): refuse new requests, report 'draining'
        on /health, and end streams still open after ``drain_timeout_s``."""
        if self.draining:
            return
        self.draining = True
        call_later_threadsafe(self.loop, self.config.drain_timeout_s, self.drain_deadline.set)

    def mid_stream_failure(self, stream: RelayStream, e: MidStreamError) -> None:
        self.metrics.worker_errors.labels(stream.worker.url, e.kind).inc()
        self.metrics.request_failures.labels("mid_stream").inc()


async def _collect(state: RouterState, view: ClientView, job: Job,
                   stream: RelayStream) -> tuple[tuple[dict[str, Any], float], tuple[int, int, int]]:
    """One run's whole choice (and its usage); a stream that breaks is retried (the client
    has seen nothing)."""
    while True:
        try:
            return await view.body(stream), view.run_usage(stream)
        except MidStreamError as e:
            state.metrics.worker_errors.labels(stream.worker.url, e.kind).inc()
            failure = e
        finally:
            await stream.aclose()
        try:
            stream = await state.orchestrator.retry(job, failure.kind)
        except ApiError:
            state.metrics.request_failures.labels("mid_stream").inc()
            raise failure.error from None


async def _open_runs(state: RouterState, jobs: list[Job], fan: Fanout) -> list[RelayStream]:
    """Every run up to its first chunk; one that fails closes those opened and its error is
    the request's. Placement tells the overlap provider at once, so a prompt's runs follow its
    first to one worker, whose in-flight prefix sharing computes the prompt once. With
    dedicated prefill workers the first run of each prompt opens alone first: the others must
    find its imported blocks on the decode worker, not compute the prompt beside the import.
    (Colocated, staging would only delay the others by the first one's prefill.)"""
    opened: dict[int, RelayStream] = {}

    async def run(i: int) -> None:
        opened[i] = await state.orchestrator.open(jobs[i])

    try:
        if fan.k > 1 and state.pool.has_dedicated_prefill():
            await gather_all([run(p * fan.k) for p in range(fan.num_prompts)])
            await gather_all([run(i) for i in range(fan.total) if fan.sample_of(i)])
        else:
            await gather_all([run(i) for i in range(fan.total)])
    except BaseException:
        for s in opened.values():
            await s.aclose()
        raise
    return [opened[i] for i in range(fan.total)]


async def _close_all(streams: list[RelayStream]) -> None:
    for s in streams:
        await s.aclose()


def create_app(config: RouterConfig, tokenizer: Any | None = None,
               overlap: PrefixOverlap | None = None) -> FastAPI:
    """The router app; its lifespan discovers the workers and runs the health poller.
    ``tokenizer`` overrides the one loaded from ``config.model``; ``overlap`` is the
    prefix-overlap provider (default: the KV index fed by the workers' events, or nothing
    cached when ``config.kv_events`` is off)."""
    state = RouterState(config, tokenizer, overlap)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        if state.kv_feed is not None:
            state.kv_feed.start()  # before the pool's first discovery, which follows streams
        try:
            await state.pool.start()
            yield
        finally:
            state.draining = True
            await state.orchestrator.drain()
            await state.pool.stop()
            if state.kv_feed is not None:
                await asyncio.to_thread(state.kv_feed.close)

    app = FastAPI(title="kvbaton router", lifespan=lifespan)
    app.state.router = state
    app.add_middleware(RequestGuard, api_key=config.api_key, max_request_bytes=config.max_request_bytes,
                       body_timeout_s=config.request_body_timeout_s)
    install_error_handlers(app)

    async def serve(request: Request, prep: Prepared, arrival: float) -> Response:
        if state.draining:
            raise ApiError(503, "the router is shutting down", None, "service_unavailable")
        fan, rid = prep.fan, prep.request_id
        jobs = [state.orchestrator.new_job(rid if fan.single else f"{rid}-{i}",
                                           prep.prompts[fan.prompt_of(i)], prep.max_tokens,
                                           prep.run_fields(fan.sample_of(i)), arrival)
                for i in range(fan.total)]
        streams = await until_disconnect(request, _open_runs(state, jobs, fan), _close_all)
        if streams is None:
            return Response(status_code=499)
        view = ClientView(prep)

        def finished() -> None:
            for job in jobs:
                state.orchestrator.finished(job)

        if prep.stream:
            events = view.events(streams, state.mid_stream_failure)

            async def close() -> None:
                await _close_all(streams)
                finished()

            shutdown = sse(ApiError(503, "the router is shutting down", None, "service_unavailable").body())
            return EventStreamResponse(until_stopped(events, state.drain_deadline, shutdown), close)
        try:
            runs = await until_disconnect(request, gather_all(
                [_collect(state, view, job, s) for job, s in zip(jobs, streams)]))
        finally:
            await _close_all(streams)
            finished()
        if runs is None:
            return Response(status_code=499)
        return JSONResponse(view.response([r for r, _ in runs], [u for _, u in runs]))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        prep = await state.frontend.completion(body, state.pool.max_model_len())
        return await serve(request, prep, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        arrival = time.monotonic()
        prep = await state.frontend.chat(body, state.pool.max_model_len())
        return await serve(request, prep, arrival)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": state.created, "owned_by": "kvbaton",
                 "root": config.model, "max_model_len": state.pool.max_model_len()}
                for n in config.model_names
            ],
        }

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        ok = bool(state.pool.decode_candidates())
        status = "draining" if state.draining else ("ok" if ok else "unhealthy")
        if bearer_matches(request.scope.get("headers", ()), config.api_key):
            workers = [w.describe() for w in state.pool.workers]
        else:
            # /health is open (probes carry no key), but where the workers are and what went
            # wrong with them is for callers with the key.
            workers = [{"role": w.role, "healthy": w.healthy} for w in state.pool.workers]
        body = {"status": status, "workers": workers}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        texts = await state.pool.scrape_workers()
        return Response(state.metrics.render(federate(texts)), media_type=CONTENT_TYPE)

    return app
