"""Our Llama-family code against Hugging Face transformers on tiny random checkpoints.

Each case saves an HF model (random init) with ``save_pretrained`` and loads it through our
loader, so weight-name mapping, q/k/v and gate/up fusion, sharded safetensors, tied and untied
embeddings, Qwen2 biases, Qwen3 q/k norms and Llama-3 RoPE scaling are all exercised.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvbaton import LLM, SamplingParams
from kvbaton.models.loader import load_model

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
)
CASES = {
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3-rope-tied": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2-bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),
}


def _save_hf(tmp_path, case: str, shard: bool = False):
    cfg_cls, model_cls, extra = CASES[case]
    cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # HF's 0.02 init makes logits nearly flat; widen them
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif "norm" not in str(p.shape):
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "1GB")
    return hf


def _causal_attn(layer, q, k, v):
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    hf = _save_hf(tmp_path, case, shard=case == "llama-untied")
    if case == "llama-untied":
        assert len(list(tmp_path.glob("*.safetensors"))) > 1  # really sharded
    ours = load_model(str(tmp_path))
    ids = torch.randint(0, BASE["vocab_size"], (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids.unsqueeze(0)).logits[0]
        got = ours.model.compute_logits(ours.model(ids, torch.arange(40), _causal_attn))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_engine_greedy_matches_transformers_generate(tmp_path):
    hf = _save_hf(tmp_path, "qwen3-qknorm")
    llm = LLM(str(tmp_path), num_kv_blocks=64, max_num_batched_tokens=16)
    prompt = list(range(3, 40))
    ours = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert ours.token_ids == ref[0, len(prompt):].tolist()


def test_unknown_model_and_bad_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        load_model("no-such-model")
    _save_hf(tmp_path, "llama-untied")
    cfg = (tmp_path / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="missing weights"):
        load_model(str(tmp_path))
