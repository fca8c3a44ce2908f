"""Training configs built from parts: every stage (pretrain, SFT, DPO, GRPO, distillation) has the same
optimizer, length, batch, runtime, checkpoint, evaluation and tracking flags because its config
inherits these parts; a stage adds only its own fields (and may redeclare a field to change its
default). Each part checks its own fields on construction.

Every command-line flag is a field (``--seq-len`` is ``seq_len``); the resolved config is saved in
the run's config.json, so it is enough to reproduce or resume the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qinglm.config import DEFAULT_PROMPTS, PRESETS, ModelConfig, _f
from qinglm.data.splits import VAL_FRACTION
from qinglm.errors import QingLMError
from qinglm.tracking import TRACKERS, check_tracker
from qinglm.train.optim import OPTIMIZERS
from qinglm.train.schedule import SCHEDULES, parse_seq_len_schedule
from qinglm.typecheck import check_types

PARALLEL_MODES = ("auto", "ddp", "fsdp")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")


class Part:
    """A config part: its fields' types and ranges (the "within" of each number field, enforced by
    check_types) and every part's own check of what ranges cannot say, run when the config is built."""

    def __post_init__(self) -> None:
        check_types(self)
        for cls in reversed(type(self).__mro__):
            if "check" in cls.__dict__:
                cls.__dict__["check"](self)


# The most passes over the data a run with no length of its own (the main job) or a --budget makes: 30 CPU-minutes of
# tiny without it took 19 passes and did worse on unseen articles than 8 (5.937 vs 5.722 bits/char,
# benchmarks/README.md "30 CPU-minutes").
DEFAULT_MAX_EPOCHS = 8.0


@dataclass
class OptimPart(Part):
    """The optimizer and the learning-rate schedule."""

    lr: float = _f(
        2e-3, "peak learning rate (the seeds' 3e-4 learns far slower for these sizes)", within="(0, inf)"
    )
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak", within="[0, 1]")
    lr_schedule: str = _f(
        "cosine",
        "lr after warmup: cosine or linear decay to the floor, wsd (constant, then linear decay), constant",
        list(SCHEDULES),
    )
    decay_fraction: float = _f(0.2, "WSD: fraction of the run spent decaying", within="(0, 1]")
    warmup_steps: int = _f(
        1000, "linear warmup steps (capped at 5%% of a run whose length is known)", within="[0, inf)"
    )
    weight_decay: float = _f(0.01, "AdamW weight decay on matrices only", within="[0, inf)")
    optimizer: str = _f(
        "adamw",
        "adamw, or muon: Muon for the 2-D weight matrices inside the blocks, AdamW for the rest",
        list(OPTIMIZERS),
    )
    muon_lr: float = _f(0.02, "Muon learning rate for the hidden 2-D weight matrices", within="(0, inf)")
    beta1: float = _f(0.9, "AdamW beta1", within="[0, 1)")
    beta2: float = _f(0.999, "AdamW beta2", within="[0, 1)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", within="[0, inf)")

    def check(self) -> None:
        if self.lr_schedule not in SCHEDULES:
            raise QingLMError(
                f"unknown lr schedule {self.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise QingLMError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


@dataclass
class LengthPart(Part):
    """How long the run is: steps, minutes or passes over the data, whichever comes first."""

    max_steps: int | None = _f(None, "stop after this many optimizer steps", within="[1, inf)")
    max_time: float | None = _f(
        None,
        "stop after this many minutes of training (with no limit given: 8 minutes or 8 passes, the first reached)",
        within="(0, inf)",
    )
    num_epochs: float | None = _f(
        None, "stop after this many passes over the training data", within="(0, inf)"
    )


@dataclass
class BatchPart(Part):
    """The shape of a step: rows per micro-batch, micro-batches per step, tokens per row."""

    batch_size: int = _f(32, "sequences per micro-batch", within="[1, inf)")
    grad_accum: int = _f(1, "micro-batches per optimizer step", within="[1, 65536]")
    seq_len: int = _f(256, "training sequence length (<= max_seq_len)", within="[1, inf)")


@dataclass
class RuntimePart(Part):
    """Where and how the steps run: device, precision, compile, threads, seed, processes."""

    device: str = _f("auto", "device", list(DEVICES))
    dtype: str = _f(
        "auto",
        "compute precision (auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32)",
        list(DTYPES),
    )
    compile: bool | None = _f(
        None, "torch.compile the model (default: on for CUDA and for CPUs with a C++ compiler)"
    )
    fp8: bool = _f(
        False,
        "float8 matmuls for the block linears through torchao (CUDA, compute capability 8.9+: Ada/Hopper); "
        "weights, checkpoints and exports stay unchanged",
    )
    num_threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)", within="[1, 4096]")
    seed: int = _f(0, "random seed", within="[0, 4294967295]")
    parallel: str = _f(
        "auto",
        "multi-process training under torchrun: ddp (replicas), fsdp (sharded, FSDP2); auto = ddp",
        list(PARALLEL_MODES),
    )
    nproc: int = _f(
        0, "launch this many processes on this machine with torchrun (0 = no launch)", within="[0, 1024]"
    )

    def check(self) -> None:
        if self.parallel not in PARALLEL_MODES:
            raise QingLMError(
                f"unknown parallel mode {self.parallel!r}; choose one of {', '.join(PARALLEL_MODES)}"
            )


@dataclass
class RunPart(Part):
    """The run directory: where, resume or not, checkpoints, the report at the end."""

    out: str | None = _f(None, "run directory (default: runs/<time>-<kind>)")
    resume: bool = _f(False, "continue the run in --out from its last complete checkpoint")
    overwrite: bool = _f(False, "write into a non-empty --out that QingLM did not create")
    save_every: int = _f(200, "write a checkpoint every N optimizer steps", within="[1, inf)")
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep", within="[1, inf)")
    report: bool = _f(
        True, "write RUN/report.md and its plots at the end (no task is evaluated then: see qinglm report)"
    )


@dataclass
class EvalPart(Part):
    """Validation and logging during the run."""

    eval_every: int = _f(200, "validate every N optimizer steps", within="[1, inf)")
    eval_tokens: int = _f(
        200_000, "tokens used by each periodic validation (0 = whole split)", within="[0, inf)"
    )
    log_every: int = _f(50, "log a metrics line every N steps", within="[1, inf)")
    patience: int | None = _f(None, "early stop after N validations without improvement", within="[1, inf)")
    eval_tasks: list[str] = _f(
        [],
        "tasks of `qinglm eval --tasks` run at each validation (their scores go to metrics.jsonl and trackers)",
    )
    eval_task_limit: int = _f(100, "items per task at each validation (--eval-tasks)", within="[1, inf)")

    def check(self) -> None:
        if self.eval_tasks:
            from qinglm.evals.tasks import resolve

            resolve(",".join(self.eval_tasks))  # an unknown task fails before any slow work


@dataclass
class TrackingPart(Part):
    """Where metrics go besides RUN/metrics.jsonl."""

    tracker: str = _f(
        "none",
        "experiment tracker besides metrics.jsonl: tensorboard (RUN/tensorboard), wandb or swanlab "
        "(offline with WANDB_MODE=offline / SWANLAB_MODE=offline)",
        list(TRACKERS),
    )

    def check(self) -> None:
        if self.tracker not in TRACKERS:
            raise QingLMError(f"unknown tracker {self.tracker!r}; choose one of {', '.join(TRACKERS)}")


@dataclass
class EngineConfig(TrackingPart, EvalPart, RuntimePart, OptimPart, BatchPart, LengthPart, RunPart):
    """What the training engine needs from any stage's config: all the shared parts."""


@dataclass
class TrainConfig(EngineConfig):
    """Pretraining: the shared parts plus the data, the model's size and what to sample."""

    data: list[str] = _f(
        ["pd1998"],
        "built-in corpus name, text file(s), directory, glob, or prepared data dir; "
        "SOURCE:WEIGHT ... trains on a mixture by weight",
    )
    tokenizer: str | None = _f(None, "tokenizer directory (default: train one on the data into the run dir)")
    out: str | None = _f(None, "run directory (default: runs/<time>-<preset>-<data>)")
    preset: str = _f("tiny", "model size preset", list(PRESETS))
    budget: str | None = _f(
        None,
        "train the model the scaling law expects the best of in this time (30m, 2h) or FLOP count (3e15): "
        "sets the shape, vocab, lr, batch and the run's length (`qinglm plan` shows the choice)",
    )
    budget_measure_s: float = _f(
        1.0,
        "with --budget: seconds timing each of a few shapes first (0: the throughput recorded with the fit)",
        within="[0, 60]",
    )
    seq_len_schedule: str = _f(
        "",
        "progressive sequence length: LENGTH:UNTIL stages, e.g. 64:0.2,128:0.5 trains on 64-token rows "
        "for the first 20%% of steps, 128 until 50%%, then seq_len (same tokens per step)",
    )
    init_from: str | None = _f(
        None,
        "start from the weights of this run directory (another run, or one made by `qinglm import hf`) "
        "instead of random ones; its model config and tokenizer are used",
    )
    val_fraction: float = _f(VAL_FRACTION, "fraction of the data held out for validation", within="(0, 1)")
    split_by: str = _f(
        "auto",
        "held out whole: document, block (--split-block consecutive documents) or file; auto: block for "
        ".txt (document if too small for one block), document for JSONL/Parquet (built-in: article "
        "blocks, reviews, idioms)",
        ["auto", "document", "block", "file"],
    )
    split_block: int = _f(100, "documents per held-out block with --split-by block", within="[1, inf)")
    encoding: str | None = _f(None, "text encoding of data files (default: detect)")
    nfkc: bool = _f(True, "normalise full-width Latin letters and digits")
    text_field: str = _f("text", "JSONL/Parquet field holding the text")
    tokenizer_sample_bytes: int = _f(
        32 << 20,
        "train the tokenizer on an even sample of about this many bytes of the corpus",
        within="[1, inf)",
    )
    pre_tokenizer: str = _f(
        "qwen2",
        "how a new tokenizer splits text before BPE: qwen2 (words of Chinese characters can merge), "
        "chars (one piece per Chinese character; pinyin syllables stay whole)",
        ["qwen2", "chars"],
    )
    sample_prompts: list[str] = _f(DEFAULT_PROMPTS, "prompts to sample from after training")
    sample_tokens: int = _f(
        60,
        "tokens to generate per sample prompt (after training; greedy ones at each validation)",
        within="[0, inf)",
    )

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise QingLMError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        parse_seq_len_schedule(self.seq_len_schedule, self.seq_len)


def check_train(t: TrainConfig, m: ModelConfig) -> None:
    """Raise QingLMError for a training config that cannot run with model config m (each part has
    already checked itself when it was built)."""
    t.__post_init__()  # fields may have been changed since construction
    check_tracker(t.tracker)  # a missing tracker package fails before any slow work
    if t.seq_len > m.max_seq_len:
        raise QingLMError(
            f"seq_len ({t.seq_len}) is longer than the model's max_seq_len ({m.max_seq_len}); to continue a "
            "run at a longer context add --rope-scaling yarn (or --max-seq-len N) to --init-from RUN"
        )


def split_sections(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config dict into (model, train) parts; flat keys go where the field lives."""
    for part in ("model", "train"):
        if not isinstance(d.get(part) or {}, dict):
            raise QingLMError(f"the '{part}' section of a config file must be a mapping of keys to values")
    model, train = dict(d.get("model") or {}), dict(d.get("train") or {})
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in d.items():
        if k in ("model", "train"):
            continue
        k = k.replace("-", "_")
        if k in model_names:
            model[k] = v
        elif k in train_names:
            train[k] = v
        else:
            raise QingLMError(f"unknown config key: {k}")
    return model, train
