"""A hypothesis state machine over BlockPool + Scheduler + KV import/lease-out together, with
no model: each step "writes" the tokens it computed into the blocks they belong to, so the
machine can check what a real cache must guarantee after any sequence of admissions, chunks,
preemptions, finishes, aborts, imports, leases and resets:

- block accounting: every ref count equals the requests, leases and import plans holding it;
- request states match their queues and what they hold;
- a cached (findable) block holds exactly the tokens its hash names;
- every token a running request counts as computed is in its blocks (prefix hits, imports
  and chunking never hand a request the wrong KV).
"""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvbaton.engine.block_pool import BlockPool
from kvbaton.engine.kv_handoff import KVHandoff
from kvbaton.engine.leases import LeaseTable
from kvbaton.engine.request import Request, RequestStatus
from kvbaton.engine.scheduler import Scheduler
from kvbaton.engine.stop import check_stop
from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.sampling_params import SamplingParams

BS = 4
NUM_BLOCKS = 9
ROOT = root_hash("machine-model")
# Prompts that share prefixes of whole blocks (and one that shares a partial block).
BASE = list(range(100, 120))
PROMPTS = [BASE[:9], BASE[:13], BASE[:8] + [7, 7, 7], BASE[:3], [50 + i for i in range(17)], BASE[:16] + [1]]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def next_token(tokens: list[int]) -> int:
    """A deterministic stand-in for the model: the next token depends on the sequence."""
    return (sum(tokens) * 31 + len(tokens)) % 97


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS, BS)
        self.sched = Scheduler(self.pool, max_num_seqs=3, max_num_batched_tokens=10,
                               long_prefill_token_threshold=0)
        self.clock = Clock()
        self.leases = LeaseTable(5.0, clock=self.clock)
        self.handoff = KVHandoff(self.pool, self.sched, self.leases)
        self.written: dict[int, dict[int, int]] = {}  # block -> slot -> token whose KV is there
        self.ids = 0

    def _new(self, prompt: list[int], max_tokens: int, lease: bool = False) -> Request:
        self.ids += 1
        req = Request(f"r{self.ids}", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0),
                      ROOT, BS)
        if lease:
            req.lease_ttl_s = 5.0
        return req

    def _write(self, block_ids: list[int], tokens: list[int], start: int, end: int) -> None:
        for p in range(start, end):
            self.written.setdefault(block_ids[p // BS], {})[p % BS] = tokens[p]

    # ---- rules -------------------------------------------------------------------------

    @rule(prompt=st.sampled_from(PROMPTS), max_tokens=st.integers(1, 6), lease=st.booleans())
    def add(self, prompt: list[int], max_tokens: int, lease: bool) -> None:
        self.sched.add(self._new(prompt, 1 if lease else max_tokens, lease))

    @rule()
    def step(self) -> None:
        out = self.sched.schedule()
        for s in out.scheduled:
            req = s.request
            self._write(req.block_ids, req.token_ids, s.start, s.start + s.num_new_tokens)
            self.sched.commit_computed(s)
        for s in out.scheduled:
            if not s.samples:
                continue
            req = s.request
            req.token_ids.append(next_token(req.token_ids))
            end = check_stop(req.params, req.token_ids[-1], req.num_output_tokens, req.num_tokens, 10_000, ())
            if end is not None:
                hold = req.lease_ttl_s is not None
                kept = self.sched.finish(req, end.reason, end.stop_reason, keep_blocks=hold)
                if hold:
                    self.handoff.lease_out(req, kept, 5.0)

    @precondition(lambda self: bool(self.sched.requests))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        assert self.sched.abort(rid) is not None

    @rule(prompt=st.sampled_from(PROMPTS), commit=st.booleans(), max_tokens=st.integers(2, 5))
    def import_kv(self, prompt: list[int], commit: bool, max_tokens: int) -> None:
        """A decode-side import: reserve, 'fetch' the missing blocks, then commit or cancel."""
        self.ids += 1
        rid = f"i{self.ids}"
        plan = self.handoff.reserve(rid, list(prompt), ROOT, None, tuple(hash_block_chain(ROOT, prompt, BS)))
        if plan is None:
            return  # no room now: nothing may be held
        local = plan.num_local_blocks * BS
        self._write(plan.block_ids, prompt, local, len(prompt))  # the transfer writes the rest
        if not commit:
            assert self.handoff.cancel(rid)
            return
        req = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0), ROOT, BS)
        req.token_ids.append(next_token(req.token_ids))  # the prefill worker's first token
        self.handoff.commit(rid, req)
        assert req.status is RequestStatus.WAITING_WITH_KV

    @precondition(lambda self: len(self.leases) > 0)
    @rule(data=st.data())
    def release_lease(self, data: st.DataObject) -> None:
        lease_id = data.draw(st.sampled_from(sorted(self.leases.ids())))
        self.leases.release(lease_id)
        self.handoff.collect_leases()

    @rule(dt=st.sampled_from([1.0, 6.0]))
    def time_passes(self, dt: float) -> None:
        self.clock.now += dt
        self.handoff.collect_leases()

    @rule()
    def reset_prefix_cache(self) -> None:
        if self.pool.reset_prefix_cache():
            assert self.pool.num_cached_blocks == 0

    # ---- invariants --------------------------------------------------------------------

    @invariant()
    def accounting(self) -> None:
        refs = self.sched.block_refs()
        for b, n in self.handoff.block_refs().items():
            refs[b] = refs.get(b, 0) + n
        self.pool.check_integrity(refs)
        self.sched.check_states()
        assert self.pool.num_used_blocks <= NUM_BLOCKS

    @invariant()
    def cached_blocks_hold_their_tokens(self) -> None:
        for h in self.pool.cached_hashes():
            bid = self.pool.lookup(h)
            assert bid is not None
            blk = self.pool.blocks[bid]
            assert blk.token_ids is not None
            assert [self.written.get(bid, {}).get(i) for i in range(BS)] == list(blk.token_ids)

    @invariant()
    def computed_tokens_are_in_their_blocks(self) -> None:
        for req in self.sched.requests.values():
            if req.status is RequestStatus.WAITING:
                assert req.num_computed_tokens == 0 and not req.block_ids
                continue
            for p in range(req.num_computed_tokens):
                assert self.written.get(req.block_ids[p // BS], {}).get(p % BS) == req.token_ids[p], (
                    f"{req.request_id} token {p}")


EngineMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestEngineMachine = EngineMachine.TestCase
