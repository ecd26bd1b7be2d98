"""EngineConfig: the flat, frozen set of knobs for one engine."""

from __future__ import annotations

from dataclasses import dataclass

from kvbaton.errors import ConfigError


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
    max_num_batched_tokens: int = 1024
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
    num_threads: int | None = None
    seed: int = 0
    lease_ttl_s: float = 30.0  # how long a prefill-only request's KV stays pinned for transfer
    # CPU only: put the KV cache in /dev/shm so decode workers on this host read leased blocks
    # straight from it (prefill workers turn this on).
    shared_kv: bool = False

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
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError("load_format", "must be 'auto' or 'dummy'")
