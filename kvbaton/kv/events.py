"""KV cache events: what a block pool reports when blocks become findable or stop being so.

The classes are msgspec Structs in vLLM's wire shape (``array_like``, tagged by class name,
fields in vLLM's order), so the engine's events are encoded as they are, with no copy, and a
subscriber written for vLLM reads them: ``BlockStored`` is
``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium]``.
Defaults are always written (no ``omit_defaults``) because vLLM's decoder requires every field.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from kvbaton.kv.hashing import BlockHash

DEFAULT_MEDIUM = "device"
# Blocks a worker put in the shared remote tier (kvbaton.kv.store.remote): reachable by every
# worker of the cluster, not only the one that published the event.
REMOTE_MEDIUM = "REMOTE"


class KVCacheEvent(msgspec.Struct, array_like=True, tag=True, frozen=True, gc=False):
    """Base of the three events; the tag (first array element) is the class name.

    msgspec passes ``frozen`` on to subclasses by itself; the subclasses repeat it so that type
    checkers, which read each class's keywords, see them as frozen too."""


class BlockStored(KVCacheEvent, frozen=True):
    """Full blocks whose KV is written and that can now be found by hash."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None  # vLLM's field; kvbaton folds adapters into the hash chain
    medium: str | None = DEFAULT_MEDIUM


class BlockRemoved(KVCacheEvent, frozen=True):
    """Blocks evicted: their hashes no longer find anything."""

    block_hashes: list[BlockHash]
    medium: str | None = DEFAULT_MEDIUM


class AllBlocksCleared(KVCacheEvent, frozen=True):
    """The whole prefix cache was dropped (reset or restart)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
KVEventSink = Callable[[KVEvent], None]
