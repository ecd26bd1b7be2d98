"""The tiered KV store as users reach it: CLI flags and defaults, POST /kv/pin and /kv/unpin,
the kv_tier_* metrics, /kv/info's tiers, cached_tokens of prompts reloaded from a tier, and a
disk tier that outlives its worker."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import kvbaton.cli as cli
from conftest import random_prompts, wait_until
from kvbaton.engine.config import EngineConfig, machine_memory_bytes
from kvbaton.engine.offload import LOAD_BUCKETS
from kvbaton.router.local_cluster import WorkerSpec
from worker_support import MODEL, metric, parse_metrics, running_worker, wait_idle

BLOCK = 16  # tokens per block (the engine default)
DEVICE_BLOCKS = 16  # a device pool small enough that a few prompts evict each other
HOST_BYTES = 4 << 20  # tiny-random's block is 8 KiB: 512 host blocks
TIERED: dict[str, Any] = {"num_kv_blocks": DEVICE_BLOCKS, "kv_host_cache_bytes": HOST_BYTES}
KEY = {"Authorization": "Bearer secret"}
GIB = 1 << 30


def _args(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


def _engine_config(*argv: str, workers: int = 1) -> EngineConfig:
    return EngineConfig(model=MODEL, **cli._engine_kwargs(_args(*argv), workers))


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Set the available memory the "auto" host tier is sized from."""

    def set_available(n: int) -> None:
        monkeypatch.setattr(cli, "available_memory_bytes", lambda: n)

    yield set_available


# ---- flags -----------------------------------------------------------------------------------


def test_kv_store_flags_reach_engine_config(tmp_path: Path) -> None:
    cfg = _engine_config(
        "worker", "--kv-host-cache-gib", "0.25", "--kv-disk-cache-dir", str(tmp_path),
        "--kv-disk-cache-gib", "1.5", "--kv-eviction-policy", "lfu", "--kv-offload-mode", "write-through",
        "--kv-offload-min-hits", "2", "--kv-host-ttl", "10", "--kv-disk-ttl", "20", "--kv-pin-max-ttl", "30",
        "--kv-load-timeout", "5")
    assert cfg.kv_host_cache_bytes == GIB // 4
    assert (cfg.kv_disk_cache_dir, cfg.kv_disk_cache_bytes) == (str(tmp_path), 3 * GIB // 2)
    assert (cfg.kv_eviction_policy, cfg.kv_offload_mode, cfg.kv_offload_min_hits) == ("lfu", "write-through", 2)
    assert (cfg.kv_host_ttl_s, cfg.kv_disk_ttl_s, cfg.kv_pin_max_ttl_s, cfg.kv_load_timeout_s) == (10, 20, 30, 5)
    # Without the flags: the engine's own defaults, disk off.
    plain = _engine_config("worker", "--kv-host-cache-gib", "0")
    default = EngineConfig(model=MODEL)
    for name in ("kv_host_cache_bytes", "kv_disk_cache_dir", "kv_disk_cache_bytes", "kv_eviction_policy",
                 "kv_offload_mode", "kv_offload_min_hits", "kv_host_ttl_s", "kv_disk_ttl_s",
                 "kv_pin_max_ttl_s", "kv_load_timeout_s"):
        assert getattr(plain, name) == getattr(default, name), name
    assert not plain.kv_tiers_enabled


def test_auto_host_tier_per_command(memory: Any) -> None:
    memory(100 * GIB)  # 10% is more than the 2 GiB cap
    assert _engine_config("worker").kv_host_cache_bytes == 2 * GIB
    assert _engine_config("serve", workers=4).kv_host_cache_bytes == GIB // 2  # split over the workers
    assert _engine_config("generate", "hi").kv_host_cache_bytes == 0  # one-shot: nothing to reuse
    assert _engine_config("generate", "hi", "--kv-host-cache-gib", "0.5").kv_host_cache_bytes == GIB // 2
    assert _engine_config("worker", "--kv-host-cache-gib", "0").kv_host_cache_bytes == 0
    assert _engine_config("worker", "--no-prefix-caching").kv_host_cache_bytes == 0  # nothing to offload
    memory(4 * GIB)  # 10% of it, rounded down to a MiB
    assert cli.auto_host_cache_bytes() == (4 * GIB // 10) >> 20 << 20 == 409 << 20
    assert cli.auto_host_cache_bytes(3) == (4 * GIB // 10 // 3) >> 20 << 20
    memory(0)  # memory unknown: no host tier rather than a guess
    assert _engine_config("worker").kv_host_cache_bytes == 0
    assert _args("worker").kv_host_cache_gib == "auto"


def test_available_memory_is_memavailable_else_total() -> None:
    avail = cli.available_memory_bytes()
    assert 0 < avail <= machine_memory_bytes()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        line = next(ln for ln in meminfo.read_text().splitlines() if ln.startswith("MemAvailable:"))
        assert abs(avail - int(line.split()[1]) * 1024) < 256 << 20  # it moves between two reads


class _FakeCluster:
    """Stands in for LocalCluster: records the worker specs serve built, starts nothing."""

    specs: list[WorkerSpec] = []

    def __init__(self, specs: list[WorkerSpec], kv_secret: str | None = None, **_: Any) -> None:
        _FakeCluster.specs = list(specs)

    def run(self, serve: Any) -> int:
        return 0


def _worker_config(spec: WorkerSpec) -> EngineConfig:
    """The EngineConfig the worker process of ``spec`` would build from its flags."""
    return _engine_config("worker", "--role", spec.role, *spec.args)


def test_serve_gives_each_worker_its_share_and_its_own_disk_dir(
        memory: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import kvbaton.router.local_cluster as local_cluster

    memory(7 * GIB)  # 10%: 0.7 GiB, 3 workers: an odd number of bytes each, passed exactly
    monkeypatch.setattr(local_cluster, "LocalCluster", _FakeCluster)
    assert cli.main(["serve", "--model", MODEL, "--prefill", "2", "--decode", "1",
                     "--kv-disk-cache-dir", str(tmp_path), "--kv-disk-cache-gib", "2",
                     "--kv-eviction-policy", "s3fifo", "--kv-offload-mode", "write-through",
                     "--kv-offload-min-hits", "3", "--kv-host-ttl", "7", "--kv-disk-ttl", "8",
                     "--kv-pin-max-ttl", "9", "--kv-load-timeout", "4"]) == 0
    cfgs = [(s.role, _worker_config(s)) for s in _FakeCluster.specs]
    assert [r for r, _ in cfgs] == ["prefill", "prefill", "decode"]
    share = cli.auto_host_cache_bytes(3)
    assert 0 < share < 2 * GIB // 3
    assert {c.kv_host_cache_bytes for _, c in cfgs} == {share}
    # A disk tier's directory belongs to one process: each worker gets its own, stable by role
    # and index, so a restarted serve finds every worker's blocks again.
    assert [c.kv_disk_cache_dir for _, c in cfgs] == [str(tmp_path / d) for d in ("prefill-0", "prefill-1", "decode-0")]
    for _, c in cfgs:
        assert (c.kv_disk_cache_bytes, c.kv_eviction_policy, c.kv_offload_mode, c.kv_offload_min_hits) == (
            2 * GIB, "s3fifo", "write-through", 3)
        assert (c.kv_host_ttl_s, c.kv_disk_ttl_s, c.kv_pin_max_ttl_s, c.kv_load_timeout_s) == (7, 8, 9, 4)
    # An explicit size is per worker; 0 turns the tier off everywhere.
    cli.main(["serve", "--model", MODEL, "--colocated", "2", "--kv-host-cache-gib", "0.5"])
    assert [_worker_config(s).kv_host_cache_bytes for s in _FakeCluster.specs] == [GIB // 2] * 2
    cli.main(["serve", "--model", MODEL, "--colocated", "2", "--kv-host-cache-gib", "0"])
    assert not any(_worker_config(s).kv_tiers_enabled for s in _FakeCluster.specs)


def _too_much_for_two() -> str:
    """A host tier one worker fits and two do not (GiB)."""
    return f"{0.75 * machine_memory_bytes() / GIB:.3f}"


@pytest.mark.parametrize("command, argv, expected", [
    ("worker", ["--kv-host-cache-gib", "100000"], "error: --kv-host-cache-gib: "),
    ("serve", ["--kv-host-cache-gib", "100000"], "error: --kv-host-cache-gib: "),
    ("serve", ["--colocated", "2", "--kv-host-cache-gib", "TWO"], "error: --kv-host-cache-gib: 2 workers x "),
    ("worker", ["--kv-host-cache-gib", "-1"], "error: --kv-host-cache-gib: "),
    ("worker", ["--kv-host-cache-gib", "lots"], "error: argument --kv-host-cache-gib: "),
    ("worker", ["--kv-disk-cache-gib", "1"], "error: --kv-disk-cache-gib: needs --kv-disk-cache-dir"),
    ("worker", ["--kv-disk-cache-dir", "DIR", "--kv-disk-cache-gib", "0"], "error: --kv-disk-cache-gib: "),
    ("worker", ["--kv-eviction-policy", "mru"], "error: argument --kv-eviction-policy: invalid choice"),
    ("worker", ["--kv-offload-mode", "sometimes"], "error: argument --kv-offload-mode: invalid choice"),
    ("worker", ["--kv-offload-min-hits", "0"], "error: --kv-offload-min-hits: "),
    ("worker", ["--kv-host-ttl", "-1"], "error: --kv-host-ttl: "),
    ("serve", ["--kv-disk-ttl", "-1"], "error: --kv-disk-ttl: "),
    ("worker", ["--kv-pin-max-ttl", "0"], "error: --kv-pin-max-ttl: "),
    ("worker", ["--kv-load-timeout", "nan"], "error: argument --kv-load-timeout: "),
    ("generate", ["--kv-host-cache-gib", "100000"], "error: --kv-host-cache-gib: "),
])
def test_bad_kv_store_flags_exit_2_naming_the_flag_before_loading(
        command: str, argv: list[str], expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import kvbaton.router.local_cluster as local_cluster
    import kvbaton.worker.server as server

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a bad flag must stop the command before anything starts or loads")

    monkeypatch.setattr(server, "run_worker", never)
    monkeypatch.setattr(local_cluster, "LocalCluster", never)
    argv = [str(tmp_path) if a == "DIR" else _too_much_for_two() if a == "TWO" else a for a in argv]
    positional = ["a prompt"] if command == "generate" else []
    with pytest.raises(SystemExit) as exited:
        cli.main([command, *positional, "--model", MODEL, *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert expected in err, err
    if argv[:2] == ["--kv-host-cache-gib", "100000"]:
        assert "more than this machine's" in err and "GiB of memory" in err


# ---- the HTTP API ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiered() -> Iterator[Any]:
    """A worker whose 16-block device pool spills into a 4 MiB host tier."""
    with running_worker(**TIERED) as w:
        yield w


@pytest.fixture(scope="module")
def plain() -> Iterator[Any]:
    """A worker without tiers, behind an API key."""
    with running_worker({"api_key": "secret"}) as w:
        yield w


def _complete(url: str, prompt: str | list[int], **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _cached(answer: dict[str, Any]) -> int:
    return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])


def _post(url: str, route: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    if isinstance(body, str):  # raw JSON text (NaN, lone surrogates)
        return httpx.post(f"{url}{route}", content=body, timeout=30,
                          headers={"Content-Type": "application/json", **(headers or {})})
    return httpx.post(f"{url}{route}", json=body, headers=headers, timeout=30)


def _metrics(url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)


def _tier(url: str, name: str, tier: str = "host") -> float:
    return metric(_metrics(url), f"kvbaton:{name}", model_name=MODEL, tier=tier)


def test_a_worker_without_tiers_refuses_pins(plain: Any) -> None:
    body = {"prompt": list(range(32)), "ttl_s": 10}
    for route in ("/kv/pin", "/kv/unpin"):
        assert _post(plain.url, route, body).status_code == 401  # guarded like the other routes
        r = _post(plain.url, route, body, KEY)
        assert r.status_code == 400
        err = r.json()["error"]
        assert (err["param"], err["code"]) == (None, "kv_store_disabled")
        assert "--kv-host-cache-gib" in err["message"] and "--kv-disk-cache-dir" in err["message"]
    assert httpx.get(f"{plain.url}/kv/info", headers=KEY, timeout=10).json()["kv_tiers"] == {}
    assert "kvbaton:kv_tier_" not in httpx.get(f"{plain.url}/metrics", timeout=10).text


def test_kv_info_lists_the_tiers(tiered: Any) -> None:
    info = httpx.get(f"{tiered.url}/kv/info", timeout=10).json()
    assert info["kv_tiers"] == {"host": {"medium": "CPU_TIER", "blocks_capacity": HOST_BYTES // 8192, "enabled": True}}


def test_pin_and_unpin_a_prompt(tiered: Any) -> None:
    url = tiered.url
    prompt = random_prompts(1, 80, 80, seed=101)[0]  # five full blocks
    _complete(url, prompt)
    r = _post(url, "/kv/pin", {"prompt": prompt, "ttl_s": 60})
    assert r.status_code == 200, r.text
    assert r.json() == {"pinned_blocks": 5, "pinned_tokens": 5 * BLOCK, "ttl_s": 60.0, "prefix_blocks": 5}
    wait_until(lambda: _tier(url, "kv_tier_blocks_pinned") == 5, what="the pinned-blocks gauge")
    # Pinning again extends the pin; a longer prompt pins only the leading blocks it shares.
    assert _post(url, "/kv/pin", {"prompt": prompt + [7] * 40, "ttl_s": 30.5}).json()["pinned_blocks"] == 5
    assert _post(url, "/kv/unpin", {"prompt": prompt}).json() == {"unpinned_blocks": 5}
    assert _post(url, "/kv/unpin", {"prompt": prompt}).json() == {"unpinned_blocks": 0}  # idempotent
    wait_until(lambda: _tier(url, "kv_tier_blocks_pinned") == 0, what="the pins to end")
    wait_idle(url, 0)


def test_pin_text_chat_and_salted_prompts(tiered: Any) -> None:
    url = tiered.url
    text = "The tiered KV store keeps prefixes that fall off the device in host memory."
    _complete(url, text)
    r = _post(url, "/kv/pin", {"prompt": text, "ttl_s": 5})  # tokenized as completions do
    assert r.status_code == 200 and r.json()["pinned_blocks"] == len(text) // BLOCK, r.text
    messages = [{"role": "user", "content": "Pin this conversation in the host tier, please."}]
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4,
                                                          "temperature": 0}, timeout=60)
    assert chat.status_code == 200, chat.text
    n_blocks = chat.json()["usage"]["prompt_tokens"] // BLOCK
    r = _post(url, "/kv/pin", {"messages": messages, "ttl_s": 5})  # templated as chat does
    assert r.status_code == 200 and r.json()["pinned_blocks"] == n_blocks, r.text
    assert _post(url, "/kv/unpin", {"messages": messages}).json() == {"unpinned_blocks": n_blocks}
    # A tenant's salt is part of every block's hash: only the same salt finds the prefix.
    salted = random_prompts(1, 48, 48, seed=102)[0]
    _complete(url, salted, cache_salt="tenant-a")
    for salt in (None, "tenant-b"):
        r = _post(url, "/kv/pin", {"prompt": salted, "ttl_s": 5, "cache_salt": salt})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "unknown_prefix")
    r = _post(url, "/kv/pin", {"prompt": salted, "ttl_s": 5, "cache_salt": "tenant-a"})
    assert r.status_code == 200 and r.json()["pinned_blocks"] == 3, r.text
    assert _post(url, "/kv/unpin", {"prompt": salted, "cache_salt": "tenant-a"}).json()["unpinned_blocks"] == 3
    other = [{"role": "user", "content": "A conversation this worker has never seen at all."}]
    r = _post(url, "/kv/pin", {"messages": other, "ttl_s": 5})
    assert (r.status_code, r.json()["error"]["param"], r.json()["error"]["code"]) == (400, "messages", "unknown_prefix")
    wait_idle(url, 0)


_P = list(range(32))
_M = [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize("route, body, param, code", [
    ("/kv/pin", {"prompt": _P}, "ttl_s", "missing_required_parameter"),
    ("/kv/pin", {"prompt": _P, "ttl_s": None}, "ttl_s", "missing_required_parameter"),
    ("/kv/pin", {"prompt": _P, "ttl_s": 0}, "ttl_s", "invalid_value"),
    ("/kv/pin", {"prompt": _P, "ttl_s": -5}, "ttl_s", "invalid_value"),
    ("/kv/pin", {"prompt": _P, "ttl_s": 3600.5}, "ttl_s", "invalid_value"),  # past --kv-pin-max-ttl
    ("/kv/pin", {"prompt": _P, "ttl_s": "60"}, "ttl_s", "invalid_value"),
    ("/kv/pin", {"prompt": _P, "ttl_s": True}, "ttl_s", "invalid_value"),
    ("/kv/pin", '{"prompt": [1, 2], "ttl_s": NaN}', "ttl_s", "invalid_value"),
    ("/kv/pin", '{"prompt": [1, 2], "ttl_s": 1e999}', "ttl_s", "invalid_value"),
    ("/kv/pin", {"ttl_s": 5}, "prompt", "missing_required_parameter"),
    ("/kv/unpin", {}, "prompt", "missing_required_parameter"),
    ("/kv/pin", {"prompt": _P, "messages": _M, "ttl_s": 5}, "prompt", "invalid_value"),
    ("/kv/unpin", {"prompt": _P, "messages": _M}, "prompt", "invalid_value"),
    ("/kv/pin", {"prompt": "", "ttl_s": 5}, "prompt", "invalid_value"),
    ("/kv/pin", {"prompt": "too short", "ttl_s": 5}, "prompt", "invalid_value"),
    ("/kv/unpin", {"prompt": [1, 2, 3]}, "prompt", "invalid_value"),
    ("/kv/pin", {"prompt": 5, "ttl_s": 5}, "prompt", "invalid_type"),
    ("/kv/pin", {"prompt": [1, "a"], "ttl_s": 5}, "prompt", "invalid_type"),
    ("/kv/pin", {"prompt": [True] * 16, "ttl_s": 5}, "prompt", "invalid_type"),
    ("/kv/pin", {"prompt": [10**6] * 16, "ttl_s": 5}, "prompt", "invalid_value"),
    ("/kv/pin", {"prompt": [-1] * 16, "ttl_s": 5}, "prompt", "invalid_value"),
    ("/kv/pin", {"messages": [], "ttl_s": 5}, "messages", "invalid_value"),
    ("/kv/pin", {"messages": [{"content": "no role"}], "ttl_s": 5}, "messages", "missing_required_parameter"),
    ("/kv/pin", '{"prompt": "\\ud800 and more text than one block", "ttl_s": 5}', "prompt", "invalid_value"),
    ("/kv/pin", '{"messages": [{"role": "user", "content": "\\udfff"}], "ttl_s": 5}', "messages", "invalid_value"),
    ("/kv/unpin", '{"prompt": [1, 2], "cache_salt": "\\ud800"}', "cache_salt", "invalid_value"),
    ("/kv/pin", {"prompt": list(range(100, 148)), "ttl_s": 5}, "prompt", "unknown_prefix"),
    ("/kv/pin", {"model": "nope", "prompt": _P, "ttl_s": 5}, "model", "model_not_found"),
    ("/kv/pin", "[1, 2]", None, "invalid_type"),
    ("/kv/unpin", "{not json", None, "invalid_json"),
])
def test_bad_pin_requests_get_400_naming_the_field(
        tiered: Any, route: str, body: Any, param: str | None, code: str) -> None:
    r = _post(tiered.url, route, body)
    assert r.status_code == (404 if code == "model_not_found" else 400), r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    if param is not None:
        assert err["message"].startswith(param), err["message"]
    wait_idle(tiered.url, 0)


def test_evicted_prompt_reloads_from_the_host_tier(tiered: Any) -> None:
    url = tiered.url
    prompt = random_prompts(1, 96, 96, seed=201)[0]  # six full blocks; five can be hits
    greedy = {"max_tokens": 8}
    first = _complete(url, prompt, **greedy)
    assert _cached(first) == 0
    for flood in random_prompts(3, 200, 200, seed=202):  # 13 blocks each: the device pool turns over
        _complete(url, flood, **greedy)
    before = _metrics(url)
    again = _complete(url, prompt, **greedy)
    after = _metrics(url)
    # The same greedy tokens, and the prompt counted as cached although the device had lost it.
    assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    assert _cached(again) == (len(prompt) - 1) // BLOCK * BLOCK

    def delta(name: str) -> float:
        labels = {"model_name": MODEL, "tier": "host"}
        return metric(after, f"kvbaton:{name}", **labels) - metric(before, f"kvbaton:{name}", **labels)

    hit = delta("kv_tier_hit_tokens_total")
    assert 0 < hit <= _cached(again)
    assert hit % BLOCK == 0
    assert delta("kv_tier_loads_total") >= 1
    assert delta("kv_tier_load_bytes_total") == hit // BLOCK * 8192
    assert delta("kv_tier_load_seconds_count") >= 1 and delta("kv_tier_load_seconds_sum") > 0
    wait_idle(url, 0)


def test_tier_metrics_have_their_labels_and_shapes(tiered: Any) -> None:
    _complete(tiered.url, random_prompts(1, 64, 64, seed=301)[0])
    values = _metrics(tiered.url)
    labels = {"model_name": MODEL, "tier": "host"}

    def get(name: str) -> float:
        keys = [k for k in values if k.startswith(f"kvbaton:{name}{{")]
        assert keys, f"kvbaton:{name} missing"
        assert all(f'model_name="{MODEL}"' in k and 'tier="host"' in k for k in keys), keys
        return metric(values, f"kvbaton:{name}", **labels)

    assert get("kv_tier_blocks_capacity") == HOST_BYTES // 8192
    assert get("kv_tier_bytes_capacity") == HOST_BYTES
    assert get("kv_tier_enabled") == 1
    assert get("kv_tier_blocks_used") > 0
    assert get("kv_tier_bytes_used") == get("kv_tier_blocks_used") * 8192
    # (blocks_used also counts stores still in flight; stores_total only finished ones)
    assert get("kv_tier_stores_total") > 0
    assert get("kv_tier_store_bytes_total") == get("kv_tier_stores_total") * 8192
    for name in ("kv_tier_blocks_pinned", "kv_tier_hit_tokens_total", "kv_tier_loads_total",
                 "kv_tier_load_bytes_total", "kv_tier_evictions_total", "kv_tier_expirations_total",
                 "kv_tier_failed_loads_total", "kv_tier_failed_stores_total", "kv_tier_load_seconds_count",
                 "kv_tier_load_seconds_sum"):
        assert get(name) >= 0
    assert f'kvbaton:kv_offload_sync_stores_total{{model_name="{MODEL}"}}' in values
    # The histogram: one bucket per bound plus +Inf, cumulative, +Inf equal to the count.
    buckets = [metric(values, "kvbaton:kv_tier_load_seconds_bucket", le=le, **labels)
               for le in [*(repr(float(b)) for b in LOAD_BUCKETS), "+Inf"]]
    keys = [k for k in values if k.startswith("kvbaton:kv_tier_load_seconds_bucket{")]
    assert {k.split('le="')[1].split('"')[0] for k in keys} == {*(repr(float(b)) for b in LOAD_BUCKETS), "+Inf"}
    assert buckets == sorted(buckets) and buckets[-1] == get("kv_tier_load_seconds_count")
    assert all(math.isfinite(v) for v in values.values())


# ---- the disk tier ---------------------------------------------------------------------------


@pytest.mark.parametrize("host_bytes", [1 << 20, 0], ids=["host+disk", "disk-only"])
def test_a_restarted_worker_finds_its_disk_tier(tmp_path: Path, host_bytes: int) -> None:
    engine = {"num_kv_blocks": DEVICE_BLOCKS, "kv_host_cache_bytes": host_bytes,
              "kv_disk_cache_dir": str(tmp_path), "kv_disk_cache_bytes": 4 << 20}
    prompt = random_prompts(1, 96, 96, seed=401)[0]
    with running_worker(**engine) as w:
        first = _complete(w.url, prompt)
        assert _cached(first) == 0
        # With a host tier the disk receives what the host tier stored once the engine
        # collects that store, at its next step: give it one (see the report's engine gaps).
        _complete(w.url, random_prompts(1, 20, 20, seed=402)[0])
        info = httpx.get(f"{w.url}/kv/info", timeout=10).json()["kv_tiers"]
        assert info["disk"] == {"medium": "DISK", "blocks_capacity": (4 << 20) // 8192, "enabled": True}
        assert ("host" in info) == bool(host_bytes)
    # Stopping closed the store, as run_worker does at exit: copies finished, directory free.
    with running_worker(**engine) as w:
        again = _complete(w.url, prompt)
        assert _cached(again) == (len(prompt) - 1) // BLOCK * BLOCK
        assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
        assert _tier(w.url, "kv_tier_hit_tokens_total", "disk") > 0
        assert _tier(w.url, "kv_tier_enabled", "disk") == 1
        wait_idle(w.url, 0)


def test_a_disk_tier_that_cannot_work_turns_itself_off_and_says_so(tmp_path: Path) -> None:
    engine = {"num_kv_blocks": DEVICE_BLOCKS, "kv_disk_cache_dir": str(tmp_path), "kv_disk_cache_bytes": 4 << 20}
    with running_worker(**engine) as owner:
        # A second worker on the same directory: its disk tier starts disabled (one warning),
        # it serves on, and the metric and /kv/info show it.
        with running_worker(**engine) as second:
            assert _tier(second.url, "kv_tier_enabled", "disk") == 0
            assert _tier(second.url, "kv_tier_blocks_capacity", "disk") == 0
            tiers = httpx.get(f"{second.url}/kv/info", timeout=10).json()["kv_tiers"]
            assert tiers["disk"]["enabled"] is False
            assert _cached(_complete(second.url, random_prompts(1, 40, 40, seed=501)[0])) == 0
            assert _tier(owner.url, "kv_tier_enabled", "disk") == 1

