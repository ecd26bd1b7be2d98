"""How big a request may be: the one check of a prompt and ``max_tokens`` against the context
and the KV cache, and the one default for ``max_tokens`` when a chat request gives none.

The engine runs the check when a request arrives; the router runs the same function before any
worker is contacted, so both answer an oversized request with the same 400 naming the same
field. Torch-free.
"""

from __future__ import annotations

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
