"""How big a request may be: the one check of a prompt and ``max_tokens`` against the context
and the KV cache, and the one default for ``max_tokens`` when a chat request gives none.

The engine runs the check when a request arrives; the router runs the same function before any
worker is contacted, so both answer an oversized request with the same 400 naming the same
field. Torch-free.
"""

from __future__ import annotations

from typing import Any

from kvbaton.errors import ContextLengthError, InvalidRequestError


def check_request_fits(
    num_prompt_tokens: int, max_tokens: int, max_model_len: int | None,
    num_kv_blocks: int | None = None, block_size: int = 16,
) -> None:
    """Raise :class:`InvalidRequestError` (param ``prompt`` or ``max_tokens``) when a prompt
    of ``num_prompt_tokens`` generating up to ``max_tokens`` can never run: an empty prompt,
    one that fills the context, a total past the context, or (when the cache size is given)
    more KV blocks than the whole cache has. With ``max_model_len`` None (not known yet) only
    emptiness is checked."""
    n = num_prompt_tokens
    if n == 0:
        raise InvalidRequestError("prompt", "is empty")
    if max_model_len is None:
        return
    if n >= max_model_len:
        raise ContextLengthError("prompt", f"has {n} tokens; the context is {max_model_len} tokens")
    if n + max_tokens > max_model_len:
        raise ContextLengthError(
            "max_tokens", f"{max_tokens} + prompt {n} tokens exceeds the context of {max_model_len} tokens"
        )
    if num_kv_blocks is not None:
        need = -(-(n + max_tokens) // block_size)
        if need > num_kv_blocks:
            raise ContextLengthError(
                "max_tokens", f"{max_tokens} + prompt {n} tokens need {need} KV blocks; the cache "
                f"has {num_kv_blocks}"
            )


def default_max_tokens(
    default: int, num_prompt_tokens: int, max_model_len: int | None,
    kv_capacity_tokens: int | None = None,
) -> int:
    """``max_tokens`` for a request that gave none: ``default``, but never past the room the
    context (and, when known, the whole KV cache) leaves after the prompt; at least 1."""
    bounds = [b for b in (max_model_len, kv_capacity_tokens) if b is not None]
    if not bounds:
        return max(1, default)
    return max(1, min(default, min(bounds) - num_prompt_tokens))


# Slack on the character bound below: a normalizer that drops characters (none of the
# byte-level BPE tokenizers served here has one) could make a text shorter than it looks.
_CHAR_BOUND_SLACK = 2


def max_token_chars(tokenizer: Any) -> int:
    """An upper bound on the characters one token of ``tokenizer`` covers: its longest vocabulary
    entry (a byte-level BPE entry has one character per byte, at least the characters it decodes
    to; added special tokens are in the vocabulary too). At least 1."""
    try:
        vocab = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return 64  # a tokenizer without a vocabulary to read: a generous constant
    return max((len(t) for t in vocab), default=1) or 1


def check_prompt_chars(num_chars: int, max_model_len: int | None, token_chars: int) -> None:
    """Refuse a text prompt that cannot fit in the context before it is tokenized.

    A text of ``num_chars`` characters has at least ``num_chars / token_chars`` tokens, so one
    longer than ``max_model_len * token_chars`` (times a slack of 2) fills the context whatever
    it says: :class:`ContextLengthError` naming ``prompt``, without spending the tokenizer's
    time on it (megabytes of text take seconds to tokenize and used to stall the engine).
    """
    if max_model_len is None:
        return
    limit = max_model_len * token_chars * _CHAR_BOUND_SLACK
    if num_chars > limit:
        raise ContextLengthError(
            "prompt", f"has {num_chars} characters, more than {max_model_len} tokens of this model "
            f"can hold (at most {token_chars} characters per token): the context is {max_model_len} tokens"
        )
