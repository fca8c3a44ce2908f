"""`qinglm distill`: register(sub) adds it to the qinglm command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qinglm.config import ModelConfig, add_dataclass_args, given
from qinglm.post.config import DistillConfig


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return {command: handler} after adding the distill parser to sub."""
    p = sub.add_parser(
        "distill",
        help="pretrain a student model against a frozen teacher run (knowledge distillation)",
        description="Pretrain a student (size from --preset and the model flags) on the data with "
        "(1 - alpha) x the next-token loss + alpha x T^2 x KL(teacher || student) at temperature T. "
        "The student uses the teacher's tokenizer. Every `qinglm train` flag works here too.",
    )
    p.add_argument("--config", help="YAML or JSON config file; flags override it")
    add_dataclass_args(p, DistillConfig)
    add_dataclass_args(p, ModelConfig)
    return {"distill": cmd_distill}


def cmd_distill(args: argparse.Namespace) -> None:
    from qinglm.pipeline import run_train

    run_train(given(args, ModelConfig), given(args, DistillConfig), args.config, job="distill")
