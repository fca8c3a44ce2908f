"""Map a function over consecutive chunks of a stream in worker processes, in order, with bounded memory:
what `data clean` and `data dedup` use to spread their pure-Python work over the CPU's cores.

A worker is set up once by `init(*initargs)` (a module-level function: it runs in each spawned process,
or in this one without workers) and then maps chunks with `fn`. Results come back in input order, so
the output does not depend on the number of workers; at most `2 * workers` chunks are in flight.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from typing import Any, TypeVar

from qinglm.typecheck import check_value

T = TypeVar("T")
R = TypeVar("R")
MAX_WORKERS = 1024  # each worker is a process: more than this is a typo, not a machine


def default_workers() -> int:
    """Return the CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_workers(workers: int) -> int:
    """Return workers (0 = one per CPU) after checking it is in [0, MAX_WORKERS]."""
    check_value("--workers (0: one per CPU)", workers, f"[0, {MAX_WORKERS}]")
    return workers or default_workers()


def chunked_map(
    fn: Callable[[list[T]], R],
    items: Iterable[T],
    *,
    workers: int,
    chunk: int,
    init: Callable[..., None],
    initargs: tuple[Any, ...] = (),
) -> Iterator[R]:
    """Yield fn(c) for each consecutive chunk c of `chunk` items, in order, in `workers` processes
    (in this one when workers <= 1)."""
    it = iter(items)
    chunks = iter(lambda: list(islice(it, chunk)), [])
    if workers <= 1:
        init(*initargs)
        yield from map(fn, chunks)
        return
    # spawn: a forked child would inherit the parent's threads' locks (reader threads, Rust pools)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init, initargs=initargs) as pool:
        pending: deque = deque()
        try:
            for c in chunks:
                pending.append(pool.submit(fn, c))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
