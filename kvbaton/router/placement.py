"""The placement decision, as a pure function: given the candidates, the prefix-overlap
provider and the two policies, which decode worker runs a request and whether a prefill
worker runs its prompt first (conditional disaggregation).

No I/O, no metrics and no clock: the async orchestrator calls it and records what it decided,
and a simulator can call the same function with simulated workers, so both make the same
decision for the same state.

The rule: the decode policy picks the decode worker. If the prompt part that worker does not
hold (per the overlap provider) is shorter than ``disagg_min_tokens``, or the worker cannot
import KV (no ``kv_protocol``), it prefills the prompt itself. Otherwise the prefill policy
picks a prefill worker other than the decode worker that speaks its ``kv_protocol`` (our KV
handles, or vLLM's connector); with none available the decode worker prefills, and when some
worker is meant for prefill only that counts as a ``no_prefill_worker`` fallback.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from kvbaton.router.policies import PlacementPolicy, PrefixOverlap, RoutingRequest, WorkerView

W = TypeVar("W", bound=WorkerView)


@dataclass(frozen=True)
class Placement(Generic[W]):
    """Where a request runs: ``decoder`` always; ``prefiller`` when its prompt is prefilled
    remotely. ``predicted_cached`` is the prompt tokens the decoder is expected to hold;
    ``fallback`` names why a wanted remote prefill is not happening (None otherwise)."""

    decoder: W
    prefiller: W | None
    predicted_cached: int
    fallback: str | None = None


def place(
    request: RoutingRequest,
    decode_candidates: Sequence[W],
    prefill_candidates: Sequence[W],
    overlap: PrefixOverlap,
    decode_policy: PlacementPolicy,
    prefill_policy: PlacementPolicy,
    disagg_min_tokens: int,
    dedicated_prefill: bool,
) -> Placement[W]:
    """The placement of ``request`` (see the module docstring). ``decode_candidates`` must
    be non-empty; ``dedicated_prefill`` says whether some worker is meant for prefill only."""
    # A policy returns one of the candidates it was given, so the chosen workers are Ws.
    chosen = cast(W, decode_policy.choose(request, decode_candidates, "decode"))
    cached = min(overlap.cached_tokens(request, chosen), request.num_prompt_tokens)
    if request.num_prompt_tokens - cached < disagg_min_tokens or chosen.kv_protocol is None:
        return Placement(chosen, None, cached)
    prefills = [w for w in prefill_candidates if w is not chosen and w.kv_protocol == chosen.kv_protocol]
    if not prefills:
        return Placement(chosen, None, cached, "no_prefill_worker" if dedicated_prefill else None)
    return Placement(chosen, cast(W, prefill_policy.choose(request, prefills, "prefill")), cached)
