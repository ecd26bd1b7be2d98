"""One client request, several choices: ``n`` samples, ``best_of`` candidates, a batch of prompts.

The worker and the router both run such a request as one engine request (or one job) per
choice, each with ``n = 1``, and merge them back into one response here. The rules they share:

- Choice ``j`` of prompt ``p`` has index ``p * k + j`` (``k`` = ``n``, or ``best_of`` while
  candidates run), as vLLM numbers a batch's choices.
- Choice ``j`` samples with ``seed + j`` when the request has a seed, as vLLM's parallel
  sampling does: choice 0 is what the same request with ``n = 1`` returns, and a seeded
  request's choices are reproducible however they were batched or routed.
- ``best_of``: the ``n`` candidates with the highest cumulative log-probability (sum of the
  sampled tokens' logprobs under the raw model) are returned, best first; ties keep the
  lower index.
- Usage counts each prompt once (its first choice's prompt and cached tokens) and every
  generated token of every choice, candidates included: that is the work the server did.

A prompt's runs share its KV blocks: on a worker the engine's in-flight prefix sharing has
the other runs wait for the blocks the first admitted one computes, then find them in the
prefix cache and compute only the last, partial block (prefix caching on). The router's
KV-aware policies send a prompt's runs to one worker (a round-robin router spreads them, and
each worker computes the prompt); with dedicated prefill workers it opens the prompt's first
run before the others, which then find its imported blocks on the decode worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Fanout:
    """How many engine requests a client request becomes.

    ``num_prompts`` prompts, ``k`` runs each (``best_of`` if given, else ``n``), of which
    ``n`` per prompt are returned."""

    num_prompts: int
    n: int
    k: int

    @property
    def single(self) -> bool:
        """One prompt, one run: the plain path, no merging."""
        return self.num_prompts == 1 and self.k == 1

    @property
    def total(self) -> int:
        return self.num_prompts * self.k

    def prompt_of(self, index: int) -> int:
        return index // self.k

    def sample_of(self, index: int) -> int:
        return index % self.k

    def returned(self, cumulative_logprobs: Sequence[float]) -> list[int]:
        """Which runs the response returns, in choice order, from every run's cumulative
        logprob (read only with ``best_of``): all of them, or each prompt's ``n`` best."""
        if self.k == self.n:
            return list(range(self.total))
        chosen: list[int] = []
        for p in range(self.num_prompts):
            base = p * self.k
            chosen.extend(base + j for j in best_of_order(cumulative_logprobs[base:base + self.k], self.n))
        return chosen


def child_seed(seed: int | None, sample: int) -> int | None:
    """The seed of a request's ``sample``-th choice (None stays None: unseeded)."""
    return None if seed is None else seed + sample


def best_of_order(cumulative_logprobs: Sequence[float], n: int) -> list[int]:
    """Positions of the ``n`` best candidates, best first (ties: the lower position)."""
    ranked = sorted(range(len(cumulative_logprobs)), key=lambda i: (-cumulative_logprobs[i], i))
    return ranked[:n]


def combined_usage(fan: Fanout, per_run: Sequence[tuple[int, int, int]]) -> dict[str, Any]:
    """The usage object of a fanned-out request from each run's ``(prompt_tokens,
    completion_tokens, cached_tokens)``, in run order (see the module docstring)."""
    from kvbaton.api.protocol import usage

    prompt = sum(per_run[p * fan.k][0] for p in range(fan.num_prompts))
    cached = sum(per_run[p * fan.k][2] for p in range(fan.num_prompts))
    completion = sum(r[1] for r in per_run)
    return usage(prompt, completion, cached)


async def gather_all(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await ``coros`` concurrently, results in order; the first one that raises cancels the
    others (awaited to their end) and its error is raised as itself, not as a group."""
    tasks: list[asyncio.Task[T]] = []
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(_awaited(c)) for c in coros]
    except BaseExceptionGroup as group:
        raise group.exceptions[0] from None
    return [t.result() for t in tasks]


async def _awaited(aw: Awaitable[T]) -> T:
    return await aw


async def merge(iterators: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """``(position, item)`` from all ``iterators`` as the items arrive.

    Items that arrive together come in position order. An iterator that raises ends the
    merge with its error; however the merge ends, the iterators' pending reads are
    cancelled (their owners close them)."""
    pending: dict[asyncio.Future[T], int] = {
        asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)
    }
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=lambda f: pending[f]):
                i = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, item
                pending[asyncio.ensure_future(anext(iterators[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()
