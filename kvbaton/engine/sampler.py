"""Sampler: turns last-position logits into tokens (logit controls, greedy, temperature,
top-k, top-p, seed), and prompt-position logits into prompt logprobs.

:func:`sample` is the pure step; :class:`Sampler` adds what a seeded request needs across steps:
its own random generator, kept here (keyed by request id) rather than on the request, so the
engine's :class:`~kvbaton.engine.request.Request` stays free of torch and a simulator can run
the scheduler on requests without it.

Per row, in vLLM's order: ``logit_bias`` is added, ``min_tokens`` masks EOS and the stop token
ids, the repetition, frequency and presence penalties are applied, then temperature, top-k and
top-p as before (greedy rows take the argmax of the adjusted logits, so they stay
deterministic). The logprobs returned are always those of the raw model logits (vLLM's default
``raw_logprobs``): a penalty or bias changes which token is picked, never a reported logprob.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvbaton.sampling_params import SamplingParams

# Adjusted logits are kept within this bound: a tiny repetition_penalty can push a logit past
# float32's range, and an infinite logit turns softmax into NaN (inf - inf).
_LOGIT_BOUND = 1e30


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each sampled token under the raw model
    top_logprobs: list[dict[int, float] | None]


class SampleRow(Protocol):
    """What the sampler reads of one row's request (the engine's ``Request`` is one): the
    penalties need the tokens seen so far, the prompt first."""

    @property
    def request_id(self) -> str: ...

    @property
    def params(self) -> SamplingParams: ...

    @property
    def token_ids(self) -> list[int]: ...

    @property
    def num_prompt_tokens(self) -> int: ...


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


def _adjust_row(
    row: torch.Tensor,
    p: SamplingParams,
    token_ids: Sequence[int],
    num_prompt: int,
    eos_token_ids: Collection[int],
) -> torch.Tensor:
    """``row`` (one request's raw logits) with its logit controls applied, in vLLM's order."""
    vocab = row.shape[-1]
    raw = row
    row = row.clone()
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=row.device)
        row[ids] += torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device)
    if p.min_tokens and len(token_ids) - num_prompt < p.min_tokens:
        banned = set(p.stop_token_ids)
        if not p.ignore_eos:  # an ignored EOS does not stop anything, so it may be sampled
            banned.update(eos_token_ids)
        # stop_token_ids are not checked against the vocabulary: ids past it cannot be sampled.
        ids_list = [t for t in banned if t < vocab]
        if ids_list:
            row[torch.tensor(ids_list, dtype=torch.long, device=row.device)] = float("-inf")
    if p.repetition_penalty != 1.0 and token_ids:
        seen = torch.zeros(vocab, dtype=torch.bool, device=row.device)
        seen[torch.tensor(token_ids, dtype=torch.long, device=row.device)] = True
        rp = p.repetition_penalty
        row = torch.where(seen, torch.where(row > 0, row / rp, row * rp), row)
    if (p.frequency_penalty or p.presence_penalty) and len(token_ids) > num_prompt:
        out = torch.tensor(token_ids[num_prompt:], dtype=torch.long, device=row.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
        row = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
    # Masked tokens stay -inf; finite values stay finite (see _LOGIT_BOUND). A row the controls
    # left with no possible token (stop_token_ids covering the vocabulary under min_tokens)
    # samples from the raw logits instead of failing the whole batch on NaN probabilities.
    row = torch.where(torch.isneginf(row), row, row.clamp(-_LOGIT_BOUND, _LOGIT_BOUND))
    return torch.where(torch.isneginf(row).all(), raw, row)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[tuple[Sequence[int], int]] | None = None,
    eos_token_ids: Collection[int] = (),
) -> SampleResult:
    """Sample one token per row of ``logits`` (float32, ``[B, vocab]``).

    ``histories[i]`` is row ``i``'s ``(token_ids, num_prompt_tokens)``: the prompt followed by
    the tokens generated so far, which the penalties and ``min_tokens`` read (None: no row has
    any, as if every row were at its first step with an empty prompt). ``eos_token_ids`` are
    masked with the stop token ids while a row is short of its ``min_tokens``.
    """
    logits = logits.float()
    adjusted = logits
    if any(p.has_penalties for p in params):  # most steps: none (this runs every step)
        adjusted = logits.clone()  # the raw logits stay for the logprobs
        for i, p in enumerate(params):
            if p.has_penalties:
                ids, num_prompt = histories[i] if histories is not None else ((), 0)
                adjusted[i] = _adjust_row(logits[i], p, ids, num_prompt, eos_token_ids)
    tokens = torch.argmax(adjusted, dim=-1)  # greedy rows keep this
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = _filter_top_k_top_p(adjusted[i] / p.temperature, p.top_k, p.top_p)
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
    logp = torch.log_softmax(logits, dim=-1)  # raw: see the module docstring
    chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    tops: list[dict[int, float] | None] = []
    for i, p in enumerate(params):
        if p.logprobs:
            vals, idx = torch.topk(logp[i], min(p.logprobs, logp.shape[-1]))
            tops.append(dict(zip(idx.tolist(), vals.tolist())))
        else:
            tops.append(None)
    return SampleResult(token_list, chosen, tops)


def prompt_logprobs(logits: torch.Tensor, targets: Sequence[int], num_top: int) -> list[dict[int, float] | None]:
    """Prompt logprobs from raw logits: row ``j`` of ``logits`` (``[n, vocab]``) predicts
    ``targets[j]``; each entry maps that token and the ``num_top`` most likely ones to their
    log-probabilities (the actual token first, as vLLM orders them)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    tgt = torch.tensor(list(targets), dtype=torch.long, device=logp.device)
    chosen = logp.gather(1, tgt.unsqueeze(1)).squeeze(1).tolist()
    out: list[dict[int, float] | None] = []
    if num_top > 0:
        vals, idx = torch.topk(logp, min(num_top, logp.shape[-1]), dim=-1)
        for t, lp, ids, vs in zip(targets, chosen, idx.tolist(), vals.tolist()):
            entry = {t: lp}
            for k, v in zip(ids, vs):
                entry.setdefault(k, v)
            out.append(entry)
    else:
        out.extend({t: lp} for t, lp in zip(targets, chosen))
    return out


@dataclass
class Sampler:
    """Samples for the engine and owns the generators of seeded requests.

    A request's generator is created from its seed the first time it samples and lives until
    :meth:`forget` (the engine calls it when the request ends, however it ends), so a
    request's tokens depend only on its seed, never on what it was batched with, and a
    preempted request continues its stream where it left off.
    """

    generators: dict[str, torch.Generator] = field(default_factory=dict)

    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow],
               eos_token_ids: Collection[int] = ()) -> SampleResult:
        """One token per row of ``logits``, row ``i`` for ``rows[i]`` (its params, and the
        tokens it has seen for the penalties); ``eos_token_ids`` for ``min_tokens``."""
        params = [r.params for r in rows]
        gens = [self._generator(r.request_id, p) for r, p in zip(rows, params)]
        histories = None
        if any(p.has_penalties for p in params):
            histories = [(r.token_ids, r.num_prompt_tokens) for r in rows]
        return sample(logits, params, gens, histories, eos_token_ids)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator | None:
        if params.seed is None or params.greedy:
            return None
        gen = self.generators.get(request_id)
        if gen is None:
            gen = self.generators[request_id] = torch.Generator().manual_seed(params.seed)
        return gen

    def skip_draw(self, request_id: str, params: SamplingParams, vocab_size: int) -> None:
        """Advance a seeded request's generator past one sample, drawn elsewhere: a decode
        worker continuing after the prefill worker's first token draws the second sample,
        as the same request run whole would. (``multinomial`` consumes the generator by the
        row's size, never by its values, so a uniform row of the vocabulary's size stands in
        for the one the other side drew from.)"""
        gen = self._generator(request_id, params)
        if gen is not None:
            torch.multinomial(torch.ones(vocab_size), 1, generator=gen)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator (a no-op for unseeded requests)."""
        self.generators.pop(request_id, None)
