"""`qinglm grpo`: register(sub) adds it to the qinglm command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qinglm.config import add_dataclass_args, given
from qinglm.post.config import GRPOConfig

# TRL's names for the same settings.
GRPO_ALIASES = {
    "group_size": ["--num-generations"],
    "kl_coef": ["--beta"],
    "clip_eps": ["--epsilon"],
    "num_epochs": ["--epochs"],
    "lr": ["--learning-rate"],
}


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return {command: handler} after adding the grpo parser to sub."""
    p = sub.add_parser(
        "grpo",
        help="RL with verifiable rewards (GRPO) of a trained run on a task's prompts",
        description="Sample --group-size replies to each prompt of --task, reward them with the task's "
        "verifier and train on the group-relative advantages (clipped ratio, KL to the base run); "
        "writes a new run directory that load/generate/chat/eval use unchanged. Validation answers "
        "held-out prompts greedily (val_loss = 1 - mean reward).",
    )
    add_dataclass_args(p, GRPOConfig, GRPO_ALIASES)
    return {"grpo": cmd_grpo}


def cmd_grpo(args: argparse.Namespace) -> None:
    from qinglm.post.grpo import run_grpo
    from qinglm.train.driver import stage_config

    flags = given(args, GRPOConfig)
    run_grpo(stage_config(GRPOConfig, "grpo", flags), flags=flags)
