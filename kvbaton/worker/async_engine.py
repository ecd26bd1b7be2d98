"""AsyncEngine: an :class:`LLMEngine` on its own thread, served to asyncio
(docs/architecture.md, "Processes and threads").

The engine is not thread-safe, so exactly one thread (the engine loop) ever touches it. The
asyncio side sends commands (add, abort, call) through a thread-safe queue; the engine loop
posts results back with ``loop.call_soon_threadsafe`` once per step, so waking the event loop
costs one call per step however many requests are streaming.

Every loop iteration stamps a heartbeat and publishes a stats snapshot, which ``/health`` and
``/metrics`` read without disturbing the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from kvbaton.engine.engine import LLMEngine
from kvbaton.engine.outputs import RequestOutput
from kvbaton.limits import default_max_tokens
from kvbaton.models.tokenizer import chat_prompt_ids, copy_tokenizer, encode_text
from kvbaton.worker.stream import (
    EngineDeadError,
    EngineStoppedError,
    GenerationRequest,
    RequestFailedError,
    RequestStream,
    StreamObserver,
)

__all__ = [
    "AsyncEngine", "EngineDeadError", "EngineStoppedError", "GenerationRequest", "RequestFailedError",
    "RequestStream", "StreamObserver",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Add:
    request_id: str
    request: GenerationRequest
    future: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any] | None  # None: fire and forget (``post``)


class _Stop:
    pass


_Command = _Add | _Abort | _Call | _Stop


class AsyncEngine:
    """Runs ``engine`` on a dedicated thread; every public method is called from asyncio."""

    def __init__(
        self,
        engine: LLMEngine,
        observer: StreamObserver | None = None,
        idle_poll_s: float = 0.2,
    ) -> None:
        self.engine = engine
        engine.incremental_detokenize = True  # streaming needs text after every step
        self.observer = observer
        self.idle_poll_s = idle_poll_s
        self.stats_snapshot: dict[str, Any] = engine.stats()
        self.last_heartbeat = time.monotonic()
        self.error: BaseException | None = None
        # Called on the event loop once the engine loop has died (run_worker stops the server,
        # so the process exits non-zero instead of answering 503 for ever).
        self.on_death: Callable[[BaseException], None] | None = None
        self._cmds: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._live: set[str] = set()  # engine-thread view: requests added and not finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accepting = False
        # Text prompts and chats are tokenized on a thread of their own, with a copy of the
        # tokenizer (never shared with the engine thread, which decodes with its own), so a
        # long prompt costs its tokenization time there and never stalls the steps of the
        # requests already running. The encoders release the GIL.
        self._tokenizer = copy_tokenizer(engine.tokenizer)
        self._tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="kvbaton-tokenize")

    # ---- lifecycle (event loop side) -------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread, bound to the running event loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="kvbaton-engine", daemon=True)
        self._accepting = True
        self._thread.start()

    async def stop(self, timeout_s: float = 10.0) -> bool:
        """Abort whatever still runs, stop the engine thread; True if it ended in time."""
        self._accepting = False
        if self._thread is None:
            return True
        self._cmds.put(_Stop())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join, timeout_s)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        # Outputs the thread posted just before it ended (final aborts) run before this line.
        await asyncio.sleep(0)
        return not self._thread.is_alive()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    @property
    def thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def accepting(self) -> bool:
        return self._accepting and self.error is None

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    def is_healthy(self, heartbeat_timeout_s: float) -> bool:
        """The engine thread is alive, has not crashed and ran a loop iteration recently."""
        return (
            self.thread_alive
            and self.error is None
            and time.monotonic() - self.last_heartbeat < heartbeat_timeout_s
        )

    def heartbeat_age(self) -> float:
        return time.monotonic() - self.last_heartbeat

    # ---- requests (event loop side) --------------------------------------------------------

    def _check_accepting(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"engine loop died: {self.error!r}")
        if not self._accepting or self._loop is None:
            raise EngineStoppedError("the engine is not accepting requests")

    async def add_request(
        self, request: GenerationRequest, request_id: str | None = None
    ) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it.

        Raises ``ValueError`` (from the engine's checks) for a request that can never run.
        """
        self._check_accepting()
        assert self._loop is not None
        rid = request_id or f"req-{uuid.uuid4().hex}"
        if rid in self._streams:
            raise ValueError(f"duplicate request id {rid!r}")
        stream = RequestStream(rid, time.monotonic())
        self._streams[rid] = stream
        try:
            request = await self._tokenized(request)
        except BaseException:
            self._streams.pop(rid, None)
            raise
        fut: asyncio.Future[None] = self._loop.create_future()
        self._cmds.put(_Add(rid, request, fut))
        try:
            await fut
        except asyncio.CancelledError:
            self.abort(rid)  # the add may already have happened
            raise
        except BaseException:
            self._streams.pop(rid, None)
            raise
        return stream

    async def _tokenized(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its text prompt or chat turned into token ids on the tokenizer
        thread (InvalidRequestError as the engine would raise it); unchanged when it already
        carries ids, or when there is no private tokenizer (then the engine tokenizes)."""
        if self._tokenizer is None or (request.messages is None and not isinstance(request.prompt, str)):
            return request
        tok, model = self._tokenizer, self.engine.config.model
        messages, text, tools = request.messages, request.prompt, request.tools

        def encode() -> list[int]:
            if messages is not None:
                return chat_prompt_ids(tok, messages, model, tools)
            assert isinstance(text, str)
            return encode_text(tok, text)

        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(self._tokenize_pool, encode)
        return dataclasses.replace(request, prompt=ids, messages=None)

    def abort(self, request_id: str) -> bool:
        """Abort a request the client gave up on; idempotent. Its blocks are freed."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return False
        stream.finished = True
        stream.finish_reason = "abort"
        if self.observer is not None:
            self.observer.on_abort(stream, time.monotonic())
        self._cmds.put(_Abort(request_id))
        return True

    def abort_all(self) -> int:
        """Abort every in-flight request on the server's behalf (drain timeout): each stream
        ends with a final output whose finish_reason is 'abort'. Returns how many."""
        rids = list(self._streams)
        for rid in rids:
            self._cmds.put(_Abort(rid))
        self._dispatch_aborted(rids, time.monotonic())
        return len(rids)

    def post(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Run ``fn(engine)`` on the engine thread soon, without waiting (cleanups that must
        happen even from a cancelled coroutine). Errors are logged."""

        def run(eng: LLMEngine) -> None:
            try:
                fn(eng)
            except Exception:  # noqa: BLE001
                log.exception("posted engine call failed")

        self._cmds.put(_Call(run, None))

    async def call(self, fn: Callable[[LLMEngine], T], timeout_s: float = 10.0) -> T:
        """Run ``fn(engine)`` on the engine thread between steps and return its result."""
        self._check_accepting()
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._cmds.put(_Call(fn, fut))
        return await asyncio.wait_for(fut, timeout_s)

    # ---- event loop callbacks (posted by the engine thread) --------------------------------

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted by its client meanwhile
                if out.kv_lease is not None:
                    # The prompt finished just as its client left: nobody will fetch the KV,
                    # so free it now instead of at the lease's TTL.
                    self.engine.release_lease(out.kv_lease.lease_id)
                continue
            if self.observer is not None:
                self.observer.on_output(stream, out, now)
            stream.latest = out
            if out.new_token_ids:
                if stream.first_token_time is None:
                    stream.first_token_time = now
                stream.last_token_time = now
                stream.num_output_tokens = len(out.token_ids)
            if out.finished:
                stream.finished = True
                stream.finish_reason = out.finish_reason
                del self._streams[out.request_id]
            if out.finish_reason == "error":
                stream._push(RequestFailedError(out.error or "the engine step running this request failed"))
            else:
                stream._push(out)

    def _dispatch_aborted(self, request_ids: list[str], now: float) -> None:
        """The engine thread aborted these (shutdown): end their streams with 'abort'."""
        outs = []
        for rid in request_ids:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            last = stream.latest
            outs.append(RequestOutput(
                request_id=rid,
                prompt=last.prompt if last else None,
                prompt_token_ids=last.prompt_token_ids if last else [],
                token_ids=list(last.token_ids) if last else [],
                text=last.text if last else "",
                finished=True,
                finish_reason="abort",
                num_cached_tokens=last.num_cached_tokens if last else 0,
                logprobs=last.logprobs if last else None,
                top_logprobs=last.top_logprobs if last else None,
            ))
        self._dispatch(outs, now)

    def _fail_all(self, exc: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.finished = True
            stream.finish_reason = "error"
            stream._push(exc)
        self._streams.clear()

    @staticmethod
    def _resolve(fut: asyncio.Future[Any] | None, result: Any = None, exc: BaseException | None = None) -> None:
        if fut is None or fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    # ---- the engine thread -----------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        eng = self.engine
        try:
            while True:
                self.last_heartbeat = time.monotonic()
                if not self._handle_commands(block=not eng.has_unfinished_requests()):
                    break
                if eng.has_unfinished_requests():
                    outputs = eng.step()  # collects ended leases first
                else:
                    # Released or expired leases free their blocks even when nothing runs.
                    eng.collect_leases()
                    outputs = []
                # Publish stats before the outputs, so a client that saw its request end
                # never reads a snapshot from before that step.
                self.stats_snapshot = eng.stats()
                if outputs:
                    for out in outputs:
                        if out.finished:
                            self._live.discard(out.request_id)
                    self._post(self._dispatch, outputs, time.monotonic())
        except BaseException as e:  # noqa: BLE001 - a crashed loop must be reported, not lost
            log.exception("engine loop crashed")
            self.error = e
            self._post(self._fail_all, EngineDeadError(f"engine loop died: {e!r}"))
            if self.on_death is not None:
                self._post(self.on_death, e)
        finally:
            self._shutdown_engine_thread()

    def _shutdown_engine_thread(self) -> None:
        aborted = []
        for rid in sorted(self._live):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - keep aborting the rest
                log.exception("abort of %s failed during shutdown", rid)
            aborted.append(rid)
        self._live.clear()
        if aborted:
            self._post(self._dispatch_aborted, aborted, time.monotonic())
        # Whatever was still queued will never run: tell its waiters.
        stopped = EngineStoppedError("the engine stopped")
        while True:
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, (_Add, _Call)):
                if cmd.future is not None:
                    self._post(self._resolve, cmd.future, None, stopped)
        try:
            self.stats_snapshot = self.engine.stats()
        except Exception:  # noqa: BLE001
            pass

    def _handle_commands(self, block: bool) -> bool:
        """Run queued commands; False when asked to stop."""
        try:
            cmd = self._cmds.get(timeout=self.idle_poll_s) if block else self._cmds.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(cmd, _Stop):
                return False
            self._execute(cmd)
            try:
                cmd = self._cmds.get_nowait()
            except queue.Empty:
                return True

    def _execute(self, cmd: _Command) -> None:
        eng = self.engine
        if isinstance(cmd, _Abort):
            if cmd.request_id in self._live:
                self._live.discard(cmd.request_id)
                eng.abort_request(cmd.request_id)
        elif isinstance(cmd, _Add):
            try:
                self._add(cmd.request_id, cmd.request)
            except Exception as e:  # noqa: BLE001 - reported to the caller, engine stays up
                self._post(self._resolve, cmd.future, None, e)
            else:
                self._post(self._resolve, cmd.future, None, None)
        elif isinstance(cmd, _Call):
            try:
                result = cmd.fn(eng)
            except Exception as e:  # noqa: BLE001
                self._post(self._resolve, cmd.future, None, e)
            else:
                self._post(self._resolve, cmd.future, result, None)

    def _add(self, request_id: str, req: GenerationRequest) -> None:
        eng = self.engine
        prompt: str | list[int]
        if req.messages is not None:
            prompt = eng.apply_chat_template(req.messages, req.tools)
        elif req.prompt is not None:
            prompt = req.prompt
        else:
            raise ValueError("prompt is empty")
        params = req.params
        if req.default_max_tokens is not None:
            if isinstance(prompt, str):
                prompt = eng.tokenize(prompt)
            capacity = eng.pool.num_blocks * eng.config.block_size
            max_tokens = default_max_tokens(req.default_max_tokens, len(prompt), eng.max_model_len, capacity)
            params = dataclasses.replace(params, max_tokens=max_tokens)
        if req.imported:
            assert req.first_token is not None
            eng.commit_import(request_id, params, req.first_token)
        else:
            eng.add_request(
                prompt, params, request_id, req.cache_salt,
                lease_ttl_s=req.lease_ttl_s, first_token=req.first_token,
            )
        self._live.add(request_id)
