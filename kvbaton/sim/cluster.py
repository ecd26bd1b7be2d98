"""A simulated cluster: the real engine bookkeeping and the real router on a virtual clock.

Each simulated worker is a real :class:`~kvbaton.engine.block_pool.BlockPool` and
:class:`~kvbaton.engine.scheduler.Scheduler` (plus the real :class:`~kvbaton.engine.kv_handoff.KVHandoff`
and lease table for disaggregated requests); only the model runner is replaced, by a
:class:`~kvbaton.sim.cost.CostModel` that says how long the step the scheduler made takes.
Stop decisions use the engine's own :func:`~kvbaton.engine.stop.check_stop`. The router side is
the real placement function (:func:`~kvbaton.router.placement.place`), the real policies by
name, the real :class:`~kvbaton.router.kv_feed.KVIndexFeed` fed by every pool's KV events, and
the router's own per-worker load accounting (:class:`~kvbaton.router.pool.Worker`,
:class:`~kvbaton.router.pool.InFlight`). So a change to any of them shows up in both the served
and the simulated result, with no forked copy.

What is modelled beyond the step times: a KV transfer from a prefill worker to a decode worker
takes ``bytes / link bandwidth + latency`` (only the blocks the decode worker lacks move); a
fixed ``request_overhead_s`` before a request reaches its worker (HTTP, tokenizing, routing)
and ``step_overhead_s`` between steps (the worker loop); with ``host_contention``, all workers
share one host and a step is slower by how many others are busy when it starts. Generated tokens are placeholders:
requests run to their ``max_tokens`` (the bench sends ``ignore_eos``), and the next turn of a
multi-turn session carries the previous prompt and answer tokens, so prefix reuse has the real
structure. What is not: tiers below the device, network contention between transfers, and
failures.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import cast

from kvbaton.engine.block_pool import BlockPool
from kvbaton.engine.kv_handoff import KVHandoff, LeaseInfo
from kvbaton.engine.leases import LeaseTable
from kvbaton.engine.request import Request
from kvbaton.engine.scheduler import Scheduler, SchedulerOutput
from kvbaton.engine.stop import check_stop
from kvbaton.kv.events import KVEvent
from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.limits import check_request_fits
from kvbaton.router.config import DEFAULT_DISAGG_MIN_TOKENS, DEFAULT_KV_MEDIUM_CREDIT, DEFAULT_POLICY, RouterConfig
from kvbaton.router.kv_feed import KVIndexFeed
from kvbaton.router.placement import place
from kvbaton.router.policies import PlacementPolicy, PolicyOptions, RoutingRequest, make_policy
from kvbaton.router.pool import Worker, charge
from kvbaton.sampling_params import SamplingParams
from kvbaton.sim.cost import CostModel, HostContention, StepShape

SIM_FINGERPRINT = "kvbaton-sim"
LEASE_TTL_S = 30.0
PLACEHOLDER_VOCAB = 32000


@dataclass(frozen=True)
class SimEngine:
    """One simulated worker's engine settings (the ``EngineConfig`` fields the scheduler uses)."""

    num_kv_blocks: int = 4096
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    share_inflight_prefill: bool = True
    max_model_len: int = 8192

    def __post_init__(self) -> None:
        for name in ("num_kv_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True)
class SimConfig:
    """A simulated cluster: topology, engine, router and link."""

    prefill: int = 0
    decode: int = 0
    colocated: int = 1
    engine: SimEngine = SimEngine()
    decode_policy: str = DEFAULT_POLICY
    prefill_policy: str = DEFAULT_POLICY
    policy_options: PolicyOptions = PolicyOptions()
    disagg_min_tokens: int = DEFAULT_DISAGG_MIN_TOKENS
    medium_credit: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_KV_MEDIUM_CREDIT))
    link_bytes_s: float = 10e9  # one loopback TCP transfer plane on the CPU machine is ~1-3 GB/s
    link_latency_s: float = 0.0005
    kv_bytes_per_token: int | None = None  # None: the cost model's
    request_overhead_s: float = 0.0
    step_overhead_s: float = 0.0
    # The router's wait for a decode leg's first token, and how many other decode workers it
    # then tries (RouterConfig.request_timeout_s, max_retries).
    request_timeout_s: float = RouterConfig.request_timeout_s
    max_retries: int = RouterConfig.max_retries
    # All workers on one host that slows a step by how many others are busy (None: each
    # worker has its own machine, as GPUs do).
    host_contention: HostContention | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.colocated) < 0:
            raise ValueError("worker counts must be >= 0")
        if self.decode + self.colocated < 1:
            raise ValueError("a cluster needs at least one decode or colocated worker")
        if not self.link_bytes_s > 0 or self.link_latency_s < 0:
            raise ValueError("the link needs a bandwidth > 0 and a latency >= 0")
        if self.request_overhead_s < 0 or self.step_overhead_s < 0:
            raise ValueError("overheads must be >= 0")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout: must be > 0 seconds, got {self.request_timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"--max-retries: must be >= 0, got {self.max_retries}")

    @property
    def num_workers(self) -> int:
        return self.prefill + self.decode + self.colocated


@dataclass
class SimRequest:
    """One request offered to the cluster: its prompt tokens, output length, arrival."""

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    arrival_s: float
    cache_salt: str | None = None
    tags: tuple[str, ...] = ()
    # Filled by the simulation:
    first_token_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish_s: float | None = None
    cached_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    decode_worker: str | None = None
    prefill_worker: str | None = None
    error: str | None = None
    # Seeds the placeholder tokens (token_for): fixed by the id, so a rerun samples the same.
    token_seed: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.token_seed = zlib.crc32(self.request_id.encode())

    @property
    def done(self) -> bool:
        return self.finish_s is not None or self.error is not None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SimWorker:
    """One simulated worker: the real pool, scheduler and handoff, stepped by the cost model."""

    def __init__(self, url: str, role: str, engine: SimEngine, cost: CostModel, sim: SimCluster) -> None:
        self.url = url
        self.role = role
        self.sim = sim
        self.cost = cost
        self.engine = engine
        self.view = Worker(url=url, declared_role=role, role=role, worker_id=url, model_name="sim",
                           model_fingerprint=SIM_FINGERPRINT, block_size=engine.block_size,
                           transfer_address=("sim", 0), max_model_len=engine.max_model_len,
                           discovered=True, healthy=True)
        self._events: list[KVEvent] = []
        self._seq = 0
        self.pool = BlockPool(engine.num_kv_blocks, engine.block_size, engine.enable_prefix_caching,
                              event_sink=self._events.append)
        self.scheduler = Scheduler(self.pool, engine.max_num_seqs, engine.max_num_batched_tokens,
                                   engine.enable_chunked_prefill, engine.share_inflight_prefill,
                                   engine.long_prefill_token_threshold)
        self.leases = LeaseTable(LEASE_TTL_S, clock=sim.clock)
        self.handoff = KVHandoff(self.pool, self.scheduler, self.leases)
        self.busy = False
        self.steps = 0
        self.busy_s = 0.0
        self._reqs: dict[str, tuple[SimRequest, Callable[[SimRequest, Request], None] | None]] = {}
        self._aborts: set[str] = set()  # asked for during the running step
        self.flush_events(force=True)  # the pool's stream starts empty: seq 0 for the index

    def flush_events(self, force: bool = False) -> None:
        """Hand the pool's events since the last flush to the router's index, as one batch of
        the worker's stream (most steps publish none: nothing to hand)."""
        if not self._events and not force:
            return
        # The pool's sink appends to this very list: hand over a copy and empty it (swapping in
        # a new list would leave the sink filling the old one, unseen, forever).
        events = list(self._events)
        self._events.clear()
        self.sim.feed.index.apply(self.url, self._seq, events)
        self._seq += 1

    def add(self, sreq: SimRequest, req: Request, on_finish: Callable[[SimRequest, Request], None] | None = None,
            with_kv: bool = False) -> None:
        """Queue ``req`` (``with_kv``: already queued by an import's commit)."""
        self._reqs[req.request_id] = (sreq, on_finish)
        if not with_kv:
            self.scheduler.add(req)
        self.flush_events()
        self.kick()

    def abort(self, request_id: str) -> None:
        """The router closed this request's stream: the worker aborts it between steps (now if
        idle, else when the running step ends), or cancels its reserved import."""
        if self.busy:
            self._aborts.add(request_id)
            return
        self._abort_now(request_id)
        self.kick()

    def _abort_now(self, request_id: str) -> None:
        """(Never while a step runs: the step would commit a freed request.)"""
        self._reqs.pop(request_id, None)
        if self.scheduler.abort(request_id) is None:
            self.handoff.cancel(request_id)  # still waiting for its KV
        self.flush_events()

    def kick(self) -> None:
        """Start a step now if idle and there is work (the worker loop)."""
        if self.busy or not self.scheduler.has_unfinished():
            return
        self.handoff.collect_leases()
        out = self.scheduler.schedule()
        if self._events:  # (checked here: twice a step)
            self.flush_events()
        if not out.scheduled:
            return  # nothing fits now: a finishing request or an ending lease kicks again
        # Which requests sample is known only before the step commits (as in LLMEngine.step):
        # committing moves each start on. (One pass: this runs once per simulated step.)
        parts = []
        sampling = []
        for s in out.scheduled:
            parts.append((s.num_new_tokens, s.start))
            if s.samples:
                sampling.append(s.request)
        shape = StepShape(tuple(parts))
        dt = self.cost.step_time(shape)
        sim = self.sim
        hc = sim.config.host_contention
        if hc is not None:
            dt = hc.served(dt, shape.decodes, sim.num_busy)
        dt += sim.config.step_overhead_s
        self.busy = True
        sim.num_busy += 1
        self.steps += 1
        self.busy_s += dt
        sim.at(sim.clock.now + dt, lambda: self._step_done(out, sampling))

    def _step_done(self, out: SchedulerOutput, sampling: list[Request]) -> None:
        now = self.sim.clock.now
        commit = self.scheduler.commit_computed
        for s in out.scheduled:
            commit(s)
        aborts, reqs, token_for = self._aborts, self._reqs, self.sim.token_for
        for req in sampling:
            if aborts and req.request_id in aborts:
                continue  # its client is gone: the token goes nowhere
            sreq, on_finish = reqs[req.request_id]
            tok = token_for(sreq, req)
            req.token_ids.append(tok)
            if req.lease_ttl_s is None:
                if sreq.first_token_s is None:
                    sreq.first_token_s = now
                    sreq.cached_tokens = max(0, req.num_cached_tokens)
                sreq.token_times.append(now)
                sreq.output_token_ids.append(tok)
            end = check_stop(req.params, tok, req.num_output_tokens, req.num_tokens, self.engine.max_model_len, ())
            if end is None:
                continue
            kept = self.scheduler.finish(req, end.reason, end.stop_reason, keep_blocks=req.lease_ttl_s is not None)
            del self._reqs[req.request_id]
            if req.lease_ttl_s is None:
                sreq.finish_s = now
            if on_finish is not None:
                if req.lease_ttl_s is not None:  # a prefill-only leg: its blocks go under a lease
                    self.sim.leased[req.request_id] = self.handoff.lease_out(req, kept, req.lease_ttl_s or LEASE_TTL_S)
                on_finish(sreq, req)
        if self._events:
            self.flush_events()
        self.busy = False
        self.sim.num_busy -= 1
        if self._aborts:
            aborts, self._aborts = self._aborts, set()
            for rid in aborts:
                self._abort_now(rid)
        self.kick()


class SimCluster:
    """The simulated cluster (see the module docstring). ``run(requests)`` plays requests with
    fixed arrival times; :func:`kvbaton.sim.run.simulate` adds sessions and concurrency."""

    def __init__(self, config: SimConfig, cost: CostModel) -> None:
        self.config = config
        self.cost = cost
        self.clock = _Clock()
        kvb = config.kv_bytes_per_token or cost.kv_bytes_per_token()
        if kvb is None:
            raise ValueError("the KV bytes per token are unknown: give kv_bytes_per_token (the cost model has none)")
        self.kv_bytes_per_token = kvb
        self.feed = KVIndexFeed(medium_credit=config.medium_credit, clock=self.clock)
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._tick = itertools.count()
        self.leased: dict[str, LeaseInfo] = {}  # prefill-only request -> its lease, until handed over
        self.workers: list[SimWorker] = []
        for role, n in (("prefill", config.prefill), ("decode", config.decode), ("both", config.colocated)):
            for i in range(n):
                w = SimWorker(f"sim://{role}-{i}", role, config.engine, cost, self)
                self.feed.adopt(w.url)
                self.workers.append(w)
        # Simulated workers never go down: the candidate lists are fixed.
        self._by_url = {w.url: w for w in self.workers}
        self._decoders = [w.view for w in self.workers if w.view.can_decode]
        self._prefillers = [w.view for w in self.workers if w.view.can_prefill]
        opts = config.policy_options
        if opts.seed is None:  # random tie-breaks too must repeat for the same seed
            opts = dataclasses.replace(opts, seed=config.seed)
        self.decode_policy: PlacementPolicy = make_policy(config.decode_policy, self.feed, opts)
        self.prefill_policy: PlacementPolicy = make_policy(config.prefill_policy, self.feed, opts)
        self.transfers = 0
        self.transfer_bytes = 0
        self.num_busy = 0  # workers in a step now (the host contention's k)
        self.timeouts = 0  # decode legs the router gave up on (no first token in time)

    # ---- the event loop ----------------------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._tick), fn))

    def run_until_idle(self, limit_s: float = math.inf) -> None:
        heap, pop, clock = self._heap, heapq.heappop, self.clock  # locals: one pass per event
        while heap:
            t, _, fn = pop(heap)
            if t > limit_s:
                heapq.heappush(heap, (t, next(self._tick), fn))
                return
            if t > clock.now:
                clock.now = t
            fn()

    def token_for(self, sreq: SimRequest, req: Request) -> int:
        """A placeholder generated token: deterministic per request and position (its value
        matters only as part of the next turn's prefix)."""
        # A multiplicative hash of (seed, position): no bytes to build (this runs per token).
        return ((sreq.token_seed ^ len(req.token_ids)) * 2654435761 & 0xFFFFFFFF) % PLACEHOLDER_VOCAB

    # ---- routing -----------------------------------------------------------------------

    def submit(self, sreq: SimRequest, on_done: Callable[[SimRequest], None] | None = None) -> None:
        """Route ``sreq`` now (its arrival) and run it; ``on_done`` when its last token is out,
        or when it failed (refused, or no first token within the router's timeout on any
        worker it was tried on)."""
        bs = self.config.engine.block_size
        eng = self.config.engine
        try:  # what a worker answers 400 to
            check_request_fits(len(sreq.prompt_token_ids), sreq.max_tokens, eng.max_model_len, eng.num_kv_blocks, bs)
        except ValueError as e:
            sreq.error = str(e)
            if on_done is not None:
                on_done(sreq)
            return
        root = root_hash(SIM_FINGERPRINT, sreq.cache_salt)
        hashes = tuple(hash_block_chain(root, sreq.prompt_token_ids, bs))
        routing = RoutingRequest(sreq.request_id, tuple(sreq.prompt_token_ids), hashes, bs, sreq.cache_salt,
                                 sreq.max_tokens)
        p = place(routing, self._decoders, self._prefillers, self.feed, self.decode_policy, self.prefill_policy,
                  self.config.disagg_min_tokens, self.config.prefill > 0)
        # As the orchestrator does: both legs are told to the overlap provider at once.
        self.feed.routed(routing, p.decoder)
        if p.prefiller is not None:
            self.feed.routed(routing, p.prefiller)
        params = SamplingParams(max_tokens=sreq.max_tokens, temperature=0, ignore_eos=True)
        tried: list[Worker] = []
        retries = [self.config.max_retries]

        def new_request(params: SamplingParams) -> Request:
            """The request a worker builds from the prompt; its block hashes are the ones the
            router computed (the same function of the same tokens: a worker would get the same)."""
            req = Request(sreq.request_id, list(sreq.prompt_token_ids), params, root, bs)
            req.block_hashes = list(hashes)
            return req

        def decode_leg(view: Worker, with_first: int | None = None, lease: tuple[SimWorker, LeaseInfo] | None = None
                       ) -> None:
            """Send the decode leg to ``view`` now (``with_first``: the prefill's first token, the
            KV to fetch from ``lease``); the router waits request_timeout_s for its first token,
            then aborts it there and retries on a decode worker not tried yet (the prompt then
            computed there), or fails the request as the router's 504 does."""
            decoder = self._by_url[view.url]
            tried.append(view)
            sreq.decode_worker = decoder.url
            leg = charge(view, len(sreq.prompt_token_ids) + sreq.max_tokens, bs, hashes)
            state = {"open": True}

            def finished(s: SimRequest, r: Request) -> None:
                if state["open"]:
                    state["open"] = False
                    leg.done()
                    if on_done is not None:
                        on_done(s)

            def timed_out() -> None:
                if not state["open"] or sreq.first_token_s is not None:
                    return
                state["open"] = False
                leg.done()
                if lease is not None:
                    lease[0].leases.release(lease[1].lease_id)
                    lease[0].kick()
                decoder.abort(sreq.request_id)
                self.timeouts += 1
                others = [w for w in self._decoders if w not in tried]
                if retries[0] > 0 and others:
                    retries[0] -= 1
                    # A policy returns one of the candidates it was given.
                    decode_leg(cast(Worker, self.decode_policy.choose(routing, others, "decode")))
                    return
                sreq.error = (f"HTTP 504: decode worker {decoder.url} timed out (no first token in "
                              f"{self.config.request_timeout_s:g} s)")
                if on_done is not None:
                    on_done(sreq)

            self.at(self.clock.now + self.config.request_timeout_s, timed_out)
            if lease is None:
                decoder.add(sreq, new_request(params), finished)
                return
            prefiller, info = lease
            plan = decoder.handoff.reserve(sreq.request_id, sreq.prompt_token_ids, root, sreq.cache_salt,
                                           hashes, handle_is_own=True)
            if plan is None:  # the decode worker cannot hold it now: it computes the prompt itself
                prefiller.leases.release(info.lease_id)
                prefiller.kick()
                lease = None
                decoder.add(sreq, new_request(params), finished)
                return
            nbytes = len(plan.fetch_indexes) * bs * self.kv_bytes_per_token
            self.transfers += 1
            self.transfer_bytes += nbytes

            def arrived() -> None:
                nonlocal lease
                if not state["open"]:  # the router gave up meanwhile (its abort cancelled the plan)
                    return
                prefiller.leases.release(info.lease_id)
                prefiller.kick()
                lease = None
                req = new_request(params)
                assert with_first is not None
                req.token_ids.append(with_first)
                decoder.handoff.commit(sreq.request_id, req)
                sreq.output_token_ids.append(with_first)
                decoder.add(sreq, req, finished, with_kv=True)

            self.at(self.clock.now + nbytes / self.config.link_bytes_s + self.config.link_latency_s, arrived)

        start = self.clock.now + self.config.request_overhead_s
        if p.prefiller is None:
            self.at(start, lambda: decode_leg(p.decoder))
            return
        prefiller = self._by_url[p.prefiller.url]
        sreq.prefill_worker = prefiller.url
        prefill_leg = charge(p.prefiller, len(sreq.prompt_token_ids), bs, hashes)

        def prefilled(s: SimRequest, r: Request) -> None:
            prefill_leg.done()
            decode_leg(p.decoder, r.token_ids[-1], (prefiller, self.leased.pop(r.request_id)))

        def run_prefill() -> None:
            req = new_request(SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
            req.lease_ttl_s = LEASE_TTL_S
            prefiller.add(sreq, req, prefilled)

        self.at(start, run_prefill)

    def run(self, requests: Sequence[SimRequest]) -> list[SimRequest]:
        """Play ``requests`` at their arrival times to the end; returns them, filled in."""
        for r in requests:
            self.at(r.arrival_s, functools.partial(self.submit, r))
        self.run_until_idle()
        self.finish()
        return list(requests)

    def finish(self) -> None:
        """After the last event: requests that never ran (too big for a pool) fail with a
        message, and every worker's block accounting must be whole."""
        for w in self.workers:
            for rid, (sreq, on_finish) in list(w._reqs.items()):
                if not sreq.done:
                    sreq.error = f"{w.url} could never schedule it ({len(sreq.prompt_token_ids)} prompt tokens)"
                    req = w.scheduler.requests.get(rid)
                    del w._reqs[rid]
                    if req is not None:
                        w.scheduler.abort(rid)
                        if on_finish is not None:
                            on_finish(sreq, req)
        self.check()

    def check(self) -> None:
        """Every worker's block accounting is whole (the engine's own integrity check)."""
        for w in self.workers:
            refs = w.scheduler.block_refs()
            for b, n in w.handoff.block_refs().items():
                refs[b] = refs.get(b, 0) + n
            w.pool.check_integrity(refs)
