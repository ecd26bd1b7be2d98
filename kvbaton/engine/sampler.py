"""Sampler: turns last-position logits into tokens (greedy, temperature, top-k, top-p, seed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
        # Drop a token when the mass before it already reaches top_p (keeps at least one).
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
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
