"""The pretraining loop: the optimizer step, validation, checkpoints, logging, clean stopping."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qinglm.config import ModelConfig, TrainConfig
from qinglm.device import autocast
from qinglm.errors import QingLMError
from qinglm.train.checkpoint import latest_checkpoint, save_best, save_checkpoint
from qinglm.train.session import Run, setup_run

MAX_BAD_STEPS = 10  # non-finite losses in a row before giving up


class _StopRequest:
    """SIGINT/SIGTERM set a flag so the current step finishes and a checkpoint is written.

    A second Ctrl-C raises KeyboardInterrupt at once for a user who does not want to wait.
    """

    def __init__(self) -> None:
        self.requested = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopRequest]:
        if threading.current_thread() is not threading.main_thread():  # signal() only works there
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


# ---------------------------------------------------------------------------- step, validation, saving


def _optimizer_step(r: Run) -> tuple[float, float, int, bool]:
    """Return (loss, grad norm, tokens, applied) of one update over cfg.grad_accum micro-batches.

    The update is not applied when the loss or, without a GradScaler, the gradient norm is not
    finite; with fp16 the scaler skips inf/nan gradients itself.
    """
    cfg, scaler = r.cfg, r.scaler
    loss_sum, tokens = torch.zeros((), device=r.device), 0
    for _ in range(cfg.grad_accum):
        x, y = next(r.batches)
        x, y = x.to(r.device, non_blocking=True), y.to(r.device, non_blocking=True)
        with autocast(r.device, r.dtype):
            loss = r.forward(x, y) / cfg.grad_accum  # the step's loss is the mean over micro-batches
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
        tokens += x.numel()
    if scaler is not None:
        scaler.unscale_(r.optimizer)
    params = [p for g in r.optimizer.param_groups for p in g["params"]]
    # 0 disables clipping; an infinite max norm still returns the norm for the log.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
    step_loss = loss_sum.item()
    ok = math.isfinite(step_loss) and (scaler is not None or math.isfinite(grad_norm))
    if ok and scaler is not None:
        scaler.step(r.optimizer)
        scaler.update()
    elif ok:
        r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return step_loss, grad_norm, tokens, ok


def _validate(r: Run) -> dict[str, float]:
    """Return the validation metrics; log them, and save best/ when the loss improved."""
    from qinglm.evaluate import evaluate_shards

    v = evaluate_shards(
        r.model,
        r.val_data,
        batch_size=r.cfg.batch_size,
        seq_len=r.cfg.seq_len,
        device=r.device,
        dtype=r.dtype,
        max_tokens=r.cfg.eval_tokens or None,
    )
    if math.isfinite(v["loss"]) and (r.best_val_loss is None or v["loss"] < r.best_val_loss):
        r.best_val_loss, r.bad_evals = v["loss"], 0
        best = {"step": r.step, "val_loss": v["loss"], "val_ppl": v["ppl"], "val_bpc": v["bpc"]}
        save_best(r.run_dir, r.model, {**best, "tokens_seen": r.tokens_seen})
    else:
        r.bad_evals += 1
    r.metrics.log(
        "val",
        step=r.step,
        val_loss=v["loss"],
        val_ppl=v["ppl"],
        val_bpc=v["bpc"],
        tokens_seen=r.tokens_seen,
        elapsed_s=round(r.elapsed(), 3),
    )
    return v


def _checkpoint(r: Run) -> Path:
    """Return the directory of a new step checkpoint holding everything needed to resume exactly."""
    state = {
        "step": r.step,
        "tokens_seen": r.tokens_seen,
        "elapsed_s": r.elapsed(),
        "loader": r.batches.state_dict(),
        "best_val_loss": r.best_val_loss,
        "bad_evals": r.bad_evals,
        "warmup_eff": r.length.warmup,
        "total_steps_est": r.length.total,
        "skipped_steps": r.skipped_steps,
    }
    extra = {"scaler": r.scaler.state_dict()} if r.scaler is not None else None
    return save_checkpoint(
        r.run_dir, r.step, r.model, r.optimizer, state, r.cfg.keep_checkpoints, extra=extra
    )


def _stop_reason(r: Run, stop: _StopRequest) -> str | None:
    """Return why training should stop now, or None to go on."""
    if stop.requested:
        return "interrupted"
    if r.length.fixed and r.step >= r.length.total:
        return "finished"
    if r.cfg.max_time is not None and r.elapsed() >= r.cfg.max_time * 60:
        return "time limit"
    if r.cfg.patience and r.bad_evals >= r.cfg.patience:
        return "early stop"
    return None


def _log_train(r: Run, win: dict[str, float], lr: float, grad_norm: float) -> str:
    """Return the log line of the interval `win` after writing its metrics line."""
    epoch = r.batches.epoch + r.batches.position / r.batches.steps_per_epoch
    m = r.metrics.log(
        "train",
        step=r.step,
        loss=win["loss"] / win["steps"],
        lr=lr,
        tokens_per_s=win["tokens"] / max(win["time"], 1e-9),
        epoch=round(epoch, 4),
        tokens_seen=r.tokens_seen,
        elapsed_s=round(r.elapsed(), 3),
        grad_norm=grad_norm,
    )
    total = f"/{r.length.total:,}" if r.length.total else ""
    return (
        f"step {r.step:,}{total} | loss {m['loss']:.4f} | lr {lr:.2e} | {m['tokens_per_s']:,.0f} tok/s | "
        f"epoch {epoch:.2f} | grad norm {grad_norm:.2f} | {_fmt_time(m['elapsed_s'])}"
    )


def _val_line(r: Run, v: dict[str, float]) -> str:
    best = " (best)" if r.bad_evals == 0 else f" (no improvement x{r.bad_evals})"
    return f"step {r.step:,} | val loss {v['loss']:.4f} | ppl {v['ppl']:.2f} | bpc {v['bpc']:.4f}{best}"


def _fmt_time(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m{s:02d}s" if m >= 60 else f"{m}m{s:02d}s"


# ---------------------------------------------------------------------------- the loop


def train(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    run_dir: str | Path,
    data_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Return {"step", "train_loss", "val_loss", "val_ppl", "val_bpc", "best_val_loss", "elapsed_s",
    "tokens_per_s", "tokens_seen", "skipped_steps", "stop_reason", "checkpoint"} after training in run_dir.
    """
    r = setup_run(model_cfg, train_cfg, Path(run_dir), data_dir, log)
    cfg = r.cfg
    r.model.train()
    last_eval, last_save, bad_in_row = -1, (r.step if cfg.resume and r.step else -1), 0
    val: dict[str, float] = {}
    win = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}  # the current log interval
    session_tokens, session_time, last_loss = 0, 0.0, float("nan")
    r.t_start = time.perf_counter()
    bar = tqdm(total=r.length.total, initial=r.step, unit="step", disable=None, dynamic_ncols=True)
    say = bar.write if (log is print and not bar.disable) else log  # keep the bar on its own line
    with contextlib.closing(r.metrics), bar, _StopRequest().installed() as stop:
        while (reason := _stop_reason(r, stop)) is None:
            t0 = time.perf_counter()
            lr = r.length.lr(r.step, cfg.lr, cfg.min_lr_ratio)
            for g in r.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # lr_scale: per-group multiplier seam (e.g. Muon)
            step_loss, grad_norm, tokens, ok = _optimizer_step(r)
            step_time = time.perf_counter() - t0
            r.tokens_seen += tokens
            session_tokens, session_time = session_tokens + tokens, session_time + step_time
            if not ok:
                r.skipped_steps, bad_in_row = r.skipped_steps + 1, bad_in_row + 1
                say(f"step {r.step + 1}: non-finite loss/gradients, update skipped ({bad_in_row} in a row)")
                if bad_in_row >= MAX_BAD_STEPS:
                    raise QingLMError(
                        f"loss was not finite for {MAX_BAD_STEPS} steps in a row; lower --lr, "
                        "raise --warmup-steps or use --dtype fp32"
                    )
                continue
            bad_in_row, r.step, last_loss = 0, r.step + 1, step_loss
            for k, v in (("loss", step_loss), ("steps", 1), ("tokens", tokens), ("time", step_time)):
                win[k] += v
            if r.length.observe(r.step, step_time, r.elapsed()):
                bar.total = r.length.total
            bar.update(1)
            bar.set_postfix(
                loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / step_time:.0f}", refresh=False
            )
            if r.step % cfg.log_every == 0:
                say(_log_train(r, win, lr, grad_norm))
                win = dict.fromkeys(win, 0)
            if r.val_data is not None and r.step % cfg.eval_every == 0:
                val, last_eval = _validate(r), r.step
                say(_val_line(r, val))
            if r.step % cfg.save_every == 0:
                _checkpoint(r)
                last_save = r.step

        # The end: a last validation (not when interrupted: leave quickly) and a last checkpoint.
        if r.val_data is not None and last_eval != r.step and reason != "interrupted" and r.step > 0:
            val = _validate(r)
            say(_val_line(r, val))
        ckpt = _checkpoint(r) if last_save != r.step else latest_checkpoint(r.run_dir)
    if reason == "interrupted":
        log(f"interrupted; resume with: qinglm train --out {r.run_dir} --resume")
    else:
        log(f"stopped at step {r.step:,} ({reason}) after {_fmt_time(r.elapsed())}")
    return {
        "step": r.step,
        "train_loss": last_loss,
        "val_loss": val.get("loss"),
        "val_ppl": val.get("ppl"),
        "val_bpc": val.get("bpc"),
        "best_val_loss": r.best_val_loss,
        "elapsed_s": r.elapsed(),
        "tokens_per_s": session_tokens / max(session_time, 1e-9),
        "tokens_seen": r.tokens_seen,
        "skipped_steps": r.skipped_steps,
        "stop_reason": reason,
        "checkpoint": str(ckpt or ""),
    }
