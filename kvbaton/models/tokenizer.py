"""Tokenizers: Hugging Face tokenizers from model directories, and a byte-level tokenizer
for random-weight models that ship none."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from kvbaton.errors import InvalidRequestError

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BYTE_SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: ids 0-255 are bytes, 256+ are ``BYTE_SPECIALS``.

    Every string round-trips, so random-weight models can be driven with text prompts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for i, special in enumerate(BYTE_SPECIALS):
        vocab[special] = 256 + i
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(BYTE_SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def load_tokenizer(model_dir: str | Path) -> Any:
    """The tokenizer (and chat template) saved in a Hugging Face model directory.

    A directory with ``tokenizer.json`` is loaded as a fast tokenizer directly: it is what
    ``AutoTokenizer`` builds for these files, without ``AutoTokenizer``'s import of the model
    configuration machinery, which loads torch (the router and the bench only tokenize).
    Only a directory without one (a slow, sentencepiece-only tokenizer) goes through
    ``AutoTokenizer``.
    """
    if (Path(model_dir) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def copy_tokenizer(tokenizer: Any) -> Any | None:
    """A private copy of ``tokenizer`` for another thread (HF fast tokenizers must not be used
    by two threads at once), or None if it cannot be copied."""
    try:
        return copy.deepcopy(tokenizer)
    except Exception:  # noqa: BLE001 - the caller falls back to the one it has
        log.warning("the tokenizer cannot be copied; its users share one")
        return None


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a text prompt (no special tokens added); InvalidRequestError for text no
    tokenizer can take (an unpaired surrogate: the HTTP API refuses those itself, this covers
    direct callers). The one encoder of prompts, for the engine and the worker's tokenizer
    thread alike."""
    try:
        return list(tokenizer.encode(text, add_special_tokens=False))
    except (TypeError, UnicodeError) as e:
        raise InvalidRequestError("prompt", f"cannot be tokenized ({type(e).__name__}): send valid Unicode") from None


def chat_template_takes_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders tools itself (it reads ``tools``), so a
    tool conversation is handed to it as is rather than rendered by kvbaton."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], model: str,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
    """Token ids of a conversation followed by the assistant's generation prompt; ``tools``
    (function declarations) go to a template that renders them
    (:func:`chat_template_takes_tools`).

    The one implementation of this step, shared by the engine and the router so both compute
    the same ids (and so the same block hashes) for the same chat.
    :class:`~kvbaton.errors.InvalidRequestError`, naming ``messages``, when the model has no
    chat template, a message is malformed or the template rejects the conversation. Not thread-safe
    (HF fast tokenizers are not): callers serialize.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("messages", f": model {model!r} has no chat template")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequestError("messages", f"[{i}] must be an object with string 'role' and 'content'")
    extra = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    except Exception as e:  # noqa: BLE001 - jinja raises for conversations a template rejects
        raise InvalidRequestError("messages", f": the chat template failed: {e}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))
