"""Soak: many requests through `kvbaton serve` (router + prefill + decode workers) mixed with
client disconnects, malformed requests and worker kills; every request must end with a defined
outcome (never a hang) and, once the load stops, every worker must be back at its baseline:
nothing running or waiting, no KV block held, no lease left, block accounting consistent.

`serve` runs one prefill and two decode workers. The mix (by request index, so runs are
reproducible): plain completions and chats, streamed and not; clients that hang up after the
first streamed chunk or before any answer; malformed or oversized bodies; and every
``--kill-every`` requests a SIGKILL of one worker process (serve restarts it on its port; requests in
flight there get an error, later ones are served again).

Outcomes counted: ``ok`` (200 and a complete answer: a final chunk and [DONE] when streamed),
``client_error`` (4xx), ``server_error`` (5xx: allowed only around a kill), ``error_event``
(a stream that ended with an error event and [DONE]), ``abandoned`` (the client hung up on
purpose), ``connect_error`` (the router was unreachable) and ``hung`` (no answer within
``--request-timeout``: must be 0).

    python benchmarks/soak.py --requests 10000 --out docs/results/soak_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

WORKER_KEY = "soak-worker-key"
ERRORS: Counter[str] = Counter()  # 5xx answers by status and message start (for the report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_pids(parent: int) -> list[int]:
    """Live `kvbaton worker` children of ``parent`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z" and b"worker" in cmd:
            out.append(int(d.name))
    return sorted(out)


def request_for(i: int, rng: random.Random) -> tuple[str, str, Any, bool]:
    """(kind, path, body, stream) of request ``i``."""
    r = i % 20
    vocab = ["cache", "block", "prefill", "decode", "token", "lease"]
    words = " ".join(rng.choice(vocab) for _ in range(rng.randint(5, 60)))
    if r == 0:
        return "disconnect_mid", "/v1/completions", {"prompt": words, "max_tokens": 40, "stream": True}, True
    if r == 1:
        return "disconnect_early", "/v1/completions", {"prompt": words * 4, "max_tokens": 40}, False
    if r == 2:
        bad = rng.choice(['{"prompt": "x", "max_tokens": -1}', '{"prompt": ', '{"messages": 3}',
                          '{"prompt": "x", "top_p": 0}', '{"prompt": "' + "y" * 200_000 + '"}'])
        return "malformed", "/v1/completions", bad, False
    if r in (3, 4, 5, 6):
        return "chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": words}],
                                                "max_tokens": rng.randint(1, 16), "stream": r % 2 == 0}, r % 2 == 0
    stream = r % 3 == 0
    return "completion", "/v1/completions", {"prompt": words, "max_tokens": rng.randint(1, 16),
                                             "temperature": rng.choice([0, 0.7]), "stream": stream}, stream


async def one(client: httpx.AsyncClient, i: int, seed: int, timeout_s: float) -> str:
    rng = random.Random(seed * 1_000_003 + i)
    kind, path, body, stream = request_for(i, rng)
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json"}
    try:
        if kind == "disconnect_early":
            try:
                await client.post(path, content=content, headers=headers, timeout=0.05)
            except httpx.TimeoutException:
                return "abandoned"
            return "ok"
        async with asyncio.timeout(timeout_s):
            if not stream:
                r = await client.post(path, content=content, headers=headers, timeout=timeout_s)
                if r.status_code == 200:
                    return "ok" if r.json().get("choices") else "server_error"
                if r.status_code >= 500:
                    ERRORS[f"{r.status_code} {r.text[:160]}"] += 1
                return "client_error" if r.status_code < 500 else "server_error"
            async with client.stream("POST", path, content=content, headers=headers, timeout=timeout_s) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    if r.status_code >= 500:
                        ERRORS[f"{r.status_code} {text[:160]}"] += 1
                    return "client_error" if r.status_code < 500 else "server_error"
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        if kind == "disconnect_mid":
                            return "abandoned"  # leaving the block closes the connection
                if not events or events[-1] != "[DONE]":
                    ERRORS["stream cut without [DONE]"] += 1
                    return "server_error"  # cut without [DONE]: not a defined end
                return "error_event" if any('"error"' in e for e in events[:-1]) else "ok"
    except TimeoutError:
        return "hung"
    except httpx.TimeoutException:
        return "hung"
    except httpx.TransportError:
        return "connect_error"


async def load(url: str, n: int, concurrency: int, seed: int, timeout_s: float, serve_pid: int,
               kill_every: int) -> dict[str, Any]:
    outcomes: Counter[str] = Counter()
    near_kill: Counter[str] = Counter()  # outcomes of requests started within 5 s after a kill
    kills: list[dict[str, Any]] = []
    last_kill = [-1e9]
    next_i = [0]
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)

    async def runner(client: httpx.AsyncClient) -> None:
        while next_i[0] < n:
            i = next_i[0]
            next_i[0] += 1
            if kill_every and i and i % kill_every == 0:
                pids = worker_pids(serve_pid)
                if pids:
                    victim = rng.choice(pids)
                    os.kill(victim, signal.SIGKILL)
                    kills.append({"at_request": i, "pid": victim, "t": time.monotonic()})
                    last_kill[0] = time.monotonic()
            started = time.monotonic()
            out = await one(client, i, seed, timeout_s)
            outcomes[out] += 1
            if started - last_kill[0] < 5.0 or time.monotonic() - last_kill[0] < 5.0:
                near_kill[out] += 1

    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        await asyncio.gather(*(runner(client) for _ in range(concurrency)))
    return {"outcomes": dict(outcomes), "near_kill": dict(near_kill), "kills": len(kills),
            "server_errors": dict(ERRORS.most_common(10)),
            "seconds": time.monotonic() - t0, "requests": n}


def wait_baseline(url: str, timeout_s: float) -> dict[str, Any]:
    """Each worker idle, no blocks or leases held, integrity intact (polled, bounded)."""
    deadline = time.monotonic() + timeout_s
    auth = {"Authorization": f"Bearer {WORKER_KEY}"}
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        workers = httpx.get(f"{url}/health", timeout=10).json()["workers"]
        states = {}
        for w in workers:
            try:
                states[w["url"]] = httpx.get(f"{w['url']}/debug/engine", headers=auth, timeout=10).json()
            except (httpx.HTTPError, ValueError) as e:
                states[w["url"]] = {"error": repr(e)}
        last = states
        ok = all("stats" in s and s["integrity_error"] is None and s["num_streams"] == 0
                 and s["stats"]["num_running"] == 0 and s["stats"]["num_waiting"] == 0
                 and s["stats"]["kv_blocks_used"] == 0 and s["stats"]["kv_leases_active"] == 0
                 for s in states.values())
        if ok and len(states) == len(workers):
            return {"ok": True, "workers": {u: s["stats"] for u, s in states.items()}}
        time.sleep(1.0)
    return {"ok": False, "workers": last}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--kill-every", type=int, default=2000, help="SIGKILL one worker every N requests (0: never)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--model", default="tiny-random")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    port = free_port()
    # Two decode workers, so a killed one leaves the cluster serving (a lone decode worker's
    # death is a 503 for everything until it is back, which is defined but measures little).
    cmd = [sys.executable, "-m", "kvbaton.cli", "serve", "--model", a.model, "--port", str(port),
           "--prefill", "1", "--decode", "2", "--threads-per-worker", "1", "--num-kv-blocks", "512",
           "--worker-api-key", WORKER_KEY]
    log_path = Path(a.out).with_suffix(".log")
    log = log_path.open("w")  # serve's and its workers' logs (a pipe nobody reads would fill up)
    serve = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    result: dict[str, Any] = {"bench": "soak", "args": vars(a), "command": cmd,
                              "load_avg_start": os.getloadavg()}
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or serve.poll() is not None:
                raise RuntimeError("serve did not become healthy")
            time.sleep(0.5)
        result["load"] = asyncio.run(load(url, a.requests, a.concurrency, a.seed, a.request_timeout,
                                          serve.pid, a.kill_every))
        result["baseline"] = wait_baseline(url, 120)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        result["restarts"] = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                                 if line.startswith("kvbaton:router_worker_restarts_total{"))
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
        result["serve_exit_code"] = serve.returncode
        result["load_avg_end"] = os.getloadavg()
        log.close()
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    out, near = result["load"]["outcomes"], result["load"]["near_kill"]
    # 5xx and refused connections are defined outcomes only for requests caught by a kill.
    unexpected = sum(out.get(k, 0) - near.get(k, 0) for k in ("server_error", "connect_error"))
    result["unexpected_failures"] = unexpected
    verdict = out.get("hung", 0) == 0 and unexpected == 0 and result["baseline"]["ok"]
    result["pass"] = verdict
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"outcomes": out, "near_kill": result["load"]["near_kill"], "kills": result["load"]["kills"],
                      "server_errors": result["load"]["server_errors"],
                      "restarts": result["restarts"], "baseline_ok": result["baseline"]["ok"],
                      "unexpected_failures": unexpected,
                      "seconds": round(result["load"]["seconds"], 1), "pass": verdict}, indent=2))
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
