"""Attention backends: how one layer writes K/V into the paged cache and attends over it.

A backend is chosen by name from ``ATTENTION_BACKENDS``. The model only sees the per-layer
callable returned by :meth:`AttentionBackend.bind`, so model files stay backend-agnostic.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSlice:
    """The part of one sequence computed in this step.

    Tokens ``[start, start + num_new)`` are computed; keys ``[0, start + num_new)`` are
    visible, so attention is causal and aligned to the end of the KV.
    """

    block_ids: Sequence[int]
    start: int
    num_new: int

    @property
    def context_len(self) -> int:
        return self.start + self.num_new


class AttentionBackend(abc.ABC):
    """Pluggable attention over a block-first paged KV cache.

    The cache tensor is ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``
    (see ``kvbaton.kv.spec.KVSpec``); a backend may not assume any other layout.
    """

    name: str = ""

    def __init__(self, kv_cache: torch.Tensor, block_size: int) -> None:
        self.kv_cache = kv_cache
        self.block_size = block_size

    @abc.abstractmethod
    def prepare(self, seqs: Sequence[SeqSlice]) -> Any:
        """Build this step's metadata for ``seqs``, whose tokens are laid out one sequence
        after another in the flat batch, in this order."""

    @abc.abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        """Write ``k``/``v`` (``[T, kv_heads, D]``) into the cache for ``layer``, then return
        attention of ``q`` (``[T, heads, D]``) over each sequence's visible keys."""

    def bind(self, meta: Any) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The per-layer callable handed to the model for one forward pass."""
        return lambda layer, q, k, v: self.forward(layer, q, k, v, meta)


@dataclass
class _Prefill:
    token_start: int
    num_new: int
    context_len: int
    block_table: torch.Tensor | None  # None when the KV is all computed in this step
    mask: torch.Tensor | None  # None when plain causal


@dataclass
class SDPAMetadata:
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    decode_idx: torch.Tensor | None
    decode_tables: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[_Prefill]


class SDPABackend(AttentionBackend):
    """PyTorch ``scaled_dot_product_attention``; correct on CPU and CUDA.

    Single-token decodes are batched into one call over gathered, padded blocks with a key
    mask; prompt chunks run one call each, with a causal mask shifted to the end of the KV when
    part of the prompt was cached or computed in earlier chunks.
    """

    name = "sdpa"

    def prepare(self, seqs: Sequence[SeqSlice]) -> SDPAMetadata:
        device = self.kv_cache.device
        bs = self.block_size
        slot_blocks: list[int] = []
        slot_offsets: list[int] = []
        decode_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[_Prefill] = []
        t = 0
        for s in seqs:
            for p in range(s.start, s.context_len):
                slot_blocks.append(s.block_ids[p // bs])
                slot_offsets.append(p % bs)
            nblk = -(-s.context_len // bs)
            if s.num_new == 1:
                decode_idx.append(t)
                decode_tables.append(list(s.block_ids[:nblk]))
                decode_lens.append(s.context_len)
            elif s.start == 0:
                prefills.append(_Prefill(t, s.num_new, s.context_len, None, None))
            else:
                table = torch.tensor(s.block_ids[:nblk], dtype=torch.long, device=device)
                q_pos = torch.arange(s.start, s.context_len, device=device).unsqueeze(1)
                k_pos = torch.arange(s.context_len, device=device).unsqueeze(0)
                prefills.append(_Prefill(t, s.num_new, s.context_len, table, k_pos <= q_pos))
            t += s.num_new
        meta = SDPAMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=device),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
            decode_idx=None,
            decode_tables=None,
            decode_mask=None,
            prefills=prefills,
        )
        if decode_idx:
            max_blocks = max(len(tb) for tb in decode_tables)
            padded = [tb + [0] * (max_blocks - len(tb)) for tb in decode_tables]
            meta.decode_idx = torch.tensor(decode_idx, dtype=torch.long, device=device)
            meta.decode_tables = torch.tensor(padded, dtype=torch.long, device=device)
            lens = torch.tensor(decode_lens, device=device)
            k_pos = torch.arange(max_blocks * bs, device=device)
            meta.decode_mask = (k_pos.unsqueeze(0) < lens.unsqueeze(1))[:, None, None, :]
        return meta

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: SDPAMetadata
    ) -> torch.Tensor:
        k_cache = self.kv_cache[:, layer, 0]  # [num_blocks, block_size, kv_heads, D], strided view
        v_cache = self.kv_cache[:, layer, 1]
        k_cache[meta.slot_blocks, meta.slot_offsets] = k
        v_cache[meta.slot_blocks, meta.slot_offsets] = v
        out = torch.empty_like(q)
        if meta.decode_idx is not None:
            b = meta.decode_idx.shape[0]
            keys = k_cache[meta.decode_tables].view(b, -1, *k.shape[1:]).transpose(1, 2)
            vals = v_cache[meta.decode_tables].view(b, -1, *v.shape[1:]).transpose(1, 2)
            qd = q[meta.decode_idx].unsqueeze(2)  # [B, H, 1, D]
            o = F.scaled_dot_product_attention(
                qd, keys, vals, attn_mask=meta.decode_mask, enable_gqa=True
            )
            out[meta.decode_idx] = o.squeeze(2)
        for p in meta.prefills:
            sl = slice(p.token_start, p.token_start + p.num_new)
            qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if p.block_table is None:
                ks, vs = k[sl], v[sl]
            else:
                ks = k_cache[p.block_table].flatten(0, 1)[: p.context_len]
                vs = v_cache[p.block_table].flatten(0, 1)[: p.context_len]
            ks = ks.transpose(0, 1).unsqueeze(0)
            vs = vs.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True
            )
            out[sl] = o[0].transpose(0, 1)
        return out


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {SDPABackend.name: SDPABackend}


def get_attention_backend(name: str) -> type[AttentionBackend]:
    """Look up a backend class by name; ValueError lists the choices."""
    try:
        return ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of {sorted(ATTENTION_BACKENDS)}"
        ) from None
