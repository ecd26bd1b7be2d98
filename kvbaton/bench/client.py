"""One streaming request against an OpenAI-compatible server, timed chunk by chunk.

Works with any server that speaks `/v1/completions` or `/v1/chat/completions` with SSE
streaming (kvbaton, vLLM, SGLang, TGI's OpenAI layer, llama.cpp's server, ...). Every
request streams with ``stream_options.include_usage`` (token counts come from the server's
``usage``), sends ``ignore_eos`` (a vLLM extension; other servers ignore unknown fields) so
the answer has exactly ``max_tokens`` tokens where supported, and samples at temperature 0
unless told otherwise.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from kvbaton.bench.metrics import RequestRecord

if TYPE_CHECKING:
    from kvbaton.bench.workloads import Session

ENDPOINT_TYPES = ("completions", "chat")
# Prometheus sample names of the prefix-cache counters, per server family, in the order tried:
# (queries, hits). The "_total" forms are what prometheus_client exposes for counters.
PREFIX_CACHE_COUNTERS = (
    ("kvbaton:prefix_cache_queries", "kvbaton:prefix_cache_hits"),
    ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"),
)
MAX_ERROR_CHARS = 300


class BenchError(Exception):
    """A problem that stops the benchmark before it can run (unreachable server, bad model)."""


def api_root(base_url: str) -> str:
    """The server root for a base URL given with or without the ``/v1`` suffix."""
    root = base_url.strip().rstrip("/")
    if not root.startswith(("http://", "https://")):
        raise BenchError(f"base URL {base_url!r} must start with http:// or https://")
    return root[:-3] if root.endswith("/v1") else root


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send requests."""

    base_url: str                 # server root (see ``api_root``)
    model: str
    endpoint_type: str = "completions"
    api_key: str | None = None
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body

    def __post_init__(self) -> None:
        if self.endpoint_type not in ENDPOINT_TYPES:
            raise ValueError(f"endpoint_type must be one of {ENDPOINT_TYPES}, got {self.endpoint_type!r}")

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.endpoint_type == "chat" else "/v1/completions"
        return api_root(self.base_url) + path

    def headers(self) -> dict[str, str]:
        return auth_headers(self.api_key)


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def build_body(endpoint: Endpoint, session: Session, turn_index: int,
               history: list[tuple[str, str]]) -> dict[str, Any]:
    """The request body for turn ``turn_index`` of ``session`` after the (user, answer) history.

    Completions: ``prompt = prefix + user_1 + answer_1 + ... + user_n``. Chat: the prefix is
    the system message, then alternating user/assistant messages, then the new user message.
    """
    turn = session.turns[turn_index]
    body: dict[str, Any] = {
        "model": endpoint.model,
        "max_tokens": turn.max_tokens,
        "temperature": endpoint.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if endpoint.endpoint_type == "chat":
        messages = [{"role": "system", "content": session.prefix}] if session.prefix else []
        for user, answer in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": turn.user})
        body["messages"] = messages
    else:
        body["prompt"] = session.prefix + "".join(u + a for u, a in history) + turn.user
    body.update(endpoint.extra_body)
    return body


def _chunk_text(chunk: dict[str, Any]) -> tuple[str, bool]:
    """(content text, finish_reason seen) of one streamed chunk of either endpoint."""
    choices = chunk.get("choices") or []
    if not choices:
        return "", False
    c = choices[0]
    text = c.get("text")
    if text is None:
        text = (c.get("delta") or {}).get("content")
    return text or "", c.get("finish_reason") is not None


def _error_text(status: int, body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        msg = err.get("message") if isinstance(err, dict) else err
    except (ValueError, AttributeError):
        msg = None
    text = str(msg) if msg else body.decode("utf-8", "replace").strip()
    return f"HTTP {status}: {text[:MAX_ERROR_CHARS]}" if text else f"HTTP {status}"


async def send_turn(client: httpx.AsyncClient, endpoint: Endpoint, session: Session,
                    turn_index: int, history: list[tuple[str, str]],
                    run_start: float) -> RequestRecord:
    """Send one turn, streaming, and time it. Never raises for a failure of the server or the
    network: those come back as a record with ``ok=False`` and ``error`` set."""
    rec = RequestRecord(session_id=session.session_id, turn=turn_index, tags=tuple(session.tags))
    body = build_body(endpoint, session, turn_index, history)
    pieces: list[str] = []
    chunk_times: list[float] = []
    done = finished = False
    finish_time = 0.0
    usage: dict[str, Any] | None = None
    start = time.perf_counter()
    rec.start_s = start - run_start
    try:
        async with client.stream("POST", endpoint.url, json=body, headers=endpoint.headers()) as r:
            if r.status_code != 200:
                rec.error = _error_text(r.status_code, await r.aread())
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    err = chunk["error"]
                    msg = err.get("message") if isinstance(err, dict) else err
                    rec.error = f"stream error: {str(msg)[:MAX_ERROR_CHARS]}"
                    return rec
                text, fin = _chunk_text(chunk)
                if fin and not finished:
                    finished, finish_time = True, time.perf_counter()
                if text:
                    chunk_times.append(time.perf_counter())
                    pieces.append(text)
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {str(e)[:MAX_ERROR_CHARS] or 'no detail'}"
        return rec
    except (ValueError, AttributeError, TypeError) as e:  # a chunk that is not the OpenAI shape
        rec.error = f"bad stream chunk: {str(e)[:MAX_ERROR_CHARS]}"
        return rec
    end = time.perf_counter()
    if not (done or finished):
        rec.error = "stream ended before [DONE]"
        return rec
    if not chunk_times:
        # Tokens that decode to no text yet (a partial UTF-8 character, held back by the
        # server) still count when usage says they were generated: the first text-bearing
        # event is then the one that finished the request.
        if not (usage and usage.get("completion_tokens") and finished):
            rec.error = "no content in the response"
            return rec
        chunk_times.append(finish_time)
    rec.ok = True
    rec.text = "".join(pieces)
    rec.ttft_s = chunk_times[0] - start
    rec.e2el_s = end - start
    rec.itls_s = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    if usage:
        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        rec.output_tokens = int(usage.get("completion_tokens") or 0) or len(chunk_times)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        rec.cached_tokens = None if cached is None else int(cached)
    else:  # a server that ignores include_usage: one chunk is at least one token
        rec.output_tokens = len(chunk_times)
    return rec


async def list_models(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> list[str]:
    """The model ids of ``/v1/models``. Raises BenchError when the server cannot be reached;
    returns [] when it answers but lists nothing usable (e.g. no such route)."""
    url = api_root(base_url) + "/v1/models"
    try:
        r = await client.get(url, headers=auth_headers(api_key))
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach the server at {api_root(base_url)}: {type(e).__name__}: {e}") from None
    if r.status_code == 401:
        raise BenchError(f"{url}: 401 unauthorized (pass --api-key)")
    if r.status_code != 200:
        return []
    try:
        return [str(m["id"]) for m in r.json().get("data", []) if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError):
        return []


async def scrape_prefix_cache(client: httpx.AsyncClient, base_url: str) -> tuple[float, float] | None:
    """(queries, hits) summed over all label sets, from the server's Prometheus ``/metrics``,
    for the first counter family in ``PREFIX_CACHE_COUNTERS`` it exposes; None if there is none
    (or no ``/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get(api_root(base_url) + "/metrics")
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    sums: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(r.text):
            for s in family.samples:
                name = s.name[:-6] if s.name.endswith("_total") else s.name
                sums[name] = sums.get(name, 0.0) + float(s.value)
    except ValueError:  # not Prometheus text
        return None
    for queries, hits in PREFIX_CACHE_COUNTERS:
        if queries in sums and hits in sums:
            return sums[queries], sums[hits]
    return None
