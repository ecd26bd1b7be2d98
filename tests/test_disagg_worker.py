"""Prefill and decode workers handing KV over the transfer data plane, without the router.

A prefill worker answers a prefill-only request with a KV handle; a decode worker given the
handle fetches the missing blocks and decodes. Every test ends with block accounting back at
baseline on both workers: no leaked blocks, imports or leases.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from conftest import GREEDY, random_prompts, wait_until
from worker_support import metric, parse_metrics, running_worker, wait_idle

MAX_TOKENS = GREEDY.max_tokens


def completion(url: str, prompt: list[int], max_tokens: int = MAX_TOKENS, **extra: Any) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


def prefill(url: str, prompt: list[int], **extra: Any) -> dict[str, Any]:
    r = completion(url, prompt, kv_transfer_params={"do_remote_decode": True}, **extra)
    assert r.status_code == 200, r.text
    return r.json()


def decode(url: str, prompt: list[int], handle: dict[str, Any], **extra: Any) -> httpx.Response:
    return completion(url, prompt, kv_transfer_params=handle, **extra)


def settle(*urls: str) -> None:
    """Both workers idle, leases ended, no blocks used, integrity checks pass."""
    for url in urls:
        wait_until(lambda url=url: wait_idle(url, 0)["stats"]["kv_leases_active"] == 0, what="leases to end")


@pytest.fixture(scope="module", params=["shm", "tcp"])
def pd(request):
    """A prefill and a decode worker; the prefill worker's KV in shared memory (same-host fast
    path) or private memory (bytes over TCP)."""
    shared = request.param == "shm"
    with running_worker({"role": "prefill"}, shared_kv=shared) as p, \
            running_worker({"role": "decode"}) as d:
        yield p, d


@pytest.mark.parametrize("length", [7, 16, 45, 300])
def test_disaggregated_output_equals_colocated(pd, plain_reference, length: int) -> None:
    p, d = pd
    prompt = random_prompts(1, length, length, seed=100 + length)[0]
    pre = prefill(p.url, prompt)
    handle = pre["kv_transfer_params"]
    assert handle["num_prompt_tokens"] == length and len(handle["block_hashes"]) == length // 16
    assert pre["choices"][0]["token_ids"] == [handle["first_token_id"]]
    r = decode(d.url, prompt, handle)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["token_ids"] == plain_reference(prompt)
    report = body["kv_transfer_params"]
    assert report["outcome"] == "fetched" and report["blocks_fetched"] == -(-length // 16)
    stats = p.state.kv.server.stats
    if p.state.engine.engine.config.shared_kv:
        wait_until(lambda: stats.shm_fetches > 0, what="the shm fetch to be counted")
    else:
        wait_until(lambda: stats.fetches > 0, what="the TCP fetch to be counted")
        assert stats.shm_fetches == 0
    settle(p.url, d.url)


def test_decode_worker_fetches_only_what_it_does_not_cache(pd, plain_reference) -> None:
    p, d = pd
    shared = random_prompts(1, 96, 96, seed=7)[0]
    a = shared + random_prompts(1, 20, 20, seed=8)[0]
    b = shared + random_prompts(1, 5, 5, seed=9)[0]
    for prompt, fetched in ((a, 8), (b, 1)):
        r = decode(d.url, prompt, prefill(p.url, prompt)["kv_transfer_params"])
        body = r.json()
        assert body["choices"][0]["token_ids"] == plain_reference(prompt)
        assert body["kv_transfer_params"]["blocks_fetched"] == fetched
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    settle(p.url, d.url)


def test_streaming_decode_reports_the_import_in_the_usage_chunk(pd, plain_reference) -> None:
    p, d = pd
    prompt = random_prompts(1, 40, 40, seed=11)[0]
    handle = prefill(p.url, prompt)["kv_transfer_params"]
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
            "kv_transfer_params": handle}
    tokens: list[int] = []
    report = None
    with httpx.stream("POST", f"{d.url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            import json

            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                tokens += c.get("token_ids") or []
            if chunk.get("usage"):
                report = chunk["kv_transfer_params"]
    assert tokens == plain_reference(prompt)
    assert report is not None and report["outcome"] == "fetched"
    settle(p.url, d.url)


def test_first_token_that_ends_the_request_frees_the_lease_at_once(pd) -> None:
    p, _ = pd
    prompt = random_prompts(1, 20, 20, seed=12)[0]
    first = prefill(p.url, prompt)["kv_transfer_params"]
    assert first["finish_reason"] is None  # more tokens may follow: the lease is held
    httpx.post(f"{p.url}/kv/release", json={"lease_id": first["lease_id"]})
    # Make the first token a stop token: the request ends on the prefill side.
    handle = prefill(p.url, prompt, ignore_eos=False, stop_token_ids=[first["first_token_id"]])["kv_transfer_params"]
    assert handle["finish_reason"] == "stop"
    settle(p.url)


def test_expired_lease_makes_the_decode_side_recompute(plain_reference) -> None:
    with running_worker({"role": "prefill"}, lease_ttl_s=0.2) as p, \
            running_worker({"role": "decode"}) as d:
        prompt = random_prompts(1, 50, 50, seed=13)[0]
        handle = prefill(p.url, prompt)["kv_transfer_params"]
        settle(p.url)  # the lease expired and its blocks are back
        r = decode(d.url, prompt, handle)
        body = r.json()
        assert body["choices"][0]["token_ids"] == plain_reference(prompt)
        assert body["kv_transfer_params"]["outcome"] == "recomputed"
        assert "Lease" in body["kv_transfer_params"]["error"]
        settle(d.url)
        m = parse_metrics(httpx.get(f"{d.url}/metrics").text)
        assert metric(m, "kvbaton:kv_transfer_outcomes_total", outcome="recomputed") == 1


def test_dead_prefill_worker_recompute_or_fail_by_policy(plain_reference) -> None:
    prompt = random_prompts(1, 33, 33, seed=14)[0]
    with running_worker({"role": "decode"}) as d, \
            running_worker({"role": "decode", "kv_transfer_failure": "fail"}) as strict:
        with running_worker({"role": "prefill"}) as p:
            handle = prefill(p.url, prompt)["kv_transfer_params"]
        # The prefill worker is gone: nothing listens on the handle's port any more.
        body = decode(d.url, prompt, handle).json()
        assert body["choices"][0]["token_ids"] == plain_reference(prompt)
        assert body["kv_transfer_params"]["outcome"] == "recomputed"
        r = decode(strict.url, prompt, handle)
        assert r.status_code == 502 and r.json()["error"]["code"] == "kv_transfer_failed"
        settle(d.url, strict.url)


def test_corrupted_block_is_refused_and_never_used(pd, plain_reference) -> None:
    from kvbaton.kv.transfer.tcp_server import Faults

    p, d = pd
    prompt = random_prompts(1, 64, 64, seed=15)[0]
    handle = prefill(p.url, prompt)["kv_transfer_params"]
    p.state.kv.server.faults = Faults(corrupt_block_index=2)
    try:
        body = decode(d.url, prompt, handle).json()
    finally:
        p.state.kv.server.faults = None
    report = body["kv_transfer_params"]
    assert report["outcome"] == "recomputed" and "Checksum" in report["error"]
    assert body["choices"][0]["token_ids"] == plain_reference(prompt)
    # The corrupt block was never registered: a second decode fetches and matches again.
    again = decode(d.url, prompt, prefill(p.url, prompt)["kv_transfer_params"]).json()
    assert again["choices"][0]["token_ids"] == plain_reference(prompt)
    settle(p.url, d.url)


def test_handle_for_another_model_or_tenant_is_refused(plain_reference) -> None:
    # The refused peer cannot release the lease over the data plane; its deadline frees it.
    with running_worker({"role": "prefill"}, lease_ttl_s=1.0) as p, \
            running_worker({"role": "decode"}, dtype="bfloat16") as other:
        prompt = random_prompts(1, 30, 30, seed=16)[0]
        handle = prefill(p.url, prompt)["kv_transfer_params"]
        body = decode(other.url, prompt, handle).json()
        assert body["kv_transfer_params"]["outcome"] == "recomputed"
        assert "model" in body["kv_transfer_params"]["error"]
        settle(p.url, other.url)


def test_tenant_salt_mismatch_is_not_served(pd) -> None:
    p, d = pd
    prompt = random_prompts(1, 48, 48, seed=17)[0]
    handle = prefill(p.url, prompt, cache_salt="tenant-a")["kv_transfer_params"]
    body = decode(d.url, prompt, handle, cache_salt="tenant-b").json()
    assert body["kv_transfer_params"]["outcome"] == "recomputed"
    assert "block_hashes" in body["kv_transfer_params"]["error"]
    settle(p.url, d.url)


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda h: h.pop("lease_id"), "lease_id"),
        (lambda h: h.update(block_hashes=["zz"]), "block_hashes"),
        (lambda h: h.update(remote_port=70000), "remote_port"),
        (lambda h: h.update(num_prompt_tokens=3), "num_prompt_tokens"),
    ],
)
def test_malformed_handles_are_400s(pd, mutate, field: str) -> None:
    p, d = pd
    prompt = random_prompts(1, 40, 40, seed=18)[0]
    handle = prefill(p.url, prompt)["kv_transfer_params"]
    lease_id = handle["lease_id"]
    mutate(handle)
    r = decode(d.url, prompt, handle)
    assert r.status_code == 400 and field in r.json()["error"]["message"]
    # Nothing was fetched, so the lease is still held until someone releases it (the router
    # does on errors) or it expires.
    assert httpx.post(f"{p.url}/kv/release", json={"lease_id": lease_id}).json() == {"released": True}
    settle(p.url, d.url)


def test_roles_refuse_the_other_leg(pd) -> None:
    p, d = pd
    prompt = random_prompts(1, 20, 20, seed=19)[0]
    r = completion(d.url, prompt, kv_transfer_params={"do_remote_decode": True})
    assert r.status_code == 400 and "decode worker" in r.json()["error"]["message"]
    handle = prefill(p.url, prompt)["kv_transfer_params"]
    r = decode(p.url, prompt, handle)
    assert r.status_code == 400 and "prefill worker" in r.json()["error"]["message"]
    r = completion(p.url, prompt, kv_transfer_params={"do_remote_decode": True}, stream=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    assert httpx.post(f"{p.url}/kv/release", json={"lease_id": handle["lease_id"]}).json() == {"released": True}
    assert httpx.post(f"{p.url}/kv/release", json={"lease_id": handle["lease_id"]}).json() == {"released": False}
    assert httpx.post(f"{p.url}/kv/release", json={}).status_code == 400
    info = httpx.get(f"{p.url}/kv/info").json()
    assert info["role"] == "prefill" and info["transfer_address"] is not None
    assert httpx.get(f"{d.url}/kv/info").json()["transfer_address"] is None
    settle(p.url, d.url)


def test_a_lease_whose_client_left_as_it_finished_is_released_at_once() -> None:
    # The race the router hits when it gives up on a slow prefill: the prompt finishes and its
    # lease is made just as the client goes. Nobody will fetch that KV; it must not stay pinned
    # until the lease's TTL.
    from kvbaton.engine.kv_handoff import LeaseInfo
    from kvbaton.engine.outputs import RequestOutput

    with running_worker({"role": "prefill"}) as p:
        handle = prefill(p.url, random_prompts(1, 40, 40, seed=3)[0])["kv_transfer_params"]
        eng = p.state.engine
        assert eng.stats_snapshot["kv_leases_active"] == 1
        late = RequestOutput("cmpl-gone", None, [], [1], "", finished=True,
                             kv_lease=LeaseInfo(handle["lease_id"], (), 40, 30.0))
        assert eng.loop is not None
        eng.loop.call_soon_threadsafe(eng._dispatch, [late], 0.0)  # its stream is gone
        settle(p.url)


def test_a_forged_or_unsigned_handle_is_never_fetched() -> None:
    # With a transfer secret, the prefill worker signs its handles and the decode worker fetches
    # only for a handle whose signature verifies: a client that edits one (to point it at its
    # own server, or at another lease) gets a recomputed prompt, never foreign blocks.
    secret = {"kv_secret": "cluster-secret"}
    with running_worker({"role": "prefill", **secret}) as p, running_worker({"role": "decode", **secret}) as d:
        prompt = random_prompts(1, 40, 40, seed=4)[0]
        want = completion(p.url, prompt).json()["choices"][0]["token_ids"]
        for tamper in ("none", "port", "unsigned"):
            handle = dict(prefill(p.url, prompt)["kv_transfer_params"])
            assert isinstance(handle["signature"], str)
            if tamper == "port":
                handle["remote_port"] = 9  # a server of the client's choosing
            elif tamper == "unsigned":
                handle.pop("signature")
            r = decode(d.url, prompt, handle, stream=True, stream_options={"include_usage": True})
            assert r.status_code == 200, r.text
            chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                      if line.startswith("data: {")]
            kv = next(c["kv_transfer_params"] for c in chunks if c.get("kv_transfer_params"))
            tokens = [t for c in chunks for ch in c.get("choices", []) for t in ch.get("token_ids") or []]
            assert tokens == want  # the same answer either way
            if tamper == "none":
                assert kv["outcome"] == "fetched"
            else:
                assert kv["outcome"] == "recomputed" and "signature" in kv["error"]
                httpx.post(f"{p.url}/kv/release", json={"lease_id": handle["lease_id"]}, timeout=10)
        settle(p.url, d.url)
