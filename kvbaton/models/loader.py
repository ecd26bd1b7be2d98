"""Resolve a model name or path and load config, weights and tokenizer.

Sources: a Hugging Face directory (``config.json`` + ``*.safetensors``, sharded or not), a GGUF
file (converted once into a cached HF directory by ``kvbaton.models.gguf``), a built-in name
(``smollm2-135m``, ``tiny-random``), or any of these with ``load_format="dummy"`` for random
weights. Every source ends in one ``LoadedModel``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvbaton.models.config import ModelConfig
from kvbaton.models.llama import LlamaForCausalLM, RotaryEmbedding
from kvbaton.models.registry import DUMMY_CONFIGS
from kvbaton.models.sources import dir_tokenizer, resolve_model_dir
from kvbaton.models.tokenizer import byte_tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A ready model with its tokenizer and the fingerprint that roots its block hashes."""

    name: str
    config: ModelConfig
    model: LlamaForCausalLM
    tokenizer: Any
    fingerprint: str


def _file_identity(path: Path) -> str:
    """Cheap content identity: size plus hashes of the first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()


def _iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                yield key, st.get_tensor(key)


def load_model(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_format: str = "auto",
    seed: int = 0,
) -> LoadedModel:
    """Load ``name`` onto ``device`` in ``dtype``; see the module docstring for sources."""
    if name in DUMMY_CONFIGS:
        cfg_dict: dict[str, Any] = DUMMY_CONFIGS[name]
        model_dir = None
        load_format = "dummy"
    else:
        model_dir = resolve_model_dir(name)
        cfg_dict = json.loads((model_dir / "config.json").read_text())
        _merge_generation_eos(cfg_dict, model_dir)
    cfg = ModelConfig.from_hf_dict(cfg_dict)
    # Build on the meta device and materialise directly on the target in the target dtype,
    # so an 8B dummy model never exists in fp32 on the host.
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()
    model.rotary = RotaryEmbedding(cfg).to(device)  # buffers in fp32, cast per use like HF
    if load_format == "dummy":
        model.init_dummy_weights(seed)
        weights_id = f"dummy-seed-{seed}"
    else:
        assert model_dir is not None
        model.load_hf_weights(_iter_safetensors(model_dir))
        weights_id = "|".join(
            f"{f.name}:{_file_identity(f)}" for f in sorted(model_dir.glob("*.safetensors"))
        )
    model.eval()
    tokenizer = byte_tokenizer() if model_dir is None else dir_tokenizer(model_dir)
    fp_src = json.dumps(
        {"config": cfg.to_dict(), "weights": weights_id, "dtype": str(dtype)}, sort_keys=True
    )
    fingerprint = hashlib.sha256(fp_src.encode()).hexdigest()[:32]
    log.info("loaded %s: %s, %.1fM params, %s", name, cfg.architecture, cfg.num_params / 1e6, dtype)
    return LoadedModel(name, cfg, model, tokenizer, fingerprint)


def _merge_generation_eos(cfg_dict: dict[str, Any], model_dir: Path) -> None:
    """Chat models often list their end-of-turn token (Llama 3's ``<|eot_id|>``) only in
    ``generation_config.json``; without it generation would run past the turn."""
    gen = model_dir / "generation_config.json"
    if not gen.is_file():
        return
    extra = json.loads(gen.read_text()).get("eos_token_id")
    if extra is None:
        return
    ids: list[int] = []
    for v in (cfg_dict.get("eos_token_id"), extra):
        ids.extend(v if isinstance(v, list) else [] if v is None else [v])
    cfg_dict["eos_token_id"] = sorted(set(ids))
