"""The evaluation suite: built-in offline tasks, log-likelihood scoring, the lm-eval bridge, the report card.

`from qinglm.evals import run_tasks, evaluate_tasks, TASKS` (loaded on first use, so the CLI's parser
stays light).
"""

from typing import Any

__all__ = ["TASKS", "evaluate_tasks", "run_tasks"]


def __getattr__(name: str) -> Any:
    if name in ("evaluate_tasks", "run_tasks"):
        from qinglm.evals import suite

        return getattr(suite, name)
    if name == "TASKS":
        from qinglm.evals.tasks import TASKS

        return TASKS
    raise AttributeError(name)
