"""Fake workers for the router tests: small FastAPI apps that speak the worker<->router
contract (``/kv/info``, ``/health``, prefill answers with a KV handle, decode streams whose
usage chunk carries ``kv_transfer_params``) and can be told to fail in each way the router
must survive. They record what they were sent, ``/kv/release`` calls and aborted streams.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from conftest import free_port
from kvbaton.api.server import AppThread
from kvbaton.api.sse import sse
from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.models.tokenizer import byte_tokenizer
from kvbaton.router.config import RouterConfig
from kvbaton.router.server import RouterThread

FINGERPRINT = "fake-fingerprint"
BLOCK_SIZE = 4
TRANSFER_S = 0.005
TRANSFER_BYTES = 4096
_TOKENIZER: Any = None


def tokenizer() -> Any:
    """The byte tokenizer (what ``--model tiny-random`` loads), built once per session."""
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = byte_tokenizer()
    return _TOKENIZER


def token_text(i: int) -> str:
    return f"t{i} "


def expected_text(n: int) -> str:
    return "".join(token_text(i) for i in range(n))


class FakeWorker:
    """One fake worker. Set the fault attributes at any time (tests run it in a thread):

    ``decode_fault``: None, ``"500"``, ``"502"``, ``"400"``, ``"hang"`` (no answer),
    ``"error_event"`` (an error event instead of a first token), ``"transfer_event"`` (one
    that says the KV transfer failed), ``"drop"`` (close the
    stream after ``drop_after`` chunks), ``"stall"`` (stop sending after ``drop_after``
    chunks). ``prefill_fault``: None, ``"500"``, ``"400"``, ``"hang"``, ``"bad_handle"``,
    ``"finish"`` (the first token ends the request). ``healthy`` drives ``/health``;
    ``chunk_delay_s`` slows the decode stream.
    """

    def __init__(self, role: str = "both", name: str = "w", transfer: bool = True,
                 max_model_len: int = 4096) -> None:
        self.role = role
        self.name = name
        self.transfer = transfer
        self.max_model_len = max_model_len
        self.healthy = True
        self.decode_fault: str | None = None
        self.prefill_fault: str | None = None
        self.drop_after = 2
        self.chunk_delay_s = 0.0
        self.prefill_delay_s = 0.0
        self.transfer_outcome = "fetched"  # what the usage chunk reports for a handle
        self.lock = threading.Lock()
        self.prefills: list[dict[str, Any]] = []
        self.decodes: list[dict[str, Any]] = []
        self.releases: list[str] = []
        self.leases: list[str] = []
        self.aborted = 0
        self.completed = 0
        self.app = self._build()
        self.thread = AppThread(self.app)

    @property
    def url(self) -> str:
        return self.thread.url

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {"prefills": len(self.prefills), "decodes": len(self.decodes),
                    "releases": len(self.releases), "aborted": self.aborted, "completed": self.completed}

    # ---- the app -------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/kv/info")
        async def kv_info() -> dict[str, Any]:
            return {"worker_id": f"{self.name}-id", "role": self.role, "model": "fake-model",
                    "model_fingerprint": FINGERPRINT, "block_size": BLOCK_SIZE,
                    "transfer_address": ["127.0.0.1", 9] if self.transfer else None}

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": "fake-model", "object": "model", "role": self.role,
                                                 "max_model_len": self.max_model_len}]}

        @app.get("/health")
        async def health() -> JSONResponse:
            return JSONResponse({"status": "ok" if self.healthy else "unhealthy"},
                                status_code=200 if self.healthy else 503)

        @app.post("/kv/release")
        async def release(request: Request) -> dict[str, Any]:
            lease = (await request.json())["lease_id"]
            with self.lock:
                first = lease not in self.releases
                self.releases.append(lease)
            return {"released": first}

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            body = await request.json()
            kv = body.get("kv_transfer_params") or {}
            if kv.get("do_remote_decode"):
                return await self._prefill(body)
            return await self._decode(body)

        return app

    def _error(self, status: int, message: str) -> JSONResponse:
        # A 502 is what a decode worker answers when the KV fetch failed under --kv-transfer-failure fail.
        code = "invalid_value" if status < 500 else "kv_transfer_failed" if status == 502 else "server_error"
        return JSONResponse({"error": {"message": message, "type": "x", "param": "prompt" if status < 500 else None,
                                       "code": code}}, status_code=status)

    async def _prefill(self, body: dict[str, Any]) -> Any:
        with self.lock:
            self.prefills.append(body)
        fault = self.prefill_fault
        if self.prefill_delay_s:
            await asyncio.sleep(self.prefill_delay_s)
        if fault == "hang":
            await asyncio.sleep(3600)
        if fault in ("500", "400"):
            return self._error(int(fault), f"fake prefill {fault}")
        prompt = body["prompt"]
        lease = f"lease-{uuid.uuid4().hex[:8]}"
        with self.lock:
            self.leases.append(lease)
        hashes = hash_block_chain(root_hash(FINGERPRINT, body.get("cache_salt")), prompt, BLOCK_SIZE)
        finish = "stop" if fault == "finish" else None
        handle: dict[str, Any] = {
            "do_remote_prefill": True, "remote_engine_id": f"{self.name}-id", "remote_host": "127.0.0.1",
            "remote_port": 9, "lease_id": lease, "lease_ttl_s": 30.0, "model_fingerprint": FINGERPRINT,
            "block_size": BLOCK_SIZE, "block_hashes": [h.hex() for h in hashes],
            "num_prompt_tokens": len(prompt), "tail_tokens": len(prompt) % BLOCK_SIZE,
            "first_token_id": 116, "first_token_logprob": -0.5, "finish_reason": finish,
        }
        if fault == "bad_handle":
            handle = {"lease_id": lease, "block_hashes": "nope"}
        choice = {"index": 0, "text": token_text(0), "logprobs": None,
                  "finish_reason": "stop" if finish else "length"}
        if body.get("logprobs") is not None:
            choice["logprobs"] = _lp(0, 0, body["logprobs"])
        usage = {"prompt_tokens": len(prompt), "completion_tokens": 1, "total_tokens": len(prompt) + 1,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake-model",
                "choices": [choice], "usage": usage, "kv_transfer_params": handle}

    async def _decode(self, body: dict[str, Any]) -> Any:
        with self.lock:
            self.decodes.append(body)
        fault = self.decode_fault
        if fault == "hang":
            await asyncio.sleep(3600)
        if fault in ("500", "502", "400"):
            return self._error(int(fault), f"fake decode {fault}")
        return StreamingResponse(self._stream(body, fault), media_type="text/event-stream")

    async def _stream(self, body: dict[str, Any], fault: str | None) -> Any:
        n = body["max_tokens"]
        prompt = body["prompt"]
        handle = body.get("kv_transfer_params")
        done = False
        offset = 0
        try:
            if fault in ("error_event", "transfer_event"):
                transfer = fault == "transfer_event"
                message = "fake KV transfer failed" if transfer else "fake engine died"
                code = "kv_transfer_failed" if transfer else "service_unavailable"
                yield sse({"error": {"message": message, "type": "server_error", "param": None,
                                     "code": code}})
                yield "data: [DONE]\n\n"
                done = True
                return
            for i in range(n):
                if fault in ("drop", "stall") and i == self.drop_after:
                    if fault == "stall":
                        await asyncio.sleep(3600)
                    done = True
                    return  # the connection ends without [DONE]
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                last = i == n - 1
                choice: dict[str, Any] = {"index": 0, "text": token_text(i), "logprobs": None,
                                          "finish_reason": "length" if last else None}
                if body.get("logprobs") is not None:
                    choice["logprobs"] = _lp(i, offset, body["logprobs"])
                if body.get("return_token_ids"):
                    choice["token_ids"] = [100 + i]
                if last:
                    choice["stop_reason"] = None
                offset += len(token_text(i))
                yield sse({"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake-model",
                           "choices": [choice], "usage": None})
            usage_chunk: dict[str, Any] = {
                "id": "cmpl-fake", "object": "text_completion", "created": 0, "model": "fake-model",
                "choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                                         "total_tokens": len(prompt) + n,
                                         "prompt_tokens_details": {"cached_tokens": 0}},
            }
            if handle is not None:
                usage_chunk["kv_transfer_params"] = {"outcome": self.transfer_outcome, "blocks_fetched": 3,
                                                     "bytes": TRANSFER_BYTES, "transfer_s": TRANSFER_S,
                                                     "error": None}
            yield sse(usage_chunk)
            yield "data: [DONE]\n\n"
            done = True
        finally:
            with self.lock:
                if done:
                    self.completed += 1
                else:
                    self.aborted += 1


def _lp(i: int, offset: int, n: int) -> dict[str, Any]:
    """As a worker: the sampled token first, then the n most likely (here the sampled one
    is always the most likely, and "alt" the second)."""
    t = token_text(i)
    top = {t: -0.5, "alt": -1.0} if n >= 2 else {t: -0.5}
    return {"tokens": [t], "token_logprobs": [-0.5], "top_logprobs": [top], "text_offset": [offset]}


def dead_url() -> str:
    """A URL nothing listens on (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}"


ROUTER_DEFAULTS: dict[str, Any] = dict(
    model="tiny-random", port=0, health_interval_s=0.1, health_timeout_s=0.5, connect_timeout_s=0.5,
    prefill_timeout_s=1.0, request_timeout_s=1.0, disagg_min_tokens=8, drain_timeout_s=1.0,
)


@contextmanager
def cluster(*workers: FakeWorker, **router: Any) -> Iterator[RouterThread]:
    """Start the fake workers and a router over them (``--worker`` each, unless ``router``
    gives the worker lists); everything is stopped afterwards."""
    with ExitStack() as stack:
        for w in workers:
            stack.enter_context(w.thread)
        if not any(k in router for k in ("workers", "prefill_workers", "decode_workers")):
            router["workers"] = tuple(w.url for w in workers)
        cfg = RouterConfig(**{**ROUTER_DEFAULTS, **router})
        r = RouterThread(cfg, tokenizer=tokenizer()).start()
        try:
            yield r
        finally:
            assert r.stop()
