"""ModelRunner: owns the model and the KV cache tensor; runs one scheduled step."""

from __future__ import annotations

import torch

from kvbaton.engine.attention import SeqSlice, create_attention_backend
from kvbaton.engine.scheduler import SchedulerOutput
from kvbaton.kv.spec import KVSpec
from kvbaton.models.llama import LlamaForCausalLM


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
    def execute(self, out: SchedulerOutput) -> torch.Tensor:
        """Run the step; returns float32 logits ``[num_sampling_requests, vocab]`` in the
        order of ``out.scheduled`` restricted to entries whose ``samples`` is true."""
        input_ids: list[int] = []
        positions: list[int] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[int] = []
        for s in out.scheduled:
            req, start, n = s.request, s.start, s.num_new_tokens
            input_ids.extend(req.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            seqs.append(SeqSlice(req.block_ids, start, n))
            if s.samples:
                sample_rows.append(len(input_ids) - 1)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        meta = self.backend.prepare(seqs)
        hidden: torch.Tensor = self.model(ids, pos, self.backend.bind(meta))
        if not sample_rows:
            return hidden.new_empty((0, self.model.config.vocab_size), dtype=torch.float32)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[rows])
