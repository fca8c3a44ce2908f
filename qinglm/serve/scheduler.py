"""The worker that owns the model: requests wait in a queue and are decoded, batched, by one thread.

The app (asyncio) submits a GenRequest and gets a Job; the worker thread pushes the job's events onto
its asyncio queue: ("text", piece) as text is produced, then ("done", finish_reason) or ("error", message).
Decoding is qinglm.infer.engine's: each request is one row of a Generation, with its own sampling settings,
stop strings and KV-cache row, so batched requests never see each other's tokens, and a row whose
sampling fails ends alone (the engine's isolate_rows): the other requests of its batch go on. A job
whose client went away is cancelled: the worker checks between decoding steps and the row leaves the batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from qinglm.errors import QingLMError
from qinglm.infer.engine import Event, Generation, Request
from qinglm.serve.protocol import GenRequest

if TYPE_CHECKING:
    from qinglm.api import LM

log = logging.getLogger("qinglm.serve")


class QueueFull(Exception):
    """Raised by Scheduler.submit when max_queue jobs are already waiting or running."""


class Job:
    """One request in flight: the worker fills `events`, the app reads them."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req = req
        self.events: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.completion_tokens = 0
        self._loop = loop
        self._cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        """Return the number of prompt tokens."""
        return len(self.req.prompt_ids)

    @property
    def cancelled(self) -> bool:
        """Return True once cancel() was called."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the worker to stop this job at the next token (a no-op once it is done)."""
        self._cancelled.set()

    def put(self, kind: str, value: str) -> None:
        """Hand an event to the app's event loop (safe from any thread)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancel()


@dataclass
class _Batch:
    """Jobs decoding together in one engine Generation; open holds the rows not finished yet."""

    gen: Generation
    jobs: list[Job]
    steps: Iterator[list[Event]]
    open: set[int] = field(default_factory=set)


class Scheduler:
    """Owns the model: one worker thread decodes every job, many at once.

    Waiting jobs are taken together (up to max_batch_size rows in flight) into one engine Generation.
    A Generation's rows are fixed once it starts, so jobs that arrive meanwhile start their own
    Generation and the worker steps all Generations in turn: a newcomer waits for one prefill, not
    for the running batch to finish.
    """

    def __init__(self, lm: LM, max_queue: int = 256, max_batch_size: int = 16):
        self.lm = lm
        self.max_queue = max_queue
        self.max_batch_size = max_batch_size
        self.stats = {"served": 0, "cancelled": 0, "errors": 0, "peak_batch": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._active = 0  # jobs submitted and not finished
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- app side

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="qinglm-serve-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the worker after its current step; unfinished jobs are dropped."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: GenRequest) -> Job:
        """Return a queued Job for req; raise QueueFull when max_queue jobs are in flight."""
        with self._lock:
            if self._active >= self.max_queue:
                raise QueueFull(f"the server is busy ({self._active} requests in flight); retry later")
            self._active += 1
        job = Job(req, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    @property
    def in_flight(self) -> int:
        """Return the number of jobs waiting or running."""
        return self._active

    # -------------------------------------------------------------- worker side

    def _work(self) -> None:
        batches: list[_Batch] = []
        while True:
            rows = sum(len(b.open) for b in batches)
            jobs = self._take(self.max_batch_size - rows, wait=not batches)
            if jobs is None:
                return
            if jobs:
                batches += self._start(jobs)
                self.stats["peak_batch"] = max(self.stats["peak_batch"], sum(len(b.open) for b in batches))
            for batch in batches:
                self._step(batch)
            batches = [b for b in batches if b.open]

    def _take(self, room: int, wait: bool) -> list[Job] | None:
        """Return up to room waiting jobs (blocking for the first when wait); None means stop."""
        jobs: list[Job] = []
        while len(jobs) < room:
            try:
                job = self._queue.get(block=wait and not jobs)
            except queue.Empty:
                break
            if job is None:
                return None
            if job.cancelled:  # its client left while it waited
                self._finish(job, "cancelled")
            else:
                jobs.append(job)
        return jobs

    def _start(self, jobs: list[Job]) -> list[_Batch]:
        """Return the Generation of jobs as a _Batch (one per job when one of them is invalid)."""
        lm = self.lm
        requests = [Request(j.req.prompt_ids, j.req.sampling, j.req.stop, j.req.counted) for j in jobs]
        try:
            gen = Generation(lm.model, requests, tokenizer=lm.tokenizer, device=lm.device, isolate_rows=True)
        except QingLMError as e:
            if len(jobs) > 1:  # fail only the job at fault
                return [b for j in jobs for b in self._start([j])]
            self._finish(jobs[0], "error", str(e))
            return []
        return [_Batch(gen, jobs, iter(gen), set(range(len(jobs))))]

    def _step(self, batch: _Batch) -> None:
        """Run one decoding step of batch and hand each job its events."""
        try:
            events = next(batch.steps)
        except StopIteration:  # every row should have finished with an event before this
            events = []
        except Exception:  # a bug must not kill the worker: log it, fail these jobs, serve the rest
            log.exception("generation failed")
            for row in batch.open:
                self._finish(batch.jobs[row], "error", "internal error while generating; see the server log")
            batch.open.clear()
            return
        for ev in events:
            job = batch.jobs[ev.row]
            job.completion_tokens += len(ev.ids)
            if ev.text and not job.cancelled:
                job.put("text", ev.text)
            if ev.finish_reason == "error":  # this row alone failed
                log.error("a request failed while generating", exc_info=ev.error)
                batch.open.discard(ev.row)
                self._finish(job, "error", "internal error while generating; see the server log")
            elif ev.finish_reason:
                batch.open.discard(ev.row)
                self._finish(job, ev.finish_reason)
        for row in batch.open:
            if batch.jobs[row].cancelled:
                batch.gen.cancel(row)
        if not events:
            for row in batch.open:
                self._finish(batch.jobs[row], "error", "generation ended early; see the server log")
            batch.open.clear()

    def _finish(self, job: Job, reason: str, message: str = "") -> None:
        """Count job as finished and send its last event."""
        if reason == "cancelled" or job.cancelled:
            self.stats["cancelled"] += 1
        elif reason == "error":
            self.stats["errors"] += 1
            job.put("error", message)
        else:
            self.stats["served"] += 1
            job.put("done", reason)
        with self._lock:
            self._active -= 1
