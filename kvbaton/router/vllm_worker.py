"""`vllm serve` processes as router workers (``--vllm-worker``): what the router reads from them.

A vLLM worker has no ``/kv/info``; the router learns what it needs elsewhere:

- ``GET /v1/models``: the model name to send and ``max_model_len``;
- ``GET /metrics`` (Prometheus text), at discovery and at every health poll:
  ``vllm:cache_config_info``'s ``block_size`` and ``num_gpu_blocks`` labels, the load
  (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``
  or the older ``vllm:gpu_cache_usage_perc``), its prefix-cache counters
  (``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total``, tokens) and
  ``process_start_time_seconds``, which tells a restarted process from the one followed so far
  (vLLM's stream has no id of its own);
- ``POST /tokenize`` of a probe text, compared with the router's own tokenizer: a worker that
  tokenizes differently serves another model, and is refused with the reason.

Its KV events come from the endpoints given on the flag (``kvbaton.kv.vllm_events`` reads
them and keys its blocks as the router keys prompts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

# Covers letters, digits, punctuation and spaces, so two tokenizers that agree on it almost
# surely are one.
TOKENIZER_PROBE = "kvbaton probe: The quick brown fox jumps over 13 lazy dogs; naïve café, 東京."


@dataclass(frozen=True)
class VLLMMetrics:
    """What one scrape of a vLLM worker's ``/metrics`` says (None: not exposed)."""

    block_size: int | None = None
    num_blocks: int | None = None
    prefix_caching: bool | None = None
    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # fraction of its KV blocks in use
    prefix_queries: float | None = None  # prompt tokens looked up in its prefix cache
    prefix_hits: float | None = None  # of those, found
    start_time: float | None = None  # process_start_time_seconds

    def load(self) -> dict[str, int] | None:
        """The load in the shape of our workers' ``/health`` ``load`` (None: not reported)."""
        if self.running is None or self.waiting is None:
            return None
        out = {"num_requests_running": self.running, "num_requests_waiting": self.waiting}
        if self.kv_usage is not None and self.num_blocks is not None:
            out["kv_blocks_used"] = round(self.kv_usage * self.num_blocks)
        return out


def parse_vllm_metrics(text: str) -> VLLMMetrics:
    """Read a vLLM ``/metrics`` exposition; values summed over engines (data-parallel ranks).
    ValueError when the text is not Prometheus exposition."""
    sums: dict[str, float] = {}
    info: dict[str, str] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "vllm:cache_config_info" and not info:
                    info = dict(s.labels)
                elif s.name.startswith(("vllm:", "process_start_time")) and math.isfinite(s.value):
                    sums[s.name] = sums.get(s.name, 0.0) + s.value
    except (ValueError, TypeError, IndexError) as e:  # the parser's errors for malformed lines
        raise ValueError(f"/metrics is not Prometheus text: {e}") from None
    usage = sums.get("vllm:kv_cache_usage_perc", sums.get("vllm:gpu_cache_usage_perc"))
    engines = max(1, sum(1 for line in text.splitlines() if line.startswith("vllm:num_requests_running{")))

    def count(name: str) -> int | None:
        v = sums.get(name)
        return None if v is None else int(v)

    return VLLMMetrics(
        block_size=_int_label(info, "block_size"), num_blocks=_int_label(info, "num_gpu_blocks"),
        prefix_caching=(info["enable_prefix_caching"] == "True") if "enable_prefix_caching" in info else None,
        running=count("vllm:num_requests_running"), waiting=count("vllm:num_requests_waiting"),
        kv_usage=None if usage is None else usage / engines,
        prefix_queries=sums.get("vllm:prefix_cache_queries_total"),
        prefix_hits=sums.get("vllm:prefix_cache_hits_total"),
        start_time=sums.get("process_start_time_seconds"))


def _int_label(labels: dict[str, str], name: str) -> int | None:
    try:
        return int(labels[name])
    except (KeyError, ValueError):
        return None


async def scrape(client: httpx.AsyncClient, url: str) -> VLLMMetrics:
    """One scrape of ``url``'s ``/metrics``; httpx.HTTPError or ValueError when it fails."""
    r = await client.get(f"{url}/metrics")
    if r.status_code != 200:
        raise ValueError(f"/metrics answered {r.status_code}")
    return parse_vllm_metrics(r.text)


async def tokenizer_mismatch(client: httpx.AsyncClient, url: str, model: str,
                             router_ids: Callable[[str], list[int]]) -> str | None:
    """Why the worker's tokenizer is not the router's (None: they agree, or the worker has no
    ``/tokenize`` to ask). httpx.HTTPError when the worker cannot be reached."""
    r = await client.post(f"{url}/tokenize",
                          json={"model": model, "prompt": TOKENIZER_PROBE, "add_special_tokens": False})
    if r.status_code in (404, 405):
        return None  # an older server without the endpoint: nothing to compare
    body: Any = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
    theirs = body.get("tokens") if isinstance(body, dict) else None
    if r.status_code != 200 or not isinstance(theirs, list):
        return f"/tokenize answered {r.status_code} without tokens"
    ours = router_ids(TOKENIZER_PROBE)
    if theirs != ours:
        same = sum(1 for x, y in zip(theirs, ours, strict=False) if x == y)
        return (f"its tokenizer differs from the router's (model {model!r} made {len(theirs)} tokens of a "
                f"probe text, {same} equal to the router's {len(ours)}): another model")
    return None


def vllm_worker_id(url: str, metrics: VLLMMetrics | None) -> str:
    """The id the router gives a vLLM process: a new one after a restart (its start time)."""
    start = metrics.start_time if metrics is not None else None
    return f"vllm@{url}" if start is None else f"vllm@{url}#{start:.3f}"
