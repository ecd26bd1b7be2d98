"""The whole disaggregated path with real workers: router → prefill worker → KV transfer →
decode worker → client. Greedy output must equal a colocated run, and every fault ends with a
defined answer and block accounting back at baseline on every worker.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx

from conftest import GREEDY, random_prompts, wait_until
from kvbaton.router.config import RouterConfig
from kvbaton.router.local_cluster import WorkerProcess, WorkerSpec
from kvbaton.router.server import RouterThread
from worker_support import metric, parse_metrics, running_worker, wait_idle

ENGINE = {"num_kv_blocks": 512}
BODY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}


@contextmanager
def cluster(
    prefill: int = 1, decode: int = 1, colocated: int = 0, worker: dict[str, Any] | None = None,
    **router: Any,
) -> Iterator[tuple[RouterThread, list[Any], list[Any]]]:
    """Real workers in threads behind a real router; everything is stopped afterwards."""
    with ExitStack() as stack:
        ps = [stack.enter_context(running_worker({"role": "prefill", **(worker or {})}, **ENGINE))
              for _ in range(prefill)]
        ds = [stack.enter_context(running_worker({"role": "decode", **(worker or {})}, **ENGINE))
              for _ in range(decode)]
        cs = [stack.enter_context(running_worker({"role": "both", **(worker or {})}, **ENGINE))
              for _ in range(colocated)]
        cfg = RouterConfig(
            prefill_workers=tuple(p.url for p in ps), decode_workers=tuple(d.url for d in ds),
            workers=tuple(c.url for c in cs), model="tiny-random", port=0,
            health_interval_s=0.3, **{"disagg_min_tokens": 1, **router},
        )
        r = RouterThread(cfg).start()
        try:
            yield r, ps, ds + cs
        finally:
            assert r.stop()


def settle(*workers: Any) -> None:
    """Nothing running, no blocks used, no lease held, integrity checks pass, on each worker."""
    for w in workers:
        wait_until(lambda w=w: wait_idle(w.url, 0)["stats"]["kv_leases_active"] == 0, what="leases to end")


def routed(router: RouterThread, prompt: list[int], max_tokens: int = GREEDY.max_tokens,
           **extra: Any) -> dict[str, Any]:
    r = httpx.post(f"{router.url}/v1/completions",
                   json={"prompt": prompt, "max_tokens": max_tokens, **BODY, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def router_metrics(router: RouterThread) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{router.url}/metrics", timeout=10).text)


def test_1p1d_greedy_equals_colocated_from_one_block_to_hundreds(plain_reference) -> None:
    with cluster() as (router, ps, ds):
        lengths = [16, 17, 100, 1000, 3200]  # 1 block ... 200 blocks
        for n in lengths:
            prompt = random_prompts(1, n, n, seed=n)[0]
            out = routed(router, prompt)
            assert out["choices"][0]["token_ids"] == plain_reference(prompt), n
        # A prompt whose prefix the decode worker already holds: only the rest is fetched.
        base = random_prompts(1, 3200, 3200, seed=3200)[0]
        longer = base + random_prompts(1, 40, 40, seed=1)[0]
        assert routed(router, longer)["choices"][0]["token_ids"] == plain_reference(longer)
        m = router_metrics(router)
        assert metric(m, "kvbaton:router_transfers_total", outcome="fetched") == len(lengths) + 1
        blocks = sum(-(-n // 16) for n in lengths) + 3  # the 40-token tail spans 3 new blocks
        bytes_per_block = httpx.get(f"{ds[0].url}/kv/info").json()["kv_spec"]["bytes_per_block"]
        assert metric(m, "kvbaton:router_transfer_bytes_total") == blocks * bytes_per_block
        settle(*ps, *ds)


def test_streamed_chat_through_1p1d_equals_colocated() -> None:
    with cluster() as (router, ps, ds), running_worker(**ENGINE) as colo:
        body = {"messages": [{"role": "user", "content": "tell me about caches " * 20}],
                "max_tokens": 16, **BODY}
        direct = httpx.post(f"{colo.url}/v1/chat/completions", json=body, timeout=60).json()
        chunks = []
        with httpx.stream("POST", f"{router.url}/v1/chat/completions",
                          json={**body, "stream": True, "stream_options": {"include_usage": True}},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == direct["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"]["completion_tokens"] == 16
        assert metric(router_metrics(router), "kvbaton:router_requests_total", path="disagg") == 1
        settle(*ps, *ds, colo)


def test_short_prompts_skip_the_prefill_worker(plain_reference) -> None:
    with cluster(disagg_min_tokens=64) as (router, ps, ds):
        short = random_prompts(1, 20, 20, seed=5)[0]
        assert routed(router, short)["choices"][0]["token_ids"] == plain_reference(short)
        m = router_metrics(router)
        assert metric(m, "kvbaton:router_requests_total", path="local") == 1
        assert metric(m, "kvbaton:router_transfers_total") == 0
        settle(*ps, *ds)


def test_prefill_worker_down_means_the_decode_worker_prefills(plain_reference) -> None:
    with cluster() as (router, ps, ds):
        ps[0].stop()
        prompt = random_prompts(1, 90, 90, seed=6)[0]
        assert routed(router, prompt)["choices"][0]["token_ids"] == plain_reference(prompt)
        m = router_metrics(router)
        # Either the connect failed (prefill_connect) or health polling saw it first.
        assert metric(m, "kvbaton:router_fallbacks_total") == 1
        assert metric(m, "kvbaton:router_requests_total", path="local") == 1
        settle(*ds)


def test_a_dead_decode_worker_is_retried_before_the_first_token(plain_reference) -> None:
    with cluster(decode=2, decode_policy="round_robin") as (router, ps, ds):
        ds[0].stop()
        prompt = random_prompts(1, 60, 60, seed=7)[0]
        for _ in range(3):  # whichever worker round robin picks, every request succeeds
            assert routed(router, prompt)["choices"][0]["token_ids"] == plain_reference(prompt)
        settle(*ps, ds[1])


def test_client_disconnect_frees_blocks_and_leases_on_both_sides() -> None:
    with cluster() as (router, ps, ds):
        prompt = random_prompts(1, 300, 300, seed=8)[0]
        body = {"prompt": prompt, "max_tokens": 3000, **BODY, "stream": True}
        with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # one token arrived: walk away mid-stream
        settle(*ps, *ds)


def test_decode_worker_killed_mid_stream_ends_the_stream_with_an_error() -> None:
    # A real process, so it can die the way processes do (SIGKILL), mid-stream.
    decoder = WorkerProcess(
        WorkerSpec("decode", ("--model", "tiny-random", "--num-kv-blocks", "512", "--threads", "1",
                              "--insecure-transfer")),  # its in-process prefill peer has no secret
        os.environ.copy(),
    )
    proc = decoder.proc
    try:
        url = decoder.wait_ready(time.monotonic() + 120)
        with running_worker({"role": "prefill"}, **ENGINE) as p:
            cfg = RouterConfig(prefill_workers=(p.url,), decode_workers=(url,), model="tiny-random",
                               port=0, disagg_min_tokens=1, health_interval_s=0.3, request_timeout_s=10)
            with RouterThread(cfg) as router:
                prompt = random_prompts(1, 200, 200, seed=9)[0]
                body = {"prompt": prompt, "max_tokens": 3000, **BODY, "stream": True}
                events: list[str] = []
                with httpx.stream("POST", f"{router.url}/v1/completions", json=body, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line)
                            if len(events) == 1:
                                proc.send_signal(signal.SIGKILL)
                # A stream that breaks after it started: one error event, then [DONE].
                assert events[-1] == "data: [DONE]", events[-3:]
                assert "error" in json.loads(events[-2].removeprefix("data: ")), events[-3:]
                assert not any('"error"' in e for e in events[:-2]), events[-3:]
            settle(p)  # the lease was released after the fetch, or expires
    finally:
        decoder.proc.kill()
        decoder.wait_or_kill(10)
