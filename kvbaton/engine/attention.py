"""Attention backends: how one layer writes K/V into the paged cache and attends over it.

A backend is chosen by name from ``ATTENTION_BACKENDS``. The model only sees the per-layer
callable returned by :meth:`AttentionBackend.bind`, so model files stay backend-agnostic.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
class _DecodeGroup:
    token_idx: torch.Tensor  # rows of the flat batch, [G]
    block_table: torch.Tensor  # [G * max_blocks], padded with block 0
    mask: torch.Tensor | None  # [G, 1, 1, max_blocks * block_size]; None when no padding


@dataclass
class SDPAMetadata:
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    decode_groups: Sequence[_DecodeGroup | _KernelDecode]  # one kind per backend
    prefills: list[_Prefill]


class SDPABackend(AttentionBackend):
    """PyTorch ``scaled_dot_product_attention``; correct on CPU and CUDA.

    Single-token decodes are sorted by context length and attended in small groups over
    gathered blocks with a key mask: a group's gathered K/V (a few MiB) is still in cache when
    SDPA reads it, so decode attention costs about one pass over the KV from memory instead of
    three, and length-sorting keeps padding small. Prompt chunks run one call each, with a causal
    mask shifted to the end of the KV when part of the prompt was cached or computed in earlier
    chunks.
    """

    name = "sdpa"
    # Sequences per decode group on CPU: large enough to amortise per-call overhead, small
    # enough that the group's gathered K/V stays in the last-level cache.
    decode_group_size = 8

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
        return SDPAMetadata(
            slot_blocks=torch.tensor(slot_blocks, dtype=torch.long, device=device),
            slot_offsets=torch.tensor(slot_offsets, dtype=torch.long, device=device),
            decode_groups=self._decode_groups(decode_idx, decode_tables, decode_lens),
            prefills=prefills,
        )

    def _decode_groups(
        self, idx: list[int], tables: list[list[int]], lens: list[int]
    ) -> Sequence[_DecodeGroup | _KernelDecode]:
        device, bs = self.kv_cache.device, self.block_size
        order = sorted(range(len(idx)), key=lambda i: lens[i])
        group_size = self.decode_group_size if device.type == "cpu" else max(len(idx), 1)
        groups = []
        for g in range(0, len(order), group_size):
            members = order[g : g + group_size]
            max_blocks = max(len(tables[i]) for i in members)
            flat = [b for i in members for b in tables[i] + [0] * (max_blocks - len(tables[i]))]
            mask = None
            if any(lens[i] != max_blocks * bs for i in members):
                glens = torch.tensor([lens[i] for i in members], device=device)
                k_pos = torch.arange(max_blocks * bs, device=device)
                mask = (k_pos.unsqueeze(0) < glens.unsqueeze(1))[:, None, None, :]
            groups.append(
                _DecodeGroup(
                    torch.tensor([idx[i] for i in members], dtype=torch.long, device=device),
                    torch.tensor(flat, dtype=torch.long, device=device),
                    mask,
                )
            )
        return groups

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: SDPAMetadata
    ) -> torch.Tensor:
        k_cache = self.kv_cache[:, layer, 0]  # [num_blocks, block_size, kv_heads, D], strided view
        v_cache = self.kv_cache[:, layer, 1]
        self._write_kv(layer, k, v, meta)
        out = q.new_empty(q.shape)  # dense, even when q is a view of the fused projection
        self._decode(layer, q, out, meta)
        # Per-layer views with one row per block: [num_blocks, block_size * kv_heads * D].
        k_rows, v_rows = k_cache.flatten(1), v_cache.flatten(1)
        kv_shape = k.shape[1:]
        for p in meta.prefills:
            sl = slice(p.token_start, p.token_start + p.num_new)
            qs = q[sl].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
            if p.block_table is None:
                ks, vs = k[sl], v[sl]
            else:
                ks = k_rows.index_select(0, p.block_table).view(-1, *kv_shape)[: p.context_len]
                vs = v_rows.index_select(0, p.block_table).view(-1, *kv_shape)[: p.context_len]
            ks = ks.transpose(0, 1).unsqueeze(0)
            vs = vs.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True
            )
            out[sl] = o[0].transpose(0, 1)
        return out

    def _write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: SDPAMetadata) -> None:
        self.kv_cache[:, layer, 0][meta.slot_blocks, meta.slot_offsets] = k
        self.kv_cache[:, layer, 1][meta.slot_blocks, meta.slot_offsets] = v

    def _decode(self, layer: int, q: torch.Tensor, out: torch.Tensor, meta: SDPAMetadata) -> None:
        k_rows = self.kv_cache[:, layer, 0].flatten(1)
        v_rows = self.kv_cache[:, layer, 1].flatten(1)
        kv_shape = self.kv_cache.shape[-2:]
        for g in meta.decode_groups:
            assert isinstance(g, _DecodeGroup)  # built by this class's _decode_groups
            n = g.token_idx.shape[0]
            keys = k_rows.index_select(0, g.block_table).view(n, -1, *kv_shape).transpose(1, 2)
            vals = v_rows.index_select(0, g.block_table).view(n, -1, *kv_shape).transpose(1, 2)
            qd = q.index_select(0, g.token_idx).unsqueeze(2)  # [G, H, 1, D]
            o = F.scaled_dot_product_attention(qd, keys, vals, attn_mask=g.mask, enable_gqa=True)
            out[g.token_idx] = o.squeeze(2)


@dataclass
class _KernelDecode:
    token_idx: torch.Tensor  # [B]
    tables: torch.Tensor  # [B, max_blocks] int64
    ctx_lens: torch.Tensor  # [B] int64


class CPUPagedBackend(SDPABackend):
    """SDPA for prompts, and a C kernel (``kvbaton.engine.cpu_kernel``) for single-token
    decodes that reads each K/V row once from the block-first cache without a gather.

    A float32 or bfloat16 cache on CPU only; ``create_attention_backend("auto", ...)`` picks it
    there when the kernel builds, and SDPA otherwise. The kernel reads the queries and writes
    the outputs in place in the flat batch and the new K/V rows are stored by one C call, so a
    decode costs no tensor op around the kernel.
    """

    name = "cpu_paged"

    def __init__(self, kv_cache: torch.Tensor, block_size: int) -> None:
        super().__init__(kv_cache, block_size)
        from kvbaton.engine import cpu_kernel

        lib = cpu_kernel.load()
        if lib is None:
            raise RuntimeError("the CPU decode kernel could not be built")
        self.kernel = cpu_kernel.PagedDecodeKernel(lib, kv_cache)

    def _decode_groups(
        self, idx: list[int], tables: list[list[int]], lens: list[int]
    ) -> Sequence[_KernelDecode]:
        if not idx:
            return []
        max_blocks = max(len(t) for t in tables)
        flat = [t + [0] * (max_blocks - len(t)) for t in tables]
        return [_KernelDecode(torch.tensor(idx, dtype=torch.long), torch.tensor(flat, dtype=torch.long),
                              torch.tensor(lens, dtype=torch.long))]

    def _decode(self, layer: int, q: torch.Tensor, out: torch.Tensor, meta: SDPAMetadata) -> None:
        for d in meta.decode_groups:
            assert isinstance(d, _KernelDecode)  # built by this class's _decode_groups
            self.kernel(layer, q, out, d.token_idx, d.tables, d.ctx_lens)

    def _write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, meta: SDPAMetadata) -> None:
        self.kernel.write(layer, k, v, meta.slot_blocks, meta.slot_offsets)


ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    SDPABackend.name: SDPABackend,
    CPUPagedBackend.name: CPUPagedBackend,
}


def create_attention_backend(name: str, kv_cache: torch.Tensor, block_size: int) -> AttentionBackend:
    """Build the backend called ``name``; ``auto`` picks ``cpu_paged`` for a float32 or bfloat16
    cache on CPU when its kernel builds, else ``sdpa``. ValueError lists the choices for an
    unknown name."""
    if name == "auto":
        from kvbaton.engine.cpu_kernel import KERNEL_DTYPES

        if kv_cache.device.type == "cpu" and kv_cache.dtype in KERNEL_DTYPES:
            try:
                return CPUPagedBackend(kv_cache, block_size)
            except RuntimeError:
                pass
        return SDPABackend(kv_cache, block_size)
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose auto or one of {sorted(ATTENTION_BACKENDS)}"
        )
    return ATTENTION_BACKENDS[name](kv_cache, block_size)
