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

from qinglm.errors import Interrupted, QingLMError


def kill_on_parent_death() -> Callable[[], None]:
    """Return a function that asks Linux to SIGKILL the process calling it when its parent dies (a no-op
    elsewhere); it imports and looks up nothing, so it is safe as a Popen preexec_fn."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return lambda: None
    kill = int(signal.SIGKILL)
    return lambda: prctl(1, kill)  # PR_SET_PDEATHSIG


def die_with_parent(parent: int) -> None:
    """Return nothing; this process is SIGKILLed when its parent dies (Linux), and exits now if the parent,
    whose id is given, died before the request took effect."""
    kill_on_parent_death()()
    if os.getppid() != parent:
        os._exit(1)


def _child(conn: Any, parent: int, fn: Callable[..., Any], args: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches both; the parent acts
    die_with_parent(parent)
    try:
        fn(*args)
    except QingLMError as e:
        conn.send(str(e))
        return
    conn.send(None)


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def run_killable(fn: Callable[..., Any], *args: Any) -> None:
    """Return after fn(*args) has run in a spawned child process; a QingLMError there is raised here.

    Ctrl-C or SIGTERM kills the child at once and raises KeyboardInterrupt (Interrupted for SIGTERM).
    fn and args must be picklable; fn's output goes to this process's stdout/stderr, its return value
    is dropped.
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
