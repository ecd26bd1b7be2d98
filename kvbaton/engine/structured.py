"""Structured outputs in the engine: constrained requests' token masks, filled while the step's
forward pass runs and applied to the logits before sampling (docs/engine.md, "Structured
outputs").

Each constrained request has a matcher (:class:`~kvbaton.models.grammar.GrammarCompiler`),
kept here by request id like the sampler's generators, so :class:`~kvbaton.engine.request.
Request` stays free of it. A step asks for the masks of its sampling rows before the forward
pass (:meth:`StructuredOutputs.start`): a helper thread fills them (llguidance's parallel fill
runs without the GIL) while the model runs, so a constrained batch costs the step only the
mask application, not one mask after another on the engine thread. The sampled token then
advances the matcher, and a matcher that has stopped (the constraint is complete) ends its
request with ``stop``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llguidance
import llguidance.torch as llgt
import torch

from kvbaton.engine.request import Request
from kvbaton.errors import InvalidRequestError
from kvbaton.models import native
from kvbaton.models.grammar import GrammarCompiler
from kvbaton.sampling_params import StructuredOutput

_SRC = Path(__file__).with_name("csrc") / "token_mask.c"


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.apply_token_mask.argtypes = [ptr, i64, ptr, i64, i64, i64]
    lib.apply_token_mask.restype = None


def apply_token_mask(rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the tokens ``bitmask`` (``[B, ceil(V / 32)]`` int32, llguidance's layout) forbids to
    -inf in ``rows`` (``[B, V]`` float32, contiguous), in place: with the C loop on the CPU
    (~20 us a row in an ad-hoc run), else with torch ops (a GPU, or no compiler here)."""
    vocab = rows.shape[1]
    lib = native.load_library(_SRC, _declare) if rows.device.type == "cpu" else None
    if lib is not None:
        mask = bitmask.to(torch.int32).contiguous()
        lib.apply_token_mask(rows.data_ptr(), rows.stride(0), mask.data_ptr(), mask.shape[1], rows.shape[0], vocab)
        return
    shifts = torch.arange(32, dtype=torch.int32, device=rows.device)
    bits = (bitmask.to(rows.device).unsqueeze(-1) >> shifts) & 1  # [B, words, 32]
    allowed = bits.reshape(bits.shape[0], -1)[:, :vocab].bool()
    rows.masked_fill_(~allowed, float("-inf"))


@dataclass
class PendingMasks:
    """The masks of one step's constrained rows, being filled: ``rows`` are positions among
    the step's sampling rows, ``bitmask`` row ``j`` belongs to ``rows[j]``."""

    rows: list[int]
    bitmask: torch.Tensor
    filled: Future[None]


class StructuredOutputs:
    """The engine's constrained requests and their masks (engine thread only, except the
    fill that runs on its helper thread)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, eos_token_ids)
        self.vocab_size = vocab_size
        self.matchers: dict[str, llguidance.LLMatcher] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._executor: llguidance.LLExecutor | None = None

    def add(self, request_id: str, so: StructuredOutput) -> None:
        """Compile (or find compiled) ``so`` for a new request; InvalidRequestError naming the
        field when it does not compile."""
        self.matchers[request_id] = self.compiler.matcher(so)

    def accept(self, request_id: str, token: int, param: str = "kv_transfer_params") -> None:
        """A token sampled elsewhere (the prefill worker's first one) enters the matcher;
        InvalidRequestError if the constraint does not allow it."""
        m = self.matchers.get(request_id)
        if m is not None and not m.consume_token(token):
            raise InvalidRequestError(param, f": first token {token} does not match the request's constraint")

    def advance(self, request_id: str, token: int) -> None:
        """The token just sampled for ``request_id`` (a no-op for unconstrained requests). The
        mask allowed it, so it is accepted; EOS sampled despite the mask under ``min_tokens``
        never happens: the mask is applied first and min_tokens can only remove tokens."""
        m = self.matchers.get(request_id)
        if m is not None:
            m.consume_token(token)

    def stopped(self, request_id: str) -> bool:
        """Whether the request's constraint is complete: nothing more may follow."""
        m = self.matchers.get(request_id)
        return m is not None and (m.is_stopped() or m.is_error())

    def forget(self, request_id: str) -> None:
        self.matchers.pop(request_id, None)

    def start(self, requests: Sequence[Request]) -> PendingMasks | None:
        """Begin filling the masks of the step's sampling rows (their requests, in row
        order); None when none of them is constrained (the common step, which costs nothing)."""
        if not self.matchers:
            return None
        rows = [(i, m) for i, req in enumerate(requests)
                if (m := self.matchers.get(req.request_id)) is not None]
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvbaton-grammar")
            self._executor = llguidance.LLExecutor(num_threads=1)
        assert self._executor is not None
        bitmask = llgt.allocate_token_bitmask(len(rows), self.vocab_size)
        work = [(m, j) for j, (_, m) in enumerate(rows)]
        filled = self._pool.submit(llgt.fill_next_token_bitmask_par, self._executor, work, bitmask)
        return PendingMasks([i for i, _ in rows], bitmask, filled)

    @staticmethod
    def apply(logits: torch.Tensor, pending: PendingMasks | None) -> torch.Tensor:
        """Wait for the masks; ``logits`` (the step's sampling rows) with every token they
        forbid at -inf (a new tensor: the model's logits are inference tensors)."""
        if pending is None:
            return logits
        pending.filled.result()
        masked = logits.float().clone()
        idx = torch.tensor(pending.rows, dtype=torch.long, device=logits.device)
        rows = masked.index_select(0, idx).contiguous()
        apply_token_mask(rows, pending.bitmask)
        masked.index_copy_(0, idx, rows)
        return masked

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
