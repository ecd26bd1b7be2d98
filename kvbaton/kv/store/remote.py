"""The remote tier: whole KV blocks in a Redis (or Valkey) server that every worker shares, so a
prefix computed by any worker is loaded, not recomputed, by all the others.

Keys. ``<namespace>:<block hash hex>``. The hash chain's root already folds in the model
fingerprint and the request's ``cache_salt`` (:mod:`kvbaton.kv.hashing`), so models and
tenants never share a key; the namespace (``--kv-remote-namespace``) separates clusters that
share one server.

Values. :mod:`kvbaton.kv.store.blockfmt`'s header (block hash, layout id, model fingerprint,
payload length, XXH3-64 checksum, parent hash, token ids) and then the block's raw bytes. A
value whose header, size, checksum, parent or tokens do not match what the reader expects is
refused and deleted, never loaded: a key can be overwritten by anyone who can write to the
server, so every load is checked against what the request needs.

Lifecycle. Every key is written with a TTL (``--kv-remote-ttl``) and each hit refreshes it
(``GETEX``); the server's ``maxmemory`` and an evicting ``maxmemory-policy`` bound the store.
Nothing here keeps a directory of the server's keys: a lookup asks the server, one pipelined
round trip of ``EXISTS`` for the leading run; a key found by the lookup and gone (evicted,
expired) by the time it is read is a miss, and the request computes that block and the rest.

Threads. Every call that talks to the server (``probe``, ``read``, ``write``, ``delete``,
``ping``) runs on the remote tier's own IO thread (a second :class:`~kvbaton.kv.store.io.TierIO`),
so a slow or unreachable server never delays host or disk copies. The connection state
(``up``, backoff) changes on the engine thread only (``note_ok`` / ``note_failure``), from the
outcome of those calls.

Failures. An unreachable server at startup, or one that dies, turns the tier *down*: one
warning, no lookups, no writes (each counted) while requests are served from the local tiers;
a ``PING`` is retried with exponential backoff and the tier comes back *up* when it answers.
A wrong password is a startup error (a configuration mistake does not fix itself).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvbaton.errors import ConfigError
from kvbaton.kv.codec import checksum, host_bytes
from kvbaton.kv.events import REMOTE_MEDIUM
from kvbaton.kv.hashing import BlockHash
from kvbaton.kv.store.base import BlockMeta, LoadPlan, TierError
from kvbaton.kv.store.blockfmt import BlockFormat
from kvbaton.kv.store.remote_url import REMOTE_PASSWORD_ENV, check_namespace, parse_remote_url

log = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "kvbaton"
# Blocks per pipelined round trip: big enough to reach the link's rate (64 x 512 KiB blocks run
# at GB/s on loopback), small enough that one call never holds tens of MB of values at once.
BATCH_BLOCKS = 16
# The most blocks one lookup asks about (the leading run of a 4096-token prompt at 16 tokens).
MAX_PROBE_BLOCKS = 256
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0


class RemoteUnavailableError(TierError):
    """The remote server could not be reached, timed out or dropped the connection."""


@dataclass
class RemoteStats:
    """Counters of the remote tier (engine thread), beside the per-tier ones of KVOffload."""

    probes: int = 0
    probe_blocks_found: int = 0
    missing: int = 0  # blocks a lookup found and a read then did not (evicted in between)
    bad_values: int = 0  # refused (header, size, checksum, parent or tokens) and deleted
    put_blocks: int = 0
    put_failures: int = 0  # blocks the server refused (maxmemory with noeviction, say)
    dropped_puts: int = 0  # blocks not sent: the tier was down or its queue full
    errors: int = 0  # calls that failed because the server was unreachable or timed out
    outages: int = 0  # up -> down transitions
    down_seconds: float = 0.0  # total time down (closed outages)


@dataclass
class ReadResult:
    """What a read found: ``status[i]`` for block i (``ok``, ``missing`` or ``bad``)."""

    status: list[str]

    @property
    def leading_ok(self) -> int:
        return next((i for i, s in enumerate(self.status) if s != "ok"), len(self.status))


class RemoteTier:
    """One server's worth of shared KV blocks (see the module docstring).

    ``block_bytes`` per block of ``block_size`` tokens for the model ``model_fingerprint`` with
    KV layout ``layout_id``. The constructor connects once (bounded by ``timeout_s``): a wrong
    password raises :class:`~kvbaton.errors.ConfigError`; an unreachable server leaves the tier
    down, retried later. ``password`` (else the URL's, else ``$KVBATON_KV_REMOTE_PASSWORD``).
    """

    name = "remote"
    medium = REMOTE_MEDIUM

    def __init__(self, url: str, block_bytes: int, block_size: int, layout_id: str, model_fingerprint: str,
                 namespace: str = DEFAULT_NAMESPACE, ttl_s: float = 3600.0, timeout_s: float = 2.0,
                 password: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if ttl_s <= 0:
            raise ConfigError("kv_remote_ttl_s", "must be > 0: every key of a shared store needs a TTL")
        check_namespace(namespace)
        self.url = parse_remote_url(url)
        self.block_bytes = block_bytes
        self.block_size = block_size
        self.namespace = namespace
        self.ttl_s = ttl_s
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.timeout_s = timeout_s
        self.clock = clock
        self.format = BlockFormat(layout_id, model_fingerprint, block_bytes, block_size)
        self._prefix = f"{namespace}:".encode()
        self.stats = RemoteStats()
        self.up = False
        self.last_error: str | None = None
        self._down_since: float | None = None
        self._backoff_s = _BACKOFF_MIN_S
        self.next_retry = 0.0
        self._closed = False
        pw = password or self.url.password or os.environ.get(REMOTE_PASSWORD_ENV) or None
        # No retries inside the client: a failed call is reported at once (the engine then
        # serves from the local tiers and retries with backoff), instead of hiding seconds of
        # reconnect attempts inside a lookup a request is waiting on.
        self._redis = redis.Redis.from_url(
            self.url.without_password(), password=pw, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0, max_connections=4)
        self._connection_errors: tuple[type[BaseException], ...] = (
            redis.ConnectionError, redis.TimeoutError, OSError)
        self._auth_errors: tuple[type[BaseException], ...] = (redis.AuthenticationError,)
        self._response_error: type[BaseException] = redis.ResponseError
        try:
            self.ping()
        except RemoteUnavailableError as e:
            self.note_failure(e)
        else:
            self.note_ok()

    def __repr__(self) -> str:
        return f"RemoteTier({self.url.redacted}, namespace={self.namespace!r}, up={self.up})"

    # ---- state (engine thread) -----------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether lookups and writes should go to the server now."""
        return self.up and not self._closed

    def retry_due(self) -> bool:
        return not self.up and not self._closed and self.clock() >= self.next_retry

    def note_ok(self) -> None:
        """A call reached the server: the tier is up (logs the end of an outage)."""
        if not self.up:
            if self._down_since is not None:
                down = self.clock() - self._down_since
                self.stats.down_seconds += down
                log.warning("KV remote tier %s is back after %.1f s", self.url.redacted, down)
            else:
                log.info("KV remote tier: %s (namespace %r, TTL %g s)", self.url.redacted, self.namespace, self.ttl_s)
        self.up = True
        self._down_since = None
        self._backoff_s = _BACKOFF_MIN_S

    def note_failure(self, error: BaseException) -> None:
        """A call could not reach the server: the tier goes down until a PING answers."""
        self.stats.errors += 1
        self.last_error = str(error)
        now = self.clock()
        if self._down_since is None:  # a new outage (or unreachable from the start)
            self.stats.outages += 1
            log.warning("KV remote tier %s unreachable (%s): serving from the local tiers, retrying",
                        self.url.redacted, error)
            self._down_since = now
        self.up = False
        self.next_retry = now + self._backoff_s
        self._backoff_s = min(_BACKOFF_MAX_S, self._backoff_s * 2)

    @property
    def down_seconds(self) -> float:
        """Total time down, the current outage included."""
        extra = self.clock() - self._down_since if self._down_since is not None else 0.0
        return self.stats.down_seconds + extra

    # ---- server calls (the remote IO thread) ----------------------------------------------

    def key(self, h: BlockHash) -> bytes:
        return self._prefix + h.hex().encode()

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self._auth_errors as e:
            raise ConfigError("kv_remote_url", f"the Redis server at {self.url.redacted} refused the "
                              f"password ({e}); set it in the URL or ${REMOTE_PASSWORD_ENV}") from None
        except self._connection_errors as e:
            raise RemoteUnavailableError(f"{type(e).__name__}: {e}") from None

    def ping(self) -> None:
        """One round trip; RemoteUnavailableError when the server does not answer."""
        self._call(self._redis.ping)

    def probe(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading ``hashes`` the server holds now (one pipelined round trip)."""
        hashes = hashes[:MAX_PROBE_BLOCKS]
        if not hashes:
            return 0

        def run() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for h in hashes:
                pipe.exists(self.key(h))
            return pipe.execute()

        found = self._call(run)
        return next((i for i, n in enumerate(found) if not n), len(hashes))

    def read(self, hashes: Sequence[BlockHash], metas: Sequence[BlockMeta], rows: torch.Tensor,
             row_ids: Sequence[int]) -> ReadResult:
        """Fill ``rows[row_ids[i]]`` with block ``hashes[i]``, which must be the block ``metas[i]``
        describes (its parent and tokens: what the reading request needs). Reads stop at the
        first block that is missing or refused; refused values are deleted. Each hit refreshes
        its key's TTL."""
        status: list[str] = []
        for start in range(0, len(hashes), BATCH_BLOCKS):
            part = hashes[start : start + BATCH_BLOCKS]

            def run(part: Sequence[BlockHash] = part) -> list[Any]:
                pipe = self._redis.pipeline(transaction=False)
                for h in part:
                    pipe.getex(self.key(h), px=self.ttl_ms)
                return pipe.execute()

            values = self._call(run)
            bad: list[BlockHash] = []
            for j, (h, value) in enumerate(zip(part, values)):
                i = start + j
                if value is None:
                    status.append("missing")
                    break
                if not self._accept(value, h, metas[i], host_bytes(rows[row_ids[i]])):
                    status.append("bad")
                    bad.append(h)
                    break
                status.append("ok")
            if bad:
                self.delete(bad)
            if len(status) < start + len(part):
                break
        return ReadResult(status)

    def _accept(self, value: bytes, h: BlockHash, meta: BlockMeta, dst: memoryview) -> bool:
        """Copy ``value``'s payload to ``dst`` if it is block ``h`` as ``meta`` says."""
        parsed = self.format.parse(value, h)
        if parsed is None:
            return False
        header, offset = parsed
        payload = memoryview(value)[offset:]
        if (len(payload) != self.block_bytes or header.parent != meta.parent
                or header.token_ids != tuple(meta.token_ids) or checksum(payload) != header.checksum):
            return False
        dst[:] = payload
        return True

    def write(self, hashes: Sequence[BlockHash], metas: Sequence[BlockMeta], rows: torch.Tensor,
              row_ids: Sequence[int]) -> list[BlockHash]:
        """Store ``rows[row_ids[i]]`` as ``hashes[i]`` with the tier's TTL; the hashes the server
        took (a full server with ``noeviction`` refuses writes: those are left out, counted by
        the caller). RemoteUnavailableError when the server cannot be reached."""
        stored: list[BlockHash] = []
        for start in range(0, len(hashes), BATCH_BLOCKS):
            part = list(zip(hashes[start : start + BATCH_BLOCKS], metas[start : start + BATCH_BLOCKS],
                            row_ids[start : start + BATCH_BLOCKS]))

            def run(part: list[tuple[BlockHash, BlockMeta, int]] = part) -> list[Any]:
                pipe = self._redis.pipeline(transaction=False)
                for h, meta, r in part:
                    payload = host_bytes(rows[r])
                    pipe.set(self.key(h), self.format.encode(h, meta, checksum(payload)) + payload, px=self.ttl_ms)
                return pipe.execute(raise_on_error=False)

            results = self._call(run)
            for (h, _, _), res in zip(part, results):
                if isinstance(res, self._response_error):
                    continue  # OOM and the like: this block is not stored
                if isinstance(res, BaseException):
                    raise RemoteUnavailableError(f"{type(res).__name__}: {res}")
                stored.append(h)
        return stored

    def delete(self, hashes: Sequence[BlockHash]) -> None:
        """Delete ``hashes``' keys (values found bad)."""
        if hashes:
            self._call(lambda: self._redis.delete(*[self.key(h) for h in hashes]))

    def close(self) -> None:
        """Release the connections (end of the worker)."""
        self._closed = True
        try:
            self._redis.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


class RemoteReader:
    """One load's reads from the remote tier, in the shape :class:`~kvbaton.kv.store.mover.BlockMover`
    moves blocks in (``read(plan, rows, row_ids)``, called once per chunk on CUDA): ``metas``
    say what each block must be. Reading stops at the first block that is missing or refused;
    that block and every later one are returned as failed. ``status`` keeps each block's outcome.
    """

    def __init__(self, tier: RemoteTier, metas: dict[BlockHash, BlockMeta]) -> None:
        self.tier = tier
        self.metas = metas
        self.status: dict[BlockHash, str] = {}
        self._stopped = False

    def read(self, plan: LoadPlan, rows: torch.Tensor, row_ids: Sequence[int]) -> list[BlockHash]:
        if self._stopped:
            return list(plan.hashes)
        result = self.tier.read(plan.hashes, [self.metas[h] for h in plan.hashes], rows, row_ids)
        self.status.update(zip(plan.hashes, result.status))
        n = result.leading_ok
        if n < len(plan.hashes):
            self._stopped = True
        return list(plan.hashes[n:])
