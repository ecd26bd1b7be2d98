"""vLLM's KV events, read in both of its encodings and re-keyed into kvbaton's hash chain.

A `vllm serve` process started with ``--kv-events-config`` publishes its prefix cache's events
on the same ZMQ wire as kvbaton's workers (``[topic, seq, payload]``, replay by start seq;
``kvbaton.kv.event_stream``), but the payload differs in two ways this module absorbs:

- **Encoding.** The batch is ``[ts, [event, ...], dp_rank]`` as ours, but each event is either
  a msgpack *map* tagged by a ``"type"`` key (vLLM's current encoding, e.g. 0.26 and 0.32:
  ``{"type": "BlockStored", "block_hashes": [...], ..., "extra_keys": [...],
  "group_idx": 0, "kv_cache_spec_kind": "full_attention"}``, defaults omitted) or a positional
  *array* tagged by class name (the older encoding, ours too:
  ``["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium, lora_name, ...]``,
  trailing fields absent when they hold their default). :func:`decode_vllm_batch` reads both.
- **Block identity.** vLLM's hashes are its own: 64-bit ints by default
  (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``) or the raw hash bytes, computed with a
  ``NONE_HASH`` seed that is random per process unless ``PYTHONHASHSEED`` is set. A router
  cannot recompute them from token ids, so instead :class:`VLLMBlockKeys` maps each of a
  worker's hashes to kvbaton's: a stored block's key is ``block_hash(parent's key, its
  tokens)`` (the tokens come in the event; vLLM always sends them), starting from
  ``root_hash(fingerprint, cache_salt)`` where the event's ``extra_keys`` carry the salt of a
  chain's first block. The translated events are exactly what the router computes for a
  prompt, so the index, ``kv_aware`` and conditional disaggregation treat a vLLM worker like
  ours, whatever hash function or seed it runs with.

What cannot be keyed is left out (the index then holds a subset of the worker's cache: only
hits are lost, never a false one): blocks of a LoRA adapter (kvbaton's router has none),
blocks with multimodal or prompt-embedding extra keys, blocks of another KV cache group than
the first full-attention one (hybrid models), and blocks whose parent the map never saw (a
store published before the stream was followed). Each is counted in ``skipped``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from kvbaton.kv.event_stream import KVEventBatch
from kvbaton.kv.events import DEFAULT_MEDIUM, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbaton.kv.hashing import BlockHash, block_hash, root_hash

log = logging.getLogger(__name__)

VLLMHash = int | bytes
# Positional fields of the older array encoding, after the tag.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind")
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
# The group kinds whose blocks are the prefix cache a dense model's router indexes.
_FULL_ATTENTION_KINDS = (None, "full_attention", "FullAttentionSpec")
# Keys kept after their blocks are evicted (a child stored later still finds its parent), at
# most this many; beyond it the oldest half goes.
MAX_KEYS = 1 << 20


@dataclass(frozen=True)
class VLLMStored:
    """vLLM's ``BlockStored``: ``len(block_hashes)`` consecutive full blocks of one chain."""

    block_hashes: list[VLLMHash]
    parent_block_hash: VLLMHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None  # one entry (a tuple, or None) per block
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


@dataclass(frozen=True)
class VLLMRemoved:
    """vLLM's ``BlockRemoved``."""

    block_hashes: list[VLLMHash]
    medium: str | None = None
    group_idx: int | None = None


@dataclass(frozen=True)
class VLLMCleared:
    """vLLM's ``AllBlocksCleared`` (a prefix-cache reset)."""


VLLMEvent = VLLMStored | VLLMRemoved | VLLMCleared


@dataclass(frozen=True)
class VLLMEventBatch:
    """One decoded batch of a vLLM publisher."""

    ts: float
    events: list[VLLMEvent]
    data_parallel_rank: int | None = None


def decode_vllm_batch(payload: bytes) -> VLLMEventBatch:
    """Decode a vLLM publisher's payload (either encoding). Raises ``msgspec.DecodeError``
    (a ``ValueError``) on anything that is not a well-formed batch."""
    raw = msgspec.msgpack.decode(payload)
    if not isinstance(raw, list) or len(raw) < 2 or not isinstance(raw[1], list):
        raise msgspec.DecodeError("a KV event batch is [ts, [events], dp_rank]")
    ts, events = raw[0], raw[1]
    if not isinstance(ts, (int, float)):
        raise msgspec.DecodeError(f"batch ts: expected a number, got {type(ts).__name__}")
    rank = raw[2] if len(raw) > 2 and isinstance(raw[2], int) else None
    return VLLMEventBatch(float(ts), [_event(e) for e in events], rank)


def _event(raw: Any) -> VLLMEvent:
    if isinstance(raw, dict):  # current encoding: a map tagged by "type"
        tag, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):  # older: [tag, field, ...]
        tag = raw[0]
        names = _STORED_FIELDS if tag == "BlockStored" else _REMOVED_FIELDS if tag == "BlockRemoved" else ()
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise msgspec.DecodeError(f"not a KV event: {raw!r:.80}")
    try:
        if tag == "BlockStored":
            return VLLMStored(
                _hashes(fields["block_hashes"]), _hash_or_none(fields.get("parent_block_hash")),
                _ints(fields["token_ids"]), int(fields["block_size"]), fields.get("lora_id"),
                fields.get("medium"), fields.get("lora_name"), fields.get("extra_keys"),
                fields.get("group_idx"), fields.get("kv_cache_spec_kind"))
        if tag == "BlockRemoved":
            return VLLMRemoved(_hashes(fields["block_hashes"]), fields.get("medium"), fields.get("group_idx"))
        if tag == "AllBlocksCleared":
            return VLLMCleared()
    except (KeyError, TypeError, ValueError) as e:
        raise msgspec.DecodeError(f"malformed {tag}: {type(e).__name__}: {e}") from None
    raise msgspec.DecodeError(f"unknown KV event type {tag!r}")


def _hashes(raw: Any) -> list[VLLMHash]:
    if not isinstance(raw, list) or not all(isinstance(h, (int, bytes)) for h in raw):
        raise TypeError("block_hashes: expected a list of ints or bytes")
    return raw


def _hash_or_none(raw: Any) -> VLLMHash | None:
    if raw is not None and not isinstance(raw, (int, bytes)):
        raise TypeError("parent_block_hash: expected an int, bytes or null")
    return raw


def _ints(raw: Any) -> list[int]:
    if not isinstance(raw, list) or not all(isinstance(t, int) for t in raw):
        raise TypeError("token_ids: expected a list of ints")
    return raw


@dataclass
class VLLMBlockKeys:
    """One vLLM worker's map from its block hashes to kvbaton's, and the translation of its
    batches into kvbaton events (see the module docstring).

    ``fingerprint`` and ``block_size`` are the router's: the root it hashes prompts from and
    its block size (a store of another block size is skipped, and counted, since its blocks
    could never match a prompt's). Not thread-safe: one subscriber thread calls ``translate``.
    """

    fingerprint: str
    block_size: int
    skipped: dict[str, int] = field(default_factory=dict)
    _keys: dict[VLLMHash, BlockHash] = field(default_factory=dict)
    _roots: dict[str | None, BlockHash] = field(default_factory=dict)

    def translate(self, seq: int, batch: VLLMEventBatch) -> KVEventBatch:
        """kvbaton's events for vLLM's batch ``seq``. Seq 0 is a publisher's first batch: its
        cache was empty when it started, so the translation opens with ``AllBlocksCleared``
        (vLLM sends none), which makes an index that applies the stream from 0 exact."""
        out: list[KVEvent] = []
        if seq == 0:
            self._keys.clear()  # a restarted vLLM may hash with a new seed
            out.append(AllBlocksCleared())
        for ev in batch.events:
            if isinstance(ev, VLLMStored):
                stored = self._store(ev)
                if stored is not None:
                    out.append(stored)
            elif isinstance(ev, VLLMRemoved):
                if ev.group_idx not in (None, 0):
                    continue
                keys = [k for h in ev.block_hashes if (k := self._keys.get(h)) is not None]
                if keys:
                    out.append(BlockRemoved(keys, _medium(ev.medium)))
            else:
                out.append(AllBlocksCleared())
        if len(self._keys) > MAX_KEYS:
            for h in list(self._keys)[: MAX_KEYS // 2]:
                del self._keys[h]
        return KVEventBatch(batch.ts, out, batch.data_parallel_rank)

    def _skip(self, reason: str, blocks: int) -> None:
        if reason not in self.skipped:
            log.info("vLLM KV events: blocks left out of the index (%s)", reason)
        self.skipped[reason] = self.skipped.get(reason, 0) + blocks

    def _store(self, ev: VLLMStored) -> BlockStored | None:
        n = len(ev.block_hashes)
        if ev.group_idx not in (None, 0) or ev.kv_cache_spec_kind not in _FULL_ATTENTION_KINDS:
            self._skip("another KV cache group", n)
            return None
        if ev.lora_id is not None or ev.lora_name is not None:
            self._skip("LoRA adapter", n)
            return None
        if ev.block_size != self.block_size:
            self._skip(f"block size {ev.block_size}, the router's is {self.block_size}", n)
            return None
        if len(ev.token_ids) != n * ev.block_size:
            self._skip("token_ids do not cover the blocks", n)
            return None
        extra = ev.extra_keys or []
        first_parent: BlockHash | None = None  # the event's parent, in kvbaton's keys
        if ev.parent_block_hash is None:
            keyable, salt = _salt(extra[0] if extra else None)
            if not keyable:
                self._skip("multimodal or embedding extra keys", n)
                return None
            parent = self._root(salt)
        else:
            first_parent = self._keys.get(ev.parent_block_hash)
            if first_parent is None:
                self._skip("parent block never seen", n)
                return None
            parent = first_parent
        keys: list[BlockHash] = []
        bs = ev.block_size
        for i, vh in enumerate(ev.block_hashes):
            # A chain's later blocks carry extra keys only for multimodal or embedded inputs.
            if i < len(extra) and extra[i] is not None and not (i == 0 and ev.parent_block_hash is None):
                self._skip("multimodal or embedding extra keys", n - i)
                break
            parent = block_hash(parent, ev.token_ids[i * bs:(i + 1) * bs])
            # Re-inserted, so that the oldest-first pruning never drops a block just stored.
            self._keys.pop(vh, None)
            self._keys[vh] = parent
            keys.append(parent)
        if not keys:
            return None
        return BlockStored(keys, first_parent, [], bs, None, _medium(ev.medium))

    def _root(self, salt: str | None) -> BlockHash:
        root = self._roots.get(salt)
        if root is None:
            root = self._roots[salt] = root_hash(self.fingerprint, salt)
        return root

    def key_of(self, vllm_hash: VLLMHash) -> BlockHash | None:
        """kvbaton's key of one of the worker's block hashes (None: not mapped)."""
        return self._keys.get(vllm_hash)


def _salt(extra: Sequence[Any] | None) -> tuple[bool, str | None]:
    """``(True, cache salt)`` from a chain's first block's extra keys (None: unsalted), or
    ``(False, None)`` when they hold something else (multimodal identifiers, embedding
    digests), which kvbaton's chain cannot express."""
    if not extra:
        return True, None
    if len(extra) == 1 and isinstance(extra[0], str):
        return True, extra[0]
    return False, None


def _medium(medium: str | None) -> str:
    return DEFAULT_MEDIUM if medium is None else medium
