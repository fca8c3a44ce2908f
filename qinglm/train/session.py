"""Building a training run: data checks, model, optimizer, batches, schedule, and resuming a checkpoint."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qinglm.config import ModelConfig, TrainConfig
from qinglm.data.loader import TrainBatches
from qinglm.data.shards import TokenShards
from qinglm.device import compiled, resolve_compile, resolve_device, resolve_dtype
from qinglm.errors import QingLMError
from qinglm.model import Transformer
from qinglm.train.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_model_weights,
    load_trainer_state,
    read_state,
    set_rng_state,
)
from qinglm.train.metrics import MetricsLogger
from qinglm.train.optim import build_optimizer
from qinglm.train.schedule import RunLength, known_total


@dataclass
class Run:
    """Everything one training process works with; the counters are what a checkpoint carries."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    dtype: str
    model: Transformer
    optimizer: torch.optim.Optimizer
    batches: TrainBatches
    length: RunLength
    scaler: Any  # torch.amp.GradScaler for fp16 on CUDA, else None
    metrics: MetricsLogger
    train_data: TokenShards
    val_data: TokenShards | None
    forward: Callable | None = None  # the model, or its torch.compile'd wrapper
    compile: bool = False
    step: int = 0
    tokens_seen: int = 0
    elapsed_before: float = 0.0  # seconds trained by earlier processes of this run
    best_val_loss: float | None = None
    bad_evals: int = 0
    skipped_steps: int = 0
    t_start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start


def _load_data(
    data_dir: str | Path, model_cfg: ModelConfig, run_dir: Path, log: Callable[[str], None]
) -> tuple[TokenShards, TokenShards | None]:
    """Return (train, val or None) shards after checking they fit the model's vocabulary and tokenizer."""
    train_data = TokenShards(data_dir, "train")
    if train_data.vocab_size != model_cfg.vocab_size:
        raise QingLMError(
            f"{data_dir} was prepared with a {train_data.vocab_size}-token vocabulary but the model has "
            f"vocab_size {model_cfg.vocab_size}; prepare the data with the model's tokenizer"
        )
    if (run_dir / "tokenizer" / "tokenizer.json").is_file():
        from qinglm.tokenizer import Tokenizer

        train_data.check_tokenizer(Tokenizer.load(run_dir / "tokenizer"))
    try:
        return train_data, TokenShards(data_dir, "val")
    except QingLMError:
        log(f"no 'val' split in {data_dir}: training without validation (no best/ weights)")
        return train_data, None


def _find_resume(run_dir: Path, resume: bool, log: Callable[[str], None]) -> Path | None:
    """Return the checkpoint to resume from, or None to start fresh; refuse to overwrite a run."""
    if not resume:
        if checkpoint_dirs(run_dir):
            raise QingLMError(
                f"{run_dir} already holds checkpoints; pass --resume to continue or choose another --out"
            )
        return None
    found = latest_checkpoint(run_dir)
    if found is None:
        log(f"--resume: no complete checkpoint in {run_dir}; starting a fresh run")
    return found


def setup_run(
    model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path, data_dir: str | Path, log: Callable[[str], None]
) -> Run:
    """Return a run ready for its first (or next, when resuming) step: seeded, built, restored."""
    if cfg.max_steps is None and cfg.num_epochs is None and cfg.max_time is None:
        raise QingLMError("give the run a length: --max-steps, --num-epochs or --max-time")
    resume_from = _find_resume(run_dir, cfg.resume, log)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # also seeds every CUDA device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    train_data, val_data = _load_data(data_dir, model_cfg, run_dir, log)
    model = Transformer(model_cfg).to(device)
    batches = TrainBatches(train_data, cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    steps_per_epoch = max(1, batches.steps_per_epoch // cfg.grad_accum)
    max_time_s = cfg.max_time * 60 if cfg.max_time is not None else None
    length = RunLength(
        known_total(cfg.max_steps, cfg.num_epochs, steps_per_epoch),
        max_time_s,
        cfg.warmup_steps,
        kind=cfg.lr_schedule,
        decay_fraction=cfg.decay_fraction,
    )
    r = Run(
        cfg=cfg,
        run_dir=run_dir,
        device=device,
        dtype=dtype,
        model=model,
        optimizer=build_optimizer(model, cfg, device),
        batches=batches,
        length=length,
        scaler=torch.amp.GradScaler("cuda") if dtype == "fp16" and device.type == "cuda" else None,
        metrics=MetricsLogger(run_dir),
        train_data=train_data,
        val_data=val_data,
    )
    if resume_from is not None:
        _resume(r, resume_from)
        log(f"resuming from {resume_from} (step {r.step:,}, {r.tokens_seen:,} tokens seen)")
    r.metrics.truncate_after(r.step)  # lines of steps after the checkpoint (or of a failed start) are redone
    r.compile = resolve_compile(cfg.compile, device)
    r.forward = compiled(model, r.compile, log)
    for line in _header(r, steps_per_epoch):
        log(line)
    return r


def _resume(r: Run, ckpt: Path) -> None:
    """Return nothing; load weights, optimizer, data position, schedule estimate, counters and RNG states of ckpt into r."""
    state = read_state(ckpt)
    load_model_weights(r.model, ckpt)
    trainer = load_trainer_state(ckpt)
    r.optimizer.load_state_dict(trainer["optimizer"])
    if r.scaler is not None and "scaler" in trainer:
        r.scaler.load_state_dict(trainer["scaler"])
    r.batches.load_state_dict(state["loader"])
    r.length.restore(state.get("total_steps_est"), state.get("warmup_eff"), state["step"])
    r.step, r.tokens_seen, r.elapsed_before = state["step"], state["tokens_seen"], state["elapsed_s"]
    r.best_val_loss, r.bad_evals = state.get("best_val_loss"), state.get("bad_evals", 0)
    r.skipped_steps = state.get("skipped_steps", 0)
    set_rng_state(trainer["rng"])  # last: building the model and loading drew random numbers


def _header(r: Run, steps_per_epoch: int) -> list[str]:
    """Return the lines describing the run that are printed before the first step."""
    cfg, m = r.cfg, {k: v / 1e6 for k, v in r.model.param_counts().items()}
    head = "tied to embeddings" if r.model.cfg.tie_embeddings else f"{m['head']:.2f}M"
    if r.length.fixed:
        plan = f"{r.length.total:,} steps, warmup {r.length.warmup}"
    else:
        plan = f"{cfg.max_time:g} min (steps estimated from the step time after {RunLength.ESTIMATE_AT[0]} steps)"
    return [
        f"parameters: embeddings {m['embeddings']:.2f}M | blocks {m['blocks']:.2f}M | head {head} | "
        f"total {m['total']:.2f}M",
        f"tokens: {r.train_data.n_tokens:,} train / {r.val_data.n_tokens if r.val_data else 0:,} val; "
        f"{steps_per_epoch:,} steps per epoch",
        f"batch: {cfg.batch_size} x {cfg.grad_accum} accum x {cfg.seq_len} tokens = "
        f"{cfg.batch_size * cfg.grad_accum * cfg.seq_len:,} tokens per step",
        f"device: {r.device} | dtype {r.dtype} | compile {'on' if r.compile else 'off'} | "
        f"{torch.get_num_threads()} CPU threads",
        f"schedule: {plan}, {cfg.lr_schedule} {cfg.lr:g} -> "
        f"{cfg.lr * (1.0 if cfg.lr_schedule == 'constant' else cfg.min_lr_ratio):g}",
    ]
