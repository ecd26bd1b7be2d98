"""ModelRunner: owns the model and the KV cache tensor; runs one scheduled step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbaton.engine.attention import SeqSlice, create_attention_backend
from kvbaton.engine.request import Request
from kvbaton.engine.scheduler import SchedulerOutput
from kvbaton.kv.spec import KVSpec
from kvbaton.models.llama import LlamaForCausalLM


@dataclass
class PromptLogits:
    """Raw logits at a run of one request's prompt positions: row ``j`` is the model's
    prediction at position ``first_position + j``, i.e. for prompt token ``first_position + j + 1``."""

    request: Request
    first_position: int
    logits: torch.Tensor  # float32 [n, vocab]


@dataclass
class StepLogits:
    """What one forward pass hands the sampler: ``sample`` holds a row per sampling request
    (in the order of ``out.scheduled`` restricted to entries whose ``samples`` is true);
    ``prompt`` the prompt positions of requests that asked for ``prompt_logprobs`` and have
    them in this step (empty for every other step)."""

    sample: torch.Tensor
    prompt: list[PromptLogits] = field(default_factory=list)


class ModelRunner:
    """Turns a ``SchedulerOutput`` into one forward pass and returns the logits to sample."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        spec: KVSpec,
        num_blocks: int,
        device: torch.device,
        attention_backend: str = "auto",
        shared_kv: bool = False,
    ) -> None:
        self.model = model
        self.spec = spec
        self.device = device
        if shared_kv and device.type == "cpu":
            # Same-host decode workers then copy blocks straight out of this memory.
            from kvbaton.kv.transfer.shm import allocate_shared_kv

            self.kv_cache = allocate_shared_kv(spec, num_blocks)
        else:
            self.kv_cache = spec.allocate(num_blocks, device)
        self.backend = create_attention_backend(attention_backend, self.kv_cache, spec.block_size)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepLogits:
        """Run the step; returns float32 logits of the rows to sample and of the prompt
        positions that ``prompt_logprobs`` requests still need (:class:`StepLogits`)."""
        input_ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[int] = []
        # (request, first position, first row in the flat batch, number of rows)
        prompt_runs: list[tuple[Request, int, int, int]] = []
        for s in out.scheduled:
            req, start, n = s.request, s.start, s.num_new_tokens
            offset = len(input_ids)
            input_ids.extend(req.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            seqs.append(SeqSlice(req.block_ids, start, n))
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
            if req.needs_prompt_logits:
                wanted = req.prompt_logit_positions(start, n)
                if wanted:
                    prompt_runs.append((req, wanted.start, offset + wanted.start - start, len(wanted)))
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        meta = self.backend.prepare(seqs)
        hidden: torch.Tensor = self.model(ids, pos, self.backend.bind(meta))
        # One lm_head pass over the sampled rows and the asked-for prompt rows (none, but in a
        # prompt_logprobs request's prefill) together; no other row is projected.
        num_sampled = len(sample_rows)
        all_rows = sample_rows + [r for _, _, row0, k in prompt_runs for r in range(row0, row0 + k)]
        if not all_rows:
            return StepLogits(hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32))
        logits = self.model.compute_logits(hidden[torch.tensor(all_rows, dtype=torch.long, device=self.device)])
        prompt: list[PromptLogits] = []
        at = num_sampled
        for req, first, _, k in prompt_runs:
            prompt.append(PromptLogits(req, first, logits[at : at + k]))
            at += k
        return StepLogits(logits[:num_sampled], prompt)
