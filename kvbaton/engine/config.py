"""EngineConfig: the flat, frozen set of knobs for one engine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kvbaton.errors import ConfigError
from kvbaton.kv.store.policies import POLICIES
from kvbaton.kv.store.remote_url import check_namespace, parse_remote_url

# Mirrors kvbaton.engine.offload.OFFLOAD_MODES (that module imports torch; this one must not).
OFFLOAD_MODES = ("write-back", "write-through")
LINEAR_BACKENDS = ("auto", "torch", "onednn")
DEFAULT_DISK_CACHE_BYTES = 8 << 30


@dataclass(frozen=True)
class EngineConfig:
    """Settings for one engine instance.

    KV memory is sized from ``num_kv_blocks`` if given, else from ``kv_cache_memory_bytes``,
    else from a default budget (2 GiB on CPU, 85% of free GPU memory on CUDA). A setting that
    cannot work raises :class:`~kvbaton.errors.ConfigError` naming its field.
    """

    model: str = "smollm2-135m"
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on CUDA
    device: str = "cpu"
    load_format: str = "auto"  # "auto" or "dummy" (random weights from the config)
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 64
    # Tokens one step computes at most. 2048, as vLLM's CPU server: with 1024, concurrent
    # 256-token prompts no longer fit one step together, their decodes fall out of step, and
    # each later prefill lands in the others' decode steps (p50 TPOT 102-109 ms against 74-77
    # at concurrency 16, same throughput; docs/engine.md).
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # A request whose prefix another request is prefilling right now waits for those blocks
    # instead of computing them again (see kvbaton.engine.scheduler).
    share_inflight_prefill: bool = True
    # Most tokens one request computes per step (0: no cap): a long prompt then leaves budget
    # for short prompts behind it instead of blocking them until its prefill ends.
    long_prefill_token_threshold: int = 0
    attention_backend: str = "auto"  # "auto", "sdpa" or "cpu_paged"
    # How matmuls run (kvbaton.models.packed_linear): "onednn" packs the weights once for
    # oneDNN (CPU; 1.6-2.3x faster decode steps, docs/engine.md), "torch" keeps nn.Linear,
    # "auto" packs where oneDNN supports the device and dtype.
    linear_backend: str = "auto"
    num_threads: int | None = None
    seed: int = 0
    lease_ttl_s: float = 30.0  # how long a prefill-only request's KV stays pinned for transfer
    # CPU only: put the KV cache in /dev/shm so decode workers on this host read leased blocks
    # straight from it (prefill workers turn this on).
    shared_kv: bool = False
    # The tiered KV store (docs/kv-store.md): host memory for the host tier (0: none), a
    # directory and size for the disk tier (None: none; 0 bytes: DEFAULT_DISK_CACHE_BYTES),
    # the eviction policy of the device pool and of every tier, when blocks leave the device
    # (write-back: when evicted; write-through: as soon as computed), the reuse filter (offload
    # a block once this many requests used it), idle TTLs per tier (0: none), the longest pin
    # and how long a load may take before the request computes its prompt instead.
    kv_host_cache_bytes: int = 0
    kv_disk_cache_dir: str | None = None
    kv_disk_cache_bytes: int = 0
    kv_eviction_policy: str = "lru"
    kv_offload_mode: str = "write-back"
    kv_offload_min_hits: int = 1
    kv_host_ttl_s: float = 0.0
    kv_disk_ttl_s: float = 0.0
    kv_pin_max_ttl_s: float = 3600.0
    kv_load_timeout_s: float = 30.0
    # How long a step may wait for the prefix loads its own scheduling started before it
    # runs without them (they then join the next step): a host-tier load takes milliseconds,
    # a CPU step up to seconds, so a short grace saves a loaded request a whole step.
    kv_load_grace_s: float = 0.02
    # The remote tier (docs/kv-store.md, "Remote tier"): a Redis server the cluster shares,
    # redis://[:PASSWORD@]HOST:PORT/DB or rediss:// (None: none; the password may instead come
    # from $KVBATON_KV_REMOTE_PASSWORD). Keys live under the namespace with a TTL refreshed on
    # each hit; blocks go there once this many requests used them; each server call may take
    # kv_remote_timeout_s before the tier counts the server as down. Kept out of the repr: the
    # URL may hold a password.
    kv_remote_url: str | None = field(default=None, repr=False)
    kv_remote_namespace: str = "kvbaton"
    kv_remote_ttl_s: float = 3600.0
    kv_remote_min_hits: int = 1
    kv_remote_timeout_s: float = 2.0
    # A JSON-lines file that gets one line per step that ran work (kvbaton.engine.step_trace):
    # what the scheduler chose and how long it took, for `kvbaton profile --from-steps`.
    step_trace_path: str | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError("block_size", "must be a power of two")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens", "must be >= 1")
        if self.long_prefill_token_threshold < 0:
            raise ConfigError("long_prefill_token_threshold", "must be >= 0 (0: no cap)")
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ConfigError("long_prefill_token_threshold", "needs enable_chunked_prefill")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError("num_kv_blocks", "must be >= 1")
        if self.lease_ttl_s <= 0:
            raise ConfigError("lease_ttl_s", "must be > 0")
        if self.linear_backend not in LINEAR_BACKENDS:
            raise ConfigError("linear_backend", f"must be one of {', '.join(LINEAR_BACKENDS)}, "
                              f"got {self.linear_backend!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError("load_format", "must be 'auto' or 'dummy'")
        if self.kv_eviction_policy not in POLICIES:
            raise ConfigError("kv_eviction_policy", f"must be one of {', '.join(sorted(POLICIES))}, "
                              f"got {self.kv_eviction_policy!r}")
        if self.kv_offload_mode not in OFFLOAD_MODES:
            raise ConfigError("kv_offload_mode", f"must be one of {', '.join(OFFLOAD_MODES)}, "
                              f"got {self.kv_offload_mode!r}")
        if self.kv_offload_min_hits < 1:
            raise ConfigError("kv_offload_min_hits", "must be >= 1")
        for name in ("kv_host_cache_bytes", "kv_disk_cache_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")
        memory = machine_memory_bytes()
        if memory and self.kv_host_cache_bytes > memory:
            raise ConfigError("kv_host_cache_bytes", f"{self.kv_host_cache_bytes / 2**30:.1f} GiB is more than "
                              f"this machine's {memory / 2**30:.1f} GiB of memory")
        for name in ("kv_host_ttl_s", "kv_disk_ttl_s"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0 (0: no TTL)")
        if self.kv_load_grace_s < 0:
            raise ConfigError("kv_load_grace_s", "must be >= 0 (0: never wait)")
        for name in ("kv_pin_max_ttl_s", "kv_load_timeout_s", "kv_remote_ttl_s", "kv_remote_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
        if self.kv_remote_url is not None:
            parse_remote_url(self.kv_remote_url)
            if not self.kv_host_cache_bytes:
                raise ConfigError("kv_remote_url", "needs a host tier (kv_host_cache_bytes > 0): blocks reach "
                                  "the remote tier from it")
        check_namespace(self.kv_remote_namespace)
        if self.kv_remote_min_hits < 1:
            raise ConfigError("kv_remote_min_hits", "must be >= 1")

    @property
    def kv_tiers_enabled(self) -> bool:
        return self.kv_host_cache_bytes > 0 or self.kv_disk_cache_dir is not None or self.kv_remote_url is not None


def machine_memory_bytes() -> int:
    """Physical memory of this machine (0 when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0
