"""Building a training run of any stage: model, optimizer, batches, schedule, and resuming a checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qinglm import run_dir as run_dirs
from qinglm.config import to_dict
from qinglm.data.loader import saved_global_batch
from qinglm.device import compiled, grad_scaler, resolve_compile, resolve_device, resolve_dtype
from qinglm.errors import QingLMError
from qinglm.tracking import make_trackers
from qinglm.train import distributed, whole
from qinglm.train.checkpoint import (
    checkpoint_dirs,
    latest_checkpoint,
    load_model_weights,
    load_trainer_state,
    read_state,
    set_rng_state,
    verify_checkpoint,
)
from qinglm.train.config import EngineConfig
from qinglm.train.fp8 import enable_fp8
from qinglm.train.metrics import MetricsLogger
from qinglm.train.optim import build_optimizer
from qinglm.train.schedule import RunLength, known_total
from qinglm.train.stage import Stage, StageContext


@dataclass
class Run:
    """Everything one training process works with; the counters are what a checkpoint carries."""

    cfg: EngineConfig
    stage: Stage
    run_dir: Path
    device: torch.device
    dtype: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Any  # resumable micro-batches: data.loader.TrainBatches, data.mix.MixedBatches, EpochBatches
    length: RunLength
    scaler: Any  # torch.amp.GradScaler for fp16 on CUDA, else None
    metrics: MetricsLogger
    forward: Callable | None = None  # the model (or its DDP wrapper), or their torch.compile'd wrapper
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    wrapped: torch.nn.Module | None = None  # the model, DDP(model), or the model sharded by FSDP
    skeleton: torch.nn.Module | None = None  # FSDP, rank 0: the model unsharded, weightless (train/whole.py)
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

    def state_dict(self) -> dict[str, Any]:
        """Return the run's resumable state besides weights, optimizer and RNGs (a checkpoint's state.json)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed(),
            "loader": self.batches.state_dict(),
            "best_val_loss": self.best_val_loss,
            "bad_evals": self.bad_evals,
            "warmup_eff": self.length.warmup,
            "total_steps_est": self.length.total,
            "skipped_steps": self.skipped_steps,
            "kind": self.stage.kind,
            "stage": self.stage.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Return nothing; continue from a state_dict() (data position, schedule, counters)."""
        self.batches.load_state_dict(state["loader"])
        self.length.restore(state.get("total_steps_est"), state.get("warmup_eff"), state["step"])
        self.step, self.tokens_seen, self.elapsed_before = (
            state["step"],
            state["tokens_seen"],
            state["elapsed_s"],
        )
        self.best_val_loss, self.bad_evals = state.get("best_val_loss"), state.get("bad_evals", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.stage.load_state_dict(state.get("stage", {}))


def _find_resume(
    run_dir: Path, resume: bool, log: Callable[[str], None]
) -> tuple[Path | None, dict[str, Any] | None]:
    """Return (the checkpoint to resume from, its trainer state), or Nones to start fresh; refuse to
    overwrite a run. A checkpoint whose trainer.pt cannot be loaded safely is skipped like a truncated one."""
    if not resume:
        if checkpoint_dirs(run_dir):
            raise QingLMError(
                f"{run_dir} already holds checkpoints; pass --resume to continue or choose another --out"
            )
        return None, None
    trainer: dict[Path, dict[str, Any]] = {}

    def loadable(d: Path) -> None:
        verify_checkpoint(d)
        trainer[d] = load_trainer_state(d)

    found = latest_checkpoint(run_dir, loadable)
    if found is None:
        log(f"--resume: no complete checkpoint in {run_dir}; starting a fresh run")
    return found, trainer.get(found)


def _fit_global_batch(
    cfg: EngineConfig, state: dict, world_size: int, log: Callable[[str], None]
) -> EngineConfig:
    """Return cfg, with grad_accum changed when a run resumes on another number of processes.

    The global batch (batch_size x grad_accum x processes) stays the checkpoint's, so the data order,
    the steps per epoch and the schedule continue exactly.
    """
    want = saved_global_batch(state["loader"])
    if cfg.batch_size * cfg.grad_accum * world_size == want:
        return cfg
    per_micro_step = cfg.batch_size * world_size
    if want % per_micro_step:
        raise QingLMError(
            f"the checkpoint's global batch is {want} sequences, which {world_size} process(es) x "
            f"--batch-size {cfg.batch_size} cannot make up; pick --batch-size and --grad-accum with "
            f"batch_size x grad_accum x {world_size} = {want}"
        )
    log(
        f"{world_size} process(es): grad_accum {cfg.grad_accum} -> {want // per_micro_step} keeps the "
        f"checkpoint's global batch of {want} sequences"
    )
    return dataclasses.replace(cfg, grad_accum=want // per_micro_step)


def _steps_per_epoch(batches: Any, grad_accum: int) -> int:
    return max(1, batches.steps_per_epoch // grad_accum)


def setup_run(
    stage: Stage,
    cfg: EngineConfig,
    run_dir: Path,
    log: Callable[[str], None],
    dist: distributed.Dist | None = None,
) -> Run:
    """Return a run of stage ready for its first (or next, when resuming) step: seeded, built, restored.

    Under torchrun (dist enabled) every rank builds the same run; rank 0 chooses the checkpoint.
    """
    dist = dist or distributed.Dist()
    if cfg.max_steps is None and cfg.num_epochs is None and cfg.max_time is None:
        raise QingLMError("give the run a length: --max-steps, --num-epochs or --max-time")
    if dist.is_main:
        run_dirs.claim(run_dir, cfg.overwrite)  # refuses a directory that QingLM did not write
    found, trainer = _find_resume(run_dir, cfg.resume, log) if dist.is_main else (None, None)
    resume_from = distributed.broadcast_object(dist, found)
    state = read_state(resume_from) if resume_from is not None else None
    if state is not None:
        cfg = _fit_global_batch(cfg, state, dist.world_size, log)
    # Every rank draws the same initial weights (which FSDP shards in place); dropout: see step_seed.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # also seeds every CUDA device
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = distributed.local_device(dist, resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    stage.bind(StageContext(device, dtype, dist, run_dir, log, resuming=resume_from is not None))
    _write_run_files(stage, run_dir, dist)
    model = stage.build_model()
    if resume_from is not None:
        load_model_weights(model, resume_from)  # before wrapping: DDP copies and FSDP shards these
    if cfg.fp8:  # before wrapping: FSDP shards the converted modules
        enable_fp8(model, device, dtype, log)
    skeleton = whole.skeleton(model) if dist.mode == "fsdp" and dist.is_main else None  # before sharding
    wrapped = distributed.wrap(model, dist, device)
    batches = stage.batches(cfg)
    max_time_s = cfg.max_time * 60 if cfg.max_time is not None else None
    if cfg.num_epochs is not None and hasattr(batches, "steps_for_epochs"):  # epochs of varying length
        total = batches.steps_for_epochs(cfg.num_epochs)
        total = total if cfg.max_steps is None else min(total, cfg.max_steps)
    else:
        total = known_total(cfg.max_steps, cfg.num_epochs, _steps_per_epoch(batches, cfg.grad_accum))
    length = RunLength(
        total, max_time_s, cfg.warmup_steps, kind=cfg.lr_schedule, decay_fraction=cfg.decay_fraction
    )
    r = Run(
        cfg=cfg,
        stage=stage,
        run_dir=run_dir,
        device=device,
        dtype=dtype,
        model=model,
        optimizer=build_optimizer(model, cfg, device),
        batches=batches,
        length=length,
        scaler=grad_scaler(dtype, device),
        metrics=distributed.metrics_for(dist, run_dir),
        dist=dist,
        wrapped=wrapped,
        skeleton=skeleton,
    )
    if resume_from is not None:
        _resume(r, resume_from, state, trainer)
        log(f"resuming from {resume_from} (step {r.step:,}, {r.tokens_seen:,} tokens seen)")
    r.metrics.truncate_after(r.step)  # lines of steps after the checkpoint (or of a failed start) are redone
    if dist.is_main:
        config = {"train": to_dict(cfg)}
        if hasattr(model, "cfg"):
            config["model"] = to_dict(model.cfg)
        for sink in make_trackers(cfg.tracker, run_dir, config, r.step):
            r.metrics.add_sink(sink)
    r.compile = resolve_compile(cfg.compile, device)
    # DDP: compile the wrapper (PyTorch's DDPOptimizer splits the graph at gradient buckets).
    r.forward = compiled(wrapped, r.compile, log)
    for line in _header(r):
        log(line)
    return r


def _write_run_files(stage: Stage, run_dir: Path, dist: distributed.Dist) -> None:
    """Return nothing; write the stage's tokenizer and config.json into the run (rank 0 only)."""
    sections = stage.sections()
    if dist.is_main and sections is not None:
        tok = stage.tokenizer()
        if tok is not None:
            tok.save(run_dir / run_dirs.TOKENIZER, model_max_length=sections["model"]["max_seq_len"])
        run_dirs.write_config(run_dir, stage.kind, sections)
    distributed.barrier(dist)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Return the seed of the random numbers (dropout) that `rank` draws in 0-based update `step`.

    Ranks draw different dropout masks, as independent samples should; seeding each update from
    (seed, rank, step) also makes a resumed run draw exactly the masks of an uninterrupted one,
    whatever drew random numbers in between (validation samples) and whichever rank saved its state.
    """
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch generator takes it


def _resume(r: Run, ckpt: Path, state: dict[str, Any], trainer: dict[str, Any] | None) -> None:
    """Return nothing; load optimizer, data position, schedule estimate, counters and RNG states of ckpt into r.

    The weights were loaded before the model was wrapped for DDP/FSDP; trainer is ckpt's trainer.pt
    when this process already loaded it.
    """
    if trainer is None:
        trainer = load_trainer_state(ckpt)
    r.optimizer.load_state_dict(distributed.shard_optimizer_state(trainer["optimizer"], r.optimizer, r.dist))
    if r.scaler is not None and "scaler" in trainer:
        r.scaler.load_state_dict(trainer["scaler"])
    r.load_state_dict(state)
    set_rng_state(trainer["rng"])  # last: building the model and loading drew random numbers


def _header(r: Run) -> list[str]:
    """Return the lines describing the run that are printed before the first step."""
    cfg, model = r.cfg, r.model
    lines = []
    if hasattr(model, "param_counts"):
        m = {k: v / 1e6 for k, v in model.param_counts().items()}
        head = "tied to embeddings" if model.cfg.tie_embeddings else f"{m['head']:.2f}M"
        lines.append(
            f"parameters: embeddings {m['embeddings']:.2f}M | blocks {m['blocks']:.2f}M | head {head} | "
            f"total {m['total']:.2f}M"
        )
    procs = f" x {r.dist.world_size} processes ({r.dist.mode})" if r.dist.enabled else ""
    if r.length.fixed:
        plan = f"{r.length.total:,} steps, warmup {r.length.warmup}"
    elif r.length.cap is not None:
        plan = (
            f"{r.length.cap:,} steps or {cfg.max_time:g} min, whichever comes first (steps re-estimated "
            f"from the step time after {RunLength.ESTIMATE_AT[0]} steps), warmup {r.length.warmup}"
        )
    else:
        plan = f"{cfg.max_time:g} min (steps estimated from the step time after {RunLength.ESTIMATE_AT[0]} steps)"
    return [
        *lines,
        *r.stage.header(),
        r.stage.batch_line(cfg, r.batches.global_batch, procs),
        f"device: {r.device} | dtype {r.dtype} | compile {'on' if r.compile else 'off'} | "
        f"{torch.get_num_threads()} CPU threads",
        f"schedule: {plan}, {cfg.lr_schedule} {cfg.lr:g} -> "
        f"{cfg.lr * (1.0 if cfg.lr_schedule == 'constant' else cfg.min_lr_ratio):g}",
    ]
