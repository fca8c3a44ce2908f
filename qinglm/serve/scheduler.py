"""The worker that owns the model: requests wait in a queue and are decoded, batched, by one thread.

The app (asyncio) submits a GenRequest and gets a Job; the worker thread pushes the job's events onto
its asyncio queue: ("text", piece) as text is produced, then ("done", finish_reason) or ("error", message).
Decoding is qinglm.infer.engine's: the worker owns one Engine and each request is one row of it, with its
own sampling settings, stop strings and KV-cache row, so requests never see each other's tokens, and a
row whose sampling fails ends alone (the engine's isolate_rows): the other requests go on. A job whose
client went away is cancelled: the worker checks between decoding steps and the row leaves the engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING

from qinglm.errors import QingLMError
from qinglm.infer.engine import Engine, Event, Request
from qinglm.infer.slots import check_fits
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


class Scheduler:
    """Owns the model: one worker thread decodes every job on one engine, many at once.

    Jobs join the engine as they arrive (up to max_batch_size rows decode at once, within the KV-cache
    budget kv_tokens; the rest wait in the engine's queue) and each engine step is one forward for
    every decoding row, whichever job it belongs to: a newcomer waits for one step, not for a batch.
    """

    def __init__(
        self,
        lm: LM,
        max_queue: int = 256,
        max_batch_size: int = 16,
        kv_tokens: int | None = None,
        compile: bool = False,
    ):
        self.lm = lm
        self.max_queue = max_queue
        self.max_batch_size, self.kv_tokens, self.compile = max_batch_size, kv_tokens, compile
        self.stats = {"served": 0, "cancelled": 0, "errors": 0, "peak_batch": 0}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._active = 0  # jobs submitted and not finished
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    # -------------------------------------------------------------- app side

    def start(self) -> None:
        """Start the worker thread; return once it is ready (compiled: every shape of the step compiled)."""
        if self._thread is None:
            self._ready.clear()
            self._thread = threading.Thread(target=self._work, name="qinglm-serve-worker", daemon=True)
            self._thread.start()
            self._ready.wait()

    def stop(self) -> None:
        """Stop the worker after its current step; unfinished jobs are dropped."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: GenRequest) -> Job:
        """Return a queued Job for req; raise QueueFull when max_queue jobs are in flight, QingLMError when
        req could never fit the KV-cache budget."""
        if self.kv_tokens is not None:
            context = self.lm.model.cfg.max_seq_len
            check_fits(len(req.prompt_ids), req.sampling.max_new_tokens, context, self.kv_tokens)
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

    def _engine(self) -> Engine:
        lm = self.lm
        return Engine(
            lm.model,
            tokenizer=lm.tokenizer,
            device=lm.device,
            max_batch_size=self.max_batch_size,
            kv_tokens=self.kv_tokens,
            isolate_rows=True,
            compile=self.compile,
            log=log.warning,
        )

    def _warm_engine(self) -> Engine:
        """Return the worker's engine, its step compiled for every shape when compiling (in this thread: CUDA
        graphs replay in the thread that captured them); ready is set either way."""
        try:
            engine = self._engine()
            if self.compile:
                t0 = time.perf_counter()
                log.warning("compiling the decoding step for every batch and context shape before serving...")
                n = engine.warm_up()
                log.warning(f"compiled {n} shapes in {time.perf_counter() - t0:.0f} s; serving")
            return engine
        finally:
            self._ready.set()

    def _work(self) -> None:
        engine, jobs = self._warm_engine(), set()  # jobs: those added to the engine and not finished
        while True:
            if not self._take(engine, jobs, wait=not engine.busy):
                return
            for job in jobs:
                if job.cancelled:
                    engine.cancel(job)
            try:
                events = engine.step()
            except Exception:  # a bug must not kill the worker: log it, fail these jobs, serve the rest
                log.exception("generation failed")
                for job in jobs:
                    self._finish(job, "error", "internal error while generating; see the server log")
                engine, jobs = self._engine(), set()
                continue
            finished = sum(1 for ev in events if ev.finish_reason)
            self.stats["peak_batch"] = max(self.stats["peak_batch"], engine.rows + finished)
            for ev in events:
                self._event(ev, jobs)

    def _take(self, engine: Engine, jobs: set[Job], wait: bool) -> bool:
        """Add the waiting jobs to engine (blocking for the first when wait); return False to stop."""
        while True:
            try:
                job = self._queue.get(block=wait)
            except queue.Empty:
                return True
            wait = False
            if job is None:
                return False
            req = job.req
            try:
                engine.add(job, Request(req.prompt_ids, req.sampling, req.stop, req.counted))
            except QingLMError as e:
                self._finish(job, "error", str(e))
                continue
            jobs.add(job)

    def _event(self, ev: Event, jobs: set[Job]) -> None:
        """Hand one engine event to its job."""
        job = ev.row
        job.completion_tokens += len(ev.ids)
        if ev.text and not job.cancelled:
            job.put("text", ev.text)
        if ev.finish_reason == "error":  # this row alone failed
            log.error("a request failed while generating", exc_info=ev.error)
            self._finish(job, "error", "internal error while generating; see the server log")
        elif ev.finish_reason:
            self._finish(job, ev.finish_reason)
        if ev.finish_reason:
            jobs.discard(job)

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
