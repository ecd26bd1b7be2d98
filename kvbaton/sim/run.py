"""A simulated benchmark run: the bench's workloads and load model on a :class:`SimCluster`,
written in the bench's result JSON, so ``kvbaton bench compare``-style tables and plots put a
simulated run beside a real one.

The load model is the bench driver's (:mod:`kvbaton.bench.load`) on the virtual clock: the
same arrival offsets (``arrival_offsets``, same seed), sessions holding a concurrency slot from
their first request to their last answer, turns one after another with their think times. A
turn's prompt is the bench's completions prompt (``prefix + user_1 + answer_1 + ... + user_n``)
as tokens: the session's earlier prompt and answer tokens, then the new user text tokenized
with the bench's tokenizer.
"""

from __future__ import annotations

import functools
import math
import time
from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvbaton.bench.load import LoadConfig, arrival_offsets
from kvbaton.bench.metrics import RequestRecord, per_tag, summarize
from kvbaton.bench.runner import usage_cached_rate
from kvbaton.bench.workloads import Session
from kvbaton.sim.cluster import SimCluster, SimConfig, SimRequest
from kvbaton.sim.cost import CostModel


@dataclass
class SimResult:
    """A simulated run: its records, the simulated duration, and the cluster it ran on."""

    records: list[RequestRecord]
    duration_s: float
    wall_s: float
    cluster: SimCluster

    @property
    def speed(self) -> float:
        """Simulated seconds per wall-clock second."""
        return self.duration_s / self.wall_s if self.wall_s > 0 else math.inf


class _Driver:
    def __init__(self, cluster: SimCluster, sessions: Sequence[Session], tokenizer: Any, load: LoadConfig) -> None:
        self.cluster = cluster
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.load = load
        self.records: list[RequestRecord] = []
        self.slots = load.max_concurrency or math.inf
        self.in_use = 0
        self.queue: deque[int] = deque()
        self._encoded: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        ids = self._encoded.get(text)
        if ids is None:
            ids = self._encoded[text] = list(self.tokenizer.encode(text, add_special_tokens=False))
        return ids

    @staticmethod
    def known_ids(s: Session, k: int) -> array[int] | None:
        """The token ids of turn ``k``'s new text when the workload gave them (the first turn's
        text is the prefix and the user text together: known only without a prefix)."""
        t = s.turns[k]
        return t.user_ids if k or not s.prefix else None

    def pretokenize(self) -> None:
        """Encode every text the sessions will send, and whose ids the workload did not give,
        in one batch call (the tokenizer's Rust side runs it on all cores: per-prompt calls
        cost more than the simulation itself)."""
        texts = list(dict.fromkeys(s.prefix + turn.user if k == 0 else turn.user
                                   for s in self.sessions for k, turn in enumerate(s.turns)
                                   if self.known_ids(s, k) is None))
        if not texts:
            return
        batch = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        self._encoded.update(zip(texts, (list(ids) for ids in batch)))

    def start(self) -> None:
        self.pretokenize()
        offsets = arrival_offsets(self.sessions, self.load.request_rate, self.load.burstiness,
                                  self.load.time_scale, self.load.seed)
        for i, t in enumerate(offsets):
            self.cluster.at(t, functools.partial(self.arrive, i))

    def arrive(self, i: int) -> None:
        if self.in_use < self.slots:
            self.in_use += 1
            self.turn(i, 0, [])
        else:
            self.queue.append(i)

    def release(self) -> None:
        self.in_use -= 1
        if self.queue:
            self.in_use += 1
            self.turn(self.queue.popleft(), 0, [])

    def turn(self, i: int, k: int, context: list[int]) -> None:
        s = self.sessions[i]
        t = s.turns[k]
        known = self.known_ids(s, k)
        if known is not None:
            head = list(known)
        else:
            head = self.encode(s.prefix + t.user) if k == 0 else self.encode(t.user)
        prompt = context + head
        sreq = SimRequest(f"{s.session_id}-{k}", prompt, t.max_tokens, self.cluster.clock.now, tags=s.tags)

        def done(r: SimRequest) -> None:
            self.records.append(self.record(s, k, r))
            if k + 1 < len(s.turns) and r.error is None:
                nxt = s.turns[k + 1]
                history = prompt + r.output_token_ids
                self.cluster.at(self.cluster.clock.now + nxt.think_time_s, lambda: self.turn(i, k + 1, history))
            else:
                self.release()

        self.cluster.submit(sreq, done)

    @staticmethod
    def record(s: Session, k: int, r: SimRequest) -> RequestRecord:
        if r.error is not None or r.first_token_s is None or r.finish_s is None:
            return RequestRecord(s.session_id, k, s.tags, r.arrival_s, ok=False, error=r.error or "not finished",
                                 prompt_tokens=len(r.prompt_token_ids))
        times = [r.first_token_s, *r.token_times[1:]] if r.token_times else [r.first_token_s]
        itls = [b - a for a, b in zip(times, times[1:])]
        return RequestRecord(s.session_id, k, s.tags, r.arrival_s, ok=True, ttft_s=r.first_token_s - r.arrival_s,
                             e2el_s=r.finish_s - r.arrival_s, itls_s=itls, prompt_tokens=len(r.prompt_token_ids),
                             output_tokens=len(r.output_token_ids), cached_tokens=r.cached_tokens)


def simulate(config: SimConfig, cost: CostModel, sessions: Sequence[Session], tokenizer: Any,
             load: LoadConfig | None = None) -> SimResult:
    """Run ``sessions`` on a simulated cluster under ``load`` (``duration_s`` and the drain
    bound are not modelled: every session runs to its end)."""
    load = load or LoadConfig()
    cluster = SimCluster(config, cost)
    driver = _Driver(cluster, sessions, tokenizer, load)
    wall = time.perf_counter()
    driver.start()
    cluster.run_until_idle()
    cluster.finish()
    wall = time.perf_counter() - wall
    records = sorted(driver.records, key=lambda r: (r.start_s, r.session_id, r.turn))
    end = max((r.start_s + (r.e2el_s or 0.0) for r in records), default=0.0)
    return SimResult(records, end, wall, cluster)


def result_json(res: SimResult, load: LoadConfig, workload: str, options: dict[str, Any], seed: int,
                num_prompts: int, slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The bench's result JSON for a simulated run (``backend`` says ``kvbaton-sim``), plus a
    ``sim`` block: the cost model, the topology, speed, and per-worker utilisation."""
    c = res.cluster
    cfg = c.config
    queries = sum(w.pool.prefix_queries for w in c.workers)
    hits = sum(w.pool.prefix_hits for w in c.workers)
    out: dict[str, Any] = {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "backend": "kvbaton-sim",
        "base_url": None,
        "endpoint_type": "completions",
        "model_id": "sim",
        "num_prompts": num_prompts,
        "request_rate": load.request_rate if math.isfinite(load.request_rate) else "inf",
        "burstiness": load.burstiness,
        "max_concurrency": load.max_concurrency,
    }
    out.update(summarize(res.records, res.duration_s, slo))
    out.update({
        "prefix_cache_hit_rate": hits / queries if queries else None,
        "usage_cached_token_rate": usage_cached_rate(res.records),
        "per_tag": per_tag(res.records),
        "slo": dict(slo) if slo else None,
        "workload": {"name": workload, "options": dict(options)},
        "seed": seed,
        "sim": {
            "cost_model": c.cost.describe(),
            "topology": {"prefill": cfg.prefill, "decode": cfg.decode, "colocated": cfg.colocated},
            "policy": {"decode": cfg.decode_policy, "prefill": cfg.prefill_policy},
            "engine": dict(vars(cfg.engine)),
            "link": {"bytes_per_s": cfg.link_bytes_s, "latency_s": cfg.link_latency_s},
            "kv_bytes_per_token": c.kv_bytes_per_token,
            "transfers": c.transfers, "transfer_bytes": c.transfer_bytes, "timeouts": c.timeouts,
            "simulated_s": res.duration_s, "wall_s": res.wall_s, "speed": res.speed,
            "workers": {w.url: {"steps": w.steps, "busy_s": w.busy_s,
                                "utilisation": w.busy_s / res.duration_s if res.duration_s else None}
                        for w in c.workers},
        },
    })
    return out
