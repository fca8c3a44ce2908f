"""GRPO's tasks: a built-in one (qinglm.data.verifiable.TASKS) or your own, ``--task MODULE:FUNCTION``.

FUNCTION() returns a qinglm.data.verifiable.Task (the current directory is searched for MODULE), e.g.
``Task("mine", lambda split: [...], lambda prompt, completion, ref: 1.0)``; Task and Example are
importable from here too.
"""

from __future__ import annotations

import importlib
import sys

from qinglm.data.verifiable import TASKS, Example, Task
from qinglm.errors import QingLMError

__all__ = ["TASKS", "Example", "Task", "load_task"]


def load_task(spec: str) -> Task:
    """Return the built-in task named spec, or the Task that MODULE:FUNCTION() returns."""
    if spec in TASKS:
        return TASKS[spec]()
    module, sep, func = spec.partition(":")
    if not sep or not module or not func:
        raise QingLMError(f"unknown task {spec!r}; choose {', '.join(TASKS)} or MODULE:FUNCTION")
    if "" not in sys.path:  # the `qinglm` script does not search the current directory; python -m does
        sys.path.insert(0, "")
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # the user's module: any error it raises is theirs to fix
        raise QingLMError(f"cannot import task module {module!r}: {type(e).__name__}: {e}") from None
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise QingLMError(f"task module {module!r} has no function {func!r}")
    try:
        task = fn()
    except Exception as e:
        raise QingLMError(f"task function {spec} raised {type(e).__name__}: {e}") from None
    if not isinstance(task, Task):
        raise QingLMError(
            f"task function {spec} must return a qinglm.post.tasks.Task, got {type(task).__name__}"
        )
    return task
