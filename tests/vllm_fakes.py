"""A stand-in for `vllm serve` in the router's tests (CI never installs vLLM): a FastAPI app
with vLLM 0.32's surfaces as recorded from the real server (``tests/data/vllm/``, made by
benchmarks/vllm_capture.py), and a KV event publisher with vLLM's wire layout.

- ``/health``: 200 with an empty body; ``/v1/models``: vLLM's entry (``max_model_len``);
- ``/metrics``: the recorded exposition with this instance's block size, start time, running
  and waiting requests and prefix-cache counters substituted;
- ``/tokenize``: the byte tokenizer's ids (``wrong_tokenizer`` shifts them: another model);
- ``/v1/completions``: vLLM's stream shape (``token_ids`` with ``return_token_ids``, a usage
  chunk with ``prompt_tokens_details.cached_tokens`` from its own prefix cache);
- P/D (vLLM's ``kv_transfer_params`` protocol, as its NixlConnector speaks it): a request
  with ``do_remote_decode`` is answered whole (one token) with the params a decode worker
  needs (``remote_engine_id``, ``remote_block_ids``, ...); one with ``do_remote_prefill``
  streams as usual and records the params (``imports``);
- KV events: every full prompt block it has not cached is stored and published as vLLM
  does: ``BlockStored`` with its own hashes (64-bit ints from a per-instance random seed, as
  vLLM's default), the chain's salt in the first block's ``extra_keys``, map-encoded
  (``encoding="map"``, vLLM's current) or positional (``"array"``, the older one); replay on a
  ROUTER socket answering ``[topic, seq, payload]`` frames, as vLLM 0.32 does.

The real server is exercised by benchmarks/vllm_workers.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import zmq
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from conftest import free_port
from kvbaton.api.server import AppThread
from kvbaton.api.sse import sse
from router_fakes import token_text, tokenizer

RECORDED = Path(__file__).parent / "data" / "vllm" / "events_int.json"
END_SEQ = (-1).to_bytes(8, "big", signed=True)
_METRICS: str | None = None


def recorded_metrics() -> str:
    global _METRICS
    if _METRICS is None:
        _METRICS = json.loads(RECORDED.read_text())["metrics_after"]
    return _METRICS


class _Publisher:
    """vLLM's ZmqEventPublisher's wire behaviour: PUB ``[topic, seq, payload]``, a replay
    buffer, ROUTER replay answering ``[topic, seq, payload]`` then ``[b"", END, b""]``."""

    def __init__(self, topic: bytes = b"kv-events") -> None:
        self.topic = topic
        self.pub_port, self.replay_port = free_port(), free_port()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=10_000)
        self.seq = 0
        self.skip_next = False  # publish the next batch's seq without sending it anywhere
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(5)

    def publish(self, payload: bytes) -> None:
        self._queue.put(payload)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self, ready: threading.Event) -> None:
        ctx = zmq.Context.instance()
        pub, replay = ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
        pub.bind(f"tcp://127.0.0.1:{self.pub_port}")
        replay.bind(f"tcp://127.0.0.1:{self.replay_port}")
        ready.set()
        try:
            while True:
                if replay.poll(0):
                    client, _, start = replay.recv_multipart()
                    first = int.from_bytes(start, "big")
                    for seq, buf in list(self.buffer):
                        if seq >= first:
                            replay.send_multipart((client, b"", self.topic, seq.to_bytes(8, "big"), buf))
                    replay.send_multipart((client, b"", b"", END_SEQ, b""))
                try:
                    payload = self._queue.get(timeout=0.01)
                except queue.Empty:
                    continue
                if payload is None:
                    return
                seq, self.seq = self.seq, self.seq + 1
                if self.skip_next:  # lost on the wire and absent from the buffer: a gap
                    self.skip_next = False
                    continue
                pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
                self.buffer.append((seq, payload))
        finally:
            pub.close(linger=0)
            replay.close(linger=0)


class FakeVLLMWorker:
    """One stand-in `vllm serve`. Attributes a test may change while it runs: ``healthy``,
    ``silent`` (store blocks without publishing), ``extra_running`` (requests its /metrics
    reports beyond the router's), ``kv_usage`` (the fraction of its KV blocks it reports in
    use), ``wrong_tokenizer``."""

    def __init__(self, block_size: int = 4, encoding: str = "map", events: bool = True,
                 model: str = "fake-vllm-model", max_model_len: int = 4096) -> None:
        self.block_size = block_size
        self.encoding = encoding
        self.model = model
        self.max_model_len = max_model_len
        self.healthy = True
        self.silent = False
        self.extra_running = 0
        self.kv_usage = 0.0  # what its /metrics reports as vllm:kv_cache_usage_perc
        self.wrong_tokenizer = False
        self.start_time = 1.7e9 + int.from_bytes(os.urandom(3), "big")
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.imports: list[dict[str, Any]] = []  # kv_transfer_params of decode legs
        self.engine_id = f"fake-engine-{os.urandom(4).hex()}"
        self.prefill_answer = "ok"  # "ok", "no_params" (a vLLM without a connector), "stop"
        self.running = 0
        self.queries = self.hits = 0
        self._seed = os.urandom(16)  # vLLM's NONE_HASH is random per process
        self.cache: set[int] = set()
        self.publisher = _Publisher() if events else None
        self.thread = AppThread(self._build())

    # ---- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> FakeVLLMWorker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.stop()
        if self.publisher is not None:
            self.publisher.close()

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def spec(self) -> str:
        """Its ``--vllm-worker`` value."""
        if self.publisher is None:
            return self.url
        return (f"{self.url},events=tcp://127.0.0.1:{self.publisher.pub_port},"
                f"replay=tcp://127.0.0.1:{self.publisher.replay_port}")

    def restart(self) -> None:
        """As a new process: empty cache, new seed and start time, seq from 0."""
        with self.lock:
            self.cache.clear()
            self._seed = os.urandom(16)
            self.start_time += 1000
            if self.publisher is not None:
                self.publisher.buffer.clear()
                self.publisher.seq = 0

    # ---- vLLM's cache and events -----------------------------------------------------------

    def _hash(self, parent: int | None, tokens: list[int], salt: str | None) -> int:
        h = hashlib.sha256(self._seed + (parent or 0).to_bytes(8, "big") + json.dumps([tokens, salt]).encode())
        return int.from_bytes(h.digest()[:8], "big")

    def _admit(self, prompt: list[int], salt: str | None) -> int:
        """Cache the prompt's full blocks; publish the new ones; the cached prompt tokens."""
        bs = self.block_size
        parent: int | None = None
        hit, new, new_parent, tokens, extra = 0, [], None, [], []
        for b in range(len(prompt) // bs):
            block = prompt[b * bs:(b + 1) * bs]
            h = self._hash(parent, block, salt if b == 0 else None)
            if h in self.cache and not new:
                hit += bs
            else:
                if not new:
                    new_parent = parent
                new.append(h)
                tokens += block
                extra.append([salt] if b == 0 and salt is not None else None)
                self.cache.add(h)
            parent = h
        self.queries += len(prompt)
        self.hits += hit
        if new and self.publisher is not None and not self.silent:
            ev: dict[str, Any] = {"type": "BlockStored", "block_hashes": new, "parent_block_hash": new_parent,
                                  "token_ids": tokens, "block_size": bs, "lora_id": None, "medium": "GPU",
                                  "lora_name": None, "extra_keys": extra, "group_idx": 0,
                                  "kv_cache_spec_kind": "full_attention"}
            if self.encoding == "array":
                ev_out: Any = ["BlockStored", new, new_parent, tokens, bs, None, "GPU"]
            else:
                ev_out = ev
            self.publisher.publish(msgspec.msgpack.encode([1.0, [ev_out], 0]))
        return hit

    # ---- the app ---------------------------------------------------------------------------

    def _metrics(self) -> str:
        text = recorded_metrics()
        out = []
        for line in text.splitlines():
            if line.startswith("vllm:cache_config_info{"):
                line = line.replace('block_size="32"', f'block_size="{self.block_size}"')
            elif line.startswith("vllm:num_requests_running{"):
                line = line.rsplit(" ", 1)[0] + f" {float(self.running + self.extra_running)}"
            elif line.startswith("vllm:kv_cache_usage_perc{"):
                line = line.rsplit(" ", 1)[0] + f" {self.kv_usage}"
            elif line.startswith("vllm:prefix_cache_queries_total{"):
                line = line.rsplit(" ", 1)[0] + f" {float(self.queries)}"
            elif line.startswith("vllm:prefix_cache_hits_total{"):
                line = line.rsplit(" ", 1)[0] + f" {float(self.hits)}"
            elif line.startswith("process_start_time_seconds "):
                line = f"process_start_time_seconds {self.start_time}"
            out.append(line)
        return "\n".join(out) + "\n"

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.healthy else 503)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "vllm",
                                                 "root": self.model, "max_model_len": self.max_model_len}]}

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self._metrics())

        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict[str, Any]:
            body = await request.json()
            ids = list(tokenizer().encode(body["prompt"], add_special_tokens=False))
            if self.wrong_tokenizer:
                ids = [i + 1 for i in ids]
            return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": None}

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            body = await request.json()
            kv = body.get("kv_transfer_params") or {}
            with self.lock:
                self.requests.append(body)
                cached = self._admit(body["prompt"], body.get("cache_salt"))
                if kv.get("do_remote_prefill"):
                    self.imports.append(kv)
            if kv.get("do_remote_decode"):
                return self._prefilled(body)
            return StreamingResponse(self._stream(body, cached), media_type="text/event-stream")

        return app

    def _prefilled(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body["prompt"]
        params = None if self.prefill_answer == "no_params" else {
            "do_remote_prefill": True, "do_remote_decode": False, "remote_block_ids": [[1, 2, 3]],
            "remote_engine_id": self.engine_id, "remote_request_id": f"cmpl-{os.urandom(4).hex()}",
            "remote_host": "127.0.0.1", "remote_port": 5600, "tp_size": 1}
        finish = "stop" if self.prefill_answer == "stop" else "length"
        return {"id": "cmpl-vllm", "object": "text_completion", "created": 0, "model": self.model,
                "choices": [{"index": 0, "text": token_text(0), "logprobs": None, "finish_reason": finish,
                             "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                             "prompt_token_ids": None}],
                "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + 1, "completion_tokens": 1},
                "kv_transfer_params": params}

    async def _stream(self, body: dict[str, Any], cached: int) -> Any:
        n, prompt = body["max_tokens"], body["prompt"]
        self.running += 1
        try:
            for i in range(n):
                choice: dict[str, Any] = {"index": 0, "text": token_text(i), "logprobs": None,
                                          "finish_reason": "length" if i == n - 1 else None, "stop_reason": None}
                # As vLLM: the fields are there, null unless asked for.
                choice["token_ids"] = [100 + i] if body.get("return_token_ids") else None
                choice["prompt_token_ids"] = prompt if i == 0 and body.get("return_token_ids") else None
                choice["prompt_logprobs"] = None
                yield sse({"id": "cmpl-vllm", "object": "text_completion", "created": 0, "model": self.model,
                           "choices": [choice]})
            yield sse({"id": "cmpl-vllm", "object": "text_completion", "created": 0, "model": self.model,
                       "choices": [], "usage": {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + n,
                                                "completion_tokens": n,
                                                "prompt_tokens_details": {"cached_tokens": cached}},
                       "system_fingerprint": "vllm-0.32.0-fake"})
            yield "data: [DONE]\n\n"
        finally:
            self.running -= 1
