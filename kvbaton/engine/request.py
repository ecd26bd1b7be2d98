"""Request: one sequence's state inside the engine (tokens, blocks, progress, outcome).

Torch-free on purpose: the scheduler, the block pool and the stop rule work on requests alone,
so a simulator can drive them without a model (the sampler keeps seeded generators itself).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from kvbaton.kv.hashing import BlockHash, hash_block_chain
from kvbaton.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Where a request is in its life.

    ``WAITING`` requests hold no blocks; admission looks up their cached prefix.
    ``WAITING_FOR_KV`` requests hold blocks that a load from the tiered KV store is filling
    with their prefix; the scheduler passes them over until it ends. ``WAITING_WITH_KV``
    requests already hold blocks with KV written for their first ``num_computed_tokens``
    tokens (imported from a prefill worker, or loaded from a tier): admission gives them
    blocks for the rest only. ``RUNNING`` requests are scheduled every step until
    ``FINISHED``. Preemption sends a running request back to ``WAITING`` (its blocks freed).
    """

    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    WAITING_WITH_KV = "waiting_with_kv"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """A request's tokens and progress.

    ``token_ids`` holds the prompt followed by the generated tokens. ``num_computed_tokens``
    counts tokens whose KV is in the cache; the last sampled token is never computed yet, so a
    running decode has exactly one token left to compute.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    root_hash: BlockHash
    block_size: int
    prompt: str | None = None

    token_ids: list[int] = field(init=False)
    status: RequestStatus = field(init=False, default=RequestStatus.WAITING)
    num_computed_tokens: int = field(init=False, default=0)
    block_ids: list[int] = field(init=False, default_factory=list)
    # Hashes of full blocks of token_ids, extended lazily as the sequence grows.
    block_hashes: list[BlockHash] = field(init=False, default_factory=list)
    # How many of block_ids are registered in the prefix cache (their KV is written).
    num_committed_blocks: int = field(init=False, default=0)
    num_cached_tokens: int = field(init=False, default=-1)  # -1: not yet admitted
    num_preemptions: int = field(init=False, default=0)
    logprobs: list[float] = field(init=False, default_factory=list)
    top_logprobs: list[dict[int, float]] = field(init=False, default_factory=list)
    # params.prompt_logprobs: one entry per prompt position collected so far (None at
    # position 0, which has no context); complete once it has num_prompt_tokens entries.
    prompt_logprobs: list[dict[int, float] | None] = field(init=False, default_factory=list)
    finish_reason: str | None = field(init=False, default=None)
    stop_reason: str | int | None = field(init=False, default=None)
    output_text: str = field(init=False, default="")
    num_reported_tokens: int = field(init=False, default=0)  # output tokens already returned
    # A prefix load from the tiered store failed or timed out: compute the prompt instead.
    skip_tiers: bool = field(init=False, default=False)
    # The remote KV tier was asked for this request's blocks (once per request).
    remote_probed: bool = field(init=False, default=False)
    # The tiered store's reuse filter has counted this request's blocks (once per request).
    reuse_counted: bool = field(init=False, default=False)
    # Prefill-only: keep the prompt's blocks under a lease of this many seconds when finished.
    lease_ttl_s: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs.append(None)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether prompt positions still need their logits computed (``prompt_logprobs``
        asked and not all collected yet). Such a request must compute its prompt rather than
        read it from a cache: cached tokens come with no logits."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def prompt_logit_positions(self, start: int, num_new_tokens: int) -> range:
        """Positions among ``[start, start + num_new_tokens)`` whose logits give a prompt
        logprob not collected yet: position ``p`` predicts prompt token ``p + 1``. Empty when
        nothing is needed; positions collected before a preemption are not asked again."""
        if not self.needs_prompt_logits:
            return range(0)
        # Such a request never starts past what it collected (it reads no cached prefix).
        assert start <= len(self.prompt_logprobs) - 1, "prompt positions skipped: their logprobs would be lost"
        first = max(start, len(self.prompt_logprobs) - 1)
        return range(first, max(first, min(start + num_new_tokens, self.num_prompt_tokens - 1)))

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def waiting(self) -> bool:
        return self.status in (RequestStatus.WAITING, RequestStatus.WAITING_FOR_KV, RequestStatus.WAITING_WITH_KV)

    def full_block_hashes(self) -> list[BlockHash]:
        """Hashes of all full blocks of the current tokens (computed incrementally)."""
        n_full = self.num_tokens // self.block_size
        if len(self.block_hashes) < n_full:
            start = len(self.block_hashes)
            parent = self.block_hashes[-1] if start else None
            self.block_hashes.extend(
                hash_block_chain(self.root_hash, self.token_ids, self.block_size, parent, start)
            )
        return self.block_hashes
