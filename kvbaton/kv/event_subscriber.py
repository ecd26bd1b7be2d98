"""KVEventSubscriber: follows many workers' KV event streams, in order, filling gaps by replay.

The wire format and the publisher are in ``kvbaton.kv.event_stream``. One SUB socket per
worker, so a batch's worker is known from its socket whatever topic the worker publishes on
(vLLM's default topic is empty). Per worker the subscriber tracks the stream id (from the
topic, when the publisher sends one) and the next expected seq:

- the expected seq: deliver it;
- a later seq (batches lost): replay from the expected one via the worker's ROUTER socket,
  deliver what came back in order, then carry on;
- an earlier seq from the same stream: a duplicate of a batch already replayed, skipped;
- a new stream (the worker restarted) or the first contact: its start may have been missed,
  so replay from seq 0 unless this is seq 0.

When replay cannot fill a gap (no replay endpoint, timeout, or the ring buffer no longer
holds the missing batches) ``on_gap(worker_id)`` is called and delivery resumes at the
current batch; a ``KVIndex`` then drops that worker's entries and flags it approximate. The
subscriber then asks the worker for a resync, again every ``resync_interval_s`` until a batch
with ``AllBlocksCleared`` arrives: a worker that supports it publishes its whole cache
in-stream, starting with ``AllBlocksCleared``, and the index is exact again once that arrives.
Replays run on the subscriber thread, so one bounded by ``replay_timeout_s`` delays the other
workers' batches by at most that long; they are queued, not lost.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import msgspec
import zmq

from kvbaton.kv.event_stream import (
    END_SEQ,
    RESYNC_REQUEST,
    KVEventBatch,
    check_endpoint,
    curve_client,
    curve_keys,
    decode_batch,
    split_topic,
)
from kvbaton.kv.events import AllBlocksCleared
from kvbaton.kv.vllm_events import VLLMEventBatch, decode_vllm_batch

log = logging.getLogger(__name__)

WorkerId = Hashable
BatchCallback = Callable[[WorkerId, int, "KVEventBatch | VLLMEventBatch"], None]
_DECODERS: dict[str, Callable[[bytes], KVEventBatch | VLLMEventBatch]] = {
    "kvbaton": decode_batch, "vllm": decode_vllm_batch}
GapCallback = Callable[[WorkerId], None]


@dataclass(frozen=True)
class WorkerEndpoints:
    """Where one worker publishes (``pub``) and serves replay (``replay``; None: no replay)."""

    pub: str
    replay: str | None = None
    encrypted: bool = False  # CURVE, keyed by the cluster's KV secret (``curve_keys``)
    # How its payloads are encoded: "kvbaton" (ours, ``decode_batch``) or "vllm" (a `vllm
    # serve` publisher, ``kvbaton.kv.vllm_events.decode_vllm_batch``; it has no resync).
    encoding: str = "kvbaton"

    def __post_init__(self) -> None:
        if self.encoding not in _DECODERS:
            raise ValueError(f"encoding: expected one of {sorted(_DECODERS)}, got {self.encoding!r}")


class _Stream:
    __slots__ = ("worker_id", "sock", "replay", "encrypted", "decode", "resyncs", "stream", "next_seq",
                 "resync_at", "resync_wanted", "resync_wait")

    def __init__(self, worker_id: WorkerId, sock: zmq.SyncSocket, endpoints: WorkerEndpoints) -> None:
        self.worker_id = worker_id
        self.sock = sock
        self.replay = endpoints.replay
        self.encrypted = endpoints.encrypted
        self.decode = _DECODERS[endpoints.encoding]
        self.resyncs = endpoints.encoding == "kvbaton"  # whether it answers a resync request
        self.stream: bytes | None = None
        self.next_seq: int | None = None  # None until the first batch
        self.resync_at = -float("inf")  # monotonic time of the last resync request
        self.resync_wanted = False  # a gap was not filled and no AllBlocksCleared came since
        self.resync_wait = 0.0  # seconds before the next resync request (backs off on timeouts)


class KVEventSubscriber:
    """Delivers every worker's batches in seq order to ``on_batch(worker_id, seq, batch)``.

    Callbacks run on the subscriber's own thread; an exception in one is logged and the
    stream goes on. ``close()`` returns within its timeout whatever the peers do; ``alive``
    says whether the thread is still running.
    """

    def __init__(
        self,
        workers: dict[WorkerId, WorkerEndpoints],
        on_batch: BatchCallback,
        on_gap: GapCallback | None = None,
        *,
        topic: str = "",
        replay_timeout_s: float = 1.0,
        poll_interval_s: float = 0.05,
        resync_interval_s: float = 1.0,
        rcvhwm: int = 100_000,
        curve_secret: str | None = None,
    ) -> None:
        # Encrypted workers' streams are followed with keys from the cluster's KV secret.
        self._keys = curve_keys(curve_secret) if curve_secret else None
        if not replay_timeout_s > 0:
            raise ValueError(f"replay_timeout_s must be > 0, got {replay_timeout_s!r}")
        if not poll_interval_s > 0:
            raise ValueError(f"poll_interval_s must be > 0, got {poll_interval_s!r}")
        if not resync_interval_s >= 0:
            raise ValueError(f"resync_interval_s must be >= 0, got {resync_interval_s!r}")
        self._resync_interval = resync_interval_s
        self._on_batch = on_batch
        self._on_gap = on_gap
        self._topic = topic.encode()
        self._replay_timeout = replay_timeout_s
        self._poll_ms = max(1, int(poll_interval_s * 1000))
        self._rcvhwm = rcvhwm
        self._ctx: zmq.SyncContext = zmq.Context.instance()
        self._commands: queue.SimpleQueue[tuple[WorkerId, zmq.SyncSocket | None, WorkerEndpoints | None]] = (
            queue.SimpleQueue()
        )
        self._stop = threading.Event()
        self.gaps = 0  # unrecoverable gaps (on_gap calls)
        self.replays = 0  # replay requests made
        self.resyncs = 0  # resync requests a worker accepted
        for worker_id, eps in workers.items():
            self.add_worker(worker_id, eps)
        self._thread = threading.Thread(target=self._run, name="kv-event-subscriber", daemon=True)
        self._thread.start()

    def add_worker(self, worker_id: WorkerId, endpoints: WorkerEndpoints) -> None:
        """Follow one more worker (replacing any stream under the same id). Thread-safe."""
        check_endpoint(f"workers[{worker_id!r}].pub", endpoints.pub)
        if endpoints.replay is not None:
            check_endpoint(f"workers[{worker_id!r}].replay", endpoints.replay)
        if endpoints.encrypted and self._keys is None:
            raise ValueError(f"workers[{worker_id!r}]: its KV events are encrypted with the cluster's KV "
                             "secret, which this subscriber was not given (--kv-secret)")
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, self._rcvhwm)
        sock.setsockopt(zmq.SUBSCRIBE, self._topic)
        if endpoints.encrypted and self._keys is not None:
            curve_client(sock, self._keys)
        try:
            sock.connect(endpoints.pub)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise ValueError(f"workers[{worker_id!r}].pub: cannot connect: {e}") from e
        # Created here so a bad endpoint raises in the caller; the queue hand-off is the
        # memory barrier ZMQ asks for when a socket moves to another thread.
        self._commands.put((worker_id, sock, endpoints))

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Stop following a worker; its batches stop being delivered. Thread-safe."""
        self._commands.put((worker_id, None, None))

    @property
    def alive(self) -> bool:
        """Whether the subscriber thread is running (False once ``close()`` has stopped it, or
        if it failed)."""
        return self._thread.is_alive()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the thread and close its sockets; waits at most ``timeout_s`` (plus one
        replay timeout if a replay is in flight)."""
        self._stop.set()
        self._thread.join(timeout_s + self._replay_timeout)
        if self._thread.is_alive():
            log.warning("KV event subscriber thread did not stop in time (stuck callback?)")

    # ---- subscriber thread -----------------------------------------------------------------

    def _run(self) -> None:
        streams: dict[WorkerId, _Stream] = {}
        by_sock: dict[zmq.SyncSocket, _Stream] = {}
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                self._apply_commands(streams, by_sock, poller)
                for sock, _ in poller.poll(self._poll_ms):
                    st = by_sock.get(sock)
                    # Bounded drain per socket so one busy worker cannot starve the others.
                    for _ in range(256):
                        if st is None or self._stop.is_set():
                            break
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._receive(st, frames)
                for st in streams.values():
                    self._maybe_resync(st)
        except Exception:
            log.exception("KV event subscriber thread failed")
        finally:
            for st in streams.values():
                st.sock.close(linger=0)
            while True:  # sockets handed over but never picked up
                try:
                    _, sock, _ = self._commands.get_nowait()
                except queue.Empty:
                    break
                if sock is not None:
                    sock.close(linger=0)

    def _apply_commands(
        self, streams: dict[WorkerId, _Stream], by_sock: dict[zmq.SyncSocket, _Stream],
        poller: zmq.Poller,
    ) -> None:
        while True:
            try:
                worker_id, sock, endpoints = self._commands.get_nowait()
            except queue.Empty:
                return
            old = streams.pop(worker_id, None)
            if old is not None:
                poller.unregister(old.sock)
                del by_sock[old.sock]
                old.sock.close(linger=0)
            if sock is not None:
                assert endpoints is not None
                st = streams[worker_id] = _Stream(worker_id, sock, endpoints)
                by_sock[sock] = st
                poller.register(sock, zmq.POLLIN)

    def _receive(self, st: _Stream, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) < 8:
            log.warning("worker %r: ignoring malformed KV event message", st.worker_id)
            return
        _, stream = split_topic(frames[0])
        seq, payload = int.from_bytes(frames[1][:8], "big"), frames[2]
        if st.next_seq is None or (stream is not None and stream != st.stream):
            st.stream = stream
            st.next_seq = 0
        elif seq < st.next_seq:
            if not (stream is None and seq == 0):
                return  # already delivered (by replay)
            st.next_seq = 0  # a publisher without stream ids restarted
        if seq > st.next_seq:
            self._catch_up(st, seq)
        if seq == st.next_seq:
            self._deliver(st, seq, payload)

    def _catch_up(self, st: _Stream, seq: int) -> None:
        """Batches ``next_seq .. seq-1`` are missing: replay them, or report the gap."""
        start = st.next_seq
        assert start is not None
        for rseq, payload in self._replay(st, start) or ():
            if rseq != st.next_seq:
                break  # the buffer no longer reaches back, or skips a seq (overflow)
            self._deliver(st, rseq, payload)
        if st.next_seq is not None and st.next_seq < seq:
            log.warning("worker %r: KV event batches %d..%d lost", st.worker_id, st.next_seq,
                        seq - 1)
            self._report_gap(st)
            st.next_seq = seq

    def _report_gap(self, st: _Stream) -> None:
        self.gaps += 1
        if self._on_gap is not None:
            try:
                self._on_gap(st.worker_id)
            except Exception:
                log.exception("on_gap callback failed for worker %r", st.worker_id)
        st.resync_wanted = st.replay is not None and st.resyncs
        self._maybe_resync(st)

    def _maybe_resync(self, st: _Stream) -> None:
        """Ask the worker to publish its whole cache (it arrives as ordinary batches), at
        most once per ``resync_interval_s``, until a batch with ``AllBlocksCleared`` comes."""
        now = time.monotonic()
        if not st.resync_wanted or now - st.resync_at < max(st.resync_wait, self._resync_interval):
            return
        st.resync_at = now
        answer = self._ask(st, RESYNC_REQUEST, "resync")
        if answer is None:
            # Unreachable: each try blocks this thread up to replay_timeout_s, so back off
            # (to 30 s) rather than keep stalling the other workers' streams.
            st.resync_wait = min(30.0, max(2 * st.resync_wait, self._replay_timeout))
            return
        st.resync_wait = 0.0
        if answer[1] == RESYNC_REQUEST:
            self.resyncs += 1
            log.info("worker %r: KV resync requested", st.worker_id)
        else:
            st.resync_wanted = False
            log.warning("worker %r: no KV resync support; its index entries stay approximate "
                        "until it restarts", st.worker_id)

    def _replay(self, st: _Stream, start: int) -> list[tuple[int, bytes]] | None:
        """Buffered batches from ``start`` on, in order; None without endpoint or on timeout."""
        self.replays += st.replay is not None
        answer = self._ask(st, start.to_bytes(8, "big"), "replay")
        return None if answer is None else answer[0]

    def _ask(self, st: _Stream, request: bytes, what: str
             ) -> tuple[list[tuple[int, bytes]], bytes] | None:
        """Send ``request`` to the worker's replay socket: the ``(seq, payload)`` batches it
        answers and the end marker's payload, or None (no endpoint, timeout, socket error)."""
        if st.replay is None:
            return None
        # A fresh DEALER per request: a late answer to a timed-out request cannot be
        # mistaken for the answer to the next one.
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if st.encrypted and self._keys is not None:
            curve_client(sock, self._keys)
        deadline = time.monotonic() + self._replay_timeout
        out: list[tuple[int, bytes]] = []
        try:
            sock.connect(st.replay)
            sock.send_multipart((b"", request))
            while True:
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not sock.poll(left_ms):
                    log.warning("worker %r: KV event %s timed out", st.worker_id, what)
                    return None
                frames = sock.recv_multipart()
                # [b"", seq, payload] (ours, older vLLM) or [b"", topic, seq, payload] (vLLM
                # 0.32, whose end marker is [b"", b"", END, b""]).
                if len(frames) not in (3, 4):
                    continue
                seq, payload = frames[-2], frames[-1]
                if seq == END_SEQ:
                    return out, payload
                out.append((int.from_bytes(seq, "big"), payload))
        except zmq.ZMQError as e:
            log.warning("worker %r: KV event %s failed: %s", st.worker_id, what, e)
            return None
        finally:
            sock.close(linger=0)

    def _deliver(self, st: _Stream, seq: int, payload: bytes) -> None:
        st.next_seq = seq + 1
        try:
            batch = st.decode(payload)
        except msgspec.DecodeError as e:
            log.warning("worker %r: undecodable KV event batch %d: %s", st.worker_id, seq, e)
            self._report_gap(st)
            return
        if st.resync_wanted and any(isinstance(e, AllBlocksCleared) for e in batch.events):
            st.resync_wanted = False  # from here on the stream describes the whole cache
        try:
            self._on_batch(st.worker_id, seq, batch)
        except Exception:
            log.exception("on_batch callback failed for worker %r", st.worker_id)
