"""The engine's side of the prefill→decode handoff: leasing a finished prompt's blocks out,
and taking fetched blocks in.

Prefill side: a request added with ``lease_ttl_s`` keeps its prompt's blocks when it finishes;
they go under a lease in :class:`~kvbaton.engine.leases.LeaseTable` until released or expired.

Decode side, in three engine-thread calls around a transfer that runs elsewhere:

1. ``reserve`` checks the handle's block hashes against this engine's own chain (same model,
   same tenant salt, same tokens), takes references on the prefix this worker already caches
   and allocates the rest. Nothing else can touch these blocks now.
2. The caller fetches the missing lease-relative blocks into ``plan.dst_block_ids``.
3. ``commit`` registers the fetched full blocks by hash and queues a request that owns all
   the blocks with the whole prompt computed and the first token already sampled; or
   ``cancel`` frees them (the fetch failed, or the client went away).

Only the engine thread calls this class; the lease table is the thread-safe part.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvbaton.engine.block_pool import BlockPool
from kvbaton.engine.leases import Lease, LeaseTable
from kvbaton.engine.request import Request
from kvbaton.engine.scheduler import Scheduler
from kvbaton.kv.hashing import BlockHash, hash_block_chain


class HandleMismatch(ValueError):
    """A KV handle's block hashes are not this prompt's on this worker (another model, other
    tokens or another tenant salt): its blocks must not be imported. The worker recomputes the
    prompt instead (a transfer failure, not the client's error)."""


@dataclass(frozen=True)
class LeaseInfo:
    """What a prefill-only request's output says about the lease on its prompt's blocks."""

    lease_id: str
    block_hashes: tuple[BlockHash, ...]
    num_tokens: int
    ttl_s: float


@dataclass
class ImportPlan:
    """Blocks reserved for a prompt whose KV is partly local and partly fetched."""

    request_id: str
    prompt_token_ids: list[int]
    cache_salt: str | None
    block_hashes: list[BlockHash]  # of the prompt's full blocks, checked against the handle
    block_ids: list[int]  # one per prompt block, full blocks then the tail
    num_local_blocks: int  # leading blocks found in this worker's own prefix cache

    @property
    def fetch_indexes(self) -> list[int]:
        """Lease-relative indexes of the blocks to fetch (all but the local prefix)."""
        return list(range(self.num_local_blocks, len(self.block_ids)))

    @property
    def dst_block_ids(self) -> list[int]:
        return self.block_ids[self.num_local_blocks :]


class KVHandoff:
    """Lease-out and import-in of prompt KV for one engine (engine thread only)."""

    def __init__(self, pool: BlockPool, scheduler: Scheduler, leases: LeaseTable) -> None:
        self.pool = pool
        self.scheduler = scheduler
        self.leases = leases
        self.plans: dict[str, ImportPlan] = {}
        self.num_imported_blocks = 0

    # ---- prefill side ----------------------------------------------------------------------

    def lease_out(self, req: Request, blocks: list[int], ttl_s: float) -> LeaseInfo:
        """Put a finished prefill-only request's blocks (which it no longer holds) under a
        lease."""
        bs = self.pool.block_size
        n = req.num_prompt_tokens
        keep = -(-n // bs)
        # Blocks past the prompt (none today: a prefill-only request never computes its
        # sampled token) are not part of the handoff.
        self.pool.free(list(reversed(blocks[keep:])))
        hashes = tuple(req.full_block_hashes()[: n // bs])
        lease = self.leases.create(blocks[:keep], hashes, n, ttl_s)
        return LeaseInfo(lease.lease_id, hashes, n, ttl_s)

    def collect_leases(self) -> int:
        """Free the blocks of leases that ended; returns how many leases ended."""
        ended = self.leases.collect()
        if ended:  # most steps: none (this runs every step)
            self._free_leases(ended)
        return len(ended)

    def drop_all_leases(self) -> None:
        self._free_leases(self.leases.drain())

    def _free_leases(self, leases: list[Lease]) -> None:
        for lease in leases:
            self.pool.free(list(reversed(lease.block_ids)))

    # ---- decode side -----------------------------------------------------------------------

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        root: BlockHash,
        cache_salt: str | None,
        handle_hashes: tuple[BlockHash, ...],
        *,
        handle_is_own: bool = False,
    ) -> ImportPlan | None:
        """Reserve blocks for an import; None when the pool cannot hold the prompt now.
        :class:`HandleMismatch` when the handle does not describe this prompt for this model
        and tenant. ``handle_is_own``: the caller computed ``handle_hashes`` from this prompt
        and ``root`` with this module's own function (the simulator, whose router and workers
        are one process), so hashing the prompt again would only repeat it; a handle from the
        network is always checked."""
        if request_id in self.plans or request_id in self.scheduler.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        bs = self.pool.block_size
        n = len(prompt_token_ids)
        if handle_is_own:
            own = list(handle_hashes)
        else:
            own = hash_block_chain(root, prompt_token_ids, bs)
            if tuple(own) != tuple(handle_hashes):
                raise HandleMismatch(
                    "kv_transfer_params.block_hashes do not match this prompt on this worker "
                    "(different model, tokens or cache_salt)"
                )
        hit = self.pool.find_cached_prefix(own, prompt_token_ids)
        blocks = self.pool.acquire(hit, -(-n // bs) - len(hit))
        if blocks is None:
            return None
        plan = ImportPlan(request_id, list(prompt_token_ids), cache_salt, own, blocks, len(hit))
        self.plans[request_id] = plan
        return plan

    def commit(self, request_id: str, req: Request) -> None:
        """Hand the reserved blocks to ``req`` (prompt computed, first token sampled) and
        register the fetched full blocks in the prefix cache."""
        plan = self.plans.pop(request_id)
        bs = self.pool.block_size
        n = len(plan.prompt_token_ids)
        req.block_hashes = list(plan.block_hashes)  # already computed (and checked) by reserve
        hashes = req.full_block_hashes()
        local, full = plan.num_local_blocks, n // bs
        self.pool.cache_blocks(plan.block_ids[local:full], hashes[local:full],
                               plan.prompt_token_ids[local * bs : full * bs], hashes[local - 1] if local else None)
        self.num_imported_blocks += len(plan.block_ids) - plan.num_local_blocks
        self.scheduler.add_with_kv(req, plan.block_ids, n, plan.num_local_blocks * bs)

    def cancel(self, request_id: str) -> bool:
        plan = self.plans.pop(request_id, None)
        if plan is None:
            return False
        self.pool.free(list(reversed(plan.block_ids)))
        return True

    def block_refs(self) -> dict[int, int]:
        """Block -> references held by leases and pending imports (for integrity checks)."""
        refs = self.leases.block_refs()
        for plan in self.plans.values():
            for b in plan.block_ids:
                refs[b] = refs.get(b, 0) + 1
        return refs
