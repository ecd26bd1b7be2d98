"""KVIndex against a brute-force model, plus prediction and remote-tier TTLs on an injected clock."""

from __future__ import annotations

import itertools
import sys
import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvbaton.kv import index as kv_index
from kvbaton.kv.events import REMOTE_MEDIUM, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbaton.kv.index import KVIndex


def H(i: int) -> bytes:
    return i.to_bytes(16, "big")


# Chains that share prefixes (A and B share two blocks), so counts differ per worker.
CHAIN_A = [H(i) for i in range(0, 6)]
CHAIN_B = CHAIN_A[:2] + [H(i) for i in range(10, 14)]
CHAIN_C = [H(i) for i in range(20, 26)]
CHAINS = [CHAIN_A, CHAIN_B, CHAIN_C, CHAIN_A[::-1], CHAIN_A[1:]]
UNIVERSE = sorted(set(CHAIN_A + CHAIN_B + CHAIN_C))
WORKERS = ["w0", "w1", "w2"]
MEDIUMS = ["device", "host", "DISK", REMOTE_MEDIUM]  # REMOTE: the cluster-wide set
REMOTE_TTL = 1.5  # a few ticks: entries expire during a run
# Credits per medium for weighted_prefix; "DISK" is left out so the default weight applies.
# Powers of two keep the float sums exact whatever order they are added in.
WEIGHT_SETS = [
    ({"device": 1.0, "host": 0.5}, 0.25),  # REMOTE at the default, below every held medium
    ({"device": 0.5, "host": 1.0, "DISK": 0.125, REMOTE_MEDIUM: 0.25}, 1.0),  # above DISK
    ({}, 1.0),  # every medium weighs 1: the fast path
]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored(*hashes: bytes, medium: str = "device") -> BlockStored:
    return BlockStored(list(hashes), None, [0] * len(hashes), 1, medium=medium)


class Model:
    """The index's contract written the slow, obvious way."""

    def __init__(self) -> None:
        self.blocks: dict[str, dict[bytes, set[str]]] = {}
        self.pred: dict[str, dict[bytes, float]] = {}
        self.approx: dict[str, bool] = {}
        self.last: dict[str, int | None] = {}
        self.remote: dict[bytes, float] = {}  # hash -> time of its last REMOTE store

    def ensure(self, w: str) -> None:
        if w not in self.blocks:
            self.blocks[w], self.pred[w], self.approx[w], self.last[w] = {}, {}, False, None

    def apply(self, w: str, seq: int, events: list[KVEvent], now: float) -> None:
        self.ensure(w)
        last = self.last[w]
        if seq != (0 if last is None else last + 1):
            self.blocks[w] = {}
            self.approx[w] = seq != 0
        self.last[w] = seq
        for ev in events:
            if isinstance(ev, (BlockStored, BlockRemoved)) and ev.medium == REMOTE_MEDIUM:
                for h in ev.block_hashes:  # any worker's, for every worker
                    if isinstance(ev, BlockStored):
                        self.remote[h] = now
                    else:
                        self.remote.pop(h, None)
            elif isinstance(ev, BlockStored):
                for h in ev.block_hashes:
                    if h not in self.blocks[w]:
                        self.pred[w].pop(h, None)
                    self.blocks[w].setdefault(h, set()).add(ev.medium)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    if h in self.blocks[w]:
                        self.blocks[w][h].discard(ev.medium)
                        if not self.blocks[w][h]:
                            del self.blocks[w][h]
            else:
                self.blocks[w], self.approx[w] = {}, False

    def in_remote(self, h: bytes, now: float, remote: bool = True) -> bool:
        return remote and self.remote.get(h, -1e300) > now - REMOTE_TTL

    def remote_run(self, chain: list[bytes], now: float, remote: bool = True) -> int:
        """What any worker reaches with nothing of its own: the remote tier's leading run."""
        return next((i for i, h in enumerate(chain) if not self.in_remote(h, now, remote)), len(chain))

    def longest_prefix(self, chain: list[bytes], now: float, preds: bool, remote: bool = True) -> dict[str, int]:
        out = {}
        for w in self.blocks:
            n = 0
            for h in chain:
                if (h in self.blocks[w] or (preds and self.pred[w].get(h, -1.0) > now)
                        or self.in_remote(h, now, remote)):
                    n += 1
                else:
                    break
            if n:
                out[w] = n
        return out

    def weighted_prefix(self, chain: list[bytes], now: float, preds: bool,
                        weights: dict[str, float], default: float,
                        remote: bool = True) -> dict[str, tuple[int, float]]:
        out = {}
        w_remote = weights.get(REMOTE_MEDIUM, default)
        for w, n in self.longest_prefix(chain, now, preds, remote).items():
            total = 0.0
            for h in chain[:n]:
                mediums = self.blocks[w].get(h)
                in_remote = self.in_remote(h, now, remote)
                if mediums:  # held: its best medium, or the remote tier if that weighs more
                    total += max([weights.get(m, default) for m in mediums] + [w_remote] * in_remote)
                elif preds and self.pred[w].get(h, -1.0) > now:
                    total += 1.0  # predicted: computed on the device
                else:
                    assert in_remote
                    total += w_remote
            out[w] = (n, total)
        return out


class Truth:
    """One worker's real cache and its publisher's sequence counter."""

    epochs = itertools.count()

    def __init__(self) -> None:
        self.blocks: dict[bytes, set[str]] = {}
        self.next_seq = 0
        self.epoch = next(self.epochs)  # a new publisher stream per (re)start

    def run(self, events: list[KVEvent]) -> int:
        for ev in events:
            if isinstance(ev, (BlockStored, BlockRemoved)) and ev.medium == REMOTE_MEDIUM:
                continue  # the shared server's, not this worker's cache
            if isinstance(ev, BlockStored):
                for h in ev.block_hashes:
                    self.blocks.setdefault(h, set()).add(ev.medium)
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    if h in self.blocks:
                        self.blocks[h].discard(ev.medium)
                        if not self.blocks[h]:
                            del self.blocks[h]
            else:
                self.blocks = {}
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        return seq


hash_lists = st.lists(st.sampled_from(UNIVERSE), min_size=1, max_size=6, unique=True)
events_st = st.lists(
    st.one_of(
        st.builds(lambda hs, m: BlockStored(hs, None, [0] * len(hs), 1, medium=m),
                  hash_lists, st.sampled_from(MEDIUMS)),
        st.builds(lambda hs, m: BlockRemoved(hs, medium=m), hash_lists, st.sampled_from(MEDIUMS)),
        st.just(AllBlocksCleared()),
    ),
    min_size=0,
    max_size=4,
)


class IndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.index = KVIndex(clock=self.clock, remote_ttl_s=REMOTE_TTL)
        self.model = Model()
        self.truth = {w: Truth() for w in WORKERS}
        self.seen_epoch: dict[str, int] = {}  # stream of the last batch the index got

    @rule(w=st.sampled_from(WORKERS), events=events_st, delivered=st.booleans())
    def emit(self, w: str, events: list[KVEvent], delivered: bool) -> None:
        """A worker publishes a batch; undelivered batches are lost on the wire."""
        seq = self.truth[w].run(events)
        if delivered:
            if self.seen_epoch.get(w, self.truth[w].epoch) != self.truth[w].epoch and seq != 0:
                # A new stream whose start was lost: the subscriber sees the new stream id,
                # replay cannot reach seq 0 here, so it reports the gap first.
                self.gap(w)
            self.seen_epoch[w] = self.truth[w].epoch
            self.index.apply(w, seq, events)
            self.model.apply(w, seq, events, self.clock.now)

    @rule(w=st.sampled_from(WORKERS), delivered=st.booleans())
    def restart(self, w: str, delivered: bool) -> None:
        """A restarted worker's publisher begins again at seq 0 with AllBlocksCleared."""
        self.truth[w] = Truth()
        self.emit(w, [AllBlocksCleared()], delivered)

    @rule(w=st.sampled_from(WORKERS))
    def gap(self, w: str) -> None:
        self.index.mark_approximate(w)
        self.model.ensure(w)
        self.model.blocks[w], self.model.approx[w] = {}, True

    @rule(w=st.sampled_from(WORKERS))
    def remove_worker(self, w: str) -> None:
        self.index.remove_worker(w)
        for d in (self.model.blocks, self.model.pred, self.model.approx, self.model.last):
            d.pop(w, None)

    @rule(w=st.sampled_from(WORKERS), chain=st.sampled_from(CHAINS), k=st.integers(1, 6),
          ttl=st.sampled_from([0.5, 1.0, 2.0]))
    def predict(self, w: str, chain: list[bytes], k: int, ttl: float) -> None:
        self.index.predict(w, chain[:k], ttl)
        self.model.ensure(w)
        now = self.clock.now
        for h in chain[:k]:
            if h not in self.model.blocks[w]:
                self.model.pred[w][h] = max(self.model.pred[w].get(h, -1.0), now + ttl)

    @rule(dt=st.sampled_from([0.25, 0.5, 1.0]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @invariant()
    def lookups_agree(self) -> None:
        now = self.clock.now
        for chain in CHAINS:
            for preds, remote in itertools.product((True, False), repeat=2):
                got = self.index.longest_prefix(chain, preds, remote)
                assert got == self.model.longest_prefix(chain, now, preds, remote)
                assert got.others == self.model.remote_run(chain, now, remote)
                assert got.of("never-seen") == got.others

    @invariant()
    def weighted_lookups_agree(self) -> None:
        now = self.clock.now
        for chain in CHAINS:
            for weights, default in WEIGHT_SETS:
                for preds, remote in itertools.product((True, False), repeat=2):
                    got = self.index.weighted_prefix(chain, weights, default, preds, remote)
                    assert got == self.model.weighted_prefix(chain, now, preds, weights, default, remote)
                    runs = self.index.longest_prefix(chain, preds, remote)
                    assert {w: n for w, (n, _) in got.items()} == runs
                    r0 = self.model.remote_run(chain, now, remote)
                    assert got.others == (r0, r0 * weights.get(REMOTE_MEDIUM, default)) and runs.others == r0

    @invariant()
    def per_worker_state_agrees(self) -> None:
        assert sorted(self.index.workers()) == sorted(self.model.blocks)
        for w in WORKERS:
            assert self.index.is_approximate(w) == self.model.approx.get(w, False)
            assert self.index.block_count(w) == len(self.model.blocks.get(w, {}))
        for h in UNIVERSE:
            expect = {(w, m) for w, b in self.model.blocks.items() for m in b.get(h, ())}
            assert self.index.holders(h) == expect

    @invariant()
    def remote_tier_agrees(self) -> None:
        """One set for the cluster, whatever happened to the workers that filled it."""
        now = self.clock.now
        assert {h for h in UNIVERSE if self.index.in_remote(h)} == \
            {h for h in UNIVERSE if self.model.in_remote(h, now)}
        assert self.index.remote_block_count() == sum(self.model.in_remote(h, now) for h in self.model.remote)

    @invariant()
    def never_claims_more_than_the_worker_holds(self) -> None:
        """Caught up with a worker's stream, the index holds exactly its blocks, or a subset
        of them while approximate."""
        for w in self.model.blocks:
            t = self.truth[w]
            if self.seen_epoch.get(w) != t.epoch or self.model.last[w] != t.next_seq - 1:
                continue
            mine, real = self.model.blocks[w], self.truth[w].blocks
            if self.model.approx[w]:
                assert all(m <= real.get(h, set()) for h, m in mine.items())
            else:
                assert mine == real


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---- unit tests ----------------------------------------------------------------------------


def test_longest_prefix_counts_leading_blocks_per_worker() -> None:
    idx = KVIndex()
    idx.apply("a", 0, [stored(*CHAIN_A)])
    idx.apply("b", 0, [stored(*CHAIN_A[:3], CHAIN_A[4])])  # hole at block 3
    idx.apply("c", 0, [stored(*CHAIN_A[1:])])  # lacks the first block
    assert idx.longest_prefix(CHAIN_A) == {"a": 6, "b": 3}
    assert idx.longest_prefix(CHAIN_B) == {"a": 2, "b": 2}
    assert idx.longest_prefix([]) == {}
    assert idx.block_count("b") == 4 and len(idx) == 6


def test_removal_of_one_medium_keeps_the_block() -> None:
    idx = KVIndex()
    idx.apply("a", 0, [stored(H(1)), stored(H(1), medium="host")])
    idx.apply("a", 1, [BlockRemoved([H(1)], medium="device")])
    assert idx.holders(H(1)) == {("a", "host")}
    idx.apply("a", 2, [BlockRemoved([H(1)], medium="host")])
    assert idx.holders(H(1)) == set() and idx.longest_prefix([H(1)]) == {}


def test_gap_then_clear_resyncs() -> None:
    idx = KVIndex()
    idx.apply("a", 0, [stored(H(1))])
    idx.apply("a", 2, [stored(H(2))])  # seq 1 missing
    assert idx.is_approximate("a") and idx.longest_prefix([H(1)]) == {}
    assert idx.longest_prefix([H(2)]) == {"a": 1}
    idx.apply("a", 3, [AllBlocksCleared(), stored(H(3))])
    assert not idx.is_approximate("a") and idx.longest_prefix([H(3)]) == {"a": 1}


def test_remove_worker_frees_its_slot_for_reuse() -> None:
    idx = KVIndex()
    idx.apply("a", 0, [stored(*CHAIN_A)])
    idx.apply("b", 0, [stored(*CHAIN_A[:2])])
    idx.remove_worker("a")
    idx.remove_worker("nobody")
    assert idx.longest_prefix(CHAIN_A) == {"b": 2} and len(idx) == 2
    idx.apply("c", 0, [stored(CHAIN_A[0])])  # reuses a's bit: must not inherit its blocks
    assert idx.longest_prefix(CHAIN_A) == {"b": 2, "c": 1}


def test_weighted_prefix_weighs_each_block_by_its_best_medium() -> None:
    clock = FakeClock()
    idx = KVIndex(clock=clock)
    weights = {"GPU": 1.0, "CPU_TIER": 0.75, "DISK": 0.5}
    idx.apply("a", 0, [stored(*CHAIN_A[:2], medium="GPU"), stored(*CHAIN_A[2:4], medium="DISK"),
                       stored(CHAIN_A[3], medium="CPU_TIER")])  # block 3 on disk and host: host counts
    idx.apply("b", 0, [stored(*CHAIN_A[:3], medium="DISK"), stored(CHAIN_A[3], medium="other")])
    idx.apply("c", 0, [stored(*CHAIN_A[:3])])  # no medium -> DEFAULT_MEDIUM "device"
    assert idx.weighted_prefix(CHAIN_A, weights) == {
        "a": (4, 1.0 + 1.0 + 0.5 + 0.75),
        "b": (4, 0.5 * 3 + 1.0),  # a medium not in weights: default_weight
        "c": (3, 3.0),
    }
    assert idx.weighted_prefix(CHAIN_A, weights, default_weight=0.25)["b"] == (4, 0.5 * 3 + 0.25)
    assert idx.weighted_prefix(CHAIN_A, {**weights, "device": 0.0})["c"] == (3, 0.0)
    assert idx.weighted_prefix([], weights) == {} and idx.weighted_prefix(CHAIN_C, weights) == {}


def test_weighted_prefix_sees_mediums_that_appear_after_a_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-weights table is cached: a medium first seen later must still get its weight,
    with the precomputed table and with the per-mask one used when mediums are many."""
    for limit in (10, 1):
        monkeypatch.setattr(kv_index, "_TABLE_MAX_MEDIUMS", limit)
        idx = KVIndex()
        weights = {"GPU": 0.5, "DISK": 0.25}
        idx.apply("a", 0, [stored(*CHAIN_A[:2], medium="GPU")])
        assert idx.weighted_prefix(CHAIN_A, weights) == {"a": (2, 1.0)}
        idx.apply("a", 1, [stored(*CHAIN_A[2:4], medium="DISK"), stored(CHAIN_A[1], medium="new")])
        assert idx.weighted_prefix(CHAIN_A, weights) == {"a": (4, 0.5 + 1.0 + 0.25 + 0.25)}
        assert idx.weighted_prefix(CHAIN_A, {"GPU": 1.0, "DISK": 1.0}) == {"a": (4, 4.0)}


def test_weighted_prefix_counts_predicted_blocks_whole() -> None:
    """The router just sent the prompt there: predicted blocks are computed on the device,
    but a block already stored on disk stays a disk block (the prediction skips it)."""
    clock = FakeClock()
    idx = KVIndex(clock=clock)
    idx.apply("a", 0, [stored(*CHAIN_A[:2], medium="DISK")])
    idx.predict("a", CHAIN_A[:5], ttl_s=1.0)
    assert idx.weighted_prefix(CHAIN_A, {"DISK": 0.5}) == {"a": (5, 0.5 * 2 + 3.0)}
    assert idx.weighted_prefix(CHAIN_A, {"DISK": 0.5}, include_predicted=False) == {"a": (2, 1.0)}
    clock.now += 1.0
    assert idx.weighted_prefix(CHAIN_A, {"DISK": 0.5}) == {"a": (2, 1.0)}


def test_not_an_event_is_rejected() -> None:
    with pytest.raises(TypeError, match="not a KV event"):
        KVIndex().apply("a", 0, ["BlockStored"])  # type: ignore[list-item]


# ---- predictions ---------------------------------------------------------------------------


def test_prediction_counts_until_its_ttl() -> None:
    clock = FakeClock()
    idx = KVIndex(clock=clock)
    idx.predict("a", CHAIN_A[:4], ttl_s=2.0)
    assert idx.longest_prefix(CHAIN_A) == {"a": 4}
    assert idx.longest_prefix(CHAIN_A, include_predicted=False) == {}
    clock.now += 1.999
    assert idx.longest_prefix(CHAIN_A) == {"a": 4}
    clock.now += 0.001
    assert idx.longest_prefix(CHAIN_A) == {}
    assert idx.stats()["a"].predicted == 0


def test_prediction_is_replaced_by_the_real_store() -> None:
    clock = FakeClock()
    idx = KVIndex(clock=clock)
    idx.predict("a", CHAIN_A[:4], ttl_s=1.0)
    idx.apply("a", 0, [stored(*CHAIN_A[:2])])
    assert idx.stats()["a"].predicted == 2
    clock.now += 5
    assert idx.longest_prefix(CHAIN_A) == {"a": 2}  # the stored part outlives the TTL


def test_repredicting_extends_the_ttl() -> None:
    clock = FakeClock()
    idx = KVIndex(clock=clock)
    idx.predict("a", CHAIN_A[:2], ttl_s=1.0)
    clock.now += 0.5
    idx.predict("a", CHAIN_A[:3], ttl_s=1.0)
    clock.now += 0.75  # the first prediction's expiry has passed, the second's has not
    assert idx.longest_prefix(CHAIN_A) == {"a": 3}
    clock.now += 0.25
    assert idx.longest_prefix(CHAIN_A) == {}


def test_prediction_survives_a_gap_but_not_worker_removal() -> None:
    clock = FakeClock()
    idx = KVIndex(clock=clock)
    idx.predict("a", CHAIN_A[:2], ttl_s=1.0)
    idx.mark_approximate("a")
    assert idx.longest_prefix(CHAIN_A) == {"a": 2} and idx.is_approximate("a")
    idx.remove_worker("a")
    assert idx.longest_prefix(CHAIN_A) == {} and idx.workers() == []


def test_prediction_rejects_a_non_positive_ttl() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        KVIndex().predict("a", CHAIN_A, ttl_s=0)


def test_lookups_during_a_large_drop_never_see_partial_state(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Dropping a worker's entries retires its bit at once and scrubs in chunks: a concurrent
    lookup sees the worker's whole chain or none of it, and other workers are unaffected."""
    monkeypatch.setattr(kv_index, "_PURGE_CHUNK", 16)  # many chunks: lookups interleave
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        _run_drop_with_concurrent_lookups()
    finally:
        sys.setswitchinterval(old_interval)


def _run_drop_with_concurrent_lookups() -> None:
    big = [H(1000 + i) for i in range(4096)]
    idx = KVIndex()
    errors: list[BaseException] = []
    idx.apply("b", 0, [stored(*big[:128])])
    seen: set[tuple[tuple[str, int], ...]] = set()
    seen_weighted: set[tuple[tuple[str, tuple[int, float]], ...]] = set()
    for round_ in range(3):
        idx.apply("a", 2 * round_, [AllBlocksCleared(), stored(*big)])
        done = threading.Event()

        def look(done: threading.Event = done) -> None:
            try:
                while not done.is_set():
                    seen.add(tuple(sorted(idx.longest_prefix(big[:128]).items())))
                    seen_weighted.add(tuple(sorted(idx.weighted_prefix(big[:128], {"device": 0.5}).items())))
                    idx.holders(big[0])
            except BaseException as e:  # surfaced below: a thread's failure is otherwise lost
                errors.append(e)

        t = threading.Thread(target=look)
        t.start()
        try:
            if round_ == 2:
                idx.remove_worker("a")
            else:
                idx.mark_approximate("a")
        finally:
            done.set()
            t.join()
        assert idx.longest_prefix(big) == {"b": 128}
    assert errors == []
    assert seen <= {(("a", 128), ("b", 128)), (("b", 128),)}
    assert seen_weighted <= {(("a", (128, 64.0)), ("b", (128, 64.0))), (("b", (128, 64.0)),)}
    assert len(idx) == 128 and idx.workers() == ["b"]


def test_expired_remote_entries_are_dropped_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries stored together expire together: each batch applied drops at most one chunk of
    them (a bounded lock hold), lookups skip the rest at once, and the count drops them all."""
    monkeypatch.setattr(kv_index, "_PURGE_CHUNK", 16)
    clock = FakeClock()
    idx = KVIndex(clock=clock, remote_ttl_s=10.0)
    chain = [H(i) for i in range(100)]
    idx.apply("a", 0, [stored(*chain, medium=REMOTE_MEDIUM)])
    assert idx.longest_prefix(chain).others == 100
    clock.now += 10.0
    idx.apply("a", 1, [])
    assert len(idx._remote) == 100 - 16  # one chunk dropped with the batch
    assert idx.longest_prefix(chain) == {} and idx.longest_prefix(chain).others == 0
    assert idx.remote_block_count() == 0 and len(idx._remote) == 0
