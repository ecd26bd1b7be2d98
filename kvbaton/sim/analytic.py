"""The analytic cost model: a roofline of one engine step from a model's shape and a hardware
table (``--cost-model analytic:HARDWARE[:MODEL]``).

For a step (a :class:`~kvbaton.sim.cost.StepShape`):

- **FLOPs** = 2 x (active matmul parameters per token) x tokens + 2 x (LM head) x sequences (the
  runner computes logits only for the rows it samples) + attention:
  ``4 x layers x heads x head_dim x (sum new x (ctx + new / 2) over prefill parts + sum (ctx + 1)
  over decode parts)`` (QK^T and PV, causal);
- **bytes** = the weights read once per step (for MoE: the shared part plus the experts the
  step's tokens touch) + the KV cache read (context before each part x KV bytes per token) + the
  KV written (new tokens x KV bytes per token). Activations are not counted: they stay in cache
  for decode and are dwarfed by the GEMMs' compute for prefill;
- **time** = ``max(FLOPs / (peak FLOP/s x mfu), bytes / (bandwidth x mbu))`` + a fixed per-step
  overhead + a per-sequence overhead.

The efficiency factors default to typical values (:data:`GPU_EFFICIENCY`, :data:`CPU_EFFICIENCY`,
sources there) and :func:`calibrate` fits them to measured ``(shape, seconds)`` points.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvbaton.sim.cost import CostModel, CostModelError, StepShape
from kvbaton.sim.hardware import GB, Hardware, hardware

# --- efficiency ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Efficiency:
    """How far from the roofs a real engine runs: ``mfu`` (model FLOPs utilisation: achieved /
    peak FLOP/s), ``mbu`` (memory bandwidth utilisation), and the time a step costs beyond the
    roofline, fixed (``step_overhead_s``) and per sequence in the batch (``seq_overhead_s``)."""

    mfu: float
    mbu: float
    step_overhead_s: float
    seq_overhead_s: float

    def __post_init__(self) -> None:
        for name in ("mfu", "mbu"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise CostModelError(f"efficiency {name} must be a positive finite number, got {v!r}")
        for name in ("step_overhead_s", "seq_overhead_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise CostModelError(f"efficiency {name} must be a finite number >= 0, got {v!r}")


# Typical values for a tuned GPU serving engine (CUDA graphs, FlashAttention, paged KV):
# - mfu 0.5: large prefill batches run the GEMMs at 50-60 % of dense BF16 peak on Hopper in
#   vLLM/SGLang-class engines; Pope et al., "Efficiently Scaling Transformer Inference"
#   (MLSys 2023) report up to 76 % MFU for large-batch prefill on TPU v4, an upper end. Attention
#   and the small GEMMs of chunked prefill bring the whole step lower, hence 0.5.
# - mbu 0.6: Databricks, "LLM Inference Performance Engineering: Best Practices" (blog, 2023)
#   measure about 55-60 % MBU decoding a 7B model at batch 1 on A100/H100.
# - step_overhead_s 1 ms: the host side of a step (scheduling, input preparation, launching the
#   graph, sampling); the vLLM v0.6.0 release blog (2024) profiles it as a large share of a
#   Llama-3-8B decode step on H100 before its multi-step and async-output changes, of the order
#   of a millisecond after them.
# - seq_overhead_s 10 us: per-request bookkeeping (block tables, sampling parameters, output
#   processing); an estimate, not a measurement: calibrate it.
# These model a tuned engine. kvbaton's own GPU path is eager PyTorch without CUDA graphs, ~10-20
# ms of launch overhead a step (docs/benchmarks.md, GPU section): calibrate to simulate it.
GPU_EFFICIENCY = Efficiency(mfu=0.5, mbu=0.6, step_overhead_s=1e-3, seq_overhead_s=10e-6)

# kvbaton's own eager PyTorch runner on a CPU, relative to what hardware.probe_cpu measured (1.0
# would be the probe's best float32 GEMM / its 64 MiB copy):
# - mfu 0.8: docs/benchmarks.md (CPU engine throughput, SmolLM2-135M on this 2-vCPU EPYC) finds
#   prefill "at about 80% of GEMM speed";
# - mbu 0.5: the same section puts a 64-sequence decode step, ~2 GB of float32 KV, at "a few
#   hundred milliseconds", i.e. 0.4-0.6 of the copy bandwidth the probe sees;
# - step_overhead_s 3 ms: a step's few hundred eager ops at ~10 us of dispatch each (30 layers);
# - seq_overhead_s 0.1 ms: per-request Python (sampling, stop checks, detokenization).
# The overheads are estimates: calibrate against a `kvbaton profile` for real numbers.
CPU_EFFICIENCY = Efficiency(mfu=0.8, mbu=0.5, step_overhead_s=3e-3, seq_overhead_s=100e-6)


def default_efficiency(hw: Hardware) -> Efficiency:
    """The typical efficiency for ``hw`` (:data:`CPU_EFFICIENCY` for the CPU, else the GPU one)."""
    return CPU_EFFICIENCY if hw.is_cpu else GPU_EFFICIENCY


# --- model shape -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the roofline needs of a model: its dimensions (from a Hugging Face ``config.json``,
    :meth:`from_config`) and the bytes per element of its weights and KV cache.

    Dense Llama/Mistral/Qwen2/Qwen3 models use the first block of fields; MoE models (Mixtral,
    Qwen-MoE, DeepSeek) also ``num_experts`` > 0; MLA models (DeepSeek V2/V3) ``kv_lora_rank`` > 0,
    whose KV cache holds one latent vector of ``kv_lora_rank + qk_rope_head_dim`` per layer."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # the dense MLP's width (for Mixtral-style MoE: each expert's)
    vocab_size: int
    tie_word_embeddings: bool = False
    dtype_bytes: int = 2
    # MoE: routed experts, experts per token, each expert's width, the shared experts' total
    # width, and how many layers have a MoE MLP (the others a dense one of intermediate_size).
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_moe_layers: int = 0
    # MLA (DeepSeek): latent KV rank, the decoupled RoPE key dims, query LoRA rank (0: none),
    # the non-RoPE query/key dims and the value dims per head.
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    q_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    # parameters, by part

    @property
    def attn_params(self) -> int:
        """Attention weights of one layer (q, k, v, o; MLA: its down/up projections)."""
        h = self.hidden_size
        if self.is_mla:
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk if self.q_lora_rank
                 else h * self.num_heads * qk)
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            o = self.num_heads * self.v_head_dim * h
            return q + kv_a + kv_b + o
        return h * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)

    @property
    def expert_params(self) -> int:
        """One routed expert (gated MLP: gate, up, down)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def _dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def _shared_params_per_moe_layer(self) -> int:
        """A MoE layer's weights every token uses: the shared experts and the router."""
        return 3 * self.hidden_size * self.shared_expert_intermediate_size + self.hidden_size * self.num_experts

    @property
    def body_params(self) -> int:
        """Every layer's weights (attention, MLPs, all experts, norms): no embeddings, no head."""
        h = self.hidden_size
        dense_mlp = 3 * h * self.intermediate_size
        moe = self.num_experts * self.expert_params + self._shared_params_per_moe_layer
        return (self.num_layers * (self.attn_params + 2 * h) + self._dense_layers * dense_mlp
                + self.num_moe_layers * moe + h)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        """All parameters (embeddings counted once when tied)."""
        return self.body_params + self.embedding_params * (1 if self.tie_word_embeddings else 2)

    @property
    def active_body_params(self) -> int:
        """Matmul weights one token goes through in the layers (MoE: only its top-k experts)."""
        h = self.hidden_size
        dense_mlp = 3 * h * self.intermediate_size
        moe = self.experts_per_tok * self.expert_params + self._shared_params_per_moe_layer
        return self.num_layers * self.attn_params + self._dense_layers * dense_mlp + self.num_moe_layers * moe

    @property
    def active_params(self) -> int:
        """Parameters one token uses: the active layer weights, its embedding row's table and
        the LM head (the usual "active parameters" of a MoE model card)."""
        return self.active_body_params + self.embedding_params * (1 if self.tie_word_embeddings else 2)

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights (what must fit in memory)."""
        return self.total_params * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token holds: K and V of every KV head of every layer, or for MLA
        the latent vector and the RoPE key of every layer."""
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * self.dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def attn_flops_per_pair(self, decode: bool) -> int:
        """FLOPs of one (query token, key token) pair over all layers and heads (QK^T + PV).
        MLA decodes in the latent space (the weight-absorbed form DeepSeek's serving kernels
        use): its pair costs the latent width, not the per-head one."""
        if self.is_mla:
            if decode:
                per_head = (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            else:
                per_head = (self.qk_nope_head_dim + self.qk_rope_head_dim) + self.v_head_dim
            return 2 * self.num_layers * self.num_heads * per_head
        return 4 * self.num_layers * self.num_heads * self.head_dim

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct routed experts ``tokens`` tokens use in one MoE layer, with
        uniform routing: ``E x (1 - (1 - k/E)^tokens)`` (at most ``min(E, tokens x k)``, and
        that bound at one token)."""
        if not self.is_moe or tokens <= 0:
            return 0.0
        e, k = self.num_experts, min(self.experts_per_tok, self.num_experts)
        return min(float(e), float(tokens * k), e * (1.0 - (1.0 - k / e) ** tokens))

    def summary(self) -> dict[str, Any]:
        """The shape and the derived sizes, for a result JSON."""
        return {**asdict(self), "total_params": self.total_params, "active_params": self.active_params,
                "weight_gb": self.weight_bytes / GB, "kv_bytes_per_token": self.kv_bytes_per_token()}

    @classmethod
    def from_config(cls, config: Any, name: str = "model", dtype_bytes: int = 2) -> ModelShape:
        """Parse a Hugging Face ``config.json`` dict (a ``text_config`` inside a multimodal one
        is used when the top level has no ``hidden_size``). CostModelError naming the problem
        for anything that is not one."""
        if not isinstance(config, Mapping):
            raise CostModelError(f"model config {name}: expected a JSON object, got {type(config).__name__}")
        if "hidden_size" not in config and isinstance(config.get("text_config"), Mapping):
            config = config["text_config"]
        if not isinstance(dtype_bytes, int) or isinstance(dtype_bytes, bool) or dtype_bytes <= 0:
            raise CostModelError(f"dtype_bytes must be a positive integer, got {dtype_bytes!r}")
        c = _Reader(config, name)
        hidden = c.req("hidden_size")
        layers = c.req("num_hidden_layers")
        heads = c.req("num_attention_heads")
        kv_heads = c.opt("num_key_value_heads", heads)
        if kv_heads > heads or heads % kv_heads:
            raise CostModelError(f"model config {name}: num_key_value_heads {kv_heads} must divide "
                                 f"num_attention_heads {heads}")
        head_dim = c.opt("head_dim", 0) or hidden // heads
        if head_dim <= 0:
            raise CostModelError(f"model config {name}: hidden_size {hidden} < num_attention_heads {heads}")
        vocab = c.req("vocab_size")
        tie = config.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise CostModelError(f"model config {name}: tie_word_embeddings must be true or false, got {tie!r}")

        num_experts = c.opt("num_experts", 0) or c.opt("num_local_experts", 0) or c.opt("n_routed_experts", 0)
        moe: dict[str, int] = {}
        if num_experts:
            top_k = c.req("num_experts_per_tok")
            if top_k > num_experts:
                raise CostModelError(f"model config {name}: num_experts_per_tok {top_k} > {num_experts} experts")
            expert_width = c.opt("moe_intermediate_size", 0) or c.req("intermediate_size")
            shared = c.opt("shared_expert_intermediate_size", 0) or c.opt("n_shared_experts", 0) * expert_width
            moe = {"num_experts": num_experts, "experts_per_tok": top_k, "moe_intermediate_size": expert_width,
                   "shared_expert_intermediate_size": shared,
                   "num_moe_layers": _moe_layers(c, config, layers)}
        # A MoE model whose every layer is MoE (Mixtral, Qwen3-MoE) needs no dense width.
        intermediate = (c.req("intermediate_size") if not moe or moe["num_moe_layers"] < layers
                        else c.opt("intermediate_size", 0))

        mla: dict[str, int] = {}
        if c.opt("kv_lora_rank", 0):
            rope = c.req("qk_rope_head_dim")
            nope = c.opt("qk_nope_head_dim", 0)
            mla = {"kv_lora_rank": c.req("kv_lora_rank"), "qk_rope_head_dim": rope,
                   "q_lora_rank": c.opt("q_lora_rank", 0), "qk_nope_head_dim": nope,
                   "v_head_dim": c.opt("v_head_dim", 0) or nope or head_dim}
            head_dim = nope + rope
        return cls(name=name, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                   head_dim=head_dim, intermediate_size=intermediate, vocab_size=vocab,
                   tie_word_embeddings=tie, dtype_bytes=dtype_bytes, **moe, **mla)


def _moe_layers(c: _Reader, config: Mapping[str, Any], layers: int) -> int:
    """How many layers have a MoE MLP: all but DeepSeek's ``first_k_dense_replace`` leading
    dense layers, Qwen's ``mlp_only_layers``, and those off ``decoder_sparse_step`` /
    ``moe_layer_freq``."""
    first_dense = c.opt("first_k_dense_replace", 0)
    step = c.opt("decoder_sparse_step", 1) or 1
    freq = c.opt("moe_layer_freq", 1) or 1
    only = config.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(i, int) for i in only):
        raise CostModelError(f"model config {c.name}: mlp_only_layers must be a list of layer indices")
    dense = set(only)
    return sum(1 for i in range(layers)
               if i >= first_dense and i not in dense and (i + 1) % step == 0 and i % freq == 0)


class _Reader:
    """Typed access to a config dict, with errors that name the key."""

    def __init__(self, d: Mapping[str, Any], name: str) -> None:
        self.d = d
        self.name = name

    def _int(self, key: str, v: Any, minimum: int) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < minimum:
            what = "a positive integer" if minimum > 0 else "an integer >= 0"
            raise CostModelError(f"model config {self.name}: {key!r} must be {what}, got {v!r}")
        return int(v)

    def req(self, key: str) -> int:
        if self.d.get(key) is None:
            raise CostModelError(f"model config {self.name}: missing {key!r}")
        return self._int(key, self.d[key], 1)

    def opt(self, key: str, default: int) -> int:
        v = self.d.get(key)
        return default if v is None else self._int(key, v, 0)


# Built-in configs (the fields of their Hugging Face config.json the roofline reads).
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                     "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256},
    # Qwen/Qwen3-32B (head_dim 128 != 5120 / 64)
    "qwen3-32b": {"hidden_size": 5120, "num_hidden_layers": 64, "num_attention_heads": 64,
                  "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 25600,
                  "vocab_size": 151936},
    # meta-llama/Llama-3.1-70B
    "llama-3.1-70b": {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                      "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256},
}
DEFAULT_MODEL = "smollm2-135m"


def load_model_config(model: str) -> tuple[str, dict[str, Any]]:
    """``(name, config dict)`` for a built-in model name (case-insensitive), a ``config.json``
    path, or a directory holding one. CostModelError for anything else."""
    key = model.strip().lower()
    if key in BUILTIN_MODELS:
        return key, dict(BUILTIN_MODELS[key])
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise CostModelError(f"model directory {p.parent} has no config.json")
    elif not p.exists():
        raise CostModelError(f"unknown model {model!r}: not a built-in ({', '.join(BUILTIN_MODELS)}) "
                             "nor a path to a config.json or a directory holding one")
    name = p.parent.name if p.name == "config.json" and p.parent.name else p.stem
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise CostModelError(f"cannot read the model config {p}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CostModelError(f"the model config {p} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise CostModelError(f"the model config {p} is not a JSON object (got {type(data).__name__})")
    return name, data


# --- memory ----------------------------------------------------------------------------------

# vLLM's default --gpu-memory-utilization (vLLM engine arguments docs): the share of device
# memory the engine takes for weights + KV; the rest is CUDA context, activations, fragmentation.
DEFAULT_MEMORY_UTILIZATION = 0.9


def memory_fits(shape: ModelShape, hw: Hardware, utilization: float = DEFAULT_MEMORY_UTILIZATION) -> int:
    """KV cache bytes left on ``hw`` once ``shape``'s weights are loaded, using ``utilization``
    of its memory. CostModelError when the weights do not fit (or leave no room for one token of
    KV)."""
    if not 0 < utilization <= 1:
        raise CostModelError(f"memory utilization must be in (0, 1], got {utilization!r}")
    usable = hw.mem_bytes * utilization
    weights = shape.weight_bytes
    if weights + shape.kv_bytes_per_token() > usable:
        raise CostModelError(
            f"model {shape.name} needs {weights / GB:.1f} GB of weights ({shape.total_params / 1e9:.2f}B "
            f"parameters x {shape.dtype_bytes} bytes), {hw.name} has {hw.mem_bytes / GB:.0f} GB "
            f"({usable / GB:.1f} GB usable at memory utilization {utilization:g})")
    return int(usable - weights)


# --- the cost model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Roofline:
    """One step against the roofs: its work and the time each roof alone would take."""

    flops: float
    bytes: float
    compute_s: float  # flops / (peak x mfu)
    memory_s: float  # bytes / (bandwidth x mbu)
    overhead_s: float
    time_s: float

    @property
    def bound(self) -> str:
        """``"compute"`` or ``"memory"``: the roof that sets the step's time."""
        return "compute" if self.compute_s >= self.memory_s else "memory"


class AnalyticCostModel(CostModel):
    """A roofline cost model for ``shape`` on ``hw`` with ``efficiency`` (default: the typical
    one for that hardware). Construction checks that the weights fit (CostModelError otherwise;
    ``check_fit=False`` skips it, for what-if arithmetic)."""

    def __init__(self, shape: ModelShape, hw: Hardware, efficiency: Efficiency | None = None, *,
                 memory_utilization: float = DEFAULT_MEMORY_UTILIZATION, check_fit: bool = True,
                 calibration: Mapping[str, Any] | None = None) -> None:
        self.shape = shape
        self.hw = hw
        self.efficiency = efficiency or default_efficiency(hw)
        self.memory_utilization = memory_utilization
        self.kv_cache_bytes: int | None = memory_fits(shape, hw, memory_utilization) if check_fit else None
        self.calibration = dict(calibration or {})
        self.name = f"analytic:{hw.name}:{shape.name}"
        # per-step constants
        s = shape
        self._kvb = s.kv_bytes_per_token()
        self._lm_head = s.vocab_size * s.hidden_size
        dense = s.total_params - s.num_moe_layers * s.num_experts * s.expert_params
        if not s.tie_word_embeddings:
            dense -= s.embedding_params  # the input table: only the step's rows are read
        self._dense_weight_bytes = dense * s.dtype_bytes
        self._expert_bytes = s.num_moe_layers * s.expert_params * s.dtype_bytes
        self._attn_prefill = s.attn_flops_per_pair(decode=False)
        self._attn_decode = s.attn_flops_per_pair(decode=True)
        self._flops_per_token = 2.0 * s.active_body_params
        self._embed_row_bytes = 0 if s.tie_word_embeddings else s.hidden_size * s.dtype_bytes
        self._s_per_flop = 1.0 / (hw.flops * self.efficiency.mfu)
        self._s_per_byte = 1.0 / (hw.mem_bw_bytes_s * self.efficiency.mbu)

    # the work of a step

    def step_flops(self, step: StepShape) -> float:
        return self._work(step)[0]

    def step_bytes(self, step: StepShape) -> float:
        return self._work(step)[1]

    def _work(self, step: StepShape) -> tuple[float, float]:
        """``(FLOPs, bytes moved)`` of ``step``."""
        flops = (self._flops_per_token * step.tokens + 2.0 * self._lm_head * len(step.parts)
                 + self._attn_prefill * step.prefill_attn + self._attn_decode * step.decode_ctx)
        weights = float(self._dense_weight_bytes)
        if self._expert_bytes:
            weights += self._expert_bytes * self.shape.experts_touched(step.tokens)
        # KV read (the context before each part) and written (the new tokens), and for untied
        # embeddings the step's rows of the input table.
        return flops, weights + (step.context + step.tokens) * self._kvb + step.tokens * self._embed_row_bytes

    def roofline(self, step: StepShape, efficiency: Efficiency | None = None) -> Roofline:
        """``step`` against the roofs (with ``efficiency``, default the model's)."""
        flops, nbytes = self._work(step)
        compute, memory, overhead = self._seconds(flops, nbytes, len(step.parts), efficiency or self.efficiency)
        return Roofline(flops, nbytes, compute, memory, overhead, max(compute, memory) + overhead)

    def _seconds(self, flops: float, nbytes: float, seqs: int, e: Efficiency) -> tuple[float, float, float]:
        """``(compute, memory, overhead)`` seconds of a step's work under ``e`` (the model's own
        efficiency uses its reciprocals computed once: step_time runs once per simulated step)."""
        if e is self.efficiency:
            s_per_flop, s_per_byte = self._s_per_flop, self._s_per_byte
        else:
            s_per_flop, s_per_byte = 1.0 / (self.hw.flops * e.mfu), 1.0 / (self.hw.mem_bw_bytes_s * e.mbu)
        return flops * s_per_flop, nbytes * s_per_byte, e.step_overhead_s + e.seq_overhead_s * seqs

    # CostModel

    def step_time(self, step: StepShape) -> float:
        # roofline() without its record.
        flops, nbytes = self._work(step)
        compute, memory, overhead = self._seconds(flops, nbytes, len(step.parts), self.efficiency)
        return max(1e-9, max(compute, memory) + overhead)

    def kv_bytes_per_token(self) -> int:
        return self._kvb

    def kv_transfer_s(self, num_tokens: int) -> float:
        """Seconds to send ``num_tokens`` tokens of KV over the hardware's inter-node link."""
        return num_tokens * self._kvb / self.hw.link_bytes_s

    def max_kv_tokens(self) -> int | None:
        """Tokens of KV the memory left after the weights holds (None: fit not checked)."""
        return None if self.kv_cache_bytes is None else self.kv_cache_bytes // self._kvb

    def with_efficiency(self, efficiency: Efficiency, calibration: Mapping[str, Any] | None = None
                        ) -> AnalyticCostModel:
        """The same model and hardware with other efficiency factors."""
        return AnalyticCostModel(self.shape, self.hw, efficiency, memory_utilization=self.memory_utilization,
                                 check_fit=self.kv_cache_bytes is not None, calibration=calibration)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name, "kind": "analytic", "hardware": self.hw.describe(),
            "model": self.shape.summary(), "efficiency": asdict(self.efficiency),
            "kv_bytes_per_token": self._kvb, "memory_utilization": self.memory_utilization,
            "kv_cache_bytes": self.kv_cache_bytes, "max_kv_tokens": self.max_kv_tokens(),
        }
        if self.calibration:
            d["calibration"] = dict(self.calibration)
        return d


def analytic_cost_model(spec: str) -> AnalyticCostModel:
    """The cost model of ``--cost-model analytic:SPEC``: ``HARDWARE`` or ``HARDWARE:MODEL``
    (MODEL: a built-in name, a config.json, or a directory with one; default
    :data:`DEFAULT_MODEL`). Weights and KV are 2 bytes per element on GPUs (bf16), 4 on the
    CPU (kvbaton runs float32 there)."""
    from kvbaton.sim.hardware import known_hardware

    hw_name, _, model = spec.partition(":")
    if not hw_name.strip():
        raise CostModelError(f"analytic cost model {spec!r}: expected HARDWARE[:MODEL], "
                             f"hardware one of {', '.join(known_hardware())}")
    hw = hardware(hw_name)
    name, config = load_model_config(model if model.strip() else DEFAULT_MODEL)
    shape = ModelShape.from_config(config, name=name, dtype_bytes=4 if hw.is_cpu else 2)
    return AnalyticCostModel(shape, hw)


# --- calibration -----------------------------------------------------------------------------

_EFF_RANGE = (1e-3, 2.0)  # mfu/mbu searched here (above 1: the probe or datasheet undershoots)


def calibrate(model: AnalyticCostModel, points: Sequence[tuple[StepShape, float]]) -> AnalyticCostModel:
    """``model`` with its efficiency fitted to measured ``(shape, seconds)`` points: mfu and mbu
    by a zooming grid search in log space over [0.001, 2], the two overheads (>= 0) by weighted
    least squares inside it, minimising the squared *relative* error (a 5 ms decode step and a
    2 s prefill count alike). A factor the points cannot pin down (no point is bound by that
    roof) stays as close to ``model``'s value as the points allow. The result's ``describe()``
    says how well it fits ("calibration": points, rms and max relative error)."""
    import numpy as np

    pts = list(points)
    if len(pts) < 2:
        raise CostModelError(f"calibration needs at least 2 measured points, got {len(pts)}")
    for shape, secs in pts:
        if not isinstance(shape, StepShape):
            raise CostModelError(f"calibration point {shape!r} is not a StepShape")
        if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not math.isfinite(secs) or secs <= 0:
            raise CostModelError(f"calibration point time must be a positive number of seconds, got {secs!r}")
    t = np.array([p[1] for p in pts], dtype=np.float64)
    c = np.array([model.step_flops(p[0]) / model.hw.flops for p in pts])  # seconds at mfu 1
    m = np.array([model.step_bytes(p[0]) / model.hw.mem_bw_bytes_s for p in pts])  # at mbu 1
    s = np.array([float(len(p[0].parts)) for p in pts])
    w2 = 1.0 / t**2
    prior = np.log([model.efficiency.mfu, model.efficiency.mbu])

    def solve(lf: Any, lb: Any) -> tuple[Any, Any, Any]:
        """Best overheads and loss on the grid of log mfu ``lf`` x log mbu ``lb`` (2-D arrays)."""
        roof = np.maximum(c / np.exp(lf)[..., None], m / np.exp(lb)[..., None])  # [..., n]
        r = t - roof
        a11, a12, a22 = w2.sum(), (w2 * s).sum(), (w2 * s * s).sum()
        b1, b2 = (w2 * r).sum(-1), (w2 * r * s).sum(-1)
        det = a11 * a22 - a12 * a12
        cands = []
        if det > 1e-12 * a11 * a22:  # both overheads, where both come out >= 0
            o1, o2 = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
            ok = (o1 >= 0) & (o2 >= 0)
            cands.append((np.where(ok, o1, 0.0), np.where(ok, o2, 0.0), ok))
        cands.append((np.maximum(b1 / a11, 0.0), np.zeros_like(b1), None))  # per-step only
        cands.append((np.zeros_like(b2), np.maximum(b2 / a22, 0.0), None))  # per-sequence only
        best = None
        for o1, o2, ok in cands:
            loss = (w2 * (r - o1[..., None] - o2[..., None] * s) ** 2).sum(-1)
            if ok is not None:
                loss = np.where(ok, loss, np.inf)
            if best is None:
                best = (o1, o2, loss)
            else:
                better = loss < best[2]
                best = (np.where(better, o1, best[0]), np.where(better, o2, best[1]),
                        np.where(better, loss, best[2]))
        assert best is not None
        return best

    lo, hi = math.log(_EFF_RANGE[0]), math.log(_EFF_RANGE[1])
    cf, cb = float(np.clip(prior[0], lo, hi)), float(np.clip(prior[1], lo, hi))
    half_f = half_b = (hi - lo) / 2
    centre_f = centre_b = (hi + lo) / 2
    n = 41
    for _ in range(10):
        gf = np.clip(np.linspace(centre_f - half_f, centre_f + half_f, n), lo, hi)
        gb = np.clip(np.linspace(centre_b - half_b, centre_b + half_b, n), lo, hi)
        lf, lb = np.meshgrid(gf, gb, indexing="ij")
        o1, o2, loss = solve(lf, lb)
        # Ties (a roof that binds no point leaves its factor free): the one nearest the prior.
        near = loss <= loss.min() * (1 + 1e-9) + 1e-15 * len(pts)
        dist = np.where(near, np.abs(lf - prior[0]) + np.abs(lb - prior[1]), np.inf)
        i, j = np.unravel_index(int(np.argmin(dist)), dist.shape)
        cf, cb = float(lf[i, j]), float(lb[i, j])
        step_f, step_b = 2 * half_f / (n - 1), 2 * half_b / (n - 1)
        centre_f, centre_b = cf, cb
        half_f, half_b = 3 * step_f, 3 * step_b
        n = 25
    o1, o2, loss = solve(np.array([[cf]]), np.array([[cb]]))
    eff = Efficiency(mfu=math.exp(cf), mbu=math.exp(cb), step_overhead_s=float(o1[0, 0]),
                     seq_overhead_s=float(o2[0, 0]))
    fitted = model.with_efficiency(eff)
    rel = np.array([fitted.step_time(p) / tt - 1 for p, tt in pts])
    info = {"points": len(pts), "rms_rel_error": float(np.sqrt(np.mean(rel**2))),
            "max_rel_error": float(np.abs(rel).max()),
            "compute_bound_points": sum(fitted.roofline(p).bound == "compute" for p, _ in pts)}
    return fitted.with_efficiency(eff, calibration=info)


def load_points(source: str | Path | Mapping[str, Any]) -> list[tuple[StepShape, float]]:
    """Measured points of a ``kvbaton profile`` JSON (a path or the parsed object): its
    ``"points"`` list, each ``{"parts": [[new, context], ...], "seconds": t}`` (``"step_s"`` or
    ``"time_s"`` also read for the time) or a ``[parts, seconds]`` pair."""
    if isinstance(source, Mapping):
        data: Any = source
        where = "profile"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text())
        except OSError as e:
            raise CostModelError(f"cannot read the profile {where}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CostModelError(f"the profile {where} is not JSON: {e}") from None
    raw = data.get("points") if isinstance(data, Mapping) else None
    if not isinstance(raw, list):
        raise CostModelError(f"{where}: no \"points\" list")
    out: list[tuple[StepShape, float]] = []
    for k, p in enumerate(raw):
        parts: Any
        secs: Any
        if isinstance(p, Mapping):
            parts = p.get("parts")
            secs = next((p[key] for key in ("seconds", "step_s", "time_s") if key in p), None)
        elif isinstance(p, list) and len(p) == 2:
            parts, secs = p
        else:
            raise CostModelError(f"{where}: points[{k}] is neither an object nor a [parts, seconds] pair")
        if (not isinstance(parts, list) or not parts
                or not all(isinstance(x, list) and len(x) == 2 and all(_nonneg_int(v) for v in x) for x in parts)
                or any(x[0] < 1 for x in parts)):
            raise CostModelError(f"{where}: points[{k}].parts must be a non-empty list of [new >= 1, context >= 0]")
        if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not math.isfinite(secs) or secs <= 0:
            raise CostModelError(f"{where}: points[{k}] needs a positive time in seconds, got {secs!r}")
        out.append((StepShape(tuple((int(a), int(b)) for a, b in parts)), float(secs)))
    return out


def _nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


__all__ = [
    "BUILTIN_MODELS", "CPU_EFFICIENCY", "DEFAULT_MODEL", "GPU_EFFICIENCY", "AnalyticCostModel", "Efficiency",
    "ModelShape", "Roofline", "analytic_cost_model", "calibrate", "default_efficiency", "load_model_config",
    "load_points", "memory_fits",
]
