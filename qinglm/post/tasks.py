"""GRPO's tasks: a built-in one (qinglm.data.verifiable.TASKS) or your own, ``--task MODULE:FUNCTION``.

FUNCTION() returns a qinglm.data.verifiable.Task (the current directory is searched for MODULE), e.g.
``Task("mine", lambda split: [...], lambda prompt, completion, ref: 1.0)``; Task and Example are
importable from here too.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from qinglm.data.verifiable import TASKS, Example, Task
from qinglm.errors import QingLMError

__all__ = ["TASKS", "Example", "Task", "import_function", "load_task"]


def import_function(spec: str, what: str, builtin: str) -> Any:
    """Return the callable FUNCTION of MODULE:FUNCTION (the current directory is searched for MODULE);
    QingLMError naming what ("task", "tools") when spec is not one. builtin: the choices named in the
    message besides MODULE:FUNCTION."""
    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise QingLMError(f"unknown {what} {spec!r}; choose {builtin} or MODULE:FUNCTION")
    if "" not in sys.path:  # the `qinglm` script does not search the current directory; python -m does
        sys.path.insert(0, "")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # the user's module: any error it raises is theirs to fix
        raise QingLMError(f"cannot import {what} module {module!r}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise QingLMError(f"{what} module {module!r} has no function {func!r}")
    return fn


def load_task(spec: str) -> Task:
    """Return the built-in task named spec, or the Task that MODULE:FUNCTION() returns."""
    if spec in TASKS:
        return TASKS[spec]()
    fn = import_function(spec, "task", ", ".join(TASKS))
    try:
        task = fn()
    except Exception as e:
        raise QingLMError(f"task function {spec} raised {type(e).__name__}: {e}") from None
    if not isinstance(task, Task):
        raise QingLMError(
            f"task function {spec} must return a qinglm.post.tasks.Task, got {type(task).__name__}"
        )
    return task
