"""Scheduler: continuous batching with a token budget, chunked prefill and preemption.

Every step it first gives running requests their next tokens (one per decode, a chunk per
unfinished prefill), oldest first, so decodes are never starved by new prompts; then it admits
waiting requests while the token budget, ``max_num_seqs`` and free blocks allow. With
``long_prefill_token_threshold`` no request computes more than that many tokens in one step
(vLLM's knob of that name), so a long prompt leaves budget for the short prompts behind it. When a running
request needs a block and none is free, the newest running request is preempted: its blocks
are freed (their cached hashes survive until evicted) and it is recomputed later.

In-flight prefix sharing (``share_inflight_prefill``): a block becomes findable in the prefix
cache only once its KV is written, so siblings that share a prefix and arrive together would
each compute it. A waiting request whose next uncached block is being prefilled by a running
request (or one admitted earlier in the same step) waits instead, while later requests
are admitted past it. Its turn comes when the shared blocks are written: it then finds them
cached and computes only the rest, like SGLang's radix cache. Without a long-prefill cap the
wait is one step: waiting requests are only considered when budget is left after the running
ones, so every prefill they could be waiting for is scheduled to the end of its prompt in the
same step. With the cap it lasts until the capped prefill has written the shared blocks, as
long as computing them alongside would have taken.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Protocol

from kvbaton.engine.block_pool import BlockPool
from kvbaton.engine.request import Request, RequestStatus
from kvbaton.kv.hashing import BlockHash


class PrefixLoader(Protocol):
    """Loads a waiting request's prefix from somewhere below the device (the tiered KV store,
    :class:`kvbaton.engine.offload.KVOffload`) while the scheduler goes on without it.

    ``begin_load`` either starts loading the blocks that follow ``hit`` (the device's cached
    prefix) into blocks it allocates for ``req``, sets ``req`` to ``WAITING_FOR_KV`` and
    returns True, or changes nothing and returns False. When the load ends the loader calls
    :meth:`Scheduler.kv_arrived`. A request aborted while loading is handed back with
    ``abandon``: the loader keeps its blocks until the load has stopped writing them.
    """

    def begin_load(self, req: Request, hashes: list[BlockHash], hit: list[int]) -> bool: ...

    def abandon(self, req: Request) -> None: ...

    def loading_hashes(self) -> Set[BlockHash]: ...


@dataclass(slots=True)  # one per request per step: slots make them cheaper to build
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def start(self) -> int:
        """Position of the first token computed this step."""
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step completes the known tokens, so a new token is sampled."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Decides which requests run each step and owns their block allocation."""

    def __init__(
        self,
        pool: BlockPool,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        share_inflight_prefill: bool = True,
        long_prefill_token_threshold: int = 0,
    ) -> None:
        self.pool = pool
        # Most tokens one request computes in a step (0: no cap beyond the budget).
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.block_size = pool.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.share_inflight_prefill = share_inflight_prefill
        self.num_inflight_waits = 0  # admissions put off to share a prefix being prefilled
        self.loader: PrefixLoader | None = None  # the tiered KV store, when there is one
        self.num_kv_releases = 0  # waiting requests that gave up held KV for the queue's head

    # ---- lifecycle -------------------------------------------------------------------------

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish(
        self,
        req: Request,
        reason: str,
        stop_reason: str | int | None = None,
        keep_blocks: bool = False,
    ) -> list[int]:
        """Mark ``req`` finished and free everything it holds; with ``keep_blocks`` its block
        references are returned to the caller instead (a lease takes them over)."""
        if req.finished:
            return []
        loading = req.status is RequestStatus.WAITING_FOR_KV
        req.status = RequestStatus.FINISHED
        req.finish_reason, req.stop_reason = reason, stop_reason
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        kept: list[int] = []
        if loading:
            # A load may still be writing these blocks: the loader frees them once it stops.
            assert self.loader is not None
            self.loader.abandon(req)
            req.block_ids, req.num_committed_blocks = [], 0
        elif keep_blocks:
            kept, req.block_ids, req.num_committed_blocks = req.block_ids, [], 0
        else:
            self._free_blocks(req)
        self.requests.pop(req.request_id, None)
        return kept

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, "abort")
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
            while not self._ensure_blocks(req, req.num_computed_tokens + n):
                if self._release_waiting_kv(keep=None):
                    continue  # a waiting request's blocks were cheaper to give up
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                break
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
            i += 1
        if out.preempted:
            return out  # memory is short: admit nothing new this step
        self._admit_waiting(out, budget)
        return out

    def admit_more(self, out: SchedulerOutput) -> None:
        """Admit waiting requests into ``out`` with the budget it leaves (after prefix loads
        that landed since ``schedule`` returned: the engine's load grace)."""
        if not out.preempted:
            self._admit_waiting(out, self.max_num_batched_tokens - out.num_tokens)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        if not self.waiting:  # most steps: nothing to admit (this runs every step)
            return
        share = self.share_inflight_prefill and self.waiting and budget > 0
        inflight = self._inflight_blocks() if share else None
        passed: list[Request] = []  # waiting for an in-flight prefix; keep their order
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if req.status is RequestStatus.WAITING_FOR_KV:  # its prefix is still loading
                passed.append(self.waiting.popleft())
                continue
            if req.status is RequestStatus.WAITING_WITH_KV:  # nothing to look up or share
                admitted = self._admit_with_kv(req, budget, out)
                while not admitted and self._release_waiting_kv(keep=req):
                    admitted = self._admit_with_kv(req, budget, out)
            else:
                hashes, hit = self._cached_prefix(req)
                # One that must compute its prompt (prompt_logprobs) reads no cache: waiting for a
                # sibling's blocks or loading them from a tier would gain it nothing.
                reads_cache = not req.needs_prompt_logits
                if (reads_cache and inflight is not None
                        and self._waits_for_inflight(hashes, len(hit), req, inflight)):
                    passed.append(self.waiting.popleft())
                    continue
                if (reads_cache and self.loader is not None and not req.skip_tiers
                        and self.loader.begin_load(req, hashes, hit)):
                    passed.append(self.waiting.popleft())
                    if inflight is not None:  # siblings wait for this load instead of repeating it
                        inflight.update(self.loader.loading_hashes())
                    continue
                admitted = self._admit(req, hit, budget, out)
                # The head of the queue must not starve behind requests that hold KV they
                # loaded or imported: take their blocks back (newest first) until it fits.
                while not admitted and self._release_waiting_kv(keep=req):
                    admitted = self._admit(req, self._cached_prefix(req)[1], budget, out)
            if not admitted:
                break
            budget -= out.scheduled[-1].num_new_tokens
            if inflight is not None:
                self._add_inflight(req, inflight)
        self.waiting.extendleft(reversed(passed))

    # ---- in-flight prefix sharing ----------------------------------------------------------

    def _inflight_blocks(self) -> set[BlockHash]:
        """Hashes of prompt blocks that running requests are still to write (or that are
        being loaded from the tiered store)."""
        inflight: set[BlockHash] = set(self.loader.loading_hashes()) if self.loader is not None else set()
        for req in self.running:
            self._add_inflight(req, inflight)
        return inflight

    def _add_inflight(self, req: Request, inflight: set[BlockHash]) -> None:
        full = req.num_prompt_tokens // self.block_size
        if req.num_committed_blocks < full:
            inflight.update(req.full_block_hashes()[req.num_committed_blocks:full])

    def _waits_for_inflight(self, hashes: list[BlockHash], num_hit: int, req: Request,
                            inflight: set[BlockHash]) -> bool:
        """Whether ``req``'s next block past its ``num_hit`` cached ones is being prefilled."""
        if num_hit < (req.num_tokens - 1) // self.block_size and hashes[num_hit] in inflight:
            self.num_inflight_waits += 1
            return True
        return False

    def _cached_prefix(self, req: Request) -> tuple[list[BlockHash], list[int]]:
        """``req``'s block hashes and the blocks of its longest cached prefix, leaving at least
        one token to compute for the logits. No prefix for a request that still needs its
        prompt's logits (``prompt_logprobs``, as in vLLM): cached tokens come with none. It
        still registers the blocks it computes, for later requests to read."""
        hashes = req.full_block_hashes()
        if req.needs_prompt_logits:
            return hashes, []
        max_blocks = (req.num_tokens - 1) // self.block_size
        return hashes, self.pool.find_cached_prefix(hashes[:max_blocks], req.token_ids)

    def _admit(self, req: Request, hit: list[int], budget: int, out: SchedulerOutput) -> bool:
        """Admit ``req`` (no blocks yet) on its cached prefix ``hit`` if budget and blocks allow."""
        num_cached = len(hit) * self.block_size
        remaining = req.num_tokens - num_cached
        n = self._chunk(remaining, budget)
        if n < remaining and not self.enable_chunked_prefill:
            return False
        blocks = self.pool.acquire(hit, self._blocks_for(num_cached + n) - len(hit))
        if blocks is None:
            return False
        self.waiting.popleft()
        req.block_ids = blocks
        req.num_committed_blocks = len(hit)
        req.num_computed_tokens = num_cached
        self._count_hit(req, num_cached)
        self._run(req, n, out)
        return True

    def _release_waiting_kv(self, keep: Request | None) -> bool:
        """Free the blocks of the newest waiting request that holds KV it has not used yet
        (``WAITING_WITH_KV``; not ``keep``), sending it back to a plain wait. Its full blocks
        are registered, so they stay findable until evicted and it usually finds them again;
        only a partial tail is recomputed. False when no such request is left."""
        for req in reversed(self.waiting):
            if req is not keep and req.status is RequestStatus.WAITING_WITH_KV:
                self._free_blocks(req)
                req.num_computed_tokens = 0
                req.status = RequestStatus.WAITING
                self.num_kv_releases += 1
                return True
        return False

    def _admit_with_kv(self, req: Request, budget: int, out: SchedulerOutput) -> bool:
        """Admit a request that arrived holding blocks with its first tokens' KV already in
        them (imported from a prefill worker): only its remaining tokens are computed."""
        n = self._chunk(req.num_tokens - req.num_computed_tokens, budget)
        if not self._ensure_blocks(req, req.num_computed_tokens + n):
            return False
        self.waiting.popleft()
        self._run(req, n, out)
        return True

    def _run(self, req: Request, n: int, out: SchedulerOutput) -> None:
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        out.scheduled.append(ScheduledRequest(req, n))

    def _count_hit(self, req: Request, num_cached: int) -> None:
        """The hit-rate counters, once per request (a preempted request readmitted on its own
        blocks is not a new lookup)."""
        if req.num_cached_tokens < 0:
            req.num_cached_tokens = num_cached
            self.pool.count_lookup(req.num_tokens, num_cached)

    def kv_arrived(self, req: Request, block_ids: list[int], num_cached_tokens: int) -> None:
        """A prefix load for the waiting ``req`` ended: it holds ``block_ids`` (device hit plus
        what loaded, all registered), so its first ``len(block_ids)`` blocks are computed and
        count as cached. With no blocks (the load failed) it goes back to a plain wait."""
        req.block_ids = list(block_ids)
        req.num_computed_tokens = len(block_ids) * self.block_size
        req.num_committed_blocks = len(block_ids)
        if block_ids:
            self._count_hit(req, num_cached_tokens)
            req.status = RequestStatus.WAITING_WITH_KV
        else:
            req.status = RequestStatus.WAITING

    def add_with_kv(self, req: Request, block_ids: list[int], num_computed_tokens: int,
                    num_cached_tokens: int) -> None:
        """Queue ``req`` holding ``block_ids``, whose first ``num_computed_tokens`` tokens'
        KV is in place (full blocks among them already registered by the caller);
        ``num_cached_tokens`` of them were found in this worker's own cache (the rest came
        from elsewhere), for the hit counters and the client's ``cached_tokens``."""
        req.block_ids = list(block_ids)
        req.num_computed_tokens = num_computed_tokens
        req.num_committed_blocks = num_computed_tokens // self.block_size
        self._count_hit(req, num_cached_tokens)
        self.add(req)
        req.status = RequestStatus.WAITING_WITH_KV

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens a request computes this step: what it has left, within the step's budget
        and the long-prefill cap (which leaves budget for the requests behind a long prompt)."""
        n = min(remaining, budget)
        cap = self.long_prefill_token_threshold
        return min(n, cap) if cap > 0 else n

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _ensure_blocks(self, req: Request, num_tokens: int) -> bool:
        need = self._blocks_for(num_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free_blocks:
            return False
        req.block_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: Request) -> None:
        self._free_blocks(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _free_blocks(self, req: Request) -> None:
        self.pool.free(list(reversed(req.block_ids)))
        req.block_ids = []
        req.num_committed_blocks = 0

    # ---- after a step ----------------------------------------------------------------------

    def commit_computed(self, sched: ScheduledRequest) -> None:
        """Advance progress after the step ran and register newly full blocks by hash."""
        req = sched.request
        req.num_computed_tokens += sched.num_new_tokens
        full = req.num_computed_tokens // self.block_size
        done = req.num_committed_blocks
        if full > done:
            hashes = req.full_block_hashes()
            bs = self.block_size
            self.pool.cache_blocks(req.block_ids[done:full], hashes[done:full],
                                   req.token_ids[done * bs : full * bs], hashes[done - 1] if done else None)
            req.num_committed_blocks = full

    def block_refs(self) -> dict[int, int]:
        """Block -> number of live requests holding it (for integrity checks)."""
        refs: dict[int, int] = {}
        for req in self.requests.values():
            for b in req.block_ids:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def check_states(self) -> None:
        """Assert that each live request's status matches where it is and what it holds."""
        problems = []
        for req in self.requests.values():
            queue = "running" if req in self.running else "waiting" if req in self.waiting else None
            ok = {
                RequestStatus.WAITING: queue == "waiting" and not req.block_ids,
                RequestStatus.WAITING_WITH_KV: queue == "waiting" and bool(req.block_ids),
                RequestStatus.WAITING_FOR_KV: queue == "waiting" and bool(req.block_ids),
                RequestStatus.RUNNING: queue == "running",
            }.get(req.status, False)
            if not ok:
                problems.append(f"{req.request_id}: {req.status.value} in {queue} with "
                                f"{len(req.block_ids)} blocks")
        if len(self.running) + len(self.waiting) != len(self.requests):
            problems.append("a queued request is not in the request table")
        if problems:
            raise AssertionError("scheduler states: " + "; ".join(problems[:10]))
