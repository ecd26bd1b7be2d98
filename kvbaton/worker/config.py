"""WorkerConfig: the flat, frozen set of knobs for one worker's HTTP side; errors are
:class:`~kvbaton.errors.ConfigError` naming the field (the CLI names its flag)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbaton.api.frontdoor import FrontDoorConfig
from kvbaton.errors import ConfigError

ROLES = ("prefill", "decode", "both")
TRANSFER_FAILURE_POLICIES = ("recompute", "fail")


@dataclass(frozen=True)
class WorkerConfig(FrontDoorConfig):
    """Settings of one worker process besides its engine's :class:`EngineConfig` (the HTTP
    API's own, shared with the router, come from :class:`FrontDoorConfig`).

    ``role``: ``prefill`` workers answer prefill-only requests with a KV handle and serve the
    leased blocks; ``decode`` workers fetch them; ``both`` do either and also serve whole
    requests (every role serves whole requests: that is the fallback). ``served_model_name`` is
    an extra name the API accepts in the ``model`` field besides the engine's ``--model``.
    """

    host: str = "127.0.0.1"
    port: int = 8100
    role: str = "both"
    # /health fails when the engine loop has not completed an iteration for this long.
    heartbeat_timeout_s: float = 30.0
    # Engine-loop poll interval while idle (bounds heartbeat age when nothing runs).
    idle_poll_s: float = 0.2
    # KV transfer (disaggregation): the transfer server's port (0 = any free one), a shared
    # secret that authenticates peers (HMAC over the handshake), how long one fetch may take,
    # and what a decode request does when its fetch fails.
    kv_port: int = 0
    kv_secret: str | None = field(default=None, repr=False)
    kv_transfer_timeout_s: float = 10.0
    kv_transfer_failure: str = "recompute"
    # KV events (docs/kv-events.md): the block pool's BlockStored/BlockRemoved/AllBlocksCleared
    # go out on a ZMQ PUB socket (``kv_events_port``) with a replay ROUTER socket
    # (``kv_events_replay_port``), both on ``host``; 0 = any free port. Routers learn the
    # endpoints from /kv/info.
    kv_events: bool = True
    kv_events_port: int = 0
    kv_events_replay_port: int = 0
    # Include each block's token ids in BlockStored events (vLLM's format always has them). Off
    # by default: the event stream is unauthenticated and the tokens are the tenants' prompts.
    kv_events_token_ids: bool = False
    # The cluster's KV secret as given (--kv-secret / $KVBATON_KV_SECRET), not one a 'both'
    # worker made up: it encrypts the event streams (CURVE) so only routers holding it follow.
    kv_events_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.role not in ROLES:
            raise ConfigError("role", f"must be one of {', '.join(ROLES)}, got {self.role!r}")
        for name in ("port", "kv_port", "kv_events_port", "kv_events_replay_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ConfigError(name, f"must be in [0, 65535], got {value}")
        if self.kv_events and self.kv_events_port and self.kv_events_port == self.kv_events_replay_port:
            raise ConfigError("kv_events_replay_port", "must differ from kv_events_port")
        if self.kv_transfer_timeout_s <= 0:
            raise ConfigError("kv_transfer_timeout_s", "must be > 0")
        if self.kv_transfer_failure not in TRANSFER_FAILURE_POLICIES:
            raise ConfigError(
                "kv_transfer_failure",
                f"must be one of {', '.join(TRANSFER_FAILURE_POLICIES)}, got {self.kv_transfer_failure!r}",
            )
        for name in ("heartbeat_timeout_s", "idle_poll_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, "must be > 0")
