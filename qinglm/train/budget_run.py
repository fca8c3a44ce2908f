"""`qinglm train --budget`: the plan of qinglm.train.budget turned into the run's fields, logged with why."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qinglm.errors import QingLMError
from qinglm.train.budget import make_plan, plan_lines
from qinglm.train.config import DEFAULT_MAX_EPOCHS
from qinglm.train.scaling import parse_budget

LENGTH_FIELDS = ("max_time", "max_steps", "num_epochs")


def budget_fields(train: Any, given: set[str], log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Return (ModelConfig fields, TrainConfig fields) that `--budget` sets for the training config train (its
    fields named in given were set by the user, who keeps them), after logging the plan and why.

    The run's length is the budget: max_time for a time (the training itself; the tokenizer, the data and
    the timing come before it), max_steps for a FLOP count; and at most DEFAULT_MAX_EPOCHS passes over the data,
    whichever comes first (at 30 CPU-minutes tiny's 19 passes did worse on unseen text than 8).
    """
    from qinglm.device import resolve_compile, resolve_device

    clash = [f"--{k.replace('_', '-')}" for k in LENGTH_FIELDS if k in given]
    if clash:
        raise QingLMError(f"--budget sets the run's length; drop {', '.join(clash)}")
    if train.nproc or train.init_from:
        raise QingLMError("--budget plans a new one-process run; drop --nproc / --init-from")
    budget = parse_budget(train.budget)
    device = resolve_device(train.device)
    plan = make_plan(
        budget, device.type, train.budget_measure_s, compile=resolve_compile(train.compile, device)
    )
    model, fields = plan.train_fields()
    fields["num_epochs"] = DEFAULT_MAX_EPOCHS  # whichever comes first: the budget or the passes
    if budget.seconds is not None:
        fields["max_time"] = budget.seconds / 60
    else:
        step_tokens = fields["batch_size"] * fields.get("grad_accum", 1) * fields["seq_len"]
        fields["max_steps"] = max(1, round(plan.best.tokens / step_tokens))
    log(
        f"--budget {train.budget}: the scaling law's best model for it (qinglm plan --budget {train.budget}):"
    )
    for line in plan_lines(plan):
        log(f"  {line}")
    kept = [k for k in (*model, *fields) if k in given]
    if kept:
        log(f"  kept from your flags: {', '.join(kept)}")
    return model, fields
