"""LLMEngine: one worker's inference loop (add requests, step, abort), no I/O.

Callers drive it with ``step()``; each step schedules, runs the model once, samples, applies
stop conditions and returns the outputs that changed. Thread-unsafe by design: the worker runs
it on one thread and talks to it through queues.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch

from kvbaton.engine.block_pool import BlockPool
from kvbaton.engine.config import DEFAULT_DISK_CACHE_BYTES, EngineConfig
from kvbaton.engine.kv_handoff import ImportPlan, KVHandoff
from kvbaton.engine.leases import LeaseTable
from kvbaton.engine.model_runner import ModelRunner, PromptLogits
from kvbaton.engine.offload import KVOffload
from kvbaton.engine.outputs import RequestOutput
from kvbaton.engine.request import Request
from kvbaton.engine.sampler import Sampler, prompt_logprobs
from kvbaton.engine.scheduler import Scheduler, SchedulerOutput
from kvbaton.engine.step_trace import StepRecorder, StepTrace
from kvbaton.engine.stop import StopDecision, check_stop
from kvbaton.engine.structured import StructuredOutputs
from kvbaton.errors import ConfigError, InvalidRequestError
from kvbaton.kv.events import KVEventSink
from kvbaton.kv.hashing import BlockHash, root_hash
from kvbaton.kv.spec import KVSpec, torch_dtype
from kvbaton.kv.store.base import KVTier
from kvbaton.kv.store.disk import DiskTier
from kvbaton.kv.store.host import HostTier
from kvbaton.kv.store.policies import make_policy
from kvbaton.kv.store.remote import RemoteTier
from kvbaton.limits import check_request_fits
from kvbaton.models.loader import LoadedModel, load_model
from kvbaton.models.packed_linear import is_packed, onednn_supports, pack_linears
from kvbaton.models.tokenizer import chat_prompt_ids, encode_text
from kvbaton.sampling_params import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 2 << 30
GPU_MEMORY_FRACTION = 0.85


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return torch_dtype(dtype)


class LLMEngine:
    """A paged-KV engine with prefix caching, continuous batching and chunked prefill."""

    def __init__(
        self,
        config: EngineConfig,
        event_sink: KVEventSink | None = None,
        loaded: LoadedModel | None = None,
    ) -> None:
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        self.device = torch.device(config.device)
        dtype = resolve_dtype(config.dtype, config.device)
        self.loaded = loaded or load_model(
            config.model, dtype, self.device, config.load_format, config.seed
        )
        self.linear_backend = self._pack_linears(config.linear_backend, dtype)
        mcfg = self.loaded.config
        self.model_config = mcfg
        self.tokenizer = self.loaded.tokenizer
        self.max_model_len = min(
            config.max_model_len or mcfg.max_position_embeddings, mcfg.max_position_embeddings
        )
        self.kv_spec = KVSpec(
            mcfg.num_layers, mcfg.num_kv_heads, mcfg.head_dim, str(dtype).split(".")[-1],
            config.block_size,
        )
        num_blocks = self._num_kv_blocks()
        self.model_fingerprint = f"{self.loaded.fingerprint}:{self.kv_spec.layout_id()}"
        # Events name where blocks live: vLLM's "GPU" for a CUDA device; "CPU" for a CPU one.
        medium = "GPU" if self.device.type == "cuda" else "CPU"
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching, event_sink,
                              config.kv_eviction_policy, medium)
        self.scheduler = Scheduler(
            self.pool, config.max_num_seqs, config.max_num_batched_tokens,
            config.enable_chunked_prefill, config.share_inflight_prefill,
            config.long_prefill_token_threshold,
        )
        self.leases = LeaseTable(config.lease_ttl_s)
        self.handoff = KVHandoff(self.pool, self.scheduler, self.leases)
        self.sampler = Sampler()
        self.num_failed_steps = 0  # steps whose forward pass or sampling raised (_fail_step)
        self._traced_parts: list[list[int]] = []  # the step trace's record of the running step
        self.runner = ModelRunner(
            self.loaded.model, self.kv_spec, num_blocks, self.device, config.attention_backend,
            shared_kv=config.shared_kv,
        )
        self.offload = self._build_offload() if config.kv_tiers_enabled and config.enable_prefix_caching else None
        self.step_trace: StepRecorder | None = (
            StepTrace(config.step_trace_path, self.cost_meta()) if config.step_trace_path else None
        )
        eos = set(mcfg.eos_token_ids)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos))
        self.structured = StructuredOutputs(self.tokenizer, mcfg.vocab_size, self.eos_token_ids)
        self._ids = itertools.count()
        # Servers that stream text set this; batch callers only need text at the end.
        self.incremental_detokenize = False
        tokens = num_blocks * config.block_size
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %d B/token); "
            "maximum concurrency for %d-token requests: %.2fx",
            num_blocks, config.block_size, tokens,
            num_blocks * self.kv_spec.bytes_per_block / 2**30, self.kv_spec.bytes_per_token,
            self.max_model_len, tokens / self.max_model_len,
        )

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        budget = cfg.kv_cache_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * GPU_MEMORY_FRACTION)
            else:
                # Never more than max_num_seqs full-context requests could use.
                cap = self.kv_spec.bytes_per_token * self.max_model_len * cfg.max_num_seqs
                budget = min(DEFAULT_CPU_KV_BYTES, cap)
        n = budget // self.kv_spec.bytes_per_block
        if n < 1:
            raise ValueError(f"KV memory budget {budget} B holds no {self.kv_spec.bytes_per_block} B block")
        return int(n)

    def _build_offload(self) -> KVOffload:
        """The tiered KV store below the device pool: a host tier and/or a disk tier, and a
        remote tier the cluster shares."""
        cfg, spec = self.config, self.kv_spec
        tiers: list[KVTier] = []
        if cfg.kv_host_cache_bytes:
            blocks = cfg.kv_host_cache_bytes // spec.bytes_per_block
            if blocks < 1:
                raise ConfigError("kv_host_cache_bytes", f"holds no {spec.bytes_per_block} B block")
            tiers.append(HostTier(blocks, spec.bytes_per_block, cfg.block_size, make_policy(cfg.kv_eviction_policy),
                                  cfg.kv_host_ttl_s, pin_memory=self.device.type == "cuda"))
        if cfg.kv_disk_cache_dir is not None:
            disk_bytes = cfg.kv_disk_cache_bytes or DEFAULT_DISK_CACHE_BYTES
            blocks = disk_bytes // spec.bytes_per_block
            if blocks < 1:
                raise ConfigError("kv_disk_cache_bytes", f"holds no {spec.bytes_per_block} B block")
            tiers.append(DiskTier(cfg.kv_disk_cache_dir, blocks, spec.bytes_per_block, cfg.block_size,
                                  spec.layout_id(), self.model_fingerprint, make_policy(cfg.kv_eviction_policy),
                                  cfg.kv_disk_ttl_s))
        # Readahead covers what one step can allocate: its token budget, plus a block per
        # running sequence that crosses into a new block.
        readahead = 2 * -(-cfg.max_num_batched_tokens // cfg.block_size) + cfg.max_num_seqs
        remote = None
        if cfg.kv_remote_url is not None:
            remote = RemoteTier(cfg.kv_remote_url, spec.bytes_per_block, cfg.block_size, spec.layout_id(),
                                self.model_fingerprint, cfg.kv_remote_namespace, cfg.kv_remote_ttl_s,
                                cfg.kv_remote_timeout_s)
        offload = KVOffload(self.pool, self.scheduler, self.runner.kv_cache, tiers, cfg.kv_offload_mode,
                            cfg.kv_offload_min_hits, cfg.kv_load_timeout_s, readahead, remote=remote,
                            remote_min_hits=cfg.kv_remote_min_hits)
        for t in tiers:
            log.info("KV %s tier: %d blocks (%.2f GiB)", t.name, t.capacity_blocks,
                     t.capacity_blocks * spec.bytes_per_block / 2**30)
        return offload

    # ---- requests --------------------------------------------------------------------------

    def root_hash(self, cache_salt: str | None = None) -> BlockHash:
        """Root of the block-hash chain for this model and tenant (one SHA-256 of a short
        string: computed per request rather than cached, so no number of tenant salts can
        grow a table)."""
        try:
            return root_hash(self.model_fingerprint, cache_salt)
        except UnicodeError:
            raise InvalidRequestError("cache_salt", "must be valid Unicode") from None

    def tokenize(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``; InvalidRequestError for text no tokenizer can take
        (:func:`~kvbaton.models.tokenizer.encode_text`)."""
        return encode_text(self.tokenizer, prompt)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a conversation followed by the assistant's generation prompt (``tools``
        for a template that renders them); InvalidRequestError if the model has no chat
        template or a message is malformed."""
        return chat_prompt_ids(self.tokenizer, messages, self.config.model, tools)

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        cache_salt: str | None = None,
        lease_ttl_s: float | None = None,
        first_token: tuple[int, float | None] | None = None,
    ) -> str:
        """Queue a request; raises :class:`~kvbaton.errors.InvalidRequestError` (naming the
        field) for inputs that can never run: empty prompt, unknown token ids, or prompt +
        max_tokens beyond the context or the whole KV cache.

        ``lease_ttl_s``: a prefill-only request; when it finishes its prompt's blocks stay
        pinned under a lease (``RequestOutput.kv_lease``) for a decode worker to fetch.
        ``first_token``: the (token id, logprob) a prefill worker already sampled; generation
        continues after it, recomputing the prompt here (the fallback when a transfer fails).
        Such a request cannot ask for ``prompt_logprobs`` (nor can an import): whether it gets
        them must not depend on whether a transfer failed.
        """
        params = params or SamplingParams()
        req = self._new_request(prompt, params, request_id, cache_salt)
        req.lease_ttl_s = lease_ttl_s
        try:
            self._begin_constraint(req)
            if first_token is not None:
                self._append_first_token(req, first_token)
            self.scheduler.add(req)
        except BaseException:
            self._forget(req.request_id)
            raise
        return req.request_id

    def _begin_constraint(self, req: Request) -> None:
        """Compile a structured-output request's constraint (InvalidRequestError naming its
        field when it does not compile) and give the request its matcher."""
        if req.params.structured is not None:
            self.structured.add(req.request_id, req.params.structured)

    def _forget(self, request_id: str) -> None:
        """Drop what a request that ended (however it ended) kept outside the scheduler: its
        seeded generator and its constraint's matcher."""
        self.sampler.forget(request_id)
        self.structured.forget(request_id)

    def _new_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str | None,
        cache_salt: str | None,
        new_id: bool = True,
    ) -> Request:
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
            raise InvalidRequestError("prompt", f"token ids must be integers in [0, {vocab})")
        # Only the engine knows the vocabulary; SamplingParams checked the rest of logit_bias.
        bad = max(params.logit_bias, default=-1)
        if bad >= vocab:
            raise InvalidRequestError("logit_bias", f"token ids must be below the vocabulary size {vocab}, got {bad}")
        check_request_fits(len(ids), params.max_tokens, self.max_model_len,
                           self.pool.num_blocks, self.config.block_size)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if new_id and (rid in self.scheduler.requests or rid in self.handoff.plans):
            raise ValueError(f"duplicate request id {rid!r}")
        return Request(
            rid, ids, params, self.root_hash(cache_salt), self.config.block_size, prompt=text,
        )

    def _append_first_token(self, req: Request, first_token: tuple[int, float | None]) -> None:
        if req.params.prompt_logprobs is not None:
            # The prompt ran on the prefill worker (whose logits are gone), or its KV was imported.
            raise InvalidRequestError("prompt_logprobs", "is not supported for a request prefilled on another worker")
        tok, logprob = first_token
        vocab = self.model_config.vocab_size
        if not isinstance(tok, int) or not 0 <= tok < vocab:
            raise InvalidRequestError("kv_transfer_params", f": first token id must be an integer in [0, {vocab})")
        req.token_ids.append(tok)
        if req.params.logprobs is not None:
            # Top-n alternatives of the first token stay on the prefill worker.
            req.logprobs.append(0.0 if logprob is None else logprob)
        # A seeded request's next token is its second draw, as if it had run whole here; a
        # constrained one's matcher takes the token as if it had sampled it.
        self.structured.accept(req.request_id, tok)
        self.sampler.skip_draw(req.request_id, req.params, vocab)

    # ---- KV handoff (disaggregated prefill/decode) ------------------------------------------

    def reserve_import(
        self,
        prompt_token_ids: Sequence[int],
        handle_hashes: Sequence[BlockHash],
        request_id: str,
        cache_salt: str | None = None,
    ) -> ImportPlan | None:
        """Reserve blocks for a prompt whose KV comes from a prefill worker (see
        :mod:`kvbaton.engine.kv_handoff`); None when the cache cannot hold it right now."""
        ids = list(prompt_token_ids)
        self._new_request(ids, SamplingParams(max_tokens=1), request_id, cache_salt)  # validates
        return self.handoff.reserve(
            request_id, ids, self.root_hash(cache_salt), cache_salt, tuple(handle_hashes)
        )

    def commit_import(
        self,
        request_id: str,
        params: SamplingParams,
        first_token: tuple[int, float | None],
    ) -> str:
        """Queue the request whose blocks ``reserve_import`` reserved and a transfer filled
        (same prompt and tenant: both come from the reservation)."""
        plan = self.handoff.plans.get(request_id)
        if plan is None:
            raise ValueError(f"no import reserved for request {request_id!r}")
        try:
            req = self._new_request(
                plan.prompt_token_ids, params, request_id, plan.cache_salt, new_id=False
            )
            self._begin_constraint(req)
            self._append_first_token(req, first_token)
        except ValueError:
            self._forget(request_id)
            self.handoff.cancel(request_id)
            raise
        self.handoff.commit(request_id, req)
        return request_id

    def cancel_import(self, request_id: str) -> bool:
        """Free the blocks of a reserved import that will not be committed."""
        return self.handoff.cancel(request_id)

    def release_lease(self, lease_id: str) -> bool:
        """End a lease now (its blocks are freed at the next ``collect_leases``)."""
        return self.leases.release(lease_id)

    def collect_leases(self) -> int:
        """Free blocks of leases released or past their deadline, and let the tiered store
        collect finished copies and expire idle entries and pins; engine thread only (the
        worker calls it while idle)."""
        if self.offload is not None:
            self.offload.step_begin()
        return self.handoff.collect_leases()

    def abort_request(self, request_id: str) -> bool:
        """Abort a request at any point; its blocks are freed. False if unknown/finished."""
        self._forget(request_id)
        return self.scheduler.abort(request_id) is not None

    def _pack_linears(self, backend: str, dtype: torch.dtype) -> str:
        """Pack the model's matmul weights for oneDNN when ``backend`` asks for it (``auto``:
        where oneDNN runs this device and dtype); returns the backend the model now runs on,
        read from the model (one handed in already packed stays packed, whatever ``backend``)."""
        model = self.loaded.model
        if backend != "torch":
            if onednn_supports(self.device, dtype):
                pack_linears(model)
            elif backend == "onednn":
                raise ConfigError("linear_backend", f"onednn cannot run {str(dtype).removeprefix('torch.')} on "
                                  f"{self.device.type} here (it needs a CPU, float32 or bfloat16 on a CPU that "
                                  "has it, and torch built with oneDNN)")
        return "onednn" if is_packed(model) else "torch"

    def cost_meta(self) -> dict[str, Any]:
        """What a measured step time depends on besides the batch (the header of a profile and
        of a step trace): model, device, dtype, threads, block size, pool, KV bytes per token."""
        cfg = self.config
        return {
            "model": cfg.model, "device": str(self.device),
            "dtype": str(self.runner.kv_cache.dtype).replace("torch.", ""),
            "linear_backend": self.linear_backend, "attention_backend": self.runner.backend.name,
            # The threads torch really uses (the flag may be unset), and the machine's cores: what
            # a served step shares with the other workers on it.
            "threads": torch.get_num_threads(), "host_cores": os.cpu_count() or 1,
            "block_size": cfg.block_size, "num_kv_blocks": self.pool.num_blocks,
            "max_num_batched_tokens": cfg.max_num_batched_tokens,
            "kv_bytes_per_token": int(self.kv_spec.bytes_per_token),
        }

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns outputs of requests that gained tokens or ended."""
        if self.step_trace is None:
            return self._step()
        start = time.monotonic()
        self._traced_parts = []
        outputs = self._step()
        if self._traced_parts:
            self.step_trace.record(start, time.monotonic(), self._traced_parts, self.has_unfinished_requests())
        else:
            self.step_trace.idle()
        return outputs

    def _step(self) -> list[RequestOutput]:
        self.handoff.collect_leases()
        if self.offload is not None:
            self.offload.step_begin()
        out = self.scheduler.schedule()
        # Loads that landed within the grace join this step; so do loads that a remote lookup
        # answered within it made possible (hence a second round).
        for _ in range(2):
            if self.offload is None or not self.offload.wait_new_loads(self.config.kv_load_grace_s):
                break
            self.scheduler.admit_more(out)
        if not out.scheduled:
            if self.offload is not None and self.scheduler.waiting:
                # Only prefixes loading (or nothing fits yet): wait for the IO threads a little
                # instead of spinning on an empty schedule.
                self.offload.wait_io(0.05)
            return []
        sampling = [s for s in out.scheduled if s.samples]
        if self.step_trace is not None:  # the batch as it runs: a step moves each start on
            self._traced_parts = [[s.num_new_tokens, s.start] for s in out.scheduled]
        try:
            # Constrained rows' masks are filled on a helper thread while the model runs.
            rows = [s.request for s in sampling]
            masks = self.structured.start(rows)
            step_logits = self.runner.execute(out)
            logits = self.structured.apply(step_logits.sample, masks)
            result = self.sampler.sample(logits, rows, self.eos_token_ids)
            prompt_lps = [self._prompt_logprobs(pl) for pl in step_logits.prompt]
        except Exception as e:  # noqa: BLE001 - contained: see _fail_step
            return self._fail_step(out, e)
        for s in out.scheduled:
            self.scheduler.commit_computed(s)
        for req, lps in prompt_lps:  # the runner asked only for positions not collected yet
            req.prompt_logprobs.extend(lps)
        outputs: list[RequestOutput] = []
        for i, s in enumerate(sampling):
            req = s.request
            req.token_ids.append(result.token_ids[i])
            self.structured.advance(req.request_id, result.token_ids[i])
            if req.params.logprobs is not None:
                req.logprobs.append(result.logprobs[i])
                top = result.top_logprobs[i]
                if top is not None:
                    req.top_logprobs.append(top)
            outputs.append(self._check_stop_and_output(req))
        if self.offload is not None:
            self.offload.step_end()
        return outputs

    @staticmethod
    def _prompt_logprobs(pl: PromptLogits) -> tuple[Request, list[dict[int, float] | None]]:
        """The prompt logprobs that ``pl``'s rows give its request (not stored yet: a step that
        fails commits nothing)."""
        req, first = pl.request, pl.first_position
        targets = req.prompt_token_ids[first + 1 : first + 1 + pl.logits.shape[0]]
        return req, prompt_logprobs(pl.logits, targets, req.params.prompt_logprobs or 0)

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """The forward pass or sampling of a step raised: fail the requests it ran, free their
        blocks, and leave the engine serving the rest.

        Nothing of the step was committed (no token appended, no block registered in the
        prefix cache), so the requests' blocks are freed whole and the state is what it was
        before the step, less those requests. The integrity check proves that before the
        engine goes on; if it fails, the error propagates and the caller's loop ends (a
        worker then exits instead of serving from a state it cannot trust).
        """
        log.exception("engine step failed; failing its %d requests", len(out.scheduled))
        message = f"the engine step running this request failed: {type(exc).__name__}: {exc}"
        outputs = []
        for s in out.scheduled:
            req = s.request
            self.scheduler.finish(req, "error")
            self._forget(req.request_id)
            failed = self._make_output(req)
            failed.error = message
            outputs.append(failed)
        self.num_failed_steps += 1
        self.check_integrity()
        return outputs

    def _check_stop_and_output(self, req: Request) -> RequestOutput:
        params = req.params
        # Detokenizing every step costs O(n) per token; do it only when someone reads it.
        text = self._detokenize(req) if (params.stop or self.incremental_detokenize) else None
        end = check_stop(params, req.token_ids[-1], req.num_output_tokens, req.num_tokens,
                         self.max_model_len, self.eos_token_ids, text, req.output_text)
        if end is None and self.structured.stopped(req.request_id):
            end = StopDecision("stop")  # the constraint is complete: nothing may follow
        lease = None
        if end is not None:
            if end.text is not None:
                text = end.text
            ttl = req.lease_ttl_s
            kept = self.scheduler.finish(req, end.reason, end.stop_reason, keep_blocks=ttl is not None)
            self._forget(req.request_id)
            if ttl is not None:
                lease = self.handoff.lease_out(req, kept, ttl)
        if text is None and req.finished:
            text = self._detokenize(req)
        if text is not None:
            req.output_text = text
        out = self._make_output(req)
        out.kv_lease = lease
        return out

    def _detokenize(self, req: Request) -> str:
        ids = req.output_token_ids
        if not req.params.ignore_eos and ids and ids[-1] in self.eos_token_ids:
            ids = ids[:-1]
        text: str = self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)
        return text

    def _make_output(self, req: Request) -> RequestOutput:
        n_prev = req.num_reported_tokens
        req.num_reported_tokens = req.num_output_tokens
        text = req.output_text
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            token_ids=list(req.output_token_ids),
            text=text,
            finished=req.finished,
            finish_reason=req.finish_reason,
            stop_reason=req.stop_reason,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            logprobs=list(req.logprobs) if req.params.logprobs is not None else None,
            top_logprobs=list(req.top_logprobs) if req.params.logprobs else None,
            # Complete once the prompt has run, then never changed: shared, not copied.
            prompt_logprobs=None if req.needs_prompt_logits or req.params.prompt_logprobs is None
            else req.prompt_logprobs,
            new_token_ids=req.output_token_ids[n_prev:],
        )

    # ---- introspection ---------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Assert block accounting (every block's refs equal the live requests, leases and
        imports holding it), request states, and that no finished request left a sampler
        generator behind."""
        self.scheduler.check_states()
        stale = set(self.sampler.generators) - set(self.scheduler.requests)
        assert not stale, f"sampler generators of finished requests: {sorted(stale)[:5]}"
        stale = set(self.structured.matchers) - set(self.scheduler.requests) - set(self.handoff.plans)
        assert not stale, f"constraint matchers of finished requests: {sorted(stale)[:5]}"
        refs = self.scheduler.block_refs()
        held = [self.handoff.block_refs()]
        if self.offload is not None:
            self.offload.check()
            held.append(self.offload.block_refs())
        for more in held:
            for b, n in more.items():
                refs[b] = refs.get(b, 0) + n
        self.pool.check_integrity(refs)

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.pool.num_used_blocks,
            "kv_blocks_total": self.pool.num_blocks,
            "prefix_cache_queries": self.pool.prefix_queries,
            "prefix_cache_hits": self.pool.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_inflight_prefix_waits": self.scheduler.num_inflight_waits,
            "kv_leases_active": len(self.leases),
            "kv_leases_created": self.leases.num_created,
            "kv_leases_released": self.leases.num_released,
            "kv_leases_expired": self.leases.num_expired,
            "kv_blocks_imported": self.handoff.num_imported_blocks,
            "kv_tiers": self.offload.tier_stats() if self.offload is not None else {},
            "kv_remote": self.offload.remote_stats() if self.offload is not None else {},
            "kv_offload_sync_stores": self.offload.sync_stores if self.offload is not None else 0,
            "num_failed_steps": self.num_failed_steps,
        }

    def publish_snapshot(self) -> int:
        """Send the whole cache to the event sink (a router that lost events resyncs):
        the device pool's blocks, then every tier's; returns the number of blocks sent."""
        sent = self.pool.publish_snapshot()
        sink = self.pool.event_sink
        if self.offload is not None and sink is not None:
            events = self.offload.snapshot_events()
            for ev in events:
                sink(ev)
            sent += len(events)
        return sent

    def close(self) -> None:
        """Release what outlives requests: the tiered store's IO thread and media, the step trace."""
        if self.offload is not None:
            self.offload.close()
        if self.step_trace is not None:
            self.step_trace.close()
        self.structured.close()


def build_engine_on_own_thread(config: EngineConfig, event_sink: KVEventSink | None = None) -> LLMEngine:
    """Build an :class:`LLMEngine` on a short-lived thread and return it (or raise what building
    raised), for a process whose engine loop runs on a thread of its own, as the worker's does.

    Why: loading a model runs multi-threaded torch ops, and each thread that runs one keeps an
    OpenMP team until it exits. With a team left on the main thread beside the engine thread's,
    libgomp counts more threads than CPUs and stops spin-waiting between parallel regions, so
    every one of oneDNN's short matmuls waits for its threads to wake: a batch-1 SmolLM2 decode
    step took 51.6 ms instead of 44.5 ms on the project's 2-core machine (``benchmarks/
    engine_steps.py --steps-on-second-thread``, docs/engine.md). A thread that exits takes its
    team with it.
    """
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["engine"] = LLMEngine(config, event_sink)
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box["error"] = e

    # A daemon: Ctrl-C during a long load ends the process instead of waiting for the load.
    t = threading.Thread(target=build, name="kvbaton-engine-build", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    engine: LLMEngine = box["engine"]
    return engine
