"""The remote KV tier against a real redis-server: blocks one engine computed are loaded by
another, values that are not the block asked for are refused and deleted, TTLs are set and
refreshed, a full server refuses writes softly, tenants never share blocks, and an unreachable,
killed or password-protected server has a defined outcome (never a failed request or a hang)."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import pytest
import redis
import torch

from conftest import GREEDY, free_port, make_llm, random_prompts, wait_until
from kvbaton import LLM, SamplingParams
from kvbaton.errors import ConfigError
from kvbaton.kv.events import REMOTE_MEDIUM, BlockRemoved, BlockStored
from kvbaton.kv.hashing import HASH_BYTES
from kvbaton.kv.store.base import BlockMeta
from kvbaton.kv.store.redis_server import RedisServer
from kvbaton.kv.store.remote import RemoteTier
from kvbaton.kv.store.remote_url import REMOTE_PASSWORD_ENV, parse_remote_url

HOST = 8 << 20
PROMPTS = random_prompts(6, 70, 130, seed=23)
BLOCK_BYTES = 4096
BS = 16


def remote_llm(url: str, **kwargs: Any) -> LLM:
    kwargs.setdefault("num_kv_blocks", 24)
    kwargs.setdefault("max_num_seqs", 2)
    kwargs.setdefault("kv_host_cache_bytes", HOST)
    return make_llm(kv_remote_url=url, **kwargs)


def flush(llm: LLM) -> None:
    """Let every queued copy (device -> host -> remote) finish and be collected."""
    off = llm.engine.offload
    for _ in range(3):
        off.io.drain(10)
        off.remote_io.drain(10)
        off.step_begin()


def remote_stats(llm: LLM) -> dict[str, Any]:
    return llm.engine.stats()["kv_tiers"]["remote"]


@pytest.fixture(scope="module")
def reference(plain_reference) -> list[list[int]]:
    return [plain_reference(p) for p in PROMPTS]


def _hashes(n: int, seed: str = "x") -> list[bytes]:
    return [hashlib.sha256(f"{seed}{i}".encode()).digest()[:HASH_BYTES] for i in range(n)]


def _metas(hashes: list[bytes]) -> list[BlockMeta]:
    return [BlockMeta(hashes[i - 1] if i else None, tuple(range(i * BS, (i + 1) * BS))) for i in range(len(hashes))]


def _tier(url: str, fingerprint: str = "model-a", **kwargs: Any) -> RemoteTier:
    return RemoteTier(url, BLOCK_BYTES, BS, "layout-1", fingerprint, **kwargs)


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, BLOCK_BYTES), dtype=torch.uint8, generator=g)


# ---- the tier on its own -----------------------------------------------------------------


def test_write_probe_read_round_trip_sets_and_refreshes_the_ttl(redis_server: RedisServer) -> None:
    tier = _tier(redis_server.url, ttl_s=100)
    hs, metas, src = _hashes(20), _metas(_hashes(20)), _rows(20)
    assert tier.write(hs, metas, src, range(20)) == hs
    assert tier.probe(hs) == 20
    assert tier.probe(hs[:5] + _hashes(1, "other") + hs[6:]) == 5  # the leading run only
    client = redis.Redis.from_url(redis_server.url)
    ttl = client.pttl(tier.key(hs[0]))
    assert 0 < ttl <= 100_000
    client.pexpire(tier.key(hs[0]), 5_000)
    dst = torch.zeros_like(src)
    result = tier.read(hs, metas, dst, range(20))
    assert result.leading_ok == 20 and torch.equal(dst, src)
    assert client.pttl(tier.key(hs[0])) > 50_000  # the hit refreshed it


def test_values_that_are_not_the_block_asked_for_are_refused_and_deleted(redis_server: RedisServer) -> None:
    tier = _tier(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    hs, metas, src = _hashes(4), _metas(_hashes(4)), _rows(4)

    def reads_bad(i: int, fix: Any, wanted: list[BlockMeta] = metas) -> None:
        assert tier.write(hs, metas, src, range(4)) == hs
        fix(i)
        dst = torch.zeros_like(src)
        result = tier.read(hs, wanted, dst, range(4))
        assert result.leading_ok == i and result.status[i] == "bad"
        assert torch.equal(dst[:i], src[:i])
        assert not client.exists(tier.key(hs[i]))  # deleted, so nobody loads it again

    assert tier.write(hs, metas, src, range(4)) == hs
    value = client.get(tier.key(hs[0]))
    assert value is not None
    # Another model's block under the same key (a shared namespace, a collision, a writer).
    other = _tier(redis_server.url, fingerprint="model-b")
    reads_bad(1, lambda i: other.write([hs[i]], [metas[i]], src, [i]))
    # A flipped payload byte: the checksum.
    reads_bad(2, lambda i: client.setrange(tier.key(hs[i]), len(value) - 7, b"\x00\xff"))
    # Truncated: the size.
    reads_bad(3, lambda i: client.set(tier.key(hs[i]), client.get(tier.key(hs[i]))[:-100]))
    # The right header and bytes, but not the tokens the reading request has.
    wrong = [*metas[:2], BlockMeta(metas[2].parent, (7,) * BS), metas[3]]
    reads_bad(2, lambda i: None, wrong)


def test_a_full_server_with_noeviction_refuses_writes_softly(redis_binary: str) -> None:
    with RedisServer(maxmemory_bytes=2 << 20, policy="noeviction", binary=redis_binary) as server:
        tier = _tier(server.url)
        hs = _hashes(1200)
        stored = tier.write(hs, _metas(hs), _rows(1200), range(1200))  # ~5 MB into 2 MiB
        assert 0 < len(stored) < len(hs)
        assert tier.probe(stored) == len(stored)


def test_a_wrong_password_is_a_config_error_and_the_env_var_supplies_a_right_one(
        redis_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with RedisServer(password="s3cret-pw", binary=redis_binary) as server:
        with pytest.raises(ConfigError) as e:
            _tier(server.url.replace("redis://", "redis://:wrong@"))
        assert e.value.field == "kv_remote_url" and "refused the password" in str(e.value)
        assert "wrong" not in str(e.value)
        with pytest.raises(ConfigError):
            _tier(server.url)  # none at all
        monkeypatch.setenv(REMOTE_PASSWORD_ENV, "s3cret-pw")
        tier = _tier(server.url)
        assert tier.up
        assert "s3cret" not in repr(tier)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:6379", "scheme"), ("redis://", "no host"), ("redis://h:99999/0", "not a URL"),
    ("redis://h:1/x", "number"), ("redis://h:1/99", "0..15"), ("127.0.0.1:6379", "scheme"),
])
def test_a_malformed_url_is_an_error_naming_the_field(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_remote_url(url)
    assert e.value.field == "kv_remote_url" and why in str(e.value)


def test_the_password_never_shows_in_the_redacted_url() -> None:
    u = parse_remote_url("rediss://:hunter2@cache.example:6380/3")
    assert (u.scheme, u.host, u.port, u.db, u.password) == ("rediss", "cache.example", 6380, 3, "hunter2")
    assert "hunter2" not in u.redacted and "hunter2" not in u.without_password()


def test_the_engine_config_checks_the_url_and_needs_a_host_tier() -> None:
    from kvbaton.engine.config import EngineConfig

    with pytest.raises(ConfigError) as e:
        EngineConfig(kv_remote_url="redis://x:1/0")
    assert e.value.field == "kv_remote_url" and "host tier" in str(e.value)
    with pytest.raises(ConfigError):
        EngineConfig(kv_remote_url="tcp://x", kv_host_cache_bytes=HOST)
    assert "hunter2" not in repr(EngineConfig(kv_remote_url="redis://:hunter2@x:1/0", kv_host_cache_bytes=HOST))


# ---- through the engine --------------------------------------------------------------------


def test_a_second_engine_loads_what_the_first_computed_and_gets_the_same_tokens(
        redis_server: RedisServer, reference) -> None:
    a = remote_llm(redis_server.url)
    events: list[Any] = []
    a.engine.pool.event_sink = events.append
    assert [o.token_ids for o in a.generate(PROMPTS, GREEDY)] == reference
    flush(a)
    put = a.engine.stats()["kv_remote"]["put_blocks"]
    assert put > 0 and remote_stats(a)["stores"] == put
    announced = [h for ev in events if isinstance(ev, BlockStored) and ev.medium == REMOTE_MEDIUM
                 for h in ev.block_hashes]
    assert len(announced) == put
    b = remote_llm(redis_server.url)
    assert [o.token_ids for o in b.generate(PROMPTS, GREEDY)] == reference
    b.engine.check_integrity()
    st = remote_stats(b)
    assert st["hit_tokens"] > 0 and st["loads"] > 0
    assert b.engine.pool.prefix_hits >= st["hit_tokens"]
    a.engine.close()
    b.engine.close()


def test_tenants_with_different_cache_salts_never_see_each_others_blocks(redis_server: RedisServer) -> None:
    params = [SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)] * len(PROMPTS)
    a = remote_llm(redis_server.url)
    a.generate(PROMPTS, params, cache_salt="tenant-a")
    flush(a)
    other = remote_llm(redis_server.url)
    other.generate(PROMPTS, params, cache_salt="tenant-b")
    assert remote_stats(other)["hit_tokens"] == 0
    same = remote_llm(redis_server.url)
    same.generate(PROMPTS, params, cache_salt="tenant-a")
    assert remote_stats(same)["hit_tokens"] > 0
    for llm in (a, other, same):
        llm.engine.close()


def test_a_block_evicted_between_lookup_and_read_is_recomputed(
        redis_server: RedisServer, reference, monkeypatch: pytest.MonkeyPatch) -> None:
    a = remote_llm(redis_server.url)
    a.generate(PROMPTS, GREEDY)
    flush(a)
    b = remote_llm(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    remote = b.engine.offload.remote
    real_probe = remote.probe

    def probe_then_evict(hashes: list[bytes]) -> int:
        found = real_probe(hashes)
        if found > 2:
            client.delete(remote.key(hashes[2]))  # gone before the load reads it
        return found

    monkeypatch.setattr(remote, "probe", probe_then_evict)
    events: list[Any] = []
    b.engine.pool.event_sink = events.append
    assert [o.token_ids for o in b.generate(PROMPTS, GREEDY)] == reference
    b.engine.check_integrity()
    assert b.engine.stats()["kv_remote"]["missing"] > 0
    assert remote_stats(b)["hit_tokens"] > 0  # the blocks before the gap still loaded
    assert any(isinstance(ev, BlockRemoved) and ev.medium == REMOTE_MEDIUM for ev in events)
    a.engine.close()
    b.engine.close()


def test_an_unreachable_server_at_start_then_one_that_appears(redis_binary: str, reference) -> None:
    port = free_port()
    llm = remote_llm(f"redis://127.0.0.1:{port}/0", kv_remote_timeout_s=0.5)
    remote = llm.engine.offload.remote
    assert not remote.up and llm.engine.stats()["kv_remote"]["outages"] == 1
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference  # the local tiers serve
    assert llm.engine.stats()["kv_remote"]["probes"] == 0
    with RedisServer(port=port, binary=redis_binary):
        def back() -> bool:
            llm.engine.collect_leases()  # the worker's idle upkeep: PING when the backoff is over
            return remote.up
        wait_until(back, 30, "the remote tier to reconnect")
        assert llm.engine.stats()["kv_remote"]["down_seconds"] > 0
        llm.generate(random_prompts(4, 70, 130, seed=99), GREEDY)
        flush(llm)
        assert llm.engine.stats()["kv_remote"]["put_blocks"] > 0
        llm.engine.close()


def test_a_server_killed_mid_run_fails_no_request_and_comes_back(redis_server: RedisServer, reference) -> None:
    llm = remote_llm(redis_server.url, kv_remote_timeout_s=0.5)
    assert [o.token_ids for o in llm.generate(PROMPTS[:3], GREEDY)] == reference[:3]
    flush(llm)
    redis_server.kill()
    # Every request still finishes with the right tokens, served from the local tiers.
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY)] == reference
    flush(llm)
    stats = llm.engine.stats()["kv_remote"]
    assert not stats["up"] and stats["outages"] == 1 and stats["errors"] >= 1
    redis_server.start()

    def back() -> bool:
        llm.engine.collect_leases()
        return llm.engine.offload.remote.up
    wait_until(back, 30, "the remote tier to reconnect")
    before = llm.engine.stats()["kv_remote"]["put_blocks"]
    llm.generate(random_prompts(4, 70, 130, seed=98), GREEDY)
    flush(llm)
    assert llm.engine.stats()["kv_remote"]["put_blocks"] > before  # writes resumed
    llm.engine.check_integrity()
    llm.engine.close()


def test_the_reuse_filter_keeps_one_off_blocks_out_of_the_remote_tier(redis_server: RedisServer) -> None:
    llm = remote_llm(redis_server.url, kv_remote_min_hits=2)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate(PROMPTS[:2], params)
    flush(llm)
    assert llm.engine.stats()["kv_remote"]["put_blocks"] == 0
    llm.generate(PROMPTS[:2], params)  # used a second time: now they qualify
    llm.generate(random_prompts(6, 100, 130, seed=5), params)  # push them off the device
    flush(llm)
    assert llm.engine.stats()["kv_remote"]["put_blocks"] > 0
    llm.engine.close()


def test_close_is_bounded_when_the_server_hangs(redis_server: RedisServer) -> None:
    llm = remote_llm(redis_server.url, kv_remote_timeout_s=0.5)
    llm.generate(PROMPTS[:2], GREEDY)
    assert redis_server.proc is not None
    import signal

    redis_server.proc.send_signal(signal.SIGSTOP)  # alive, answering nothing
    try:
        # Each server call gives up after its timeout: the requests finish and close returns
        # (the bound only catches a hang; it is minutes above what this takes).
        start = time.monotonic()
        outs = llm.generate(PROMPTS[2:4], GREEDY)
        llm.engine.close()
        assert all(o.finished for o in outs)
        assert time.monotonic() - start < 120
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
