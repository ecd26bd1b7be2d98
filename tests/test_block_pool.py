"""BlockPool: ref counts, LRU eviction of cached blocks, events, integrity checks."""

from __future__ import annotations

import pytest

from kvbaton.engine.block_pool import BlockPool, NoFreeBlocksError
from kvbaton.kv.events import AllBlocksCleared, BlockRemoved, BlockStored
from kvbaton.kv.hashing import hash_block_chain, root_hash
from kvbaton.kv.index import KVIndex

ROOT = root_hash("test-model")


def _cache(pool: BlockPool, ids: list[int], tokens: list[int]) -> list[bytes]:
    hashes = hash_block_chain(ROOT, tokens, pool.block_size)
    for i, (bid, h) in enumerate(zip(ids, hashes)):
        bs = pool.block_size
        pool.cache_block(bid, h, tokens[i * bs : (i + 1) * bs], hashes[i - 1] if i else None)
    return hashes


def test_allocate_free_and_refcounts():
    pool = BlockPool(4, 4)
    a = pool.allocate(3)
    assert pool.num_free_blocks == 1 and pool.num_used_blocks == 3
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    pool.check_integrity({b: 1 for b in a})
    pool.free(a)
    assert pool.num_used_blocks == 0
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([a[0]])
    pool.check_integrity({})


def test_cached_prefix_found_shared_and_evicted_lru():
    events = []
    pool = BlockPool(4, 2, event_sink=events.append)
    toks = [1, 2, 3, 4, 5, 6]
    ids = pool.allocate(3)
    hashes = _cache(pool, ids, toks)
    assert [type(e) for e in events] == [BlockStored] * 3
    assert events[1].parent_block_hash == hashes[0]
    assert pool.find_cached_prefix(hashes, toks) == ids
    # A second owner shares the prefix.
    pool.touch(ids[:2])
    pool.check_integrity({ids[0]: 2, ids[1]: 2, ids[2]: 1})
    pool.free(list(reversed(ids)))
    pool.free(list(reversed(ids[:2])))
    # Freed but still findable until the memory is needed.
    assert pool.num_used_blocks == 0
    assert pool.find_cached_prefix(hashes, toks) == ids
    # Allocation takes the never-cached block first, then the tail of the chain first.
    first = pool.allocate(1)
    assert first[0] not in ids and not any(isinstance(e, BlockRemoved) for e in events)
    pool.allocate(1)
    assert isinstance(events[-1], BlockRemoved) and events[-1].block_hashes == [hashes[2]]
    assert pool.find_cached_prefix(hashes, toks) == ids[:2]
    pool.check_integrity()


def test_snapshot_rebuilds_an_index_that_lost_events():
    """publish_snapshot = AllBlocksCleared + every cached block, parents first: an index that
    holds stale entries and missed others matches the pool exactly after applying it."""
    events: list = []
    pool = BlockPool(8, 2, event_sink=events.append)
    a = [1, 2, 3, 4, 5, 6]
    b = [1, 2, 3, 4, 9, 9, 8, 8]  # shares a's first two blocks
    ids_a = pool.allocate(3)
    ha = _cache(pool, ids_a, a)
    ids_b = ids_a[:2] + pool.allocate(2)
    pool.touch(ids_a[:2])
    hb = _cache(pool, ids_b, b)
    pool.free(list(reversed(ids_a)))
    pool.free(list(reversed(ids_b)))
    pool.allocate(4)  # the 3 never-used blocks, then the LRU cached one: a's tail
    index = KVIndex()
    index.apply("w", 0, [BlockStored([b"stale" * 4], None, [0, 0], 2), BlockStored([hb[3]], hb[2], [8, 8], 2)])
    assert pool.num_cached_blocks == 4
    del events[:]
    assert pool.publish_snapshot() == 4
    assert isinstance(events[0], AllBlocksCleared)
    stored = events[1:]
    order = [e.block_hashes[0] for e in stored]
    assert sorted(order) == sorted([ha[0], ha[1], hb[2], hb[3]])
    for e in stored:  # each names its chain parent, which came before it
        assert e.parent_block_hash == ({ha[0]: None, ha[1]: ha[0], hb[2]: ha[1], hb[3]: hb[2]}[e.block_hashes[0]])
        if e.parent_block_hash is not None:
            assert order.index(e.parent_block_hash) < order.index(e.block_hashes[0])
    index.apply("w", 1, events)
    assert index.block_count("w") == 4 and not index.is_approximate("w")
    assert index.longest_prefix(hb) == {"w": 4} and index.longest_prefix(ha) == {"w": 2}
    assert index.longest_prefix([b"stale" * 4]) == {}
    assert BlockPool(2, 2).publish_snapshot() == 0  # no sink: nothing to send
    # A block whose parent was evicted first is still sent (as a root of what is left).
    orphan = b"o" * 16
    pool.cache_block(pool.allocate(1)[0], orphan, [7, 7], b"gone" * 4)
    del events[:]
    assert pool.publish_snapshot() == pool.num_cached_blocks and orphan in [e.block_hashes[0] for e in events[1:]]


def test_token_mismatch_is_never_a_hit():
    pool = BlockPool(2, 2)
    ids = pool.allocate(1)
    hashes = _cache(pool, ids, [7, 8])
    assert pool.find_cached_prefix(hashes, [7, 9]) == []


def test_reset_prefix_cache_only_when_idle():
    events = []
    pool = BlockPool(2, 2, event_sink=events.append)
    ids = pool.allocate(1)
    hashes = _cache(pool, ids, [1, 2])
    assert pool.reset_prefix_cache() is False
    pool.free(ids)
    assert pool.reset_prefix_cache() is True
    assert isinstance(events[-1], AllBlocksCleared)
    assert pool.find_cached_prefix(hashes, [1, 2]) == []


def test_integrity_check_detects_leak():
    pool = BlockPool(3, 2)
    pool.allocate(1)
    with pytest.raises(AssertionError, match="owners hold 0"):
        pool.check_integrity({})


def test_a_chain_cached_at_once_is_one_event_per_run_of_new_blocks():
    # A step's commit registers several blocks of one chain: one BlockStored per run of blocks
    # that became findable, and a block whose hash another block already owns splits the run
    # (it stays a private duplicate; the next run's parent is its hash).
    events: list = []
    pool = BlockPool(8, 2, event_sink=events.append)
    toks = [1, 2, 3, 4, 5, 6, 7, 8]
    hashes = hash_block_chain(ROOT, toks, 2)
    owner = pool.allocate(1)
    pool.cache_block(owner[0], hashes[1], toks[2:4], hashes[0])
    events.clear()
    ids = pool.allocate(4)
    pool.cache_blocks(ids, hashes, toks, None)
    assert [(type(e), e.block_hashes, e.parent_block_hash, e.token_ids) for e in events] == [
        (BlockStored, [hashes[0]], None, [1, 2]),
        (BlockStored, [hashes[2], hashes[3]], hashes[1], [5, 6, 7, 8]),
    ]
    assert [pool.lookup(h) for h in hashes] == [ids[0], owner[0], ids[2], ids[3]]
    assert pool.blocks[ids[2]].parent_hash == hashes[1] and pool.blocks[ids[3]].parent_hash == hashes[2]
    # The index a stream of such events builds is the pool's own view.
    index = KVIndex()
    index.apply("w", 0, events)
    assert index.longest_prefix(hashes[2:]) == {"w": 2}
    pool.check_integrity({b: 1 for b in owner + ids})
