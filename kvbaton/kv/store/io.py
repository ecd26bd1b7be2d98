"""The KV store's IO thread: it moves block bytes between tiers while the engine computes.

The engine thread never blocks on a tier: it submits jobs and, once per step, collects the
ones that finished (``completed``). Loads go before stores and deletions, so a request waiting
for its prefix is not held up by write traffic; stores and deletions keep their order among
themselves (a block's file is deleted before a later copy of the same block is written).

Torch copies, file reads and writes and the checksum all release the GIL, so on a CPU the
copies run beside the model's step instead of inside it. On CUDA the job itself issues its
copies on a side stream and waits for them on this thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """The job was taken off the queue before it ran (``TierIO.cancel``)."""


class Job:
    """One unit of IO work; ``kind`` labels it (``load``, ``store``, ``delete``), ``tag`` is
    the submitter's (the engine keeps its own record there)."""

    __slots__ = ("kind", "fn", "tag", "result", "error", "_done")

    def __init__(self, kind: str, fn: Callable[[], Any], tag: Any) -> None:
        self.kind = kind
        self.fn = fn
        self.tag = tag
        self.result: Any = None
        self.error: BaseException | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the job ran; True if it did within ``timeout_s``."""
        return self._done.wait(timeout_s)


class TierIO:
    """A single worker thread with a high-priority queue (loads) and a normal one."""

    def __init__(self, name: str = "kvbaton-kv-io", on_complete: Callable[[], None] | None = None) -> None:
        # on_complete: called (on the thread that completed it) after each job completes, so an
        # owner with two TierIO can wait for either (KVOffload.wait_io).
        self.on_complete = on_complete
        self._cond = threading.Condition()
        self._urgent: deque[Job] = deque()
        self._normal: deque[Job] = deque()
        self._completed: deque[Job] = deque()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, kind: str, fn: Callable[[], Any], tag: Any = None, urgent: bool = False) -> Job:
        """Queue ``fn`` (run on the IO thread); its Job shows up in ``completed`` when done."""
        job = Job(kind, fn, tag)
        with self._cond:
            if self._closed:
                raise RuntimeError("the KV store's IO thread is closed")
            (self._urgent if urgent else self._normal).append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> bool:
        """Take a job that has not started off its queue; it completes at once with
        ``JobCancelled`` (so its owner's bookkeeping runs as for a failure). False if it
        already started or finished."""
        with self._cond:
            for q in (self._urgent, self._normal):
                try:
                    q.remove(job)
                except ValueError:
                    continue
                job.error = JobCancelled(f"{job.kind} job cancelled before it ran")
                self._completed.append(job)
                job._done.set()
                self._cond.notify_all()
                if self.on_complete is not None:
                    self.on_complete()
                return True
        return False

    @property
    def has_completed(self) -> bool:
        """Some job finished and was not collected yet."""
        return bool(self._completed)

    def completed(self) -> list[Job]:
        """Jobs that finished since the last call (engine thread)."""
        out = []
        while self._completed:
            out.append(self._completed.popleft())
        return out

    def wait_completed(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until some job has finished and not been collected:
        the engine's idle wait while a request's prefix loads, instead of spinning."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self._completed), timeout_s)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._urgent) + len(self._normal) + int(self._busy)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is queued or running; True if so within ``timeout_s``."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._urgent or self._normal or self._busy), timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Finish queued jobs (bounded by ``timeout_s``) and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._urgent or self._normal or self._closed)
                if not (self._urgent or self._normal):
                    return  # closed and drained
                job = (self._urgent or self._normal).popleft()
                self._busy = True
            try:
                job.result = job.fn()
            except BaseException as e:  # noqa: BLE001 - handed to the engine thread
                job.error = e
                if not isinstance(e, Exception):
                    log.exception("KV store IO job %s failed", job.kind)
            self._completed.append(job)
            job._done.set()
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            if self.on_complete is not None:
                self.on_complete()
