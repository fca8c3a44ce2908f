"""`qinglm experiment init`: the command line of qinglm.experiment (other flags are `qinglm train`'s)."""

from __future__ import annotations

import argparse
from typing import Any

from qinglm.config import INITS, ModelConfig, add_dataclass_args, given
from qinglm.experiment import DEFAULT_STEPS, compare_inits
from qinglm.train.config import TrainConfig


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    p = sub.add_parser("experiment", help="controlled comparisons (e.g. weight initialisations)")
    esub = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    e = esub.add_parser(
        "init",
        help="train one model per initialisation on the same budget; write a loss-curve PNG and a table",
        description="Train the same model once per weight initialisation (PyTorch default, GPT-2 "
        "normal(0.02) with scaled residual projections, small init), on the same data, seed and "
        f"budget (default {DEFAULT_STEPS} steps), and compare their loss curves. Other flags are "
        "those of `qinglm train`.",
    )
    e.add_argument(
        "--inits", nargs="+", default=list(INITS), choices=INITS, help="initialisations to compare"
    )
    e.add_argument("--config", help="YAML or JSON config file; flags override it")
    add_dataclass_args(e, TrainConfig)
    add_dataclass_args(e, ModelConfig, skip={"init"})
    return {"experiment": cmd_experiment}


def cmd_experiment(args: argparse.Namespace) -> None:
    compare_inits(given(args, ModelConfig), given(args, TrainConfig), args.inits, args.config)
