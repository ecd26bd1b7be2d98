"""WorkerConfig: the flat, frozen set of knobs for one worker's HTTP side."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("prefill", "decode", "both")
TRANSFER_FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class WorkerConfig:
    """Settings of one worker process besides its engine's :class:`EngineConfig`.

    ``role``: ``prefill`` workers answer prefill-only requests with a KV handle and serve the
    leased blocks; ``decode`` workers fetch them; ``both`` do either and also serve whole
    requests (every role serves whole requests: that is the fallback). ``served_model_name`` is
    an extra name the API accepts in the ``model`` field besides the engine's ``--model``.
    """

    host: str = "127.0.0.1"
    port: int = 8100
    role: str = "both"
    api_key: str | None = None
    served_model_name: str | None = None
    max_request_bytes: int = 8 << 20
    # Seconds in-flight requests may keep running after SIGTERM before they are aborted.
    drain_timeout_s: float = 5.0
    # /health fails when the engine loop has not completed an iteration for this long.
    heartbeat_timeout_s: float = 30.0
    # Engine-loop poll interval while idle (bounds heartbeat age when nothing runs).
    idle_poll_s: float = 0.2
    max_logprobs: int = 20
    # Chat requests without max_tokens generate at most this many tokens (and never past
    # the context or the KV cache).
    default_chat_max_tokens: int = 1024
    default_completion_max_tokens: int = 16
    log_level: str = "WARNING"
    # KV transfer (disaggregation): the transfer server's port (0 = any free one), a shared
    # secret that authenticates peers (HMAC over the handshake), how long one fetch may take,
    # and what a decode request does when its fetch fails.
    kv_port: int = 0
    kv_secret: str | None = None
    kv_transfer_timeout_s: float = 10.0
    kv_transfer_failure: str = "recompute"
    # KV events (docs/kv-events.md): the block pool's BlockStored/BlockRemoved/AllBlocksCleared
    # go out on a ZMQ PUB socket (``kv_events_port``) with a replay ROUTER socket
    # (``kv_events_replay_port``), both on ``host``; 0 = any free port. Routers learn the
    # endpoints from /kv/info.
    kv_events: bool = True
    kv_events_port: int = 0
    kv_events_replay_port: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not 0 <= self.kv_port < 65536:
            raise ValueError(f"kv_port must be in [0, 65535], got {self.kv_port}")
        for name in ("kv_events_port", "kv_events_replay_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be in [0, 65535], got {value}")
        if self.kv_events and self.kv_events_port and self.kv_events_port == self.kv_events_replay_port:
            raise ValueError("kv_events_replay_port (--kv-events-replay-port) must differ from "
                             "kv_events_port (--kv-events-port)")
        if self.kv_transfer_timeout_s <= 0:
            raise ValueError("kv_transfer_timeout_s must be > 0")
        if self.kv_transfer_failure not in TRANSFER_FAILURE_POLICIES:
            raise ValueError(
                f"kv_transfer_failure must be one of {', '.join(TRANSFER_FAILURE_POLICIES)}, "
                f"got {self.kv_transfer_failure!r}"
            )
        if self.max_request_bytes < 1024:
            raise ValueError("max_request_bytes must be >= 1024")
        if self.drain_timeout_s < 0 or self.heartbeat_timeout_s <= 0 or self.idle_poll_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.default_chat_max_tokens < 1 or self.default_completion_max_tokens < 1:
            raise ValueError("default max tokens must be >= 1")
