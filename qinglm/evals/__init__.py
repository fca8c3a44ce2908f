"""The evaluation suite: built-in offline tasks, log-likelihood scoring, the lm-eval bridge, the report card."""

from qinglm.evals.suite import evaluate_tasks, run_tasks
from qinglm.evals.tasks import TASKS

__all__ = ["TASKS", "evaluate_tasks", "run_tasks"]
