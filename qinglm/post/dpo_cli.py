"""`qinglm dpo`: register(sub) adds it to the qinglm command line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qinglm.config import add_dataclass_args, given
from qinglm.post.config import DPOConfig
from qinglm.sft.cli import SFT_ALIASES


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return {command: handler} after adding the dpo parser to sub."""
    p = sub.add_parser(
        "dpo",
        help="Direct Preference Optimization (full or --lora) of a fine-tuned run on preference pairs",
        description="Train a run (usually an SFT run) to prefer each pair's chosen reply over its rejected "
        "one, relative to a frozen reference (the base; with --lora the base without adapters), and write "
        "a new run directory. Logs TRL's metrics (rewards/chosen, rewards/accuracies, logps/chosen, ...). "
        "--data idioms-dpo uses built-in pairs about idioms and reports held-out figures.",
    )
    add_dataclass_args(p, DPOConfig, SFT_ALIASES)
    return {"dpo": cmd_dpo}


def cmd_dpo(args: argparse.Namespace) -> None:
    from qinglm.post.dpo import run_dpo
    from qinglm.train.driver import stage_config

    flags = given(args, DPOConfig)
    run_dpo(stage_config(DPOConfig, "dpo", flags), flags=flags)
