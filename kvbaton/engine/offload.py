"""KVOffload: the engine's side of the tiered KV store (device -> host -> disk).

The device :class:`~kvbaton.engine.block_pool.BlockPool` keeps working as it always has; this
class follows it through its two hooks and moves blocks below it:

- **Offload.** ``write-back`` (default): a block leaves the device only when the pool is
  about to reuse it. To keep that off the step's critical path, after every step the next
  blocks in eviction order are copied to the host tier ahead of need (readahead); a block the
  pool evicts before its copy was made is copied there and then (``sync_stores`` counts it).
  ``write-through``: every block is copied as soon as the step that wrote it ends. Blocks go
  to the top tier (host, or the disk when there is no host tier); the disk tier then receives
  every block the host tier stores (so a restart finds them), through the same IO thread.
- **Load.** When the scheduler considers a waiting request, the blocks after its device hit
  are looked up in the tiers (host first, then disk); the leading run found there is loaded
  into newly allocated device blocks by the IO thread while the request waits
  (``WAITING_FOR_KV``), then registered in the prefix cache (``kv_arrived``): the step loop
  never waits on I/O. A load that fails or times out sends the request to compute its prompt;
  a block that fails validation is dropped from its tier and never used.
- **Ownership.** The blocks of a load belong to the request until it is aborted or the load
  times out; then they belong to the load record until the IO thread has stopped writing
  them, and only then go back to the pool. Device blocks an offload copy is reading are
  ``busy``: before their memory is reused, the pool's eviction hook cancels that copy if it
  is still queued (and copies the block there and then) or waits for it if it is running.
- **Reuse filter.** With ``min_hits`` > 1 a block is offloaded only once that many requests
  have used it (vLLM's ``store_threshold``), so one-off prompts do not churn the tiers.
- **Pins.** ``pin`` keeps a prefix in the tiers (copying it down from the device first) until
  a deadline; ``unpin`` ends it early.
- **Events.** Blocks that enter or leave a tier are announced with the tier's ``medium``
  through the pool's event sink, in order with the pool's own events.
- **Remote tier** (optional, :mod:`kvbaton.kv.store.remote`: a Redis server the cluster
  shares). Blocks the host tier stores are also written there (subject to their own reuse
  filter), by the remote tier's own IO thread, never holding up a step; they are announced with
  medium ``REMOTE``. A waiting request whose leading run in the local tiers ends before its
  prompt does first *probes* the server (one pipelined round trip) for the run that follows,
  waiting in the queue without holding blocks; the next scheduling loads the local and remote
  runs together into new device blocks. A remote block that is gone or refused by the time it
  is read ends the run there: the rest is computed. While the server is unreachable the tier is
  down (no probes, no writes) and a PING is retried with backoff.

Everything here runs on the engine thread, except the job functions, which run on the IO
thread and only copy bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbaton.engine.block_pool import Block, BlockPool
from kvbaton.engine.config import OFFLOAD_MODES
from kvbaton.engine.request import Request, RequestStatus
from kvbaton.engine.scheduler import Scheduler
from kvbaton.kv.events import REMOTE_MEDIUM, BlockRemoved, BlockStored, KVEvent
from kvbaton.kv.hashing import BlockHash
from kvbaton.kv.store.base import BlockMeta, KVTier, LoadPlan, StorePlan, TierError
from kvbaton.kv.store.host import HostTier
from kvbaton.kv.store.io import Job, JobCancelled, TierIO
from kvbaton.kv.store.mover import BlockMover, kv_rows
from kvbaton.kv.store.policies import ReuseFilter
from kvbaton.kv.store.remote import RemoteReader, RemoteTier

log = logging.getLogger(__name__)

# Buckets of the load-latency histogram (seconds).
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_EXPIRE_EVERY_S = 1.0
# Remote writes queued at once (each up to BATCH_BLOCKS... blocks, holding their host entries):
# past this, new ones are dropped and counted rather than queued behind a slow server.
_MAX_REMOTE_PUT_JOBS = 8
# Hashes this worker put in (or loaded from) the remote tier lately, not written again.
_REMOTE_KNOWN_MAX = 1 << 16


@dataclass
class TierStats:
    """Cumulative counters of one tier, as the worker's metrics report them."""

    hit_tokens: int = 0
    stores: int = 0
    store_bytes: int = 0
    loads: int = 0
    load_bytes: int = 0
    failed_loads: int = 0
    failed_stores: int = 0
    load_seconds: list[int] = field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))
    load_seconds_sum: float = 0.0

    def observe_load(self, seconds: float) -> None:
        i = next((k for k, b in enumerate(LOAD_BUCKETS) if seconds <= b), len(LOAD_BUCKETS))
        self.load_seconds[i] += 1
        self.load_seconds_sum += seconds


@dataclass
class _Load:
    req: Request
    blocks: list[int]  # device hit blocks, then the blocks being filled
    num_hit: int
    hashes: list[BlockHash]  # of blocks[num_hit:]
    metas: list[BlockMeta]
    parts: list[tuple[KVTier, LoadPlan, list[int]]]  # tier, plan, positions in the run
    started: float
    job: Job | None = None
    abandoned: bool = False  # the request ended or gave up: free the blocks when the job ends
    timed_out: bool = False
    marked: bool = True  # its hashes count in KVOffload._loading
    fresh: bool = True  # started in the scheduling of the current step
    remote: RemoteReader | None = None  # the run's blocks after the local tiers' come from the server
    remote_positions: list[int] = field(default_factory=list)  # their positions in the run
    io: TierIO | None = None  # the thread running it


@dataclass
class _Probe:
    """A lookup in the remote tier for a waiting request's blocks ``start``.. (its leading run
    in the local tiers ends there)."""

    request_id: str
    start: int
    hashes: list[BlockHash]
    job: Job | None = None
    found: int | None = None  # leading hashes the server holds, once the job is reaped
    fresh: bool = True


@dataclass
class _RemotePut:
    hashes: list[BlockHash]
    metas: list[BlockMeta]
    hold: LoadPlan  # the host entries being read


@dataclass
class _Store:
    tier: KVTier
    plan: StorePlan
    device_blocks: list[int]  # device rows being read (busy until done); [] for host -> disk
    source_hold: tuple[KVTier, LoadPlan] | None = None  # host entries a disk write reads
    settled: bool = False  # its outcome was applied (cancelled ones are settled at once)


class KVOffload:
    """Moves blocks between one engine's device pool and its tiers (module docstring)."""

    def __init__(
        self,
        pool: BlockPool,
        scheduler: Scheduler,
        kv_cache: torch.Tensor,
        tiers: Sequence[KVTier],
        mode: str = "write-back",
        min_hits: int = 1,
        load_timeout_s: float = 30.0,
        readahead_blocks: int = 64,
        clock: Callable[[], float] = time.monotonic,
        io: TierIO | None = None,
        remote: RemoteTier | None = None,
        remote_min_hits: int = 1,
        remote_io: TierIO | None = None,
    ) -> None:
        if mode not in OFFLOAD_MODES:
            raise ValueError(f"offload mode must be one of {', '.join(OFFLOAD_MODES)}, got {mode!r}")
        if not tiers:
            raise ValueError("KVOffload needs at least one tier")
        self.pool = pool
        self.scheduler = scheduler
        self.tiers = list(tiers)
        self.mode = mode
        self.load_timeout_s = load_timeout_s
        self.readahead_blocks = readahead_blocks
        self.clock = clock
        self.rows = kv_rows(kv_cache)
        self.block_bytes = int(self.rows.shape[1])
        self.mover = BlockMover(self.rows)
        self._io_done = threading.Event()
        self.io = io or TierIO(on_complete=self._io_done.set)  # tests pass one they step by hand
        seen = max(1024, 4 * sum(t.capacity_blocks for t in tiers))  # hashes the reuse filters remember
        self.filter = ReuseFilter(min_hits, capacity=seen)
        self.stats = {t.name: TierStats() for t in self.tiers}
        self.remote = remote
        self.remote_io: TierIO | None = None
        self.remote_filter = ReuseFilter(remote_min_hits, capacity=seen)
        if remote is not None:
            if not isinstance(self.top, HostTier):
                raise ValueError("the remote tier is written from the host tier: it needs one")
            self.remote_io = remote_io or TierIO("kvbaton-kv-remote", on_complete=self._io_done.set)
            self.stats[remote.name] = TierStats()
        self._probes: dict[str, _Probe] = {}
        self._remote_known: OrderedDict[BlockHash, float] = OrderedDict()  # hash -> when put/loaded
        self._ping: Job | None = None
        self.sync_stores = 0  # blocks copied at eviction time (readahead had not reached them)
        self.eviction_waits = 0  # evictions that waited for an offload copy still running
        self.cancelled_stores = 0  # queued copies dropped because their block was evicted first
        self._loads: dict[str, _Load] = {}  # request id -> its load (also abandoned ones, by id)
        self._abandoned: list[_Load] = []
        self._loading: dict[BlockHash, int] = {}  # hashes being loaded -> number of loads
        self._busy: dict[int, Job] = {}  # device block -> the offload copy reading it
        self._pending: list[tuple[Block, BlockHash]] = []  # write-through: to store after this step
        self._next_expire = 0.0
        self._closed = False
        pool.on_evict = self._on_evict
        pool.on_cached = self._on_cached
        scheduler.loader = self
        for t in self.tiers:  # a disk tier found blocks at startup: announce them
            self._flush_events(t)

    # ---- tiers -------------------------------------------------------------------------

    @property
    def top(self) -> KVTier:
        """Where blocks leaving the device go first."""
        return self.tiers[0]

    def tier(self, name: str) -> KVTier | None:
        return next((t for t in self.tiers if t.name == name), None)

    def _holder(self, h: BlockHash) -> KVTier | None:
        return next((t for t in self.tiers if t.dir.is_ready(h)), None)

    # ---- loads (the scheduler's PrefixLoader) -----------------------------------------

    def begin_load(self, req: Request, hashes: list[BlockHash], hit: list[int]) -> bool:
        """Start loading the blocks after ``req``'s device hit ``hit`` that the tiers hold;
        False (nothing changed) when they hold none or the pool has no room now."""
        self._count_reuse(req, hashes)
        if self._stalled():
            return False
        k = len(hit)
        for t in self.tiers:
            t.dir.touch(hashes[:k])  # a hot prefix kept on the device stays fresh below it
        max_blocks = (req.num_tokens - 1) // self.pool.block_size
        bs = self.pool.block_size
        run: list[tuple[KVTier, BlockHash, BlockMeta]] = []
        for i in range(k, max_blocks):
            h = hashes[i]
            if h in self._loading:
                break  # another request is loading it: wait for that (in-flight sharing)
            holder = self._holder(h)
            if holder is None:
                break
            meta = holder.dir.meta_of(h)
            # A hash names its tokens; checking them too means even a collision cannot
            # serve the wrong KV (the device pool checks the same way).
            if meta.token_ids != tuple(req.token_ids[i * bs : (i + 1) * bs]):
                break
            run.append((holder, h, meta))
        remote_n = self._remote_run(req, hashes, k + len(run), max_blocks)
        if remote_n is None:
            return True  # its probe of the remote tier is out: keep waiting, holding nothing
        if not run and not remote_n:
            return False
        # Hold the tier entries first: allocating device blocks can evict device blocks into
        # the host tier, which could otherwise evict the very entries about to be loaded.
        parts: list[tuple[KVTier, LoadPlan, list[int]]] = []
        for t in self.tiers:
            positions = [i for i, (rt, _, _) in enumerate(run) if rt is t]
            if positions:
                parts.append((t, t.dir.prepare_load([run[i][1] for i in positions]), positions))
        start = k + len(run)
        remote_hashes = hashes[start : start + remote_n]
        remote_metas = [BlockMeta(hashes[i - 1] if i else None, tuple(req.token_ids[i * bs : (i + 1) * bs]))
                        for i in range(start, start + remote_n)]
        blocks = self.pool.acquire(hit, len(run) + remote_n)
        if blocks is None:
            for t, plan, _ in parts:
                t.dir.complete_load(plan, ok=False)
            return False
        load = _Load(req, blocks, k, [h for _, h, _ in run] + remote_hashes, [m for _, _, m in run] + remote_metas,
                     parts, self.clock())
        if remote_n:
            assert self.remote is not None
            load.remote = RemoteReader(self.remote, dict(zip(remote_hashes, remote_metas)))
            load.remote_positions = list(range(len(run), len(run) + remote_n))
        for h in load.hashes:
            self._loading[h] = self._loading.get(h, 0) + 1
        req.block_ids = blocks
        req.status = RequestStatus.WAITING_FOR_KV
        self._loads[req.request_id] = load
        # A load with remote blocks runs on the remote tier's thread (its local part too: a host
        # copy is a memcpy of rows no other job touches), so the server's latency never holds
        # up the local tiers' queue.
        load.io = self.remote_io if load.remote is not None and self.remote_io is not None else self.io
        load.job = load.io.submit("load", lambda: self._do_load(load), load, urgent=True)
        return True

    def _remote_run(self, req: Request, hashes: list[BlockHash], start: int, max_blocks: int) -> int | None:
        """How many blocks from ``start`` on to load from the remote tier: 0 when there is no
        tier, it is down, nothing is left to look up, or this request already looked; None while
        its lookup (started here, once per request) is out."""
        if self.remote is None or req.remote_probed or start >= max_blocks:
            return 0
        probe = self._probes.get(req.request_id)
        if probe is None:
            if not self.remote.available:
                return 0
            remote, todo = self.remote, hashes[start:max_blocks]
            probe = self._probes[req.request_id] = _Probe(req.request_id, start, todo)
            assert self.remote_io is not None
            probe.job = self.remote_io.submit("probe", lambda: remote.probe(todo), probe, urgent=True)
            self.remote.stats.probes += 1
            return None
        if probe.found is None:
            return None
        del self._probes[req.request_id]
        req.remote_probed = True
        # The local run may have changed while the probe was out; the remote run is usable
        # from wherever the local one ends now, if the probe covered that block.
        n = max(0, min(probe.start + probe.found, max_blocks) - start) if probe.start <= start else 0
        run = 0
        while run < n and hashes[start + run] not in self._loading:  # another request loads it: share
            run += 1
        return run

    def _stalled(self) -> bool:
        """A load ran past its timeout and its copy has still not returned: the medium hangs.
        Start no load (each would hold blocks behind it) until it does."""
        return any(load.timed_out and load.job is not None and not load.job.done for load in self._abandoned)

    def _do_load(self, load: _Load) -> list[BlockHash]:
        """IO thread: copy the run into its device blocks; the hashes that failed validation
        (or, remote, were gone)."""
        bad: list[BlockHash] = []
        for t, plan, positions in load.parts:
            bad += self.mover.load(t, plan, [load.blocks[load.num_hit + p] for p in positions])
        if load.remote is not None:
            ps = load.remote_positions
            plan = LoadPlan([load.hashes[p] for p in ps], list(ps))
            bad += self.mover.load(load.remote, plan, [load.blocks[load.num_hit + p] for p in ps])
        return bad

    def wait_new_loads(self, grace_s: float) -> int:
        """Give loads started in this step's scheduling up to ``grace_s`` (together) to land,
        then collect whatever finished; how many loads landed. A host-tier load is a memcpy of
        a few MB, far shorter than a step: without this the request would wait out the whole
        step it was passed over in. The wait is bounded, so a slow medium costs at most
        ``grace_s`` per step."""
        fresh = [load.job for load in self._loads.values() if load.job is not None and load.fresh]
        fresh += [p.job for p in self._probes.values() if p.job is not None and p.fresh]
        for load in self._loads.values():
            load.fresh = False
        for p in self._probes.values():
            p.fresh = False
        if not fresh or grace_s <= 0:
            return 0
        deadline = time.monotonic() + grace_s
        for job in fresh:
            if not job.wait(max(0.0, deadline - time.monotonic())):
                break
        before = len(self._loads)
        answered = sum(1 for p in self._probes.values() if p.found is not None)
        self._reap()
        # A probe answered is as good as a load landed: its request can start its load now.
        return before - len(self._loads) + sum(1 for p in self._probes.values() if p.found is not None) - answered

    def wait_io(self, timeout_s: float) -> None:
        """Wait (at most ``timeout_s``) until a job of either IO thread finishes: the engine's
        idle wait while requests wait for prefix loads or remote lookups."""
        if self.io.has_completed or (self.remote_io is not None and self.remote_io.has_completed):
            return
        self._io_done.wait(timeout_s)
        self._io_done.clear()

    def abandon(self, req: Request) -> None:
        """``req`` was aborted while its prefix loads: the load keeps its blocks until done."""
        load = self._loads.pop(req.request_id, None)
        if load is None:
            return
        load.abandoned = True
        self._abandoned.append(load)

    def loading_hashes(self) -> Set[BlockHash]:
        return self._loading.keys()

    def _finish_load(self, load: _Load, job: Job) -> None:
        if self._loads.get(load.req.request_id) is load:
            del self._loads[load.req.request_id]
        self._unmark_loading(load)
        bad = set(job.result or ()) if job.error is None else set(load.hashes)
        if job.error is not None:
            log.warning("KV load for %s failed: %s", load.req.request_id, job.error)
        elapsed = self.clock() - load.started
        # Hits count once per request, as the pool's do (a request that gave its loaded
        # blocks back to the queue's head and loads them again is not a second hit).
        first = load.req.num_cached_tokens < 0
        good_run = next((i for i, h in enumerate(load.hashes) if h in bad), len(load.hashes))
        for t, plan, positions in load.parts:
            part_bad = [h for h in plan.hashes if h in bad] if job.error is None else []
            t.dir.complete_load(plan, ok=job.error is None and not load.abandoned, bad=part_bad)
            used = sum(1 for p in positions if p < good_run)
            self._count_load(self.stats[t.name], load, used, first, job.error is not None or bool(part_bad), elapsed)
            self._flush_events(t)
        if load.remote is not None:
            self._finish_remote_load(load, job, good_run, first)
        if load.abandoned:
            self.pool.free(list(reversed(load.blocks)))
            self._abandoned.remove(load)
            return
        req, bs = load.req, self.pool.block_size
        keep = load.num_hit + good_run
        for i in range(good_run):
            b = load.num_hit + i
            meta = load.metas[i]
            self.pool.cache_block(load.blocks[b], load.hashes[i], meta.token_ids, meta.parent)
        self.pool.free(list(reversed(load.blocks[keep:])))
        if good_run < len(load.hashes):
            req.skip_tiers = True  # compute the rest rather than retry a tier that failed
        self.scheduler.kv_arrived(req, load.blocks[:keep], keep * bs)

    def _count_load(self, st: TierStats, load: _Load, used: int, first: bool, failed: bool, elapsed: float) -> None:
        """One tier's part of a finished load: ``used`` of its blocks were kept."""
        if load.abandoned or failed:
            st.failed_loads += 1
        if used and not load.abandoned:
            st.loads += 1
            st.load_bytes += used * self.block_bytes
            if first:
                st.hit_tokens += used * self.pool.block_size
            st.observe_load(elapsed)

    def _finish_remote_load(self, load: _Load, job: Job, good_run: int, first: bool) -> None:
        assert self.remote is not None and load.remote is not None
        remote, st = self.remote, self.stats[self.remote.name]
        if isinstance(job.error, JobCancelled):
            pass
        elif job.error is not None:
            self._remote_failed(job.error)
        else:
            remote.note_ok()
        used = sum(1 for p in load.remote_positions if p < good_run)
        gone = [h for h, s in load.remote.status.items() if s != "ok"]
        remote.stats.missing += sum(1 for s in load.remote.status.values() if s == "missing")
        remote.stats.bad_values += sum(1 for s in load.remote.status.values() if s == "bad")
        self._count_load(st, load, used, first, job.error is not None or bool(gone), self.clock() - load.started)
        now = self.clock()
        for p in load.remote_positions[:used]:
            self._know_remote(load.hashes[p], now)
        if gone:  # the router's index should stop sending requests here for them
            for h in gone:
                self._remote_known.pop(h, None)
            self._emit(BlockRemoved(gone, medium=REMOTE_MEDIUM))

    def _unmark_loading(self, load: _Load) -> None:
        """Nobody should wait for ``load``'s blocks any more (it ended, or timed out)."""
        if not load.marked:
            return
        load.marked = False
        for h in load.hashes:
            n = self._loading.get(h, 0) - 1
            if n > 0:
                self._loading[h] = n
            else:
                self._loading.pop(h, None)

    def _check_timeouts(self) -> None:
        now = self.clock()
        for rid, load in list(self._loads.items()):
            if now - load.started <= self.load_timeout_s:
                continue
            log.warning("KV load for %s did not finish in %.1fs: computing the prompt instead",
                        rid, self.load_timeout_s)
            del self._loads[rid]
            load.abandoned = True
            load.timed_out = True
            self._unmark_loading(load)  # siblings waiting for these blocks compute them too
            self._abandoned.append(load)
            load.req.skip_tiers = True
            self.scheduler.kv_arrived(load.req, [], 0)
            if load.job is not None and load.io is not None:
                load.io.cancel(load.job)  # still queued: its blocks come back at the next reap

    # ---- stores ------------------------------------------------------------------------

    def _count_reuse(self, req: Request, hashes: list[BlockHash]) -> None:
        if not req.reuse_counted:  # once per request, however many steps it waits
            req.reuse_counted = True
            self.filter.record(hashes)
            if self.remote is not None:
                self.remote_filter.record(hashes)
                if self.remote_filter.threshold > 1:
                    # Blocks already on the host tier that this use makes qualify: the host
                    # store that normally sends them on happened before they did.
                    self._write_remote(hashes)

    def _wanted(self, blk: Block) -> bool:
        h = blk.block_hash
        return (h is not None and self.top.enabled and h not in self.top.dir and self.filter.admits(h)
                and blk.block_id not in self._busy)

    def _on_cached(self, blk: Block) -> None:
        if self.mode == "write-through" and blk.block_hash is not None and self._wanted(blk):
            self._pending.append((blk, blk.block_hash))

    def _on_evict(self, blocks: list[Block]) -> None:
        """The pool is about to reuse ``blocks``: their KV must be safe below first."""
        for blk in blocks:
            job = self._busy.pop(blk.block_id, None)
            if job is None or job.done:
                continue
            if self.io.cancel(job):
                # Still queued: drop it now (its entries go), so the copy made below at
                # eviction time takes its place; nothing waits on a queue a slow load may hold.
                self._settle_store(job)
            else:
                # An offload copy is reading it right now: let that one memcpy or file write
                # finish before the memory is reused (rare: readahead runs a step ahead).
                self.eviction_waits += 1
                job.wait()
        todo = [b for b in blocks if self._wanted(b)]
        if not todo:
            return
        plan, blocks_kept = self._plan_store(self.top, todo)
        if not plan.hashes:
            return
        self.sync_stores += len(plan.hashes)
        try:
            self.mover.store(self.top, plan, [b.block_id for b in blocks_kept])
            ok = True
        except TierError as e:
            log.warning("offload to the %s tier failed: %s", self.top.name, e)
            ok = False
        self._stored(_Store(self.top, plan, []), ok)

    def _plan_store(self, tier: KVTier, blocks: Sequence[Block]) -> tuple[StorePlan, list[Block]]:
        metas = [BlockMeta(b.parent_hash, b.token_ids or ()) for b in blocks]
        hashes: list[BlockHash] = [b.block_hash for b in blocks if b.block_hash is not None]
        plan = tier.dir.prepare_store(hashes, metas)
        by_hash = {b.block_hash: b for b in blocks}
        self._evicted(tier, plan.evicted)
        return plan, [by_hash[h] for h in plan.hashes]

    def _submit_store(self, blocks: Sequence[Block]) -> None:
        plan, kept = self._plan_store(self.top, blocks)
        if not plan.hashes:
            return
        ids = [b.block_id for b in kept]
        rec = _Store(self.top, plan, ids)
        job = self.io.submit("store", lambda: self.mover.store(rec.tier, rec.plan, ids), rec)
        for bid in ids:
            self._busy[bid] = job

    def _stored(self, rec: _Store, ok: bool) -> None:
        """A store ended: entries become loadable (or are dropped); the disk follows the host."""
        rec.tier.dir.complete_store(rec.plan, ok)
        st = self.stats[rec.tier.name]
        if ok:
            st.stores += len(rec.plan.hashes)
            st.store_bytes += len(rec.plan.hashes) * self.block_bytes
        else:
            st.failed_stores += 1
        if rec.source_hold is not None:
            src, hold = rec.source_hold
            src.dir.complete_load(hold, ok=False)
        self._flush_events(rec.tier)
        if ok and rec.tier is self.top and len(self.tiers) > 1:
            self._write_below(rec.tier, rec.plan.hashes)
        if ok and rec.tier is self.top and self.remote is not None:
            self._write_remote(rec.plan.hashes)

    def _write_remote(self, hashes: list[BlockHash]) -> None:
        """Copy those of ``hashes`` the host tier holds on to the remote tier, unless this worker
        put (or loaded) them there lately or the reuse filter says no. Never waits: while the
        server is down, or too many writes are queued, they are dropped (and counted)."""
        remote, src = self.remote, self.top
        assert remote is not None and self.remote_io is not None and isinstance(src, HostTier)
        now = self.clock()
        todo = [h for h in hashes if not self._remote_recent(h, now) and src.dir.is_ready(h)
                and self.remote_filter.admits(h)]
        if not todo:
            return
        if not remote.available or self.remote_io.pending >= _MAX_REMOTE_PUT_JOBS:
            remote.stats.dropped_puts += len(todo)
            return
        hold = src.dir.prepare_load(todo)  # the host rows stay put while the server reads them
        rec = _RemotePut(todo, [src.dir.meta_of(h) for h in todo], hold)
        self.remote_io.submit("put", lambda: remote.write(rec.hashes, rec.metas, src.rows, hold.slots), rec)

    def _remote_recent(self, h: BlockHash, now: float) -> bool:
        """Put in or loaded from the remote tier within half its TTL (so most likely still there)."""
        assert self.remote is not None
        t = self._remote_known.get(h)
        return t is not None and now - t < self.remote.ttl_s / 2

    def _know_remote(self, h: BlockHash, now: float) -> None:
        self._remote_known[h] = now
        self._remote_known.move_to_end(h)
        if len(self._remote_known) > _REMOTE_KNOWN_MAX:
            self._remote_known.popitem(last=False)

    def _finish_put(self, rec: _RemotePut, job: Job) -> None:
        assert self.remote is not None
        self.top.dir.complete_load(rec.hold, ok=False)
        st, remote = self.stats[self.remote.name], self.remote
        if job.error is not None:
            st.failed_stores += 1
            remote.stats.dropped_puts += len(rec.hashes)
            self._remote_failed(job.error)
            return
        remote.note_ok()
        stored = set(job.result or ())
        remote.stats.put_blocks += len(stored)
        remote.stats.put_failures += len(rec.hashes) - len(stored)
        if len(stored) < len(rec.hashes):
            st.failed_stores += 1
        st.stores += len(stored)
        st.store_bytes += len(stored) * self.block_bytes
        now = self.clock()
        for h, meta in zip(rec.hashes, rec.metas):
            if h in stored:
                self._know_remote(h, now)
                self._emit(BlockStored([h], meta.parent, list(meta.token_ids), self.pool.block_size,
                                       medium=REMOTE_MEDIUM))

    def _remote_failed(self, error: BaseException) -> None:
        assert self.remote is not None
        if isinstance(error, TierError):
            self.remote.note_failure(error)
        else:  # a bug or a refused password: log it, and back off like an outage
            log.warning("KV remote tier call failed: %s", error)
            self.remote.note_failure(error)

    def _write_below(self, src: KVTier, hashes: list[BlockHash]) -> None:
        """Copy blocks the host tier just stored on to the disk tier (write-through)."""
        dst = self.tiers[1]
        if not dst.enabled:
            return
        todo = [h for h in hashes if h not in dst.dir and src.dir.is_ready(h)]
        if not todo:
            return
        plan = dst.dir.prepare_store(todo, [src.dir.meta_of(h) for h in todo])
        self._evicted(dst, plan.evicted)
        if not plan.hashes:
            return
        if not isinstance(src, HostTier):  # only the host tier has rows to write from
            dst.dir.complete_store(plan, ok=False)
            return
        hold = src.dir.prepare_load(plan.hashes)  # the host rows stay put while the disk reads
        rec = _Store(dst, plan, [], (src, hold))
        self.io.submit("store", lambda: dst.write(plan, src.rows, hold.slots), rec)

    def _evicted(self, tier: KVTier, hashes: list[BlockHash]) -> None:
        if hashes:
            self.io.submit("delete", lambda: tier.removed(hashes), None)

    # ---- the step ----------------------------------------------------------------------

    def step_begin(self) -> None:
        """Before scheduling: take finished jobs, end overdue loads, expire idle entries."""
        self._reap()
        if self._loads:
            self._check_timeouts()
        if self.remote is not None:
            self._remote_upkeep()
        now = self.clock()
        if now >= self._next_expire:
            self._next_expire = now + _EXPIRE_EVERY_S
            for t in self.tiers:
                dropped = t.dir.expire()
                self._evicted(t, dropped)
                self._flush_events(t)

    def step_end(self) -> None:
        """After the step: submit this step's write-through stores, or the write-back readahead."""
        if self.mode == "write-through":
            pending, self._pending = self._pending, []
            # Still the block that was cached (nothing allocates between a step's commits and
            # here, but a reset could have cleared it).
            todo = [b for b, h in pending if b.block_hash == h and self._wanted(b)]
            if todo:
                self._submit_store(todo)
            return
        if not self.top.enabled:
            return
        ahead = [self.pool.blocks[b] for b in self.pool.eviction_candidates(self.readahead_blocks)]
        todo = [b for b in ahead if self._wanted(b)]
        if todo:
            self._submit_store(todo)

    def _remote_upkeep(self) -> None:
        """PING a down remote tier when its backoff is over; drop probes of requests that ended."""
        remote = self.remote
        assert remote is not None and self.remote_io is not None
        if self._ping is None and remote.retry_due():
            self._ping = self.remote_io.submit("ping", remote.ping, None, urgent=True)
        if self._probes:
            live = self.scheduler.requests
            for rid in [rid for rid, p in self._probes.items() if rid not in live and p.found is not None]:
                del self._probes[rid]

    def _settle_store(self, job: Job) -> None:
        """A store job ended (or was cancelled): release its device rows, settle its entries."""
        rec = job.tag
        assert isinstance(rec, _Store)
        if rec.settled:
            return
        rec.settled = True
        for bid in rec.device_blocks:
            if self._busy.get(bid) is job:
                del self._busy[bid]
        if isinstance(job.error, JobCancelled):
            self.cancelled_stores += 1  # its block was evicted before the copy ran
        elif job.error is not None:
            log.warning("offload to the %s tier failed: %s", rec.tier.name, job.error)
        self._stored(rec, job.error is None)

    def _reap(self) -> None:
        jobs = self.io.completed()
        if self.remote_io is not None:
            jobs += self.remote_io.completed()
        for job in jobs:
            tag = job.tag
            if isinstance(tag, _Load):
                self._finish_load(tag, job)
            elif isinstance(tag, _Store):
                self._settle_store(job)
            elif isinstance(tag, _Probe):
                self._finish_probe(tag, job)
            elif isinstance(tag, _RemotePut):
                self._finish_put(tag, job)
            elif job is self._ping:
                self._ping = None
                assert self.remote is not None
                if job.error is None:
                    self.remote.note_ok()
                else:
                    self._remote_failed(job.error)
            elif job.error is not None:
                log.warning("KV store %s job failed: %s", job.kind, job.error)

    def _finish_probe(self, probe: _Probe, job: Job) -> None:
        assert self.remote is not None
        if job.error is None:
            probe.found = int(job.result)
            self.remote.stats.probe_blocks_found += probe.found
            self.remote.note_ok()
        else:
            probe.found = 0  # the request computes what the local tiers lack
            if not isinstance(job.error, JobCancelled):
                self._remote_failed(job.error)
        if probe.request_id not in self.scheduler.requests:
            self._probes.pop(probe.request_id, None)

    # ---- pins --------------------------------------------------------------------------

    def pin(self, hashes: Sequence[BlockHash], token_ids: Sequence[int], ttl_s: float) -> int:
        """Pin the leading blocks of ``hashes`` that are cached anywhere (copying device-only
        ones into the top tier first) for ``ttl_s`` seconds; how many blocks are pinned."""
        # Copies already under way land first, so blocks on their way down count as there.
        self.io.drain(self.load_timeout_s)
        self._reap()
        bs = self.pool.block_size
        run: list[BlockHash] = []
        to_copy: list[Block] = []
        for i, h in enumerate(hashes):
            if self._holder(h) is None:
                bid = self.pool.lookup(h)
                if bid is None or self.pool.blocks[bid].token_ids != tuple(token_ids[i * bs : (i + 1) * bs]):
                    break
                to_copy.append(self.pool.blocks[bid])
            run.append(h)
        if to_copy and self.top.enabled:
            plan, kept = self._plan_store(self.top, to_copy)
            if plan.hashes:
                try:
                    self.mover.store(self.top, plan, [b.block_id for b in kept])
                    ok = True
                except TierError as e:
                    log.warning("copying a pinned prefix to the %s tier failed: %s", self.top.name, e)
                    ok = False
                self._stored(_Store(self.top, plan, []), ok)
        until = self.clock() + ttl_s
        return max(t.dir.pin(run, until) for t in self.tiers)

    def unpin(self, hashes: Sequence[BlockHash]) -> int:
        return max((t.dir.unpin(hashes) for t in self.tiers), default=0)

    # ---- events, snapshots, accounting -------------------------------------------------

    def _flush_events(self, tier: KVTier) -> None:
        for ev in tier.dir.take_events():
            self._emit(ev)

    def _emit(self, ev: KVEvent) -> None:
        sink = self.pool.event_sink
        if sink is not None:
            sink(ev)

    def snapshot_events(self) -> list[KVEvent]:
        """BlockStored for every ready block of every tier (a resync after the pool's own)."""
        out: list[KVEvent] = []
        for t in self.tiers:
            for h, meta in t.dir.ready_entries():
                out.append(BlockStored([h], meta.parent, list(meta.token_ids), self.pool.block_size, medium=t.medium))
        return out

    def block_refs(self) -> dict[int, int]:
        """Device blocks held by loads whose request ended (for integrity checks)."""
        refs: dict[int, int] = {}
        for load in self._abandoned:
            for b in load.blocks:
                refs[b] = refs.get(b, 0) + 1
        return refs

    def check(self) -> None:
        """Assert every tier's directory invariants."""
        for t in self.tiers:
            t.dir.check()
        live = {rid for rid, load in self._loads.items() if not load.abandoned}
        assert live <= set(self.scheduler.requests), "a load outlived its request"

    def tier_stats(self) -> dict[str, dict[str, Any]]:
        """Per tier: capacity, use and the cumulative counters (the worker's metrics)."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.tiers:
            st = self.stats[t.name]
            d = t.dir
            out[t.name] = {
                "medium": t.medium, "enabled": t.enabled,
                "blocks_used": len(d), "blocks_capacity": d.capacity,
                "bytes_used": len(d) * self.block_bytes, "bytes_capacity": d.capacity * self.block_bytes,
                "blocks_pinned": d.num_pinned, "hit_tokens": st.hit_tokens, "stores": st.stores,
                "store_bytes": st.store_bytes, "loads": st.loads, "load_bytes": st.load_bytes,
                "evictions": d.num_evicted, "expirations": d.num_expired, "dropped": d.num_dropped,
                "failed_loads": st.failed_loads, "failed_stores": st.failed_stores,
                "load_seconds_buckets": list(st.load_seconds), "load_seconds_sum": st.load_seconds_sum,
            }
        if self.remote is not None:
            # The server's keys are not counted here (it is shared, and evicts by itself):
            # use and capacity are the server's INFO memory, not this worker's.
            st, r = self.stats[self.remote.name], self.remote
            out[r.name] = {
                "medium": r.medium, "enabled": r.up, "blocks_used": 0, "blocks_capacity": 0,
                "bytes_used": 0, "bytes_capacity": 0, "blocks_pinned": 0, "hit_tokens": st.hit_tokens,
                "stores": st.stores, "store_bytes": st.store_bytes, "loads": st.loads, "load_bytes": st.load_bytes,
                "evictions": 0, "expirations": 0, "dropped": r.stats.bad_values,
                "failed_loads": st.failed_loads, "failed_stores": st.failed_stores,
                "load_seconds_buckets": list(st.load_seconds), "load_seconds_sum": st.load_seconds_sum,
            }
        return out

    def remote_stats(self) -> dict[str, Any]:
        """The remote tier's own counters and state ({} without one), for metrics and /kv/info."""
        r = self.remote
        if r is None:
            return {}
        s = r.stats
        return {
            "url": r.url.redacted, "namespace": r.namespace, "ttl_s": r.ttl_s, "up": r.up,
            "last_error": r.last_error, "probes": s.probes, "probe_blocks_found": s.probe_blocks_found,
            "missing": s.missing, "bad_values": s.bad_values, "put_blocks": s.put_blocks,
            "put_failures": s.put_failures, "dropped_puts": s.dropped_puts, "errors": s.errors,
            "outages": s.outages, "down_seconds": r.down_seconds,
        }

    def close(self, timeout_s: float = 30.0) -> None:
        """Finish queued copies (bounded), including the disk copies of what the host tier
        stored last (they are queued only once that store is collected), then release the
        tiers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for _ in range(3):  # device -> host, host -> disk, and the deletions they cause
            self.io.drain(timeout_s)
            if self.remote_io is not None:
                # Bounded by the server's timeout per call: a dead server costs seconds, not a hang.
                self.remote_io.drain(timeout_s)
            self._reap()
        self.io.close()
        for t in self.tiers:
            t.close()
        if self.remote_io is not None and self.remote is not None:
            self.remote_io.close(timeout_s)
            self.remote.close()
