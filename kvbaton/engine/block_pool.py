"""BlockPool: paged KV blocks with reference counts and a hash-chain prefix cache.

A block is free (ref 0, no hash), in use (ref > 0), or evictable (ref 0 but still findable by
hash). Allocation takes free blocks first, then evicts evictable ones in the order of the
pool's eviction policy (``lru`` by default; see :mod:`kvbaton.kv.store.policies`), so cached
prefixes survive as long as memory allows. Blocks are registered by hash only after their KV
is written (``cache_blocks``).

Two hooks let the tiered KV store follow the pool without the pool knowing it exists:
``on_cached`` sees every block as it becomes findable (write-through offload) and
``on_evict`` sees evicted blocks while their KV is still intact, before their memory is
handed out again (write-back offload). Events carry the pool's ``medium`` (``CPU`` for a CPU
device, ``GPU`` for CUDA), as vLLM's do.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvbaton.kv.events import DEFAULT_MEDIUM, AllBlocksCleared, BlockRemoved, BlockStored, KVEventSink
from kvbaton.kv.hashing import BlockHash
from kvbaton.kv.store.policies import DEFAULT_POLICY, EvictionPolicy, make_policy


@dataclass(slots=True)  # a pool holds tens of thousands: slots keep them small and close
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None
    parent_hash: BlockHash | None = None  # the previous block's hash in its chain (events)


class NoFreeBlocksError(RuntimeError):
    """Raised by ``allocate`` when the pool cannot provide the requested blocks."""


class BlockPool:
    """Owns block bookkeeping (not the KV tensor itself)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        event_sink: KVEventSink | None = None,
        eviction_policy: str = DEFAULT_POLICY,
        medium: str = DEFAULT_MEDIUM,
    ) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.event_sink = event_sink
        self.medium = medium
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks without a hash: worthless, so always reused before a cached one.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        # Cached blocks nobody holds: findable, evicted in the policy's order.
        self._evictable: EvictionPolicy[int] = make_policy(eviction_policy)
        self._cached: dict[BlockHash, int] = {}
        self.on_cached: Callable[[Block], None] | None = None
        self.on_evict: Callable[[list[Block]], None] | None = None
        # Token counters for hit-rate metrics (queried vs found in cache).
        self.prefix_queries = 0
        self.prefix_hits = 0
        # The most blocks in use at once (the KV memory a workload needed; the planner's).
        self.peak_used_blocks = 0

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free or evictable)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def eviction_candidates(self, n: int) -> list[int]:
        """Up to ``n`` evictable blocks in the order they would likely be evicted (a hint:
        write-back offload copies these out ahead of need)."""
        return self._evictable.peek(n)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The block id holding ``block_hash``, or None."""
        return self._cached.get(block_hash)

    def find_cached_prefix(
        self, hashes: Sequence[BlockHash], token_ids: Sequence[int]
    ) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes``; does not take references.

        Each hit is also checked token for token against ``token_ids`` so that even a hash
        collision can never serve the wrong KV.
        """
        if not self.enable_caching:
            return []
        out: list[int] = []
        bs = self.block_size
        for i, h in enumerate(hashes):
            bid = self._cached.get(h)
            if bid is None:
                break
            if self.blocks[bid].token_ids != tuple(token_ids[i * bs : (i + 1) * bs]):
                break
            out.append(bid)
        return out

    # ---- reference counting ----------------------------------------------------------------

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks found by ``find_cached_prefix`` (a hit)."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_count == 0:
                if blk.block_hash is None:
                    del self._free[bid]
                else:
                    self._evictable.remove(bid)
            if blk.block_hash is not None:
                self._evictable.access(bid)
            blk.ref_count += 1
        self._note_peak()

    def _note_peak(self) -> None:
        used = self.num_used_blocks
        if used > self.peak_used_blocks:
            self.peak_used_blocks = used

    def acquire(self, hit: Sequence[int], num_new: int) -> list[int] | None:
        """Take references on the cached prefix ``hit`` (from ``find_cached_prefix``) and
        allocate ``num_new`` fresh blocks after it: ``hit + new``, or None (and nothing taken)
        when the pool cannot supply them. The one allocation rule of admission and import:
        cached blocks that sit evictable are about to be taken, so they do not count as free."""
        hit_evictable = sum(1 for b in hit if self.blocks[b].ref_count == 0)
        if num_new > self.num_free_blocks - hit_evictable:
            return None
        self.touch(hit)
        return list(hit) + self.allocate(num_new)

    def count_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Record one request's prefix lookup for the hit-rate counters (once per request)."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cached_hashes(self) -> set[BlockHash]:
        """Every hash the prefix cache can find now (for tests and snapshots)."""
        return set(self._cached)

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks with ref count 1: free ones first, then cached blocks evicted in
        the policy's order (``on_evict`` sees those before they are reused)."""
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {n} blocks, {self.num_free_blocks} free")
        out: list[int] = []
        while len(out) < n and self._free:
            out.append(self._free.popitem(last=False)[0])
        evicted: list[Block] = []
        while len(out) + len(evicted) < n:
            bid = self._evictable.evict()
            assert bid is not None  # num_free_blocks counted it
            evicted.append(self.blocks[bid])
        if evicted:
            if self.on_evict is not None:
                self.on_evict(evicted)  # their KV is intact until the caller writes them
            hashes = []
            for blk in evicted:
                assert blk.block_hash is not None
                hashes.append(blk.block_hash)
                del self._cached[blk.block_hash]
                self._evictable.forget(blk.block_id)
                blk.block_hash, blk.token_ids, blk.parent_hash = None, None, None
                out.append(blk.block_id)
            if self.event_sink:
                self.event_sink(BlockRemoved(hashes, medium=self.medium))
        for bid in out:
            self.blocks[bid].ref_count = 1
        self._note_peak()
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; callers pass a sequence's blocks tail first so
        the tail is evicted before the shared head."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_count <= 0:
                raise RuntimeError(f"double free of block {bid}")
            blk.ref_count -= 1
            if blk.ref_count == 0:
                if blk.block_hash is None:
                    self._free[bid] = None
                else:
                    self._evictable.insert(bid)

    def cache_block(
        self,
        block_id: int,
        block_hash: BlockHash,
        token_ids: Sequence[int],
        parent: BlockHash | None,
    ) -> None:
        """Register one block whose KV has been fully written (``cache_blocks`` of one)."""
        self.cache_blocks((block_id,), (block_hash,), token_ids, parent)

    def cache_blocks(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[BlockHash],
        token_ids: Sequence[int],
        parent: BlockHash | None,
    ) -> None:
        """Register consecutive blocks of one hash chain whose KV has been fully written:
        ``block_ids[i]`` holds ``block_hashes[i]`` and the tokens
        ``token_ids[i * block_size : (i + 1) * block_size]``; the first block's parent is
        ``parent``. A hash already owned by another block keeps its owner (this block then stays
        a private duplicate). One ``BlockStored`` per run of newly findable blocks, as vLLM
        emits one per request and step: a step's commit costs one event, not one per block."""
        if not self.enable_caching:
            return
        cached, blocks = self._cached, self.blocks
        first = 0  # where the current run of newly cached blocks starts
        run_parent = prev = parent
        for i, (bid, h) in enumerate(zip(block_ids, block_hashes)):
            if h in cached:
                self._stored(block_ids, block_hashes, token_ids, first, i, run_parent)
                first, run_parent = i + 1, h
            else:
                blk = blocks[bid]
                blk.block_hash, blk.parent_hash = h, prev
                blk.token_ids = tuple(token_ids[i * self.block_size : (i + 1) * self.block_size])
                cached[h] = bid
                if blk.ref_count == 0:  # registered while free (nothing does this today): evictable now
                    del self._free[bid]
                    self._evictable.insert(bid)
            prev = h
        self._stored(block_ids, block_hashes, token_ids, first, len(block_hashes), run_parent)

    def _stored(self, block_ids: Sequence[int], block_hashes: Sequence[BlockHash], token_ids: Sequence[int],
                start: int, end: int, parent: BlockHash | None) -> None:
        """Publish the run ``[start, end)`` of ``cache_blocks``'s blocks, newly cached (nothing
        when it is empty): one event, then ``on_cached`` per block."""
        if start >= end:
            return
        bs = self.block_size
        if self.event_sink:
            self.event_sink(BlockStored(list(block_hashes[start:end]), parent, list(token_ids[start * bs : end * bs]),
                                        bs, medium=self.medium))
        if self.on_cached is not None:
            for bid in block_ids[start:end]:
                self.on_cached(self.blocks[bid])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_used_blocks:
            return False
        for blk in self.blocks:
            if blk.block_hash is not None:
                self._evictable.forget(blk.block_id)
                self._free[blk.block_id] = None
            blk.block_hash, blk.token_ids, blk.parent_hash = None, None, None
        self._cached.clear()
        if self.event_sink:
            self.event_sink(AllBlocksCleared())
        return True

    def publish_snapshot(self) -> int:
        """Send the whole cache to the event sink: ``AllBlocksCleared``, then one
        ``BlockStored`` per cached block, each parent before its children. An index that lost
        events (and so only knows a subset) is exact again once it has applied these; events
        sent later describe changes from this state, because the engine thread is the only one
        that changes the pool and sends its events. Returns the number of blocks sent."""
        if not self.event_sink:
            return 0
        self.event_sink(AllBlocksCleared())
        children: dict[BlockHash | None, list[Block]] = {}
        for bid in self._cached.values():
            blk = self.blocks[bid]
            # A parent evicted before its child makes the child a root of what is left.
            parent = blk.parent_hash if blk.parent_hash in self._cached else None
            children.setdefault(parent, []).append(blk)
        todo, sent = list(children.get(None, ())), 0
        while todo:
            blk = todo.pop()
            assert blk.block_hash is not None and blk.token_ids is not None
            self.event_sink(BlockStored([blk.block_hash], blk.parent_hash, list(blk.token_ids),
                                        self.block_size, medium=self.medium))
            sent += 1
            todo.extend(children.get(blk.block_hash, ()))
        return sent

    # ---- invariants ------------------------------------------------------------------------

    def check_integrity(self, expected_refs: dict[int, int] | None = None) -> None:
        """Assert the pool's invariants; ``expected_refs`` (block -> refs held by live
        requests) also checks the ref counts against their owners. Raises AssertionError."""
        problems: list[str] = []
        for blk in self.blocks:
            in_free = blk.block_id in self._free
            in_evictable = blk.block_id in self._evictable
            if blk.ref_count < 0:
                problems.append(f"block {blk.block_id} ref {blk.ref_count}")
            if (blk.ref_count == 0) != (in_free or in_evictable):
                problems.append(f"block {blk.block_id} ref {blk.ref_count} but free={in_free} "
                                f"evictable={in_evictable}")
            if in_free and in_evictable:
                problems.append(f"block {blk.block_id} is both free and evictable")
            if in_evictable and blk.block_hash is None:
                problems.append(f"block {blk.block_id} is evictable without a hash")
            if blk.block_hash is not None and self._cached.get(blk.block_hash) != blk.block_id:
                problems.append(f"block {blk.block_id} hash not indexed to it")
            if expected_refs is not None and blk.ref_count != expected_refs.get(blk.block_id, 0):
                problems.append(
                    f"block {blk.block_id} ref {blk.ref_count}, owners hold "
                    f"{expected_refs.get(blk.block_id, 0)}"
                )
        for h, bid in self._cached.items():
            if self.blocks[bid].block_hash != h:
                problems.append(f"index entry for block {bid} is stale")
        if problems:
            raise AssertionError("block pool integrity: " + "; ".join(problems[:10]))
