"""Shared fixtures: tiny random models so engine tests run in seconds."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Callable

import pytest

from kvbaton import LLM, SamplingParams


def make_llm(**kwargs) -> LLM:
    """A tiny-random LLM; kwargs override EngineConfig fields."""
    kwargs.setdefault("num_kv_blocks", 256)
    return LLM("tiny-random", **kwargs)


def run_in_threads(fn: Callable[[int], object], n: int, timeout_s: float = 30.0) -> list[BaseException]:
    """Run ``fn(0) .. fn(n-1)`` each on its own thread at once, wait for them all (each at most
    ``timeout_s``), and return the exceptions they raised, so the test can assert there were none."""
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            fn(k)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return errors


def wait_until(pred: Callable[[], object], timeout_s: float = 20.0, what: str = "condition",
               interval_s: float = 0.01) -> None:
    """Poll ``pred`` until it is true; AssertionError naming ``what`` after ``timeout_s``. The
    one polling helper of the suite: servers record some facts just after the client sees them
    (a counter after the last byte left), so tests wait for them, boundedly."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing listens on right now (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_prompts(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="session")
def plain_reference():
    """Greedy outputs of each prompt run alone, no caching: the ground truth to match."""
    llm = make_llm(enable_prefix_caching=False, max_num_batched_tokens=4096)
    cache: dict[tuple[int, ...], list[int]] = {}

    def run(prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
        key = (*prompt, -1, params.max_tokens)
        if key not in cache:
            cache[key] = llm.generate([prompt], params)[0].token_ids
        return cache[key]

    return run


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The redis-server binary (scripts/setup.sh installs it). Missing in CI (CI=true) is a
    failure, not a skip: the remote tier's tests are then not run at all."""
    from kvbaton.kv.store.redis_server import find_redis_server

    path = find_redis_server()
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed: scripts/setup.sh installs it (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (scripts/setup.sh installs it)")
    return path


@pytest.fixture
def redis_server(redis_binary: str):
    """A fresh redis-server on a free 127.0.0.1 port (64 MiB, allkeys-lru), stopped after the test."""
    from kvbaton.kv.store.redis_server import RedisServer

    with RedisServer(maxmemory_bytes=64 << 20, binary=redis_binary) as server:
        yield server
