"""`qinglm dpo`: register(sub) adds it to the qinglm command line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qinglm.post.config import DPOConfig
from qinglm.sft.cli import SFT_ALIASES
from qinglm.train.driver import stage_command


def register(sub: Any) -> dict[str, Callable[[Any], None]]:
    """Return {command: handler} after adding the dpo parser to sub."""
    return stage_command(
        sub,
        "dpo",
        DPOConfig,
        "qinglm.post.dpo:run_dpo",
        help="Direct Preference Optimization (full or --lora) of a fine-tuned run on preference pairs",
        description="Train a run (usually an SFT run) to prefer each pair's chosen reply over its rejected "
        "one, relative to a frozen reference (the base; with --lora the base without adapters), and write "
        "a new run directory. Logs TRL's metrics (rewards/chosen, rewards/accuracies, logps/chosen, ...). "
        "--data idioms-dpo uses built-in pairs about idioms and reports held-out figures.",
        aliases=SFT_ALIASES,
    )
