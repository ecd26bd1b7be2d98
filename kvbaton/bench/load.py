"""Load generation: when sessions arrive, how many run at once, and when the run stops.

The unit that arrivals and the concurrency limit schedule is the **session**: a session's
turns run one after another (each waits for the previous answer, then the turn's think
time), and the session holds its concurrency slot from its first request until its last
answer, think times included. A single-turn workload is one request per session, so there
the limits mean exactly what they mean in `vllm bench serve`.

Arrivals: sessions with ``arrival_s`` set (trace replay) arrive at ``arrival_s * time_scale``
after the start; the others arrive by a gamma process of rate ``request_rate`` sessions/s
(``burstiness`` 1 is Poisson), or all at once when the rate is infinite. An arrived session
waits for a free slot when ``max_concurrency`` is set.

Stopping: the run ends when every session has finished, or, with ``duration_s``, once that
time is up: no new session or turn starts after it, requests already in flight get
``drain_timeout_s`` more to finish (they are counted as completed or failed as usual), and
whatever is still in flight after that is cancelled and counted in ``cancelled``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvbaton.bench.metrics import RequestRecord

if TYPE_CHECKING:  # the workload module is the corpus helper's; only its types are needed
    from kvbaton.bench.workloads import Session

# send(session, turn_index, history, run_start) -> the record of that request.
# history: (user, answer) of the session's earlier turns; run_start: time.perf_counter() origin.
SendTurn = Callable[["Session", int, list[tuple[str, str]], float], Awaitable[RequestRecord]]


def arrival_intervals(n: int, request_rate: float, burstiness: float = 1.0,
                      seed: int = 0) -> np.ndarray:
    """``n`` gaps (s) between arrivals: gamma-distributed with mean ``1 / request_rate`` and
    shape ``burstiness`` (1: exponential, i.e. a Poisson process; < 1 burstier, > 1 more
    regular). An infinite rate gives zeros. Deterministic for a seed."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if not request_rate > 0:
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise ValueError(f"burstiness must be a positive number, got {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=n)


def arrival_offsets(sessions: Sequence[Session], request_rate: float, burstiness: float = 1.0,
                    time_scale: float = 1.0, seed: int = 0) -> list[float]:
    """Arrival time (s after the start) of each session, in input order. The first
    generated arrival is at 0; trace arrivals are scaled by ``time_scale``."""
    free = [i for i, s in enumerate(sessions) if s.arrival_s is None]
    gaps = arrival_intervals(len(free), request_rate, burstiness, seed)
    generated = np.concatenate([[0.0], np.cumsum(gaps)[:-1]]) if free else np.zeros(0)
    out = [0.0] * len(sessions)
    for i, t in zip(free, generated):
        out[i] = float(t)
    for i, s in enumerate(sessions):
        if s.arrival_s is not None:
            out[i] = float(s.arrival_s) * time_scale
    return out


@dataclass(frozen=True)
class LoadConfig:
    """How hard and how long to drive a server. None/inf mean "no limit"."""

    max_concurrency: int | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    duration_s: float | None = None
    drain_timeout_s: float = 30.0
    time_scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a positive number, got {self.burstiness}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0, got {self.duration_s}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout_s}")
        if not (self.time_scale > 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be a positive number, got {self.time_scale}")


@dataclass
class LoadResult:
    """Records of one run and how it ended."""

    records: list[RequestRecord]
    duration_s: float            # start -> last request settled (drain and cancellation included)
    sessions_started: int
    sessions_not_started: int    # the time was up before they arrived or got a slot
    turns_not_sent: int          # turns of started sessions never sent (time up, or an earlier turn failed)
    cancelled: int               # requests in flight when the drain bound ran out
    stopped_by: str              # "completed" (every session finished) or "duration"
    max_in_flight: int = 0       # most requests in flight at once, as the driver saw it


class _Run:
    def __init__(self, config: LoadConfig, send: SendTurn,
                 on_record: Callable[[RequestRecord], None] | None) -> None:
        self.config = config
        self.send = send
        self.on_record = on_record
        self.records: list[RequestRecord] = []
        self.stopping = asyncio.Event()
        self.slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        self.in_flight = 0
        self.max_in_flight = 0
        self.started = 0
        self.turns_not_sent = 0
        self.t0 = time.perf_counter()

    async def _sleep_unless_stopping(self, seconds: float) -> bool:
        """Sleep; False if the run started stopping meanwhile."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
            except TimeoutError:
                pass
        return not self.stopping.is_set()

    async def session(self, session: Session, arrival_s: float) -> None:
        if not await self._sleep_unless_stopping(arrival_s - (time.perf_counter() - self.t0)):
            return
        if self.slots is not None:
            await self.slots.acquire()
        try:
            if self.stopping.is_set():
                return
            self.started += 1
            await self._turns(session)
        finally:
            if self.slots is not None:
                self.slots.release()

    async def _turns(self, session: Session) -> None:
        history: list[tuple[str, str]] = []
        for i, turn in enumerate(session.turns):
            if i > 0 and not await self._sleep_unless_stopping(turn.think_time_s):
                self.turns_not_sent += len(session.turns) - i
                return
            if self.stopping.is_set():
                self.turns_not_sent += len(session.turns) - i
                return
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                rec = await self.send(session, i, history, self.t0)
            finally:
                self.in_flight -= 1
            self.records.append(rec)
            if self.on_record is not None:
                self.on_record(rec)
            if not rec.ok:  # later turns need this answer
                self.turns_not_sent += len(session.turns) - i - 1
                return
            history.append((turn.user, rec.text))


async def drive(sessions: Sequence[Session], send: SendTurn, config: LoadConfig,
                on_record: Callable[[RequestRecord], None] | None = None) -> LoadResult:
    """Run ``sessions`` against ``send`` under ``config`` and return every record."""
    offsets = arrival_offsets(sessions, config.request_rate, config.burstiness,
                              config.time_scale, config.seed)
    run = _Run(config, send, on_record)
    tasks = [asyncio.create_task(run.session(s, t)) for s, t in zip(sessions, offsets)]
    stopped_by = "completed"
    cancelled = 0
    try:
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=config.duration_s)
            if pending:
                stopped_by = "duration"
                run.stopping.set()
                _, pending = await asyncio.wait(pending, timeout=config.drain_timeout_s)
            if pending:
                cancelled = run.in_flight
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        for t in tasks:  # the caller was cancelled: leave nothing running behind
            t.cancel()
    for t in tasks:
        if t.done() and not t.cancelled() and (exc := t.exception()) is not None:
            raise exc  # a bug in send(): failures of the server are records, not raises
    return LoadResult(
        records=run.records, duration_s=time.perf_counter() - run.t0,
        sessions_started=run.started, sessions_not_started=len(sessions) - run.started,
        turns_not_sent=run.turns_not_sent, cancelled=cancelled, stopped_by=stopped_by,
        max_in_flight=run.max_in_flight,
    )
