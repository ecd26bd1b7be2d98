"""A record of every engine step that ran work, as a serving worker really ran it.

``kvbaton profile`` times steps of an engine alone; a served worker also shares its process with
the HTTP server, its machine with other workers and the router, and its loop with the commands
between steps. The step trace says what each served step cost in those conditions: one JSON line
per step that ran a batch, after a header line that says what ran them (``"kind":
"kvbaton-step-trace"``, the model, device, threads, block size, pool and KV bytes per token;
one header each time a worker opens the file),

    {"t": 12.345678, "dt": 0.0412, "gap": 0.0006, "parts": [[256, 0], [1, 300]]}

- ``t``: when the step began (seconds, ``time.monotonic`` of the worker);
- ``dt``: how long ``LLMEngine.step`` took (scheduling, the forward pass, sampling, bookkeeping:
  what a :class:`~kvbaton.sim.cost.CostModel` predicts);
- ``gap``: seconds since the previous step ended, when that step left work behind (the worker
  loop's own cost between steps: commands, publishing outputs, the GIL shared with the HTTP
  server); null after an idle engine (waiting for requests is no cost of the loop);
- ``parts``: ``[new tokens, context before them]`` per request of the batch (a
  :class:`~kvbaton.sim.cost.StepShape`).

``kvbaton profile --from-steps`` fits the simulator's cost model to such files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

TRACE_KIND = "kvbaton-step-trace"


class StepRecorder:
    """Keeps the engine's steps in memory (``steps``: one dict per step, the fields above).
    ``LLMEngine.step`` reports to whichever recorder is its ``step_trace``; ``kvbaton profile``
    reads the steps it times from one of these, so a profiled and a served step are measured
    the same way."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self._prev_end: float | None = None

    def record(self, start: float, end: float, parts: Sequence[Sequence[int]], work_left: bool) -> None:
        """The step that ran ``parts`` (``[new tokens, context before them]`` per request, as
        scheduled) from ``start`` to ``end``; ``work_left``: the engine still had unfinished
        requests after it (so the next step's wait is the loop's cost)."""
        gap = None if self._prev_end is None else round(start - self._prev_end, 6)
        self._prev_end = end if work_left else None
        self.keep({"t": round(start, 6), "dt": round(end - start, 6), "gap": gap, "parts": [list(p) for p in parts]})

    def keep(self, step: dict[str, Any]) -> None:
        self.steps.append(step)

    def idle(self) -> None:
        """The engine ran out of work without a step (nothing scheduled): the next wait is idle."""
        self._prev_end = None

    def close(self) -> None:
        """Nothing to release in memory."""


class StepTrace(StepRecorder):
    """Appends one line per step to ``path`` instead of keeping it (its directory is created; an
    existing file grows, so a restarted worker keeps its history). Buffered: lines reach the
    file in blocks and at :meth:`close`."""

    def __init__(self, path: str | Path, header: Mapping[str, Any]) -> None:
        super().__init__()
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        self.path = p
        self._f: IO[str] | None = p.open("a", encoding="utf-8")
        self._f.write(json.dumps({"kind": TRACE_KIND, **header}) + "\n")

    def keep(self, step: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(step, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
