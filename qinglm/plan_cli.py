"""`qinglm plan --budget 2h [--device cuda]`: the model a budget buys and what to expect of it, without training
(qinglm.train.budget); every flag is a field of PlanConfig."""

from __future__ import annotations

import argparse
from typing import Any

from qinglm.config import add_dataclass_args, from_dict, given
from qinglm.train.budget import PlanConfig


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    """Return {"plan": handler} after adding the `qinglm plan` parser to sub."""
    p = sub.add_parser(
        "plan",
        help="the model a training budget buys on this machine, from the measured scaling law",
        description="Time a few model shapes on this machine (or assume a GPU's speed), then print the shape "
        "the scaling law expects the lowest held-out bits per character of within --budget: its size, the "
        "tokens it will see, the time per pass over the data and its peak memory. "
        "`qinglm train --budget` trains that model.",
    )
    add_dataclass_args(p, PlanConfig)
    return {"plan": cmd_plan}


def cmd_plan(args: argparse.Namespace) -> None:
    from qinglm.train.budget import plan_from_text, plan_lines

    cfg = from_dict(PlanConfig, given(args, PlanConfig), "plan config")
    plan = plan_from_text(cfg.budget, cfg.device, cfg.measure_s, cfg.fit, cfg.compile, cfg.memory_gib)
    for line in plan_lines(plan):
        print(line)
