"""Validation in the engine: the stage's held-out metrics, --eval-tasks scores, best/ weights and the
count of validations without improvement (--patience), and the end-of-run extras."""

from __future__ import annotations

import math
from typing import Any

from qinglm.train import distributed
from qinglm.train.checkpoint import save_best
from qinglm.train.session import Run


def validate(r: Run) -> dict[str, Any]:
    """Return the stage's validation metrics (empty without held-out data); log them, and save best/
    when val_loss improved."""
    v = r.stage.validate(r.model, r.step)
    if not v:
        return {}
    if r.cfg.eval_tasks:
        v = {**v, **task_scores(r)}
    numbers = {k: x for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
    loss = v["val_loss"]
    if math.isfinite(loss) and (r.best_val_loss is None or loss < r.best_val_loss):
        r.best_val_loss, r.bad_evals = loss, 0
        gathered = distributed.full_model_tensors(r.model, r.dist)  # FSDP: every rank takes part
        if r.dist.is_main:
            weights = r.stage.inference_weights(r.model) if gathered is None else gathered
            save_best(r.run_dir, weights, {"step": r.step, **numbers, "tokens_seen": r.tokens_seen})
    else:
        r.bad_evals += 1
    r.metrics.log("val", step=r.step, **v, tokens_seen=r.tokens_seen, elapsed_s=round(r.elapsed(), 3))
    return v


def task_scores(r: Run) -> dict[str, float]:
    """Return the --eval-tasks scores of the model ({"task/NAME": score, "task/summary": ...}), from rank 0."""
    scores = None
    if r.dist.is_main:
        from qinglm.evals.suite import run_tasks
        from qinglm.tokenizer import Tokenizer

        split = {k: getattr(r.cfg, k) for k in ("val_fraction", "split_by") if hasattr(r.cfg, k)}
        tok = Tokenizer.load(r.run_dir / "tokenizer")
        scores = run_tasks(r.model, tok, r.cfg.eval_tasks, r.device, r.cfg.eval_task_limit, **split)
    return distributed.broadcast_object(r.dist, scores)


def val_line(r: Run, v: dict[str, Any]) -> str:
    """Return the log line of validation v at the run's step, with its best/ standing."""
    best = " (best)" if r.bad_evals == 0 else f" (no improvement x{r.bad_evals})"
    tasks = f" | task summary {v['task/summary']:.3f}" if "task/summary" in v else ""
    return f"step {r.step:,} | {r.stage.val_line(v)}{tasks}{best}"


def finish(r: Run) -> dict[str, Any]:
    """Return the stage's end-of-run extras; give a run whose checkpoints cannot be loaded for inference
    as they are (LoRA) its inference weights in best/ when no validation wrote them."""
    weights = r.stage.inference_weights(r.model)
    if r.dist.is_main and weights is not r.model and not (r.run_dir / "best").exists():
        save_best(r.run_dir, weights, {"step": r.step, "tokens_seen": r.tokens_seen})
    return r.stage.finish(r.model)
