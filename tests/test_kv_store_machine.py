"""A hypothesis state machine over the device pool + scheduler + the tiered KV store (host and
disk), with no model and with the store's IO stepped by hand, so every interleaving of
admissions, steps, offloads, loads, aborts, timeouts, pins, TTLs and restarts can happen.

A computed block's KV is a byte pattern derived from its hash, written into its device row
when the step that completes it ends (as the forward pass would). The machine checks:

- block accounting (requests, loads that outlived their request) and request states;
- every tier's directory invariants (slots, candidates, capacity never exceeded);
- every cached device block, every ready host block and every ready disk block holds the
  bytes of the hash that names it (no copy ever lands in the wrong place);
- every block a live request counts as computed holds its own block's bytes.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from typing import Any

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbaton.engine.block_pool import BlockPool
from kvbaton.engine.offload import KVOffload
from kvbaton.engine.request import Request, RequestStatus
from kvbaton.engine.scheduler import Scheduler
from kvbaton.engine.stop import check_stop
from kvbaton.kv.hashing import BlockHash, root_hash
from kvbaton.kv.store.disk import DiskTier
from kvbaton.kv.store.host import HostTier
from kvbaton.kv.store.io import Job, JobCancelled
from kvbaton.kv.store.policies import make_policy
from kvbaton.sampling_params import SamplingParams

BS = 4
BLOCK_BYTES = 64
NUM_BLOCKS = 6
ROOT = root_hash("store-machine")
BASE = list(range(100, 130))
# Prefixes shared whole (BASE), in part (the 7s), and not at all: many more distinct blocks than the
# device (6) or the host tier (6) holds, so blocks travel down and come back.
PROMPTS = [BASE[:9], BASE[:13], BASE[:17], BASE[:8] + [7] * 5, [60 + i for i in range(14)], BASE[:5],
           [200 + i for i in range(13)], [300 + i for i in range(17)]]


def pattern(h: BlockHash) -> torch.Tensor:
    return torch.frombuffer(bytearray(hashlib.sha256(h).digest() * (BLOCK_BYTES // 32)), dtype=torch.uint8)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ManualIO:
    """TierIO's interface, with jobs run only when the machine says so."""

    def __init__(self) -> None:
        self.queue: deque[Job] = deque()
        self.urgent: deque[Job] = deque()
        self.done: list[Job] = []

    def submit(self, kind: str, fn: Callable[[], Any], tag: Any = None, urgent: bool = False) -> Job:
        job = Job(kind, fn, tag)
        (self.urgent if urgent else self.queue).append(job)
        return job

    def run_one(self) -> bool:
        q = self.urgent or self.queue
        if not q:
            return False
        job = q.popleft()
        try:
            job.result = job.fn()
        except Exception as e:  # noqa: BLE001 - handed to the engine, as TierIO does
            job.error = e
        self.done.append(job)
        job._done.set()
        return True

    def cancel(self, job: Job) -> bool:
        for q in (self.urgent, self.queue):
            if job in q:
                q.remove(job)
                job.error = JobCancelled("cancelled")
                self.done.append(job)
                job._done.set()
                return True
        return False

    def completed(self) -> list[Job]:
        out, self.done = self.done, []
        return out

    def wait_completed(self, timeout_s: float) -> bool:
        return bool(self.done)

    def drain(self, timeout_s: float | None = None) -> bool:
        while self.run_one():
            pass
        return True

    @property
    def pending(self) -> int:
        return len(self.queue) + len(self.urgent)

    def close(self, timeout_s: float = 10.0) -> None:
        self.drain()


def next_token(tokens: list[int]) -> int:
    return (sum(tokens) * 31 + len(tokens)) % 97


class StoreMachine(RuleBasedStateMachine):
    policy = "lru"
    mode = "write-back"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvb-machine-")
        self.clock = Clock()
        self.ids = 0
        self._build()

    def _build(self) -> None:
        self.kv = torch.zeros((NUM_BLOCKS, BLOCK_BYTES), dtype=torch.uint8)
        self.pool = BlockPool(NUM_BLOCKS, BS, eviction_policy=self.policy)
        self.sched = Scheduler(self.pool, max_num_seqs=2, max_num_batched_tokens=12)
        self.io = ManualIO()
        host = HostTier(6, BLOCK_BYTES, BS, make_policy(self.policy), ttl_s=50.0, clock=self.clock)
        disk = DiskTier(self.dir, 12, BLOCK_BYTES, BS, "layout", "fp", make_policy(self.policy), clock=self.clock)
        self.off = KVOffload(self.pool, self.sched, self.kv, [host, disk], self.mode, load_timeout_s=5.0,
                             readahead_blocks=4, clock=self.clock, io=self.io)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.off.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- rules -------------------------------------------------------------------------

    @rule(prompt=st.sampled_from(PROMPTS), max_tokens=st.integers(1, 4))
    def add(self, prompt: list[int], max_tokens: int) -> None:
        self.ids += 1
        req = Request(f"r{self.ids}", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0), ROOT, BS)
        self.sched.add(req)

    @rule()
    def step(self) -> None:
        self.off.step_begin()
        out = self.sched.schedule()
        for s in out.scheduled:
            req = s.request
            hashes = req.full_block_hashes()
            # The forward pass writes the blocks this step completes, before they are committed.
            for b in range(s.start // BS, (s.start + s.num_new_tokens) // BS):
                self.kv[req.block_ids[b]] = pattern(hashes[b])
            self.sched.commit_computed(s)
        for s in out.scheduled:
            if not s.samples:
                continue
            req = s.request
            req.token_ids.append(next_token(req.token_ids))
            end = check_stop(req.params, req.token_ids[-1], req.num_output_tokens, req.num_tokens, 10_000, ())
            if end is not None:
                self.sched.finish(req, end.reason, end.stop_reason)
        self.off.step_end()

    @rule(steps=st.integers(2, 12), io_every=st.integers(1, 3))
    def serve_a_while(self, steps: int, io_every: int) -> None:
        """Several steps with the IO thread keeping up now and then (long runs are where
        blocks travel down and come back)."""
        for i in range(steps):
            self.step()
            if i % io_every == 0:
                self.io_runs(2)

    @rule(n=st.integers(1, 4))
    def io_runs(self, n: int) -> None:
        for _ in range(n):
            self.io.run_one()

    @precondition(lambda self: bool(self.sched.requests))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        assert self.sched.abort(rid) is not None

    @rule(dt=st.sampled_from([1.0, 6.0, 60.0]))
    def time_passes(self, dt: float) -> None:
        self.clock.now += dt

    @rule(prompt=st.sampled_from(PROMPTS), ttl=st.sampled_from([3.0, 100.0]))
    def pin(self, prompt: list[int], ttl: float) -> None:
        req = Request("pin", list(prompt), SamplingParams(max_tokens=1), ROOT, BS)
        self.off.pin(req.full_block_hashes(), prompt, ttl)

    @rule(prompt=st.sampled_from(PROMPTS))
    def unpin(self, prompt: list[int]) -> None:
        req = Request("pin", list(prompt), SamplingParams(max_tokens=1), ROOT, BS)
        self.off.unpin(req.full_block_hashes())

    @rule()
    def restart(self) -> None:
        """The worker dies (nothing in flight survives) and comes back on the same disk."""
        self.off.close()
        self._build()

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def accounting(self) -> None:
        refs = self.sched.block_refs()
        for b, n in self.off.block_refs().items():
            refs[b] = refs.get(b, 0) + n
        self.pool.check_integrity(refs)
        self.sched.check_states()
        self.off.check()

    @invariant()
    def every_copy_holds_its_own_bytes(self) -> None:
        for h in self.pool.cached_hashes():
            bid = self.pool.lookup(h)
            assert bid is not None and torch.equal(self.kv[bid], pattern(h)), "device block"
        host, disk = self.off.tiers
        assert isinstance(host, HostTier)
        for h, _ in host.dir.ready_entries():
            assert torch.equal(host.rows[host.dir.slot_of(h)], pattern(h)), "host block"
        ready = [h for h, _ in disk.dir.ready_entries()]
        if ready:
            rows = torch.zeros((len(ready), BLOCK_BYTES), dtype=torch.uint8)
            plan = disk.dir.prepare_load(ready)
            bad = disk.read(plan, rows, range(len(ready)))
            disk.dir.complete_load(plan, ok=False)
            assert bad == []
            for i, h in enumerate(ready):
                assert torch.equal(rows[i], pattern(h)), "disk block"

    @invariant()
    def computed_blocks_are_the_requests_own(self) -> None:
        for req in self.sched.requests.values():
            if req.status is RequestStatus.WAITING_FOR_KV:
                continue  # being filled
            hashes = req.full_block_hashes()
            for b in range(req.num_computed_tokens // BS):
                assert torch.equal(self.kv[req.block_ids[b]], pattern(hashes[b])), f"{req.request_id} block {b}"


SETTINGS = settings(max_examples=15, stateful_step_count=30, deadline=None)


class LRUWriteBack(StoreMachine):
    policy, mode = "lru", "write-back"


class S3FIFOWriteThrough(StoreMachine):
    policy, mode = "s3fifo", "write-through"


class LFUWriteBack(StoreMachine):
    policy, mode = "lfu", "write-back"


LRUWriteBack.TestCase.settings = SETTINGS
S3FIFOWriteThrough.TestCase.settings = SETTINGS
LFUWriteBack.TestCase.settings = SETTINGS
TestLRUWriteBack = LRUWriteBack.TestCase
TestS3FIFOWriteThrough = S3FIFOWriteThrough.TestCase
TestLFUWriteBack = LFUWriteBack.TestCase


def test_the_machines_rules_reach_tier_loads() -> None:
    """The machine is not vacuous: its own rules send blocks down to the tiers and back
    (host hits, then disk hits after a restart) while every invariant holds."""
    mach = LRUWriteBack()

    def check() -> None:
        mach.accounting()
        mach.every_copy_holds_its_own_bytes()
        mach.computed_blocks_are_the_requests_own()

    try:
        mach.add(PROMPTS[6], 2)
        mach.serve_a_while(12, 1)  # readahead copies its evictable blocks to the host tier
        mach.io_runs(4)
        assert mach.pool.reset_prefix_cache()  # the device forgets them; the host still has them
        mach.add(PROMPTS[6], 2)
        mach.serve_a_while(12, 1)
        check()
        assert mach.off.tier_stats()["host"]["hit_tokens"] > 0
        mach.serve_a_while(4, 1)  # the host's copies reach the disk
        mach.restart()
        mach.add(PROMPTS[6], 2)
        mach.serve_a_while(12, 1)
        check()
        assert mach.off.tier_stats()["disk"]["hit_tokens"] > 0
    finally:
        mach.teardown()
