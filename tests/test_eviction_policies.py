"""Eviction policies and the reuse filter against slow, obvious reference models."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from functools import partial
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from kvbaton.kv.store.policies import (
    DEFAULT_POLICY,
    POLICIES,
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    ReuseFilter,
    S3FIFOPolicy,
    make_policy,
    register_policy,
)

# A small universe, so keys collide, leave and come back within one run.
UNIVERSE = list(range(8))
KEYS = st.sampled_from(UNIVERSE)
COUNTS = st.integers(-1, len(UNIVERSE) + 2)
MACHINE_SETTINGS = settings(max_examples=50, stateful_step_count=50, deadline=None)


def run_machine(machine: type[RuleBasedStateMachine], **attrs: object) -> None:
    """Run ``machine`` with class attributes ``attrs`` (the policy under test) set on a subclass."""
    run_state_machine_as_test(type(machine.__name__, (machine,), attrs), settings=MACHINE_SETTINGS)


def drain(policy: EvictionPolicy[int]) -> Iterator[int]:
    """Evict until empty."""
    while (key := policy.evict()) is not None:
        yield key


# -- reference models -------------------------------------------------------------------------


class Model:
    """A policy's exact behaviour written the slow, obvious way; ``peek`` is a dry run."""

    def insert(self, k: int) -> None: ...

    def remove(self, k: int) -> None: ...

    def access(self, k: int) -> None: ...

    def forget(self, k: int) -> None: ...

    def evict(self) -> int | None:
        raise NotImplementedError

    def peek(self, n: int) -> list[int]:
        """What the next ``n`` evictions would return."""
        dry = copy.deepcopy(self)
        return [k for k in (dry.evict() for _ in range(max(n, 0))) if k is not None]

    def check(self, policy: EvictionPolicy[int]) -> None:
        """Compare the history the policy exposes."""


class LRUModel(Model):
    """A list, oldest first."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def insert(self, k: int) -> None:
        if k in self.order:
            self.order.remove(k)
        self.order.append(k)  # also a current candidate becomes the most recent

    def remove(self, k: int) -> None:
        if k in self.order:
            self.order.remove(k)

    forget = remove

    def access(self, k: int) -> None:
        if k in self.order:
            self.insert(k)

    def evict(self) -> int | None:
        return self.order.pop(0) if self.order else None


class LFUModel(Model):
    """Frequencies and touch stamps in dicts; the victim is found by sorting everything."""

    def __init__(self, max_freq: int = 64, aging: bool = True) -> None:
        self.max_freq, self.aging = max_freq, aging
        self.freq: dict[int, int] = {}
        self.stamp: dict[int, int] = {}  # candidates -> when last inserted or hit
        self.clock = 0
        self.touches = 0

    def touched(self) -> None:
        self.touches += 1
        if self.aging and self.touches >= max(self.max_freq, len(self.freq)):
            self.touches = 0
            self.freq = {k: max(1, f // 2) for k, f in self.freq.items()}

    def insert(self, k: int) -> None:
        if k not in self.stamp:
            self.freq.setdefault(k, 1)
            self.clock += 1
            self.stamp[k] = self.clock
            self.touched()

    def remove(self, k: int) -> None:
        self.stamp.pop(k, None)

    def access(self, k: int) -> None:
        self.freq[k] = min(self.freq.get(k, 1) + 1, self.max_freq)
        if k in self.stamp:
            self.clock += 1
            self.stamp[k] = self.clock
        self.touched()

    def forget(self, k: int) -> None:
        self.stamp.pop(k, None)
        self.freq.pop(k, None)

    def evict(self) -> int | None:
        if not self.stamp:
            return None
        victim = min(self.stamp, key=lambda k: (self.freq[k], self.stamp[k]))
        del self.stamp[victim]
        return victim

    def check(self, policy: EvictionPolicy[int]) -> None:
        assert isinstance(policy, LFUPolicy)
        assert [policy.frequency(k) for k in UNIVERSE] == [self.freq.get(k, 0) for k in UNIVERSE]


class S3FIFOModel(Model):
    """S3-FIFO with lists, and an eviction loop without a bound."""

    def __init__(self) -> None:
        self.small: list[int] = []
        self.main: list[int] = []
        self.ghost: list[int] = []
        self.freq: dict[int, int] = {}  # resident keys (candidates and removed)
        self.removed: dict[int, str] = {}  # removed key -> the queue it returns to

    def queue_of(self, k: int) -> str | None:
        if k in self.small:
            return "small"
        if k in self.main:
            return "main"
        return self.removed.get(k) or ("ghost" if k in self.ghost else None)

    def trim(self) -> None:
        while len(self.ghost) > len(self.small) + len(self.main) + len(self.removed):
            self.ghost.pop(0)

    def insert(self, k: int) -> None:
        if k in self.small or k in self.main:
            return
        if k in self.removed:
            (self.main if self.removed.pop(k) == "main" else self.small).append(k)
        elif k in self.ghost:
            self.ghost.remove(k)
            self.main.append(k)
            self.freq[k] = 0
        else:
            self.small.append(k)
            self.freq[k] = 0

    def remove(self, k: int) -> None:
        for name, queue in (("small", self.small), ("main", self.main)):
            if k in queue:
                queue.remove(k)
                self.removed[k] = name

    def access(self, k: int) -> None:
        if k in self.freq:
            self.freq[k] = min(self.freq[k] + 1, 3)

    def forget(self, k: int) -> None:
        for queue in (self.small, self.main, self.ghost):
            if k in queue:
                queue.remove(k)
        self.removed.pop(k, None)
        self.freq.pop(k, None)
        self.trim()

    def evict(self) -> int | None:
        if not self.small and not self.main:
            return None
        while True:
            if not self.main or len(self.small) > 0.1 * (len(self.small) + len(self.main)):
                k = self.small.pop(0)
                if self.freq[k] > 0:
                    self.freq[k] = 0
                    self.main.append(k)
                    continue
            else:
                k = self.main.pop(0)
                if self.freq[k] > 0:
                    self.freq[k] -= 1
                    self.main.append(k)
                    continue
            del self.freq[k]
            self.ghost.append(k)
            self.trim()
            return k

    def check(self, policy: EvictionPolicy[int]) -> None:
        assert isinstance(policy, S3FIFOPolicy)
        assert [policy.queue_of(k) for k in UNIVERSE] == [self.queue_of(k) for k in UNIVERSE]


Variant = tuple[Callable[[], EvictionPolicy[int]], Callable[[], Model]]

# The registered policies with a reference model: the default make_policy builds first, then
# other settings worth covering (each run draws one per example). For this small universe every
# one of them is exact, s3fifo's peek included (its work budget is never reached).
MODELS: dict[str, list[Variant]] = {
    "lru": [(LRUPolicy, LRUModel)],
    # lfu: max_freq 3 with aging halves every few touches (the bucket merge), 2 without aging
    # keeps many keys at the cap, 1 is all ties (LRU order).
    "lfu": [(LFUPolicy, LFUModel)] + [
        (partial(LFUPolicy, max_freq, aging=aging), partial(LFUModel, max_freq, aging))
        for max_freq, aging in [(3, True), (2, False), (1, True)]
    ],
    "s3fifo": [(S3FIFOPolicy, S3FIFOModel)],
}


# -- the contract, for every registered policy ----------------------------------------------


class PolicyMachine(RuleBasedStateMachine):
    """What any policy owes its owner, checked against the candidate set alone; and, where the
    policy has a reference model, the exact victims, peeks and history too."""

    name: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.policy: EvictionPolicy[int] = make_policy(self.name)
        self.model: Model | None = None
        self.candidates: set[int] = set()
        self.removed: set[int] = set()  # taken out by remove (in use) and not inserted since

    @initialize(data=st.data())
    def choose_variant(self, data: st.DataObject) -> None:
        variants = MODELS.get(self.name)
        if variants:
            make, model = data.draw(st.sampled_from(variants), label="variant")
            self.policy, self.model = make(), model()

    @rule(k=KEYS)
    def insert(self, k: int) -> None:
        self.policy.insert(k)
        self.candidates.add(k)
        self.removed.discard(k)
        if self.model is not None:
            self.model.insert(k)

    # Batches, so the policy fills up and sees hits between the single-key calls that drain it.
    @rule(ks=st.lists(KEYS, min_size=2, max_size=8))
    def insert_many(self, ks: list[int]) -> None:
        for k in ks:
            self.insert(k)

    @rule(ks=st.lists(KEYS, min_size=2, max_size=8))
    def access_many(self, ks: list[int]) -> None:
        for k in ks:
            self.access(k)

    @rule(k=KEYS)
    def remove(self, k: int) -> None:
        self.policy.remove(k)
        self.candidates.discard(k)
        self.removed.add(k)
        if self.model is not None:
            self.model.remove(k)

    @rule(k=KEYS)
    def access(self, k: int) -> None:
        self.policy.access(k)
        if self.model is not None:
            self.model.access(k)

    @rule(k=KEYS)
    def forget(self, k: int) -> None:
        self.policy.forget(k)
        self.candidates.discard(k)
        self.removed.discard(k)
        if self.model is not None:
            self.model.forget(k)

    @rule()
    def evict(self) -> None:
        victim = self.policy.evict()
        if self.model is not None:
            assert victim == self.model.evict()
        if not self.candidates:
            assert victim is None
            return
        assert victim is not None
        assert victim not in self.removed
        assert victim in self.candidates
        self.candidates.remove(victim)
        assert victim not in self.policy

    @rule(n=COUNTS)
    def peek(self, n: int) -> None:
        got = self.policy.peek(n)
        assert len(got) == len(set(got))
        assert set(got) <= self.candidates
        assert len(got) == max(0, min(n, len(self.candidates)))
        if self.model is not None:
            assert got == self.model.peek(n)

    @invariant()
    def candidates_agree(self) -> None:
        assert len(self.policy) == len(self.candidates)
        assert {k for k in UNIVERSE if k in self.policy} == self.candidates
        assert sorted(self.policy) == sorted(self.candidates)
        if self.model is not None:
            self.model.check(self.policy)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_registered_policy_keeps_the_contract(name: str) -> None:
    run_machine(PolicyMachine, name=name)


def test_the_models_cover_every_builtin_policy() -> None:
    for name, variants in MODELS.items():
        make, _ = variants[0]
        assert POLICIES[name] is make  # the first variant is what make_policy builds


def test_lru_is_the_default() -> None:
    assert DEFAULT_POLICY == "lru"
    assert isinstance(make_policy(DEFAULT_POLICY), LRUPolicy)


# -- LFU --------------------------------------------------------------------------------------


def test_lfu_fewest_hits_first_and_ties_least_recent_first() -> None:
    lfu: LFUPolicy[str] = LFUPolicy()
    for k in "abcd":
        lfu.insert(k)
    lfu.access("c")
    lfu.access("a")
    lfu.access("d")
    lfu.access("d")
    assert [lfu.frequency(k) for k in "abcd"] == [2, 1, 2, 3]
    assert lfu.peek(4) == ["b", "c", "a", "d"]
    assert list(drain(lfu)) == ["b", "c", "a", "d"]


def test_lfu_insert_is_not_a_hit() -> None:
    lfu: LFUPolicy[str] = LFUPolicy()
    lfu.insert("a")
    lfu.insert("a")  # already a candidate: no-op
    assert lfu.frequency("a") == 1
    lfu.access("z")  # a hit on a key not yet inserted starts its history and counts
    assert lfu.frequency("z") == 2
    assert "z" not in lfu


def test_lfu_history_survives_remove_insert_and_evict() -> None:
    lfu: LFUPolicy[str] = LFUPolicy()
    lfu.insert("hot")
    lfu.insert("cold")
    for _ in range(3):
        lfu.access("hot")
    lfu.remove("hot")  # in use
    lfu.access("hot")  # hit while in use still counts
    assert lfu.evict() == "cold"
    assert lfu.evict() is None  # hot is not a candidate
    lfu.insert("hot")
    lfu.insert("new")
    assert lfu.frequency("hot") == 5
    assert lfu.evict() == "new"
    assert lfu.evict() == "hot"
    lfu.insert("hot")  # evicted but not forgotten: history kept
    assert lfu.frequency("hot") == 5
    lfu.forget("hot")
    assert lfu.frequency("hot") == 0 and "hot" not in lfu
    lfu.insert("hot")
    assert lfu.frequency("hot") == 1


def test_lfu_cap_lets_keys_that_reach_it_displace_a_cooled_hot_key() -> None:
    lfu: LFUPolicy[str] = LFUPolicy(max_freq=4, aging=False)
    lfu.insert("old")
    for _ in range(100):
        lfu.access("old")
    assert lfu.frequency("old") == 4
    lfu.insert("new")
    for _ in range(3):
        lfu.access("new")
    assert lfu.frequency("new") == 4  # ties the cooled key, and is more recent
    assert lfu.evict() == "old"


def test_lfu_aging_halves_every_frequency_after_a_period_of_touches() -> None:
    lfu: LFUPolicy[str] = LFUPolicy(max_freq=4)
    lfu.insert("a")  # touch 1
    lfu.access("a")  # 2
    lfu.access("a")  # 3: frequency 3
    lfu.access("x")  # 4 = max(max_freq, 2 keys tracked): x reaches 2, then all halve
    assert [lfu.frequency(k) for k in "ax"] == [1, 1]
    lfu.insert("b")  # touch 1 of the next period
    assert lfu.peek(2) == ["a", "b"]  # a tie now: a was touched longer ago
    lfu.remove("b")
    lfu.access("b")
    lfu.access("b")  # touches 2 and 3: no halving yet
    assert [lfu.frequency(k) for k in "abx"] == [1, 3, 1]
    lfu.access("b")  # touch 4: b reaches the cap 4, then everything halves
    assert [lfu.frequency(k) for k in "abx"] == [1, 2, 1]


def test_lfu_aging_retires_a_hot_key_that_cooled() -> None:
    """After a burst of hits the workload moves on to keys reused once each: with aging the old
    hot key eventually goes; without it, it would never leave."""

    def run(aging: bool) -> bool:
        lfu: LFUPolicy[int] = LFUPolicy(aging=aging)
        resident = {-1}
        lfu.insert(-1)
        for _ in range(60):
            lfu.access(-1)
        for k in range(2000):
            if len(resident) >= 8:
                victim = lfu.evict()
                assert victim is not None
                resident.remove(victim)
                lfu.forget(victim)  # a cache owner forgets what left
            resident.add(k)
            lfu.insert(k)
            lfu.access(k)
        return -1 in resident

    assert run(aging=False)
    assert not run(aging=True)


def test_lfu_rejects_a_cap_below_one() -> None:
    with pytest.raises(ValueError, match="max_freq"):
        LFUPolicy(0)


# -- S3-FIFO ----------------------------------------------------------------------------------


def serve(policy: EvictionPolicy[str], trace: list[str], capacity: int) -> set[str]:
    """Play a get-trace through a cache of ``capacity`` entries; return what is resident."""
    resident: set[str] = set()
    for key in trace:
        if key in resident:
            policy.access(key)
            continue
        if len(resident) >= capacity:
            victim = policy.evict()
            assert victim is not None
            resident.remove(victim)
        resident.add(key)
        policy.insert(key)
    return resident


def test_s3fifo_resists_a_scan_that_flushes_lru() -> None:
    hot = [f"hot{i}" for i in range(4)]
    trace = hot * 3 + [f"scan{i}" for i in range(100)]
    assert set(hot) <= serve(S3FIFOPolicy(), trace, capacity=10)
    assert not set(hot) & serve(LRUPolicy(), trace, capacity=10)


def test_s3fifo_new_keys_enter_small_and_ghost_hits_enter_main() -> None:
    s3: S3FIFOPolicy[str] = S3FIFOPolicy()
    for k in "abc":
        s3.insert(k)
    assert s3.queue_of("a") == "small"
    assert s3.evict() == "a"  # oldest of S, never hit
    assert s3.queue_of("a") == "ghost" and "a" not in s3
    s3.access("a")  # not resident: ignored
    s3.insert("a")
    assert s3.queue_of("a") == "main" and "a" in s3
    s3.insert("d")
    # S (b, c, d) is over 10%, so S is drained before a, the ghost hit in M, is touched.
    assert [s3.evict() for _ in range(3)] == ["b", "c", "d"]
    assert s3.evict() == "a"


def test_s3fifo_hit_keys_move_from_small_to_main() -> None:
    s3: S3FIFOPolicy[str] = S3FIFOPolicy()
    for k in "abc":
        s3.insert(k)
    s3.access("a")
    assert s3.evict() == "b"  # a was hit: moved to M instead
    assert s3.queue_of("a") == "main"


def test_s3fifo_small_share_boundary_and_frequency_cap() -> None:
    s3: S3FIFOPolicy[int] = S3FIFOPolicy()
    for k in range(10):
        s3.insert(k)
    for k in range(9):
        s3.access(k)
    # 0..8 move to M while S is over 10%; at S = [9], 1 of 10, S is not over: M's oldest goes.
    assert s3.evict() == 0
    assert s3.evict() == 9  # now S holds 1 of 9: over 10%
    for k in range(1, 9):
        for _ in range(4 if k == 1 else 3):
            s3.access(k)
    # Frequencies cap at 3, so after three passes over M (each lowering every key by one) key 1
    # is as spent as the others and, being M's oldest, goes; uncapped, it would outlive 2.
    assert s3.evict() == 1


def test_s3fifo_remove_keeps_the_queue_and_frequency() -> None:
    s3: S3FIFOPolicy[str] = S3FIFOPolicy()
    for k in "mst":
        s3.insert(k)
    assert s3.evict() == "m"
    s3.insert("m")  # ghost hit: in M
    s3.access("s")
    s3.remove("m")  # in use: neither evictable nor in the way
    s3.remove("s")
    assert s3.queue_of("m") == "main" and s3.queue_of("s") == "small"
    assert "m" not in s3 and len(s3) == 1
    assert s3.evict() == "t"
    assert s3.evict() is None
    s3.insert("m")
    s3.insert("s")
    assert s3.queue_of("m") == "main" and s3.queue_of("s") == "small"
    assert s3.evict() == "m"  # S holds 1 of 2 (over 10%) but s's hit moves it to M first
    assert s3.queue_of("s") == "main"


def test_s3fifo_forget_clears_the_ghost() -> None:
    s3: S3FIFOPolicy[str] = S3FIFOPolicy()
    s3.insert("a")
    s3.insert("b")
    assert s3.evict() == "a"
    s3.forget("a")
    assert s3.queue_of("a") is None
    s3.insert("a")
    assert s3.queue_of("a") == "small"


def test_s3fifo_ghost_holds_at_most_the_resident_count() -> None:
    s3: S3FIFOPolicy[int] = S3FIFOPolicy()
    for k in range(20):
        s3.insert(k)
    s3.remove(19)  # removed keys are resident too
    victims = [s3.evict() for _ in range(15)]
    assert victims == list(range(15))
    ghosts = [k for k in range(20) if s3.queue_of(k) == "ghost"]
    assert ghosts == victims[-5:]  # 4 candidates + 1 removed key resident
    s3.forget(18)
    assert [k for k in range(20) if s3.queue_of(k) == "ghost"] == victims[-4:]


def test_s3fifo_peek_is_exact_within_its_budget_and_complete_beyond_it() -> None:
    s3: S3FIFOPolicy[int] = S3FIFOPolicy()
    for k in range(100):
        s3.insert(k)
        s3.access(k)
    # Hit keys move from S to M until S is down to 10% (0..89 move), then M's oldest goes.
    assert s3.evict() == 0
    assert [s3.queue_of(k) for k in (1, 89, 90)] == ["main", "main", "small"]
    for k in range(1, 90):
        for _ in range(3):
            s3.access(k)
    # The next eviction requeues every key of M once before it finds a victim: more work than
    # peek(1) may do, so peek(1) is only a plausible guess, but a candidate.
    guess = s3.peek(1)
    assert len(guess) == 1 and guess[0] in s3
    # For n = len the budget covers every requeue: exact, and complete.
    everything = s3.peek(len(s3))
    assert sorted(everything) == sorted(s3)
    assert everything == list(drain(copy.deepcopy(s3)))


# -- the registry -----------------------------------------------------------------------------


def test_the_builtin_policies_are_registered() -> None:
    assert {"lru", "lfu", "s3fifo"} <= set(POLICIES)
    assert isinstance(make_policy("lfu"), LFUPolicy)
    assert isinstance(make_policy("s3fifo"), S3FIFOPolicy)


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="nope") as err:
        make_policy("nope")
    for name in POLICIES:
        assert name in str(err.value)


def test_registering_a_taken_name_raises_and_keeps_the_original() -> None:
    class Impostor(LRUPolicy[int]):
        name = "lru"

    with pytest.raises(ValueError, match="already registered"):
        register_policy(Impostor)
    assert POLICIES["lru"] is LRUPolicy
    assert register_policy(LRUPolicy) is LRUPolicy  # the same class again is fine


def test_a_new_policy_can_be_registered_and_made() -> None:
    class Newest(LRUPolicy[int]):
        name = "test_newest"

    try:
        register_policy(Newest)
        assert isinstance(make_policy("test_newest"), Newest)
    finally:
        POLICIES.pop("test_newest", None)


# -- ReuseFilter ------------------------------------------------------------------------------


def test_reuse_filter_admits_from_the_threshold_on() -> None:
    f = ReuseFilter(threshold=3, capacity=10)
    assert not f.admits("a") and f.count("a") == 0
    f.record(["a", "b"])
    f.record(["a"])
    assert f.count("a") == 2 and not f.admits("a")
    f.record(iter(["a", "a"]))  # any iterable; a key twice in one call is one sighting
    assert f.count("a") == 3 and f.admits("a")
    assert f.count("b") == 1 and not f.admits("b")


def test_reuse_filter_threshold_one_admits_everything() -> None:
    f = ReuseFilter(threshold=1, capacity=1)
    assert f.admits("never recorded")
    f.record(["a"])
    assert f.admits("a") and f.count("a") == 1


def test_reuse_filter_drops_the_least_recently_recorded() -> None:
    f = ReuseFilter(threshold=2, capacity=3)
    f.record(["a", "b", "c"])
    f.record(["a"])  # a is now the most recent
    assert f.admits("a") and not f.admits("b")  # lookups do not refresh b
    f.record(["d"])
    assert len(f) == 3
    assert f.count("b") == 0  # dropped: the least recently recorded
    assert [f.count(k) for k in "acd"] == [2, 1, 1]
    f.record(["b"])  # seen again: starts over
    assert f.count("b") == 1 and f.count("c") == 0


@given(calls=st.lists(st.lists(st.integers(0, 6), max_size=5), max_size=30),
       threshold=st.integers(1, 3), capacity=st.integers(1, 5))
@settings(max_examples=150, deadline=None)
def test_reuse_filter_matches_a_model(calls: list[list[int]], threshold: int, capacity: int) -> None:
    f = ReuseFilter(threshold, capacity)
    counts: dict[int, int] = {}  # insertion order = least recently recorded first
    for keys in calls:
        f.record(keys)
        for k in dict.fromkeys(keys):
            counts[k] = counts.pop(k, 0) + 1
            if len(counts) > capacity:
                del counts[next(iter(counts))]
        assert len(f) == len(counts) <= capacity
        for k in range(7):
            assert f.count(k) == counts.get(k, 0)
            assert f.admits(k) == (threshold == 1 or counts.get(k, 0) >= threshold)


@pytest.mark.parametrize(("args", "name"), [((0, 10), "threshold"), ((-1, 10), "threshold"),
                                            ((2, 0), "capacity"), ((2, -5), "capacity")])
def test_reuse_filter_validates_its_arguments(args: tuple[int, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ReuseFilter(*args)
