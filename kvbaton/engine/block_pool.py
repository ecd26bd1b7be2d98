"""BlockPool: paged KV blocks with reference counts and a hash-chain prefix cache.

A block is free (ref 0, no hash), in use (ref > 0), or evictable (ref 0 but still findable by
hash). Free and evictable blocks share one LRU queue: allocation takes the least recently
freed block and evicts its hash if it had one, so cached prefixes survive as long as memory
allows. Blocks are registered by hash only after their KV is written (``cache_block``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from kvbaton.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventSink
from kvbaton.kv.hashing import BlockHash


@dataclass
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
    ) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.event_sink = event_sink
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        # Token counters for hit-rate metrics (queried vs found in cache).
        self.prefix_queries = 0
        self.prefix_hits = 0

    # ---- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now (free or evictable)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

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
        """Take a reference on cached blocks found by ``find_cached_prefix``."""
        for bid in block_ids:
            blk = self.blocks[bid]
            if blk.ref_count == 0:
                del self._free[bid]
            blk.ref_count += 1

    def acquire(self, hit: Sequence[int], num_new: int) -> list[int] | None:
        """Take references on the cached prefix ``hit`` (from ``find_cached_prefix``) and
        allocate ``num_new`` fresh blocks after it: ``hit + new``, or None (and nothing taken)
        when the pool cannot supply them. The one allocation rule of admission and import:
        cached blocks that sit evictable on the free queue are about to be taken, so they do
        not count as free."""
        hit_evictable = sum(1 for b in hit if self.blocks[b].ref_count == 0)
        if num_new > len(self._free) - hit_evictable:
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
        """``n`` fresh blocks with ref count 1, evicting least-recently-used cached blocks."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"need {n} blocks, {len(self._free)} free")
        out: list[int] = []
        evicted: list[BlockHash] = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            blk = self.blocks[bid]
            if blk.block_hash is not None:
                evicted.append(blk.block_hash)
                del self._cached[blk.block_hash]
                blk.block_hash, blk.token_ids, blk.parent_hash = None, None, None
            blk.ref_count = 1
            out.append(bid)
        if evicted and self.event_sink:
            self.event_sink(BlockRemoved(evicted))
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
                    # Uncached blocks are worthless: reuse them before evicting cached ones.
                    self._free[bid] = None
                    self._free.move_to_end(bid, last=False)
                else:
                    self._free[bid] = None

    def cache_block(
        self,
        block_id: int,
        block_hash: BlockHash,
        token_ids: Sequence[int],
        parent: BlockHash | None,
    ) -> None:
        """Register a block whose KV has been fully written. A hash already owned by another
        block keeps its owner (this block then stays a private duplicate)."""
        if not self.enable_caching or block_hash in self._cached:
            return
        blk = self.blocks[block_id]
        blk.block_hash, blk.token_ids, blk.parent_hash = block_hash, tuple(token_ids), parent
        self._cached[block_hash] = block_id
        if self.event_sink:
            self.event_sink(BlockStored([block_hash], parent, list(token_ids), self.block_size))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_used_blocks:
            return False
        for blk in self.blocks:
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
                                        self.block_size))
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
            if blk.ref_count < 0:
                problems.append(f"block {blk.block_id} ref {blk.ref_count}")
            if (blk.ref_count == 0) != in_free:
                problems.append(f"block {blk.block_id} ref {blk.ref_count} but in_free={in_free}")
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
