"""`qinglm train` and `qinglm distill`: the pretraining jobs from the command line; every flag is a field of
TrainConfig (DistillConfig) or ModelConfig."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qinglm.config import ModelConfig, add_dataclass_args, given
from qinglm.post.config import DistillConfig
from qinglm.train.config import TrainConfig

# Flag names of the seed projects (Andy-LLM, LightweightLM, Zer02LLM), accepted as aliases.
TRAIN_ALIASES = {
    "preset": ["--model_size", "--model-size"],
    "lr": ["--learning_rate", "--learning-rate"],
    "seq_len": ["--max_length", "--max-length"],
    "num_epochs": ["--epochs"],
    "grad_accum": ["--gradient_accumulation_steps"],
}
# job -> (config class, help, description)
JOBS = {
    "train": (
        TrainConfig,
        "pretrain a model (no flags: the built-in quick-start job)",
        "Train a tokenizer if needed, prepare the data, pretrain, then report "
        "held-out loss / perplexity / bits per character and sample text.",
    ),
    "distill": (
        DistillConfig,
        "pretrain a student model against a frozen teacher run (knowledge distillation)",
        "Pretrain a student (size from --preset and the model flags) on the data with "
        "(1 - alpha) x the next-token loss + alpha x T^2 x KL(teacher || student) at temperature T. "
        "The student uses the teacher's tokenizer. Every `qinglm train` flag works here too.",
    ),
}


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], None]]:
    """Return {"train": handler, "distill": handler} after adding their parsers to sub."""
    handlers = {}
    for name, (cls, help, description) in JOBS.items():
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("--config", help="YAML or JSON config file; flags override it")
        add_dataclass_args(p, cls, TRAIN_ALIASES)
        add_dataclass_args(p, ModelConfig)
        handlers[name] = _handler(name, cls)
    return handlers


def _handler(name: str, cls: type) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        from qinglm.pipeline import run_train

        job = "pretrain" if name == "train" else name
        run_train(given(args, ModelConfig), given(args, cls), args.config, job=job)

    return run
