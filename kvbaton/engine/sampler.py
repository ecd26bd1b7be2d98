"""Sampler: turns last-position logits into tokens (greedy, temperature, top-k, top-p, seed).

:func:`sample` is the pure step; :class:`Sampler` adds what a seeded request needs across steps:
its own random generator, kept here (keyed by request id) rather than on the request, so the
engine's :class:`~kvbaton.engine.request.Request` stays free of torch and a simulator can run
the scheduler on requests without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvbaton.sampling_params import SamplingParams


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each sampled token under the raw model
    top_logprobs: list[dict[int, float] | None]


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p. The most likely token is
        # always kept: a top_p below float32's smallest value rounds to 0, and `0 >= 0` would
        # otherwise drop every token (all -inf: NaN probabilities).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> SampleResult:
    """Sample one token per row of ``logits`` (float32, ``[B, vocab]``)."""
    logits = logits.float()
    tokens = torch.argmax(logits, dim=-1)  # greedy rows keep this
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = generators[i]
        if gen is not None and probs.device != gen.device:
            # Seeded sampling draws on the CPU generator so results match across devices.
            probs = probs.cpu()
        tokens[i] = torch.multinomial(probs, 1, generator=gen).item()
    need_logprobs = any(p.logprobs is not None for p in params)
    token_list = tokens.tolist()
    if not need_logprobs:
        return SampleResult(token_list, [], [None] * len(params))
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    tops: list[dict[int, float] | None] = []
    for i, p in enumerate(params):
        if p.logprobs:
            vals, idx = torch.topk(logp[i], min(p.logprobs, logp.shape[-1]))
            tops.append(dict(zip(idx.tolist(), vals.tolist())))
        else:
            tops.append(None)
    return SampleResult(token_list, chosen, tops)


@dataclass
class Sampler:
    """Samples for the engine and owns the generators of seeded requests.

    A request's generator is created from its seed the first time it samples and lives until
    :meth:`forget` (the engine calls it when the request ends, however it ends), so a
    request's tokens depend only on its seed, never on what it was batched with, and a
    preempted request continues its stream where it left off.
    """

    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def sample(self, logits: torch.Tensor, request_ids: Sequence[str],
               params: Sequence[SamplingParams]) -> SampleResult:
        """One token per row of ``logits``, row ``i`` for ``request_ids[i]``."""
        gens = [self._generator(rid, p) for rid, p in zip(request_ids, params)]
        return sample(logits, params, gens)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        gen = self.generators.get(request_id)
        if gen is None:
            gen = self.generators[request_id] = torch.Generator().manual_seed(params.seed)
        return gen

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator (a no-op for unseeded requests)."""
        self.generators.pop(request_id, None)
