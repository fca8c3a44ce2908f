"""`qinglm train`: pretraining from the command line; every flag is a TrainConfig or ModelConfig field."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qinglm.config import ModelConfig, add_dataclass_args, given
from qinglm.train.config import TrainConfig

# Flag names of the seed projects (Andy-LLM, LightweightLM, Zer02LLM), accepted as aliases.
TRAIN_ALIASES = {
    "preset": ["--model_size", "--model-size"],
    "lr": ["--learning_rate", "--learning-rate"],
    "seq_len": ["--max_length", "--max-length"],
    "num_epochs": ["--epochs"],
    "grad_accum": ["--gradient_accumulation_steps"],
}


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return {"train": handler} after adding the `qinglm train` parser to sub."""
    p = sub.add_parser(
        "train",
        help="pretrain a model (no flags: the built-in quick-start job)",
        description="Train a tokenizer if needed, prepare the data, pretrain, then report "
        "held-out loss / perplexity / bits per character and sample text.",
    )
    p.add_argument("--config", help="YAML or JSON config file; flags override it")
    add_dataclass_args(p, TrainConfig, TRAIN_ALIASES)
    add_dataclass_args(p, ModelConfig)
    return {"train": cmd_train}


def cmd_train(args: argparse.Namespace) -> None:
    from qinglm.pipeline import run_train

    run_train(given(args, ModelConfig), given(args, TrainConfig), args.config)
