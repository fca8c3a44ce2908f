"""Run work that Ctrl-C cannot interrupt in a child process that the parent kills at once.

The tokenizers library trains in Rust: a Ctrl-C only sets a flag that Python checks when the
training returns, minutes or hours later. Run there, the work stops the moment the user asks.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from qinglm.errors import QingLMError


def _die_with_parent(parent: int) -> None:
    """Return nothing; ask Linux to SIGKILL this process when its parent dies (a no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _child(conn: Any, parent: int, fn: Callable[..., Any], args: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches both; the parent acts
    _die_with_parent(parent)
    try:
        fn(*args)
    except QingLMError as e:
        conn.send(str(e))
        return
    conn.send(None)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_killable(fn: Callable[..., Any], *args: Any) -> None:
    """Return after fn(*args) has run in a spawned child process; a QingLMError there is raised here.

    Ctrl-C or SIGTERM kills the child at once and raises KeyboardInterrupt. fn and args must be
    picklable; fn's output goes to this process's stdout/stderr, its return value is dropped.
    """
    ctx = multiprocessing.get_context("spawn")  # no fork: this process may hold threads
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, os.getpid(), fn, args), daemon=True)
    main = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    old = signal.signal(signal.SIGTERM, _interrupt) if main else None
    try:
        child.start()
        send.close()
        child.join()
    except BaseException:
        if child.is_alive():
            child.kill()
            child.join()
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)
    if not receive.poll():  # the child died without a word; it printed its traceback
        raise RuntimeError(f"the child process failed (exit status {child.exitcode})")
    message = receive.recv()
    if message is not None:
        raise QingLMError(message)
