"""KV event stream: workers publish their block pool's events over ZMQ; the router subscribes.

Wire shape (vLLM's ``ZmqEventPublisher``, so a subscriber written for vLLM reads ours):

- PUB socket, multipart ``[topic, seq, payload]``: ``seq`` is the batch's sequence number,
  8 bytes big-endian, from 0 per publisher; ``payload`` is ``KVEventBatch`` msgpack-encoded
  as ``[ts, [event, ...], dp_rank]`` (events as in ``kvbaton.kv.events``).
- ROUTER socket for replay: a client (REQ, or DEALER sending an empty delimiter first) sends
  a start seq (8 bytes big-endian) and receives ``[seq, payload]`` for every buffered batch
  with ``seq >= start``, then the end marker ``[-1 as 8 signed bytes, b""]``.
- Resync, on the same ROUTER socket (our addition): a client sends ``b"resync"`` instead of a
  start seq, for a gap that replay cannot fill. A publisher with a resync handler answers
  ``[END, b"resync"]`` and soon publishes its whole cache in-stream, as
  ``[AllBlocksCleared, BlockStored...]``, which makes an index that applies it exact again;
  one without a handler answers ``[END, b""]``.

One addition that vLLM subscribers ignore: the topic frame is ``<topic>|<stream id>`` (hex
of 8 random bytes per publisher). SUB filters match by prefix, so subscribing to ``<topic>``
still works, and our subscriber uses the id to tell a restarted worker (a new stream, whose
first batches it may have missed) from duplicates of batches it already got by replay.
Every publisher's first batch (seq 0) is ``[AllBlocksCleared]``: a (re)started worker's
cache is empty, and that batch resyncs whatever an index believed about it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import msgspec
import zmq
import zmq.utils.z85

from kvbaton.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
RESYNC_REQUEST = b"resync"
TOPIC_STREAM_SEP = b"|"
_ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One published batch: ``[ts, events, data_parallel_rank]`` on the wire."""

    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """Raises ``msgspec.DecodeError`` (a ``ValueError``) on a malformed payload."""
    return _decoder.decode(payload)


def split_topic(frame: bytes) -> tuple[bytes, bytes | None]:
    """``(topic, stream id)``; the id is None for publishers that do not send one (vLLM)."""
    topic, sep, stream = frame.rpartition(TOPIC_STREAM_SEP)
    return (topic, stream) if sep else (frame, None)


def check_endpoint(name: str, endpoint: str) -> None:
    if not isinstance(endpoint, str) or not endpoint.startswith(_ENDPOINT_SCHEMES):
        raise ValueError(f"{name}: expected a ZMQ endpoint like tcp://host:port, got {endpoint!r}")


def _bind(sock: zmq.SyncSocket, name: str, endpoint: str) -> str:
    check_endpoint(name, endpoint)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise ValueError(f"{name}: cannot bind {endpoint!r}: {e}") from e
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def curve_keys(secret: str) -> tuple[bytes, bytes]:
    """The (public, secret) CURVE key pair of a cluster's KV event streams, derived from its KV
    secret: a publisher with it encrypts its streams and serves only clients that know the
    public key, which is as secret as the cluster secret it comes from (it is never sent)."""
    sk = zmq.utils.z85.encode(hashlib.sha256(b"kvbaton kv events\0" + secret.encode()).digest())
    return zmq.curve_public(sk), sk


def curve_client(sock: zmq.SyncSocket, keys: tuple[bytes, bytes]) -> None:
    """Make ``sock`` (before it connects) a CURVE client of a publisher with ``keys``."""
    sock.curve_serverkey = keys[0]
    sock.curve_publickey = keys[0]
    sock.curve_secretkey = keys[1]


def _curve_server(sock: zmq.SyncSocket, keys: tuple[bytes, bytes]) -> None:
    sock.curve_server = True
    sock.curve_secretkey = keys[1]


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


_STOP = object()
_GAP = object()  # marks where the sink dropped events, so the loss shows up as a seq gap


class KVEventPublisher:
    """Publishes one worker's KV events; ``publish`` is its block pool's event sink.

    ``publish`` may be called from any thread (the engine's): it only enqueues. A publisher
    thread owns the sockets (ZMQ sockets are not thread-safe), batches events for up to
    ``batch_interval_s`` or ``max_batch_events``, numbers and sends batches, keeps the last
    ``buffer_steps`` for replay, serves replay requests, and sends an empty batch after
    ``heartbeat_s`` of silence so subscribers notice a lost last batch. If the queue holds
    ``max_queue_events`` (the thread cannot keep up), further events are dropped and one
    sequence number is skipped, so subscribers see a gap that replay cannot fill (their
    index then flags this worker approximate) rather than silently diverging.

    Two public attributes exist for fault-injection tests and may be changed while the
    publisher runs: ``max_queue_events`` (set it to 0 to make every ``publish`` overflow) and
    ``wire_filter`` (drops chosen batches on the wire only). ``alive`` says whether the
    publisher thread is running.
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:0",
        replay_endpoint: str | None = "tcp://127.0.0.1:0",
        *,
        topic: str = "kv-events",
        dp_rank: int = 0,
        buffer_steps: int = 10_000,
        max_batch_events: int = 1024,
        batch_interval_s: float = 0.005,
        heartbeat_s: float | None = 1.0,
        max_queue_events: int = 1_000_000,
        hwm: int = 100_000,
        on_resync: Callable[[], None] | None = None,
        token_ids: bool = False,
        curve_secret: str | None = None,
    ) -> None:
        for name, value in (("buffer_steps", buffer_steps), ("max_batch_events", max_batch_events),
                            ("max_queue_events", max_queue_events), ("hwm", hwm)):
            _positive(name, value)
        if batch_interval_s < 0:
            raise ValueError(f"batch_interval_s must be >= 0, got {batch_interval_s!r}")
        if heartbeat_s is not None:
            _positive("heartbeat_s", heartbeat_s)
        if TOPIC_STREAM_SEP.decode() in topic:
            raise ValueError(f"topic must not contain {TOPIC_STREAM_SEP.decode()!r}: {topic!r}")
        self.stream_id = os.urandom(8).hex().encode()
        self._topic = topic.encode() + TOPIC_STREAM_SEP + self.stream_id
        self._dp_rank = dp_rank
        # Called on the publisher thread when a subscriber asks for a resync: it must only
        # arrange for the cache's owner to publish a snapshot (``BlockPool.publish_snapshot``
        # on the engine thread), not do it itself, so the snapshot stays ordered with the
        # owner's other events.
        self.on_resync = on_resync
        # BlockStored carries its block's token ids only when asked (vLLM always sends them):
        # the stream is unauthenticated, and the tokens are the tenants' prompts. Indexes
        # need only the hashes.
        self.token_ids = token_ids
        self.resyncs = 0  # resync requests accepted
        self._max_batch = max_batch_events
        self._interval = batch_interval_s
        self._heartbeat = heartbeat_s
        # Read by publish() on every call, so a test can lower it to force an overflow.
        self.max_queue_events = max_queue_events
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._overflowed = False
        self.dropped_events = 0
        self._enqueued = 0  # written by publish() callers only
        self._sent = 0  # written by the publisher thread only
        self._seq = -1
        # For fault-injection tests: called on the publisher thread with each batch's seq just
        # before it is sent; a batch it returns False for is not sent on the PUB socket (it is
        # still kept for replay), as if the network had lost it. None (the default) sends all.
        self.wire_filter: Callable[[int], bool] | None = None

        ctx: zmq.SyncContext = zmq.Context.instance()
        # With the cluster's secret both sockets are CURVE servers: the streams are encrypted,
        # and only subscribers holding the secret can connect, follow or ask for a resync.
        keys = curve_keys(curve_secret) if curve_secret else None
        self.encrypted = keys is not None
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        if keys is not None:
            _curve_server(self._pub, keys)
        self.endpoint = _bind(self._pub, "endpoint", endpoint)
        self._replay: zmq.SyncSocket | None = None
        self.replay_endpoint: str | None = None
        if replay_endpoint is not None:
            self._replay = ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            # A replay sends up to the whole buffer at once; the default HWM would drop most.
            self._replay.setsockopt(zmq.SNDHWM, buffer_steps + 16)
            if keys is not None:
                _curve_server(self._replay, keys)
            try:
                self.replay_endpoint = _bind(self._replay, "replay_endpoint", replay_endpoint)
            except ValueError:
                self._pub.close(linger=0)
                raise
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()

    # ---- producer side (any thread) --------------------------------------------------------

    def publish(self, event: KVEvent) -> None:
        """Enqueue one event; never blocks. Events after ``close()`` are dropped."""
        if self._closed:
            self.dropped_events += 1
            return
        if self._queue.qsize() >= self.max_queue_events:
            self._overflowed = True
            self.dropped_events += 1
            return
        if self._overflowed:
            self._overflowed = False
            self._queue.put(_GAP)
        if not self.token_ids and isinstance(event, BlockStored) and event.token_ids:
            event = msgspec.structs.replace(event, token_ids=[])
        self._enqueued += 1
        self._queue.put(event)

    @property
    def last_seq(self) -> int:
        """Sequence number of the last batch sent (-1 before the first)."""
        return self._seq

    @property
    def alive(self) -> bool:
        """Whether the publisher thread is running (False once ``close()`` has stopped it, or
        if it failed)."""
        return self._thread.is_alive()

    def flush(self, timeout_s: float = 1.0) -> bool:
        """Wait until every event published so far has been sent; False on timeout (exact
        when one thread publishes, as the engine does)."""
        target = self._enqueued
        deadline = time.monotonic() + timeout_s
        while self._sent < target:
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            time.sleep(0.001)
        return True

    def close(self, timeout_s: float = 1.0) -> None:
        """Send what is queued (within ``timeout_s``), stop the thread, close the sockets.
        Never hangs: sockets linger 0, and the wait is bounded."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("KV event publisher thread did not stop within %.1fs", timeout_s)

    # ---- publisher thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._send([AllBlocksCleared()], from_queue=False)
            self._loop()
        except Exception:
            log.exception("KV event publisher thread failed")
        finally:
            self._pub.close(linger=0)
            if self._replay is not None:
                self._replay.close(linger=0)

    def _loop(self) -> None:
        pending: list[KVEvent] = []
        deadline: float | None = None  # when the pending batch must go out
        last_send = time.monotonic()
        while True:
            self._serve_replay()
            now = time.monotonic()
            # Bounded waits keep replay requests served while the engine is idle.
            wait = 0.02 if deadline is None else max(0.0, deadline - now)
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                if item is _STOP:
                    if pending:
                        self._send(pending)
                    return
                if item is _GAP:
                    if pending:
                        self._send(pending)
                        pending, deadline = [], None
                    self._seq += 1  # the lost events' seq: never sent, never in the buffer
                else:
                    pending.append(item)  # type: ignore[arg-type]
                    if deadline is None:
                        deadline = now + self._interval
                if len(pending) >= self._max_batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = None
            now = time.monotonic()
            if pending and (len(pending) >= self._max_batch or deadline is None or now >= deadline):
                self._send(pending)
                pending, deadline, last_send = [], None, now
            elif not pending and self._heartbeat and now - last_send >= self._heartbeat:
                self._send([], from_queue=False)
                last_send = now

    def _send(self, events: list[KVEvent], from_queue: bool = True) -> None:
        self._seq += 1
        payload = encode_batch(KVEventBatch(time.time(), events, self._dp_rank))
        seq = self._seq
        wire_filter = self.wire_filter
        if wire_filter is None or wire_filter(seq):
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload))
        self._buffer.append((seq, payload))
        if from_queue:
            self._sent += len(events)

    def _serve_replay(self) -> None:
        sock = self._replay
        while sock is not None and sock.poll(0):
            frames = sock.recv_multipart()
            if len(frames) == 3 and frames[1] == b"" and frames[2] == RESYNC_REQUEST:
                sock.send_multipart((frames[0], b"", END_SEQ, self._resync()))
                continue
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                log.warning("ignoring malformed KV replay request (%d frames)", len(frames))
                continue
            client, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in self._buffer:
                if seq >= start:
                    sock.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            sock.send_multipart((client, b"", END_SEQ, b""))

    def _resync(self) -> bytes:
        if self.on_resync is None:
            return b""
        try:
            self.on_resync()
        except Exception:
            log.exception("KV resync handler failed")
            return b""
        self.resyncs += 1
        return RESYNC_REQUEST
