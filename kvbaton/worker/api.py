"""The worker's FastAPI app: OpenAI-compatible completions and chat, KV routes (info, lease
release, pins in the tiered KV store), health, metrics, debug.

Routes run on the event loop and never touch the engine directly: requests go through
:class:`AsyncEngine`. Token strings for logprobs are decoded here (read-only tokenizer use);
all encoding (prompts, chat templates) happens on the engine thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kvbaton.api.fanout import child_seed, gather_all
from kvbaton.api.frontdoor import Preamble, chat_preamble, completion_preamble, invalid_request, resolve_model
from kvbaton.api.guard import RequestGuard, install_error_handlers
from kvbaton.api.metrics import CONTENT_TYPE
from kvbaton.api.protocol import (
    KV_TRANSFER_FAILED,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    KVPinRequest,
)
from kvbaton.api.server import call_later_threadsafe
from kvbaton.api.sse import EventStreamResponse, until_disconnect
from kvbaton.engine.engine import LLMEngine
from kvbaton.engine.offload import KVOffload
from kvbaton.engine.outputs import RequestOutput
from kvbaton.errors import InvalidRequestError
from kvbaton.kv.handle import KVHandle
from kvbaton.kv.hashing import BlockHash, hash_block_chain
from kvbaton.limits import max_token_chars
from kvbaton.models.tokenizer import chat_template_takes_tools
from kvbaton.sampling_params import SamplingParams
from kvbaton.worker.async_engine import AsyncEngine
from kvbaton.worker.config import WorkerConfig
from kvbaton.worker.kv_connector import KVConnector
from kvbaton.worker.metrics import WorkerMetrics
from kvbaton.worker.stream import (
    EngineDeadError,
    EngineStoppedError,
    GenerationRequest,
    RequestFailedError,
    RequestStream,
)
from kvbaton.worker.streaming import (
    chat_events,
    chat_response,
    completion_events,
    completion_response,
    request_failed_error,
    without_generated,
)


class WorkerState:
    """What the routes share: the async engine, metrics, config and the served names."""

    def __init__(self, engine: LLMEngine, config: WorkerConfig) -> None:
        self.config = config
        names = [config.served_model_name, engine.config.model]
        self.model_names: list[str] = list(dict.fromkeys(n for n in names if n))
        self.metrics = WorkerMetrics(self.model_names[0], lambda: self.engine.stats_snapshot)
        self.engine = AsyncEngine(engine, observer=self.metrics, idle_poll_s=config.idle_poll_s)
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.token_chars = max_token_chars(engine.tokenizer)
        self.root_model = engine.config.model
        # Fixed at construction (the engine builds its tiers once), so routes may read them
        # off the engine thread.
        self.kv_store = engine.offload is not None
        self.block_size = engine.config.block_size
        self.kv_pin_max_ttl_s = engine.config.kv_pin_max_ttl_s
        # A pin first waits (on the engine thread, at most the load timeout) for copies under
        # way; the route waits that long and a little more before it answers 503.
        self.kv_pin_call_timeout_s = max(10.0, engine.config.kv_load_timeout_s + 5.0)
        self.created = int(time.time())
        self.draining = False
        self.worker_id = f"{config.role}-{uuid.uuid4().hex[:12]}"
        self.kv = KVConnector(engine, self.engine, config, self.worker_id, self.metrics.registry)
        # The engine's compiler (thread-safe), so what the routes compile the engine finds.
        self.grammars = engine.structured.compiler
        self.native_tools = chat_template_takes_tools(engine.tokenizer)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def begin_drain(self) -> None:
        """Called on SIGTERM (from any thread): refuse new requests, report 'draining', and
        give in-flight requests ``drain_timeout_s`` to finish before aborting them."""
        if self.draining:
            return
        self.draining = True
        call_later_threadsafe(self.engine.loop, self.config.drain_timeout_s, self.engine.abort_all)


async def _collect(request: Request, streams: list[RequestStream], engine: AsyncEngine) -> list[RequestOutput] | None:
    """Wait for every run's final output; None (and the runs aborted) if the client left first."""

    async def last(stream: RequestStream) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        assert final is not None  # a stream ends with a finished output or raises
        return final

    try:
        return await until_disconnect(request, gather_all([last(s) for s in streams]))
    finally:
        for s in streams:
            engine.abort(s.request_id)  # no-op unless still running


async def _start(state: WorkerState, req: GenerationRequest, rid: str, pre: Preamble) -> RequestStream:
    if state.draining:
        raise ApiError(503, "the worker is shutting down", None, "service_unavailable")
    try:
        return await state.engine.add_request(req, rid)
    except InvalidRequestError as e:
        raise pre.error(e) from None
    except (EngineDeadError, EngineStoppedError) as e:
        raise ApiError(503, str(e), None, "service_unavailable") from None


async def _check_constraint(state: WorkerState, pre: Preamble) -> None:
    """Compile the request's output constraint (or its tools' schemas) off the event loop and
    off the engine thread, which then finds it compiled; a 400 naming the field if it does
    not compile."""
    so = pre.constraint_to_check()
    if so is not None:
        try:
            await asyncio.to_thread(state.grammars.check, so)
        except InvalidRequestError as e:
            raise pre.error(e) from None


def _run_params(pre: Preamble, sample: int) -> SamplingParams:
    """The params of one run of a fanned-out request (:mod:`kvbaton.api.fanout`): its own
    seed, and logprobs kept when ``best_of`` ranks the candidates by them."""
    params = pre.params
    if pre.fan.k == 1:
        return params
    logprobs = params.logprobs
    if logprobs is None and pre.fan.k > pre.fan.n:
        logprobs = 0
    return dataclasses.replace(params, seed=child_seed(params.seed, sample), logprobs=logprobs)


async def _start_runs(state: WorkerState, pre: Preamble, rid: str,
                      gen: Callable[[int, SamplingParams], GenerationRequest]) -> list[RequestStream]:
    """Start every run of the request (``gen(prompt, params)`` builds one) at once: the
    engine's in-flight prefix sharing has a prompt's other runs wait for the blocks its first
    admitted run computes, then find them cached. A run refused aborts the others."""
    fan = pre.fan
    if fan.single:
        return [await _start(state, gen(0, pre.params), rid, pre)]
    started: list[RequestStream] = []

    async def run(i: int) -> RequestStream:
        stream = await _start(state, gen(fan.prompt_of(i), _run_params(pre, fan.sample_of(i))),
                              f"{rid}-{i}", pre)
        started.append(stream)
        return stream

    try:
        return await gather_all([run(i) for i in range(fan.total)])
    except BaseException:
        for s in started:
            state.engine.abort(s.request_id)
        raise


async def _respond(
    request: Request, state: WorkerState, streams: list[RequestStream], streaming: bool | None,
    events: Callable[[], AsyncIterator[str]], body: Callable[[list[RequestOutput]], dict[str, Any]],
) -> Response:
    """SSE events when streaming, else the final outputs as one JSON body (499 if the client
    left first); either way the runs still running when we finish are aborted."""

    def abort() -> None:
        for s in streams:
            state.engine.abort(s.request_id)

    if streaming:
        return EventStreamResponse(events(), abort)
    finals = await _collect(request, streams, state.engine)
    if finals is None:
        return Response(status_code=499)
    return JSONResponse(body(finals))


async def _prefill_only(request: Request, state: WorkerState, body: CompletionRequest,
                        pre: Preamble, rid: str) -> Response:
    """Run the prompt, sample the first token, and answer with a KV handle (the blocks stay
    leased for the decode worker)."""
    if state.config.role == "decode":
        raise ApiError(400, "kv_transfer_params: this is a decode worker; send prefill-only "
                       "requests to a prefill worker", "kv_transfer_params", "invalid_value")
    if body.stream:
        raise ApiError(400, "stream: a prefill-only request (do_remote_decode) answers once; "
                       "set stream to false", "stream", "invalid_value")
    # One token: min_tokens holds only that one back (the decode side holds the rest).
    one = dataclasses.replace(pre.params, max_tokens=1, min_tokens=min(pre.params.min_tokens, 1))
    gen = GenerationRequest(one, prompt=pre.prompt, cache_salt=body.cache_salt,
                            lease_ttl_s=state.engine.engine.leases.default_ttl_s)
    stream = await _start(state, gen, rid, pre)
    finals = await _collect(request, [stream], state.engine)
    if finals is None:
        last = stream.latest
        if last is not None and last.kv_lease is not None:  # it finished as the client left
            state.engine.engine.release_lease(last.kv_lease.lease_id)
        return Response(status_code=499)
    final = finals[0]
    if final.kv_lease is None:  # aborted (drain) before the prompt finished
        raise ApiError(503, "the prefill was aborted", None, "service_unavailable")
    handle = state.kv.handle_for(final)
    return JSONResponse(completion_response(state, rid, finals, body, pre.model, pre.fan,
                                            {"kv_transfer_params": handle}))


async def _with_handle(state: WorkerState, body: CompletionRequest, pre: Preamble, rid: str,
                       ktp: dict[str, Any]) -> tuple[GenerationRequest, dict[str, Any]]:
    """A decode request with a KV handle: import the prompt's KV (or, if that fails, recompute
    it here or refuse, by policy) and continue after the first token."""
    if state.config.role == "prefill":
        raise ApiError(400, "kv_transfer_params: this is a prefill worker; it does not import "
                       "KV", "kv_transfer_params", "invalid_value")
    try:
        handle = KVHandle.from_dict(ktp)
    except ValueError as e:
        raise ApiError(400, str(e), "kv_transfer_params", "invalid_value") from None
    prompt, params = pre.prompt, pre.params
    if not isinstance(prompt, list):
        raise ApiError(400, "prompt: a request with a KV handle must send the prompt as token "
                       "ids", "prompt", "invalid_type")
    if params.max_tokens < 2:
        raise ApiError(400, "max_tokens: must be >= 2 with a KV handle (the prefill worker "
                       "already sampled the first token)", "max_tokens", "invalid_value")
    if state.draining:
        raise ApiError(503, "the worker is shutting down", None, "service_unavailable")
    first = (handle.first_token_id, handle.first_token_logprob)
    try:
        res = await state.kv.import_kv(rid, prompt, handle, body.cache_salt)
    except InvalidRequestError as e:
        raise pre.error(e) from None
    if res.plan is not None:
        gen = GenerationRequest(params, prompt=prompt, cache_salt=body.cache_salt,
                                first_token=first, imported=True)
        return gen, {"kv_transfer_params": res.report()}
    if state.config.kv_transfer_failure == "fail":
        state.kv.count_failure(recomputed=False)
        raise ApiError(502, f"KV transfer failed: {res.error}", "kv_transfer_params",
                       KV_TRANSFER_FAILED)
    state.kv.count_failure(recomputed=True)
    res.outcome = "recomputed"
    gen = GenerationRequest(params, prompt=prompt, cache_salt=body.cache_salt, first_token=first)
    return gen, {"kv_transfer_params": res.report()}


# Error codes of the pin routes: a worker without tiers (param null: no field of the request
# is wrong), and a prefix of which not one block is cached here.
KV_STORE_DISABLED = "kv_store_disabled"
UNKNOWN_PREFIX = "unknown_prefix"


def _require_kv_store(state: WorkerState) -> None:
    """The pin routes' first check: a worker without tiers has nothing to pin in."""
    if not state.kv_store:
        raise ApiError(400, "this worker has no tiered KV store to pin in: start it with "
                       "--kv-host-cache-gib N or --kv-disk-cache-dir DIR (and prefix caching on)",
                       None, KV_STORE_DISABLED)


async def _on_prefix(state: WorkerState, body: KVPinRequest,
                     op: Callable[[KVOffload, list[BlockHash], list[int]], int]) -> tuple[int, int]:
    """Run ``op(offload, hashes, token_ids)`` on the engine thread over the full-block hashes
    of ``body``'s prefix (tokenized or templated there, like a generation request, and
    chained from the engine's root for its ``cache_salt``): ``(op's result, the prefix's full
    blocks)``. 400s name the field that holds the prefix."""
    resolve_model(body.model, state.model_names, "worker")
    prompt, messages = body.prefix(state.native_tools)
    param, salt, bs = body.prompt_param, body.cache_salt, state.block_size

    def run(eng: LLMEngine) -> tuple[int, int]:
        if messages is not None:
            ids = eng.apply_chat_template(messages)
        elif isinstance(prompt, str):
            ids = eng.tokenize(prompt)
        else:
            assert prompt is not None
            ids = prompt
            vocab = eng.model_config.vocab_size
            if any(t < 0 or t >= vocab for t in ids):
                raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab})")
        if len(ids) < bs:
            raise InvalidRequestError("prompt", f"has {len(ids)} tokens, shorter than one KV block "
                                      f"({bs} tokens): only full blocks are cached")
        hashes = hash_block_chain(eng.root_hash(salt), ids, bs)
        assert eng.offload is not None  # state.kv_store said so
        return op(eng.offload, hashes, ids), len(hashes)

    try:
        return await state.engine.call(run, timeout_s=state.kv_pin_call_timeout_s)
    except InvalidRequestError as e:
        raise invalid_request(e, {}, param) from None
    except TimeoutError:
        raise ApiError(503, "the engine did not answer in time", None, "service_unavailable") from None


def _load(stats: dict[str, Any]) -> dict[str, int]:
    """The engine's load as /health reports it (from the engine thread's last snapshot)."""
    keys = (("num_requests_running", "num_running"), ("num_requests_waiting", "num_waiting"),
            ("kv_blocks_used", "kv_blocks_used"), ("kv_blocks_total", "kv_blocks_total"))
    return {name: int(stats.get(key, 0)) for name, key in keys}


def create_app(engine: LLMEngine, config: WorkerConfig) -> FastAPI:
    """The worker app; its lifespan starts and stops the engine thread."""
    state = WorkerState(engine, config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            # The connector first: it attaches the KV event sink before the engine thread runs.
            state.kv.start()
            state.engine.start()
            yield
        finally:
            state.draining = True
            state.kv.stop()
            await state.engine.stop()

    app = FastAPI(title="kvbaton worker", lifespan=lifespan)
    app.state.worker = state
    app.add_middleware(RequestGuard, api_key=config.api_key, max_request_bytes=config.max_request_bytes,
                       body_timeout_s=config.request_body_timeout_s)
    install_error_handlers(app)

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineStoppedError)
    async def _engine_gone(_: Request, exc: Exception) -> JSONResponse:
        err = ApiError(503, str(exc), None, "service_unavailable")
        return JSONResponse(err.body(), status_code=503)

    @app.exception_handler(RequestFailedError)
    async def _request_failed(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(request_failed_error(exc).body(), status_code=500)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        pre = completion_preamble(config, state.model_names, "worker", body)
        pre.check_length_before_tokenizing(state.max_model_len, state.token_chars)
        rid = f"cmpl-{uuid.uuid4().hex}"
        await _check_constraint(state, pre)
        ktp = body.kv_transfer_params
        if ktp is not None and not pre.fan.single:
            raise ApiError(400, "kv_transfer_params: a disaggregated request carries one prompt and "
                           "n=1 (a router fans n and batches out into such requests)",
                           "kv_transfer_params", "invalid_value")
        if ktp is not None and ktp.get("do_remote_decode"):
            return await _prefill_only(request, state, body, pre, rid)
        extras: dict[str, Any] | None = None
        if ktp is not None:
            handled, extras = await _with_handle(state, body, pre, rid, ktp)
            streams = [await _start(state, handled, rid, pre)]
        else:
            streams = await _start_runs(state, pre, rid, lambda p, params: GenerationRequest(
                params, prompt=pre.prompts[p], cache_salt=body.cache_salt))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _respond(
            request, state, streams, body.stream,
            lambda: completion_events(state, rid, streams, body, pre.model, pre.fan, pre.params,
                                      include_usage, extras, pre.prompt_only),
            lambda finals: completion_response(
                state, rid, [without_generated(f) for f in finals] if pre.prompt_only else finals,
                body, pre.model, pre.fan, extras),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        pre = chat_preamble(config, state.model_names, "worker", body, state.native_tools)
        pre.check_length_before_tokenizing(state.max_model_len, state.token_chars)
        default = config.default_chat_max_tokens if pre.max_tokens is None else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        await _check_constraint(state, pre)
        tools = pre.tools if pre.parses_tool_calls else None
        streams = await _start_runs(state, pre, rid, lambda _, params: GenerationRequest(
            params, messages=pre.messages, cache_salt=body.cache_salt, default_max_tokens=default,
            tools=pre.template_tools))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await _respond(
            request, state, streams, body.stream,
            lambda: chat_events(state, rid, streams, body, pre.model, pre.fan, pre.params, include_usage, tools),
            lambda finals: chat_response(state, rid, finals, body, pre.model, pre.fan, tools),
        )

    @app.get("/kv/info")
    async def kv_info() -> dict[str, Any]:
        return state.kv.info()

    @app.post("/kv/release")
    async def kv_release(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            body = None
        lease_id = body.get("lease_id") if isinstance(body, dict) else None
        if not isinstance(lease_id, str):
            raise ApiError(400, "lease_id: required string", "lease_id", "invalid_value")
        return {"released": state.engine.engine.release_lease(lease_id)}

    @app.post("/kv/pin")
    async def kv_pin(body: KVPinRequest) -> dict[str, Any]:
        """Keep a cached prefix in the KV tiers (copied down from the device if need be) for
        ``ttl_s`` seconds: eviction and TTL expiry pass over it until then."""
        _require_kv_store(state)
        ttl = body.pin_ttl(state.kv_pin_max_ttl_s)
        # (KVOffload.pin first lets copies already under way land: the blocks of a request
        # that just ended are usually still on their way down.)
        n, blocks = await _on_prefix(state, body, lambda off, hashes, ids: off.pin(hashes, ids, ttl))
        if n == 0:
            param = body.prompt_param
            raise ApiError(400, f"{param}: none of this prefix's {blocks} KV block(s) is cached on this "
                           "worker (run it once, then pin it)", param, UNKNOWN_PREFIX)
        return {"pinned_blocks": n, "pinned_tokens": n * state.block_size, "ttl_s": ttl,
                "prefix_blocks": blocks}

    @app.post("/kv/unpin")
    async def kv_unpin(body: KVPinRequest) -> dict[str, Any]:
        """End the pins on a prefix now (its blocks become evictable again); idempotent."""
        _require_kv_store(state)
        n, _ = await _on_prefix(state, body, lambda off, hashes, ids: off.unpin(hashes))
        return {"unpinned_blocks": n}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": n, "object": "model", "created": state.created, "owned_by": "kvbaton",
                    "root": state.root_model, "max_model_len": state.max_model_len,
                    "role": config.role,
                }
                for n in state.model_names
            ],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        healthy = state.engine.is_healthy(config.heartbeat_timeout_s)
        status = "draining" if state.draining else ("ok" if healthy else "unhealthy")
        body = {
            "status": status, "role": config.role, "model": state.model_names[0],
            "engine_heartbeat_age_s": round(state.engine.heartbeat_age(), 3),
            # Routers poll /health: the id tells them this worker restarted (its cache is
            # empty) even between two polls, and the load corrects their own estimates.
            "worker_id": state.worker_id, "load": _load(state.engine.stats_snapshot),
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/debug/engine")
    async def debug_engine() -> dict[str, Any]:
        def probe(eng: LLMEngine) -> dict[str, Any]:
            try:
                eng.check_integrity()
                integrity: str | None = None
            except AssertionError as e:
                integrity = str(e) or "integrity check failed"
            return {"stats": eng.stats(), "integrity_error": integrity}

        try:
            result = await state.engine.call(probe)
        except (TimeoutError, EngineDeadError, EngineStoppedError) as e:
            raise ApiError(503, f"engine unavailable: {e!r}", None, "service_unavailable") from None
        result["num_streams"] = state.engine.num_streams
        result["role"] = config.role
        return result

    return app
