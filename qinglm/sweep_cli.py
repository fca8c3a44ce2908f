"""`qinglm sweep`: the command line of qinglm.sweep (every train flag sets the trials' base config)."""

from __future__ import annotations

import argparse
from typing import Any

from qinglm.config import ModelConfig, add_dataclass_args, given
from qinglm.sweep import PRUNERS, run_sweep
from qinglm.train.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    """Return {"sweep": handler} after adding the `qinglm sweep` parser to sub."""
    p = sub.add_parser(
        "sweep",
        help="hyperparameter search (Optuna TPE + median pruning) over a declared space",
        description="Train --trials runs with hyperparameters drawn from --space, each for the per-trial "
        "budget, stopping unpromising ones early; write results.md, results.jsonl and best_config.json "
        "under --out. Every train flag sets the base config of all trials.",
    )
    p.add_argument(
        "--space", required=True, help="YAML/JSON file: field -> {low, high[, log, step]} or {choices}"
    )
    p.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="stop trials below the median")
    p.add_argument("--config", help="base YAML or JSON config file; flags override it")
    add_dataclass_args(p, TrainConfig, skip={"resume"})
    add_dataclass_args(p, ModelConfig)
    return {"sweep": cmd_sweep}


def cmd_sweep(args: argparse.Namespace) -> None:
    run_sweep(
        args.space,
        args.trials,
        given(args, ModelConfig),
        given(args, TrainConfig),
        args.config,
        pruner=args.pruner,
    )
