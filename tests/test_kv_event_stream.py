"""KV event stream over real ZMQ on 127.0.0.1: order, vLLM wire shape, replay, gaps, restarts."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq

from conftest import free_port, wait_until
from kvbaton.engine.block_pool import BlockPool
from kvbaton.kv.event_stream import KVEventBatch, KVEventPublisher
from kvbaton.kv.event_subscriber import KVEventSubscriber, WorkerEndpoints
from kvbaton.kv.events import AllBlocksCleared, BlockStored
from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.kv.index import KVIndex


def H(i: int) -> bytes:
    return i.to_bytes(16, "big")


def stored(i: int) -> BlockStored:
    return BlockStored([H(i)], None, [i, i], 2)


class Collector:
    """Records what a subscriber delivers (called from its thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[tuple[Any, int, KVEventBatch]] = []
        self.gaps: list[Any] = []

    def on_batch(self, worker: Any, seq: int, batch: KVEventBatch) -> None:
        with self.lock:
            self.batches.append((worker, seq, batch))

    def on_gap(self, worker: Any) -> None:
        with self.lock:
            self.gaps.append(worker)

    def seqs(self, worker: Any = "w") -> list[int]:
        with self.lock:
            return [s for w, s, _ in self.batches if w == worker]

    def events(self, worker: Any = "w") -> list[Any]:
        with self.lock:
            return [e for w, _, b in self.batches if w == worker for e in b.events]


@pytest.fixture
def closers() -> Iterator[list[Any]]:
    """Everything appended is closed at teardown, last first."""
    items: list[Any] = []
    try:
        yield items
    finally:
        for item in reversed(items):
            item.close()


def make_pub(closers: list[Any], **kw: Any) -> KVEventPublisher:
    kw.setdefault("heartbeat_s", None)
    kw.setdefault("token_ids", True)  # these tests compare whole events (the default strips tokens)
    pub = KVEventPublisher(**kw)
    closers.append(pub)
    return pub


def make_sub(closers: list[Any], pubs: dict[str, KVEventPublisher], col: Collector,
             **kw: Any) -> KVEventSubscriber:
    kw.setdefault("replay_timeout_s", 1.0)
    eps = {w: WorkerEndpoints(p.endpoint, p.replay_endpoint) for w, p in pubs.items()}
    sub = KVEventSubscriber(eps, col.on_batch, col.on_gap, **kw)
    closers.append(sub)
    return sub


def sync(pub: KVEventPublisher, col: Collector, worker: str = "w", since: int = 0) -> int:
    """Publish no-op batches until the subscriber follows ``pub`` (ZMQ's slow joiner drops
    what a PUB sends before the SUB is connected; the subscriber replays those). Returns the
    seq of the last batch both sides have. ``since``: batches delivered before this stream."""
    deadline = time.monotonic() + 5
    while len(col.seqs(worker)) <= since:
        assert time.monotonic() < deadline, "subscriber never received a batch"
        pub.publish(AllBlocksCleared())  # harmless: nothing is stored yet
        assert pub.flush(2.0)
        time.sleep(0.01)
    last = pub.last_seq
    wait_until(lambda: col.seqs(worker)[-1:] == [last])
    return last


def run_prompt(pool: BlockPool, prompt: list[int], chain: list[bytes]) -> None:
    """What the engine does for one prompt: reuse its cached prefix, compute and cache the
    rest, then free it (its blocks stay cached until evicted)."""
    bs = pool.block_size
    hit = pool.find_cached_prefix(chain, prompt)
    pool.touch(hit)
    ids = hit + pool.allocate(len(chain) - len(hit))
    for j in range(len(hit), len(chain)):
        pool.cache_block(ids[j], chain[j], prompt[j * bs:(j + 1) * bs], chain[j - 1] if j else None)
    pool.free(list(reversed(ids)))


def publish_batches(pub: KVEventPublisher, ids: range) -> None:
    """One event per batch: flush waits until each is sent."""
    for i in ids:
        pub.publish(stored(i))
        assert pub.flush(2.0)


def test_block_token_ids_are_stripped_unless_asked(closers: list[Any]) -> None:
    pub = make_pub(closers, token_ids=False)
    col = Collector()
    make_sub(closers, {"w": pub}, col)
    pub.publish(stored(1))
    assert pub.flush(2.0)
    wait_until(lambda: len(col.events()) == 2)
    got = col.events()[1]
    assert isinstance(got, BlockStored) and got.token_ids == [] and got.block_hashes == stored(1).block_hashes


def test_batches_arrive_in_order_with_increasing_seq(closers: list[Any]) -> None:
    pub = make_pub(closers)
    col = Collector()
    make_sub(closers, {"w": pub}, col)
    for group in range(5):
        for i in range(group * 10, group * 10 + 10):
            pub.publish(stored(i))
        assert pub.flush(2.0)
    wait_until(lambda: len(col.events()) == 51)
    seqs = col.seqs()
    assert seqs == list(range(len(seqs))) and len(seqs) >= 6
    assert col.events() == [AllBlocksCleared()] + [stored(i) for i in range(50)]
    assert col.gaps == []


def test_wire_shape_is_vllm_readable(closers: list[Any]) -> None:
    """A plain SUB/REQ client, as vLLM's example subscriber, reads our stream."""
    pub = make_pub(closers)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    closers.append(sub)
    sub.connect(pub.endpoint)
    # Keep publishing until the SUB is connected (ZMQ's slow joiner); it may get seq 0 (the
    # AllBlocksCleared batch) first.
    deadline = time.monotonic() + 5
    for i in itertools.count():
        assert time.monotonic() < deadline, "no BlockStored batch received"
        pub.publish(stored(i))
        if not sub.poll(20):
            continue
        topic, seq_frame, payload = sub.recv_multipart()
        assert topic.startswith(b"kv-events") and len(seq_frame) == 8
        ts, events, dp_rank = msgspec.msgpack.decode(payload)
        assert isinstance(ts, float) and dp_rank == 0
        if events[0] != ["AllBlocksCleared"]:
            break
    tag, hashes, parent, tokens, block_size, lora_id, medium = events[0]
    assert (tag, parent, block_size, lora_id, medium) == ("BlockStored", None, 2, None, "device")
    assert len(hashes[0]) == 16 and tokens == [hashes[0][-1]] * 2

    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    closers.append(req)
    req.connect(pub.replay_endpoint)
    req.send((0).to_bytes(8, "big"))
    assert req.poll(2000)
    # A REQ socket takes one reply: the first buffered batch, the publisher's seq 0.
    seq_bytes, data = req.recv_multipart()
    assert int.from_bytes(seq_bytes, "big") == 0
    assert msgspec.msgpack.decode(data)[1] == [["AllBlocksCleared"]]


def test_lost_batch_is_replayed(closers: list[Any]) -> None:
    pub = make_pub(closers)
    col = Collector()
    sub = make_sub(closers, {"w": pub}, col)
    base = sync(pub, col)
    pub.wire_filter = lambda seq: seq not in (base + 3, base + 4)
    publish_batches(pub, range(1, 8))
    wait_until(lambda: col.seqs()[-1:] == [base + 7])
    assert col.seqs() == list(range(base + 8))
    assert col.events()[-7:] == [stored(i) for i in range(1, 8)]
    assert col.gaps == [] and sub.replays >= 1


def test_gap_beyond_the_ring_buffer_calls_on_gap(closers: list[Any]) -> None:
    pub = make_pub(closers, buffer_steps=2)
    col = Collector()
    index = KVIndex()
    sub = KVEventSubscriber(
        {"w": WorkerEndpoints(pub.endpoint, pub.replay_endpoint)},
        lambda w, s, b: (col.on_batch(w, s, b), index.apply(w, s, b)),
        lambda w: (col.on_gap(w), index.mark_approximate(w)),
    )
    closers.append(sub)
    base = sync(pub, col)  # a 2-batch buffer may not reach back to a late SUB's seq 0
    col.gaps.clear()
    assert not index.is_approximate("w")  # the sync batches were AllBlocksCleared
    lost = {base + 1, base + 2, base + 3, base + 4}
    pub.wire_filter = lambda seq: seq not in lost
    publish_batches(pub, range(1, 7))
    wait_until(lambda: col.seqs()[-1:] == [base + 6])
    assert col.gaps == ["w"]
    assert not set(col.seqs()) & lost
    # This publisher has no resync handler: the worker stays approximate (until it restarts).
    assert index.is_approximate("w") and sub.resyncs == 0 and pub.resyncs == 0
    assert index.longest_prefix([H(1)]) == {} and index.longest_prefix([H(6)]) == {"w": 1}


class PoolOwner:
    """Plays the engine thread: owns ``pool`` (callers change it under ``lock``) and publishes
    a snapshot whenever the publisher's resync handler asks for one."""

    def __init__(self, pool: BlockPool, pub: KVEventPublisher) -> None:
        self.pool, self.lock = pool, threading.Lock()
        self.asked, self.stopped = threading.Event(), threading.Event()
        pub.on_resync = self.asked.set
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            if self.asked.wait(0.02):
                self.asked.clear()
                with self.lock:
                    self.pool.publish_snapshot()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(2)


def test_unfillable_gap_is_resynced_from_a_snapshot(closers: list[Any]) -> None:
    """A gap replay cannot fill: the subscriber asks for a resync, the cache's owner publishes
    its whole cache in-stream, and the index matches the pool again, lost blocks included."""
    pub = make_pub(closers, buffer_steps=2)
    bs, root = 4, root_hash("test-model")
    pool = BlockPool(8, bs, event_sink=pub.publish)
    owner = PoolOwner(pool, pub)
    closers.append(owner)
    col, index = Collector(), KVIndex()
    sub = KVEventSubscriber(
        {"w": WorkerEndpoints(pub.endpoint, pub.replay_endpoint)},
        lambda w, s, b: (col.on_batch(w, s, b), index.apply(w, s, b)),
        lambda w: (col.on_gap(w), index.mark_approximate(w)), resync_interval_s=0.1,
    )
    closers.append(sub)
    sync(pub, col)  # a 2-batch buffer may not reach back to a late SUB's seq 0: resynced too
    wait_until(lambda: not index.is_approximate("w"))
    col.gaps.clear()
    resyncs = pub.resyncs
    a, b = list(range(16)), [5] * 12
    chain_a, chain_b = hash_block_chain(root, a, bs), hash_block_chain(root, b, bs)
    pub.wire_filter = lambda seq: False  # everything about prompt a is lost on the wire
    with owner.lock:
        run_prompt(pool, a, chain_a)
    assert pub.flush(2.0)
    publish_batches(pub, range(900, 903))  # lost too, and push a's batches out of the buffer
    pub.wire_filter = None
    with owner.lock:
        run_prompt(pool, b, chain_b)
    assert pub.flush(2.0)
    wait_until(lambda: col.gaps == ["w"] and pub.resyncs > resyncs)
    wait_until(lambda: not index.is_approximate("w") and index.longest_prefix(chain_a) == {"w": 4})
    assert index.longest_prefix(chain_b) == {"w": 3} and sub.resyncs >= 1
    assert index.block_count("w") == pool.num_cached_blocks == 7
    assert index.longest_prefix([H(900)]) == {}


def test_replay_timeout_calls_on_gap(closers: list[Any]) -> None:
    pub = make_pub(closers, replay_endpoint=None)
    dead = f"tcp://127.0.0.1:{free_port()}"
    col = Collector()
    sub = KVEventSubscriber({"w": WorkerEndpoints(pub.endpoint, dead)}, col.on_batch,
                            col.on_gap, replay_timeout_s=0.2)
    closers.append(sub)
    base = sync(pub, col)  # may itself report a gap: the SUB joined late and replay is dead
    col.gaps.clear()
    pub.wire_filter = lambda seq: seq != base + 1
    publish_batches(pub, range(1, 3))
    wait_until(lambda: col.seqs()[-1:] == [base + 2])
    assert col.gaps == ["w"] and base + 1 not in col.seqs()


def test_queue_overflow_shows_as_an_unfillable_gap(closers: list[Any]) -> None:
    """Events the publisher had to drop must not be silently missing from the index."""
    pub = make_pub(closers, max_queue_events=2)
    col, index = Collector(), KVIndex()
    sub = KVEventSubscriber(
        {"w": WorkerEndpoints(pub.endpoint, pub.replay_endpoint)},
        lambda w, s, b: (col.on_batch(w, s, b), index.apply(w, s, b)),
        lambda w: (col.on_gap(w), index.mark_approximate(w)),
    )
    closers.append(sub)
    sync(pub, col)
    col.gaps.clear()
    entered, gate = threading.Event(), threading.Event()
    pub.wire_filter = lambda seq: (entered.set(), gate.wait(5))[1]  # stall the thread
    pub.publish(stored(1))
    assert entered.wait(5)  # the thread is stuck sending stored(1); the queue is empty
    for i in (2, 3, 4, 5):  # 4 and 5 overflow the 2-event queue
        pub.publish(stored(i))
    assert pub.dropped_events == 2
    gate.set()
    assert pub.flush(2.0)  # 1, 2, 3 sent: the queue has room again
    pub.publish(stored(6))
    assert pub.flush(2.0)
    wait_until(lambda: col.seqs()[-1:] == [pub.last_seq])
    assert col.gaps == ["w"] and index.is_approximate("w")
    assert [e.block_hashes[0] for e in col.events() if isinstance(e, BlockStored)] == \
        [H(1), H(2), H(3), H(6)]
    assert index.longest_prefix([H(6)]) == {"w": 1} and index.block_count("w") == 1


def _bind_retry(endpoint: str, replay: str) -> KVEventPublisher:
    """The old publisher's ports are released asynchronously by ZMQ's I/O thread."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return KVEventPublisher(endpoint, replay, heartbeat_s=None)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def test_publisher_restart_resyncs_with_all_blocks_cleared(closers: list[Any]) -> None:
    pub = KVEventPublisher(heartbeat_s=None)
    endpoint, replay = pub.endpoint, pub.replay_endpoint
    assert replay is not None
    col, index = Collector(), KVIndex()
    sub = KVEventSubscriber(
        {"w": WorkerEndpoints(endpoint, replay)},
        lambda w, s, b: (col.on_batch(w, s, b), index.apply(w, s, b)),
        lambda w: (col.on_gap(w), index.mark_approximate(w)),
    )
    closers.append(sub)
    try:
        base = sync(pub, col)
        publish_batches(pub, range(1, 30))
        wait_until(lambda: col.seqs()[-1:] == [base + 29])
    finally:
        pub.close()
    delivered = len(col.seqs())
    pub2 = _bind_retry(endpoint, replay)
    closers.append(pub2)
    assert pub2.stream_id != pub.stream_id
    base2 = sync(pub2, col, since=delivered)
    publish_batches(pub2, range(100, 103))
    wait_until(lambda: col.seqs()[-1:] == [base2 + 3])
    with col.lock:
        after = [(s, b.events) for _, s, b in col.batches[delivered:]]
    assert after[0] == (0, [AllBlocksCleared()])  # replayed: the SUB was still reconnecting
    assert [s for s, _ in after] == list(range(base2 + 4))
    assert col.gaps == [] and not index.is_approximate("w")
    assert index.longest_prefix([H(1)]) == {} and index.block_count("w") == 3


def test_heartbeat_batches_are_empty_and_keep_seq(closers: list[Any]) -> None:
    pub = make_pub(closers, heartbeat_s=0.02)
    col = Collector()
    make_sub(closers, {"w": pub}, col)
    wait_until(lambda: len(col.seqs()) >= 3)
    with col.lock:
        assert all(b.events == [] for _, _, b in col.batches[1:])
    assert col.seqs()[:3] == [0, 1, 2]


def test_close_never_hangs_with_dead_peers(closers: list[Any]) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    sub = KVEventSubscriber({"w": WorkerEndpoints(dead, dead)}, lambda *a: None)
    pub = KVEventPublisher(heartbeat_s=None)
    for i in range(1000):
        pub.publish(stored(i))
    pub.close()
    sub.close()
    assert not pub.alive and not sub.alive
    pub.publish(stored(0))  # after close: dropped, no error
    assert pub.dropped_events == 1


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        KVEventPublisher("localhost:5557")
    with pytest.raises(ValueError, match="buffer_steps"):
        KVEventPublisher(buffer_steps=0)
    with pytest.raises(ValueError, match="topic"):
        KVEventPublisher(topic="a|b")
    with pytest.raises(ValueError, match=r"workers\['w'\].pub"):
        KVEventSubscriber({"w": WorkerEndpoints("nope")}, lambda *a: None)
    with pytest.raises(ValueError, match="replay_timeout_s"):
        KVEventSubscriber({}, lambda *a: None, replay_timeout_s=0)


def test_block_pool_events_reach_the_index(closers: list[Any]) -> None:
    """Two engines' block pools -> publishers -> one subscriber -> index == the pools."""
    index = KVIndex()
    col = Collector()
    sub = KVEventSubscriber(
        {}, lambda w, s, b: (col.on_batch(w, s, b), index.apply(w, s, b)),
        lambda w: (col.on_gap(w), index.mark_approximate(w)),
    )
    closers.append(sub)
    bs, root = 4, root_hash("test-model")
    pools, pubs = {}, {}
    for w in ("a", "b"):
        pubs[w] = make_pub(closers)
        pools[w] = BlockPool(6, bs, event_sink=pubs[w].publish)
        sub.add_worker(w, WorkerEndpoints(pubs[w].endpoint, pubs[w].replay_endpoint))
        sync(pubs[w], col, w)
    prompts = [list(range(16)), list(range(8)) + [99] * 8, [7] * 12]
    chains = [hash_block_chain(root, p, bs) for p in prompts]
    run_prompt(pools["a"], prompts[0], chains[0])
    run_prompt(pools["a"], prompts[1], chains[1])  # shares 2 blocks, evicts a's LRU blocks
    run_prompt(pools["b"], prompts[2], chains[2])
    pools["b"].reset_prefix_cache()
    run_prompt(pools["b"], prompts[1], chains[1])
    for w in pubs:
        assert pubs[w].flush(2.0)
    wait_until(lambda: all(index.stats().get(w) and index.stats()[w].last_seq == pubs[w].last_seq
                           for w in pubs))
    for h in {h for c in chains for h in c}:
        expect = {(w, "device") for w, pool in pools.items() if pool.lookup(h) is not None}
        assert index.holders(h) == expect
    for prompt, chain in zip(prompts, chains):
        expect = {w: n for w, pool in pools.items()
                  if (n := len(pool.find_cached_prefix(chain, prompt)))}
        assert index.longest_prefix(chain) == expect
    assert col.gaps == [] and not any(index.is_approximate(w) for w in pubs)


def test_encrypted_streams_need_the_cluster_secret(closers: list[Any]) -> None:
    # A publisher with the cluster's KV secret serves CURVE only: a subscriber with the secret
    # follows it (stream and replay); one without it is refused up front, naming the flag.
    pub = make_pub(closers, curve_secret="s3cret")
    assert pub.encrypted
    col = Collector()
    eps = {"w": WorkerEndpoints(pub.endpoint, pub.replay_endpoint, encrypted=True)}
    sub = KVEventSubscriber(eps, col.on_batch, col.on_gap, curve_secret="s3cret")
    closers.append(sub)
    for i in range(3):
        pub.publish(stored(i))
    assert pub.flush(2.0)
    wait_until(lambda: len(col.events()) == 4)
    assert col.events() == [AllBlocksCleared()] + [stored(i) for i in range(3)]
    with pytest.raises(ValueError, match="--kv-secret"):
        KVEventSubscriber(eps, col.on_batch)
