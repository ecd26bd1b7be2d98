"""The remote KV tier as a user meets it: `kvbaton serve --kv-remote redis` starts a shared
redis-server its workers reuse each other's prefixes through (round robin sends a repeated
prompt to the other worker, which loads it instead of computing it), shuts it down with the
cluster, and bad remote flags are usage errors naming the flag."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from conftest import free_port, random_prompts, wait_until
from kvbaton.cli import main


def _metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_serve_with_a_local_redis_shares_prefixes_between_workers(redis_binary: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvbaton.cli", "serve", "--model", "tiny-random", "--colocated", "2",
         "--threads-per-worker", "1", "--num-kv-blocks", "64", "--kv-host-cache-gib", "0.01",
         "--kv-offload-mode", "write-through", "--policy", "round_robin", "--kv-remote", "redis",
         "--kv-remote-maxmemory-gib", "0.0625", "--disagg-min-tokens", "100000",  # no P->D transfer
         "--port", str(port), "--drain-timeout", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "KVBATON_REDIS_SERVER": redis_binary},
    )
    url = f"http://127.0.0.1:{port}"
    redis_port = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"redis-server on redis://127\.0\.0\.1:(\d+)/0", line)
            if m:
                redis_port = int(m.group(1))
                break
        assert redis_port is not None, "serve did not say where its redis-server is"
        # A password guards it: nothing but the workers can use it.
        with socket.create_connection(("127.0.0.1", redis_port), timeout=5) as s:
            s.sendall(b"GET x\r\n")
            assert s.recv(64).startswith(b"-NOAUTH")
        wait_until(lambda: _healthy(url), 120, "serve to answer")
        prompt = random_prompts(1, 120, 120, seed=3)[0]
        body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
        first = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert first.status_code == 200

        def stored() -> bool:
            return _metric_sum(httpx.get(f"{url}/metrics", timeout=5).text,
                               "kvbaton:kv_tier_stores_total", tier="remote") >= 7
        wait_until(stored, 30, "the first worker's blocks to reach the remote tier")
        second = httpx.post(f"{url}/v1/completions", json=body, timeout=60)  # round robin: the other worker
        assert second.status_code == 200
        assert second.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 7 * 16

        def loaded() -> bool:  # the workers' stats snapshots trail the response a little
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
            return _metric_sum(metrics, "kvbaton:kv_tier_hit_tokens_total", tier="remote") >= 7 * 16
        wait_until(loaded, 30, "the second worker's remote hit in its metrics")
        assert _metric_sum(httpx.get(f"{url}/metrics", timeout=5).text, "kvbaton:kv_remote_up") == 2.0
        # Another tenant's identical prompt finds nothing of the first one's.
        salted = httpx.post(f"{url}/v1/completions", json={**body, "cache_salt": "tenant-b"}, timeout=60)
        assert salted.status_code == 200
        assert salted.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        wait_until(lambda: not _listening(redis_port), 30, "serve's redis-server to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("argv, flag", [
    (["worker", "--model", "tiny-random", "--kv-remote-url", "http://127.0.0.1:6379"], "--kv-remote-url"),
    (["worker", "--model", "tiny-random", "--kv-remote-url", "redis://127.0.0.1:6379/0",
      "--kv-host-cache-gib", "0"], "--kv-remote-url"),
    (["worker", "--model", "tiny-random", "--kv-remote-url", "redis://127.0.0.1:6379/0",
      "--kv-remote-ttl", "0"], "--kv-remote-ttl"),
    (["serve", "--model", "tiny-random", "--kv-remote-maxmemory-gib", "1"], "--kv-remote-maxmemory-gib"),
    (["serve", "--model", "tiny-random", "--kv-remote", "redis", "--kv-remote-url", "redis://h:1/0"],
     "--kv-remote-url"),
    (["serve", "--model", "tiny-random", "--kv-remote", "redis", "--kv-host-cache-gib", "0"],
     "--kv-host-cache-gib"),
    (["serve", "--model", "tiny-random", "--kv-remote-url", "redis://:pw@h:1/nope"], "--kv-remote-url"),
])
def test_bad_remote_flags_are_usage_errors_naming_the_flag(argv: list[str], flag: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and ":pw@" not in err


def test_a_worker_whose_server_refuses_the_password_exits_with_an_error_naming_the_flag(redis_binary: str) -> None:
    from kvbaton.kv.store.redis_server import RedisServer

    with RedisServer(password="right-one", binary=redis_binary) as server:
        r = subprocess.run([sys.executable, "-m", "kvbaton.cli", "worker", "--model", "tiny-random",
                            "--port", "0", "--kv-remote-url", server.url.replace("redis://", "redis://:wrong-one@")],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "--kv-remote-url: the Redis server" in r.stderr and "refused the password" in r.stderr
    assert "wrong-one" not in r.stderr and "Traceback" not in r.stderr
