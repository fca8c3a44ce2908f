"""`qinglm grpo`: register(sub) adds it to the qinglm command line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qinglm.post.config import GRPOConfig
from qinglm.train.driver import stage_command

# TRL's names for the same settings.
GRPO_ALIASES = {
    "group_size": ["--num-generations"],
    "kl_coef": ["--beta"],
    "clip_eps": ["--epsilon"],
    "num_epochs": ["--epochs"],
    "lr": ["--learning-rate"],
}


def register(sub: Any) -> dict[str, Callable[[Any], None]]:
    """Return {command: handler} after adding the grpo parser to sub."""
    return stage_command(
        sub,
        "grpo",
        GRPOConfig,
        "qinglm.post.grpo:run_grpo",
        help="RL with verifiable rewards (GRPO) of a trained run on a task's prompts",
        description="Sample --group-size replies to each prompt of --task, reward them with the task's "
        "verifier and train on the group-relative advantages (clipped ratio, KL to the base run); "
        "writes a new run directory that load/generate/chat/eval use unchanged. Validation answers "
        "held-out prompts greedily (val_loss = 1 - mean reward).",
        aliases=GRPO_ALIASES,
    )
