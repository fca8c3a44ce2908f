"""Validation in the engine: the stage's held-out metrics, --eval-tasks scores, best/ weights and the
count of validations without improvement (--patience), and the end-of-run extras."""

from __future__ import annotations

import math
from typing import Any

import torch

from qinglm.train import distributed
from qinglm.train.checkpoint import save_best
from qinglm.train.session import Run
from qinglm.train.whole import unsharded


def validate(r: Run) -> dict[str, Any]:
    """Return the stage's validation metrics (empty without held-out data); log them, and save best/
    when val_loss improved."""
    v = r.stage.validate(r.model, r.step)  # every rank runs it (a sharded forward is collective)
    if not v:
        return {}
    loss = v["val_loss"]  # rank 0's on every rank: the ranks decide alike
    improved = math.isfinite(loss) and (r.best_val_loss is None or loss < r.best_val_loss)
    # Weights only to save stay on the CPU: a model sharded to fit needs no second copy on the device.
    on = r.device if r.cfg.eval_tasks else torch.device("cpu")
    whole = whole_model(r, on) if improved or r.cfg.eval_tasks else None
    if r.cfg.eval_tasks:
        v = {**v, **task_scores(r, whole)}
    numbers = {k: x for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
    if improved:
        r.best_val_loss, r.bad_evals = loss, 0
        if r.dist.is_main:
            weights = r.stage.inference_weights(whole)
            save_best(r.run_dir, weights, {"step": r.step, **numbers, "tokens_seen": r.tokens_seen})
    else:
        r.bad_evals += 1
    r.metrics.log("val", step=r.step, **v, tokens_seen=r.tokens_seen, elapsed_s=round(r.elapsed(), 3))
    return v


def whole_model(r: Run, device: torch.device) -> torch.nn.Module | None:
    """Return the run's model unsharded on rank 0 (None elsewhere), FSDP's gathered onto device;
    collective: every rank calls it."""
    return unsharded(r.model, r.skeleton, r.dist, device)


def task_scores(r: Run, model: torch.nn.Module | None) -> dict[str, float]:
    """Return the --eval-tasks scores ({"task/NAME": score, "task/summary": ...}) of model, the whole
    model on rank 0 (whole_model), which alone runs them."""
    scores = None
    if r.dist.is_main:
        from qinglm.evals.suite import run_tasks
        from qinglm.tokenizer import Tokenizer

        split = {k: getattr(r.cfg, k) for k in ("val_fraction", "split_by") if hasattr(r.cfg, k)}
        tok = Tokenizer.load(r.run_dir / "tokenizer")
        scores = run_tasks(model, tok, r.cfg.eval_tasks, r.device, r.cfg.eval_task_limit, **split)
    return distributed.broadcast_object(r.dist, scores)


def val_line(r: Run, v: dict[str, Any]) -> str:
    """Return the log line of validation v at the run's step, with its best/ standing."""
    best = " (best)" if r.bad_evals == 0 else f" (no improvement x{r.bad_evals})"
    tasks = f" | task summary {v['task/summary']:.3f}" if "task/summary" in v else ""
    return f"step {r.step:,} | {r.stage.val_line(v)}{tasks}{best}"


def finish(r: Run) -> dict[str, Any]:
    """Return the stage's end-of-run extras; give a run whose checkpoints cannot be loaded for inference
    as they are (LoRA) its inference weights in best/ when no validation wrote them."""
    whole = whole_model(r, r.device)  # the stage may run it (held-out generation)
    if r.dist.is_main and not (r.run_dir / "best").exists():
        weights = r.stage.inference_weights(whole)
        if weights is not whole:
            save_best(r.run_dir, weights, {"step": r.step, "tokens_seen": r.tokens_seen})
    return r.stage.finish(r.model, whole)
