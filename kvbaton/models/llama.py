"""The Llama family (Llama 2/3, Mistral, SmolLM/SmolLM2, Qwen2, Qwen3) in one module.

The model works on a flat batch of tokens (no padding): ``input_ids`` and ``positions`` are
``[num_tokens]`` and attention is delegated to an :class:`AttentionLayerFn` supplied per
forward call, so the model never knows how the KV cache is laid out or which backend runs.
Parameter names follow Hugging Face's (``model.layers.N.self_attn.q_proj.weight`` ...) at load
time; q/k/v and gate/up are fused into one matmul each because on a CPU one larger GEMM beats
several small ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from kvbaton.models import fused_ops
from kvbaton.models.config import ModelConfig


class AttentionLayerFn(Protocol):
    """What the model calls for attention: store k/v for this layer, return attention output.

    ``q`` is ``[T, num_heads, head_dim]``; ``k`` and ``v`` are ``[T, num_kv_heads, head_dim]``,
    already rotated. Returns ``[T, num_heads, head_dim]``.
    """

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face does, so bf16 runs stay close to fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies, including Llama-3 scaling (matches transformers exactly)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (
        cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim)
    )
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq
    factor = rs["factor"]
    low_ff, high_ff = rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (values identical to HF's)."""

    cos: torch.Tensor  # buffers (register_buffer below); declared for type checkers
    sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(cfg)
        t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Self-attention with fused QKV; the KV cache and the kernel live in the backend."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        rotary: RotaryEmbedding,
        attn_fn: AttentionLayerFn,
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        out = attn_fn(self.layer, q, k, v)
        return self.o_proj(out.reshape(t, self.q_size))

    def forward_fused(
        self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, attn_fn: AttentionLayerFn
    ) -> torch.Tensor:
        """:meth:`forward` with RoPE applied in place by one C call (``fused_ops``) to the q and
        k heads, which are adjacent in the fused projection's output."""
        if self.q_norm is not None:  # q/k are normed copies, not views of the projection
            return self.forward(positions, x, rotary, attn_fn)
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        fused_ops.rope_(qkv, self.num_heads + self.num_kv_heads, self.head_dim, positions, rotary.cos, rotary.sin)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        out = attn_fn(self.layer, q.view(t, self.num_heads, self.head_dim),
                      k.view(t, self.num_kv_heads, self.head_dim), v.view(t, self.num_kv_heads, self.head_dim))
        return self.o_proj(out.reshape(t, self.q_size))


class MLP(nn.Module):
    """SwiGLU feed-forward with gate and up fused into one matmul."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        rotary: RotaryEmbedding,
        attn_fn: AttentionLayerFn,
    ) -> torch.Tensor:
        x = x + self.self_attn(positions, self.input_layernorm(x), rotary, attn_fn)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """A Llama-family decoder working on flat token batches."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the LM head with the embeddings when the config says so (re-run after
        ``to_empty``, which materialises each module's parameters separately)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attn_fn: AttentionLayerFn
    ) -> torch.Tensor:
        """Hidden states after the final norm, ``[T, hidden]``."""
        x = self.embed_tokens(input_ids)
        if fused_ops.available(x):
            return self._forward_fused(x, positions.contiguous(), attn_fn)
        for layer in self.layers:
            x = layer(positions, x, self.rotary, attn_fn)
        return self.norm(x)

    def _forward_fused(self, x: torch.Tensor, positions: torch.Tensor, attn_fn: AttentionLayerFn) -> torch.Tensor:
        """The same computation as the layer loop in :meth:`forward`, with each norm (and the
        residual add before it), each RoPE and each SwiGLU one C call (``fused_ops``): on a CPU
        these small ops cost more in dispatch than in arithmetic. ``x`` holds the residual
        stream, updated in place; each norm's weight is the next one's in the loop order."""
        eps = self.config.rms_norm_eps
        layers = cast(list[DecoderLayer], list(self.layers))
        norms = [w for layer in layers
                 for w in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        norms.append(self.norm.weight)
        h = fused_ops.rms_norm(x, norms[0], eps)
        for i, layer in enumerate(layers):
            a = layer.self_attn.forward_fused(positions, h, self.rotary, attn_fn)
            h = fused_ops.rms_norm(a, norms[2 * i + 1], eps, residual=x)
            mlp = layer.mlp
            m = mlp.down_proj(fused_ops.silu_mul(mlp.gate_up_proj(h)))
            h = fused_ops.rms_norm(m, norms[2 * i + 2], eps, residual=x)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in float32 for the rows that will be sampled."""
        return self.lm_head(hidden).float()

    # ---- weight loading -------------------------------------------------------------------

    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load tensors named as in Hugging Face checkpoints, fusing q/k/v and gate/up.

        Raises ValueError naming any tensor that is missing or unexpected, so a wrong
        checkpoint fails at load instead of producing garbage.
        """
        cfg = self.config
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        shard_offsets = {
            "q_proj": ("qkv_proj", 0, q_size),
            "k_proj": ("qkv_proj", q_size, kv_size),
            "v_proj": ("qkv_proj", q_size + kv_size, kv_size),
            "gate_proj": ("gate_up_proj", 0, cfg.intermediate_size),
            "up_proj": ("gate_up_proj", cfg.intermediate_size, cfg.intermediate_size),
        }
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if name.startswith("rotary_emb") or "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, offset, size = name, 0, None
            if len(parts) >= 2 and parts[-2] in shard_offsets:
                fused, offset, size = shard_offsets[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
            if target not in params:
                raise ValueError(f"unexpected weight {hf_name!r} for {cfg.architecture}")
            p = params[target]
            with torch.no_grad():
                dst = p.data if size is None else p.data.narrow(0, offset, size)
                if dst.shape != tensor.shape:
                    raise ValueError(
                        f"weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(dst.shape)}"
                    )
                dst.copy_(tensor)
            loaded.add(f"{target}@{offset}")
        expected: set[str] = set()
        for pname in params:
            fused = pname.rsplit(".", 2)[-2] if pname.count(".") >= 2 else ""
            offsets = [off for f, off, _ in shard_offsets.values() if f == fused] or [0]
            expected.update(f"{pname}@{off}" for off in offsets)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:5]}")

    def init_dummy_weights(self, seed: int = 0) -> None:
        """Deterministic random weights (for tests and speed runs of models we do not have).

        Scaled by 1/sqrt(fan_in) so activations keep a useful range and greedy outputs depend
        on the whole context, which is what cache-correctness tests need.
        """
        # Drawn on the CPU, one parameter at a time, so a seed names the same model on every
        # device and the host never holds more than one parameter at once.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    p.fill_(1.0)
                    continue
                fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
                std = 1.0 if name.startswith("embed_tokens") else 1.0 / math.sqrt(fan_in)
                w = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                p.copy_(w)
