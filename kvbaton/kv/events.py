"""KV cache events: what a block pool reports when blocks become findable or stop being so.

Field names follow vLLM's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` so a later
publisher can emit them on the wire unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

from kvbaton.kv.hashing import BlockHash


@dataclass(frozen=True)
class BlockStored:
    """Full blocks whose KV is written and that can now be found by hash."""

    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    medium: str = "device"


@dataclass(frozen=True)
class BlockRemoved:
    """Blocks evicted: their hashes no longer find anything."""

    block_hashes: list[BlockHash]
    medium: str = "device"


@dataclass(frozen=True)
class AllBlocksCleared:
    """The whole prefix cache was dropped (reset or restart)."""


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]
KVEventSink = Callable[[KVEvent], None]
