"""The one training engine: the optimizer step, validation, checkpoints, logging, clean stopping, for
any stage (qinglm/train/stage.py): pretraining, SFT, LoRA, DPO, GRPO, distillation."""

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

from qinglm.config import ModelConfig
from qinglm.device import autocast, deterministic_algorithms, resolve_device
from qinglm.errors import QingLMError
from qinglm.train import distributed
from qinglm.train.checkpoint import latest_checkpoint, save_checkpoint
from qinglm.train.config import EngineConfig, TrainConfig
from qinglm.train.metrics import MetricsSink, peak_memory_mb
from qinglm.train.optim import step_optimizer
from qinglm.train.pretrain import PretrainStage
from qinglm.train.session import Run, setup_run, step_seed
from qinglm.train.stage import Stage
from qinglm.train.support import check_supported
from qinglm.train.validation import finish, val_line, validate

MAX_BAD_STEPS = 10  # non-finite losses in a row before giving up
# Every reason _stop_reason can give; when ranks differ, all take the one listed last.
STOP_REASONS = (None, "finished", "early stop", "time limit", "interrupted")


class _SpikeWatch:
    """Flags a loss spike: a step loss above SPIKE_RATIO x the running mean (EMA) of the loss.

    The first WARM steps of a process only feed the mean; a falling loss never trips it.
    """

    SPIKE_RATIO, BETA, WARM = 1.3, 0.95, 20

    def __init__(self) -> None:
        self.mean: float | None = None
        self.seen = 0

    def check(self, loss: float) -> float | None:
        """Return loss / running mean when this step's loss is a spike, else None; then update the mean."""
        ratio = loss / self.mean if self.mean else None
        spike = ratio if (self.seen >= self.WARM and ratio is not None and ratio > self.SPIKE_RATIO) else None
        self.mean = loss if self.mean is None else self.BETA * self.mean + (1 - self.BETA) * loss
        self.seen += 1
        return spike


class _StopRequest:
    """SIGINT/SIGTERM set a flag so the current step finishes and a checkpoint is written.

    A second Ctrl-C raises KeyboardInterrupt at once for a user who does not want to wait; not under
    torchrun, whose agent passes on the Ctrl-C that its workers already got from the terminal (and
    kills workers that do not finish within its timeout).
    """

    def __init__(self, second_aborts: bool = True) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self.second_aborts = second_aborts

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and self.second_aborts and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = self.signum or signum

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


# ---------------------------------------------------------------------------- step, saving, logging


def _micro_batches(r: Run) -> Iterator[tuple[Any, int | float]]:
    """Yield the step's grad_accum micro-batches, each with what its mean loss is divided by.

    Without the stage's loss_units every mean is divided by grad_accum: the step's loss is the mean over
    micro-batches. With them (SFT's target tokens, DPO's pairs) the step's micro-batches are fetched
    first, in the same order, and mean i is weighted by units_i x world_size / (the step's units over all
    micro-batches and ranks): the step's loss is then the mean over all its units, as one big batch
    gives (DDP averages the ranks' gradients, hence world_size). Equal units give grad_accum exactly.
    """
    grad_accum = r.cfg.grad_accum
    first = next(r.batches)
    units = r.stage.loss_units(first)
    if units is None:
        yield first, grad_accum
        for _ in range(grad_accum - 1):
            yield next(r.batches), grad_accum
        return
    batches = [first] + [next(r.batches) for _ in range(grad_accum - 1)]
    counts = [units] + [r.stage.loss_units(b) for b in batches[1:]]
    total = distributed.agree_sum(r.dist, sum(counts), r.device)
    for batch, n in zip(batches, counts):
        yield batch, (total / (n * r.dist.world_size) if n else math.inf)  # no units: weight 0


def _optimizer_step(r: Run) -> tuple[float, float, int, bool, dict[str, float]]:
    """Return (loss, grad norm, tokens, applied, the stage's metrics) of one update over cfg.grad_accum
    micro-batches.

    The update is not applied when the loss or, without a GradScaler, the gradient norm is not
    finite; with fp16 the scaler skips inf/nan gradients itself.
    """
    cfg, scaler = r.cfg, r.scaler
    loss_sum, tokens = torch.zeros((), device=r.device), 0
    extra: dict[str, torch.Tensor] = {}
    for i, (batch, divisor) in enumerate(_micro_batches(r)):
        # Several processes: gradients are averaged over ranks once, after the last micro-batch.
        with distributed.grad_sync(r.wrapped, r.dist, sync=i == cfg.grad_accum - 1):
            with autocast(r.device, r.dtype):
                out = r.stage.loss(r.forward, r.model, batch)
                loss = out.loss / divisor  # see _micro_batches
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
        tokens += out.tokens * r.dist.world_size
        for k, v in out.metrics.items():
            extra[k] = extra.get(k, 0.0) + v.detach().float() / divisor
    if scaler is not None:
        scaler.unscale_(r.optimizer)
    params = [p for g in r.optimizer.param_groups for p in g["params"]]
    # 0 disables clipping; an infinite max norm still returns the norm for the log.
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    step_loss = distributed.mean(r.dist, loss_sum).item()  # every rank then takes the same decision
    ok = math.isfinite(step_loss) and (scaler is not None or math.isfinite(grad_norm))
    step_optimizer(r.optimizer, scaler, ok)
    metrics = {}
    if extra:  # one all-reduce for all of them
        values = distributed.mean(r.dist, torch.stack([extra[k] for k in extra]).to(r.device)).tolist()
        metrics = dict(zip(extra, values))
    return step_loss, grad_norm, tokens, ok, metrics


def _checkpoint(r: Run) -> Path:
    """Return the directory of a new step checkpoint holding everything needed to resume exactly."""
    extra = {"scaler": r.scaler.state_dict()} if r.scaler is not None else None
    # FSDP: every rank helps gather the whole weights and optimizer state; rank 0 alone writes them.
    gathered = distributed.full_model_tensors(r.model, r.dist)
    optim_state = distributed.full_optimizer_state(r.optimizer, r.dist)
    path = None
    if r.dist.is_main:
        model = r.model if gathered is None else gathered
        path = save_checkpoint(
            r.run_dir, r.step, model, optim_state, r.state_dict(), r.cfg.keep_checkpoints, extra=extra
        )
    return distributed.broadcast_object(r.dist, path)  # also keeps the ranks together while rank 0 writes


def _agreed_stop_reason(r: Run, stop: _StopRequest) -> str | None:
    """Return why training should stop now, or None; all ranks agree (a signal may reach one rank first)."""
    reason = _stop_reason(r, stop)
    if not r.dist.enabled:
        return reason
    return STOP_REASONS[int(distributed.agree_max(r.dist, [STOP_REASONS.index(reason)], r.device)[0])]


def _stop_reason(r: Run, stop: _StopRequest) -> str | None:
    """Return why training should stop now, or None to go on."""
    if stop.requested:
        return "interrupted"
    if r.length.cap is not None and r.step >= min(r.length.cap, r.length.total or r.length.cap):
        return "finished"
    if r.cfg.max_time is not None and r.elapsed() >= r.cfg.max_time * 60:
        return "time limit"
    if r.cfg.patience and r.bad_evals >= r.cfg.patience:
        return "early stop"
    return None


def _moe_metrics(r: Run) -> dict[str, Any]:
    """Return the last micro-batch's expert utilisation of a MoE model (empty for a dense one).

    expert_util maps each MoE block to the fraction of token-slots per expert; expert_load_max is the
    busiest expert's share relative to a perfectly even split (1.0 = balanced).
    """
    stats = r.model.moe_stats()
    if not stats:
        return {}
    peak = max(max(u) * len(u) for u in stats.values())
    return {"expert_util": {k: [round(f, 4) for f in u] for k, u in stats.items()}, "expert_load_max": peak}


def _log_train(r: Run, win: dict[str, float], lr: float, grad_norm: float) -> str:
    """Return the log line of the interval `win` after writing its metrics line."""
    epoch = r.batches.epoch + r.batches.position / r.batches.steps_per_epoch
    stage_metrics = {k[2:]: v / win["steps"] for k, v in win.items() if k.startswith("m:")}
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
        memory_mb=round(peak_memory_mb(r.device), 1),
        **stage_metrics,
        **_moe_metrics(r),
    )
    total = f"/{r.length.total:,}" if r.length.total else ""
    return (
        f"step {r.step:,}{total} | loss {m['loss']:.4f} | lr {lr:.2e} | {m['tokens_per_s']:,.0f} tok/s | "
        f"epoch {epoch:.2f} | grad norm {grad_norm:.2f} | {_fmt_time(m['elapsed_s'])}"
        + (f" | expert load max {m['expert_load_max']:.2f}x" if "expert_load_max" in m else "")
    )


def _quiet(_line: str) -> None:
    pass


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
    sinks: list[MetricsSink] | None = None,
) -> dict[str, Any]:
    """Return train_stage()'s result after pretraining model_cfg on the prepared data in data_dir."""
    return train_stage(
        PretrainStage(model_cfg, train_cfg, data_dir), train_cfg, run_dir, log=log, sinks=sinks
    )


def train_stage(
    stage: Stage,
    cfg: EngineConfig,
    run_dir: str | Path,
    *,
    log: Callable[[str], None] = print,
    sinks: list[MetricsSink] | None = None,
) -> dict[str, Any]:
    """Return {"step", "train_loss", "val_loss", "val_ppl", "val_bpc", "best_val_loss", "elapsed_s",
    "tokens_per_s", "tokens_seen", "skipped_steps", "stop_reason", "stop_signal", "checkpoint",
    **stage.finish()} after training stage in run_dir.

    sinks also receive every metrics record (e.g. a hyperparameter search reporting validation losses).
    """
    check_supported(stage.kind, cfg)  # the commands check it before launching; callers of the API here
    device = resolve_device(cfg.device)
    dist = distributed.init(device, cfg.parallel)
    with distributed.group(dist), deterministic_algorithms(device):  # same seed, same weights: exact resume
        return _train(stage, cfg, Path(run_dir), log, sinks, dist)


COMMANDS = {"pretrain": "train"}  # the command that continues a run of each kind (default: the kind)


def _train(
    stage: Stage,
    cfg: EngineConfig,
    run_dir: Path,
    log: Callable[[str], None],
    sinks: list[MetricsSink] | None,
    dist: distributed.Dist,
) -> dict[str, Any]:
    """Return train_stage()'s result; the process group, if any, is set up."""
    log = log if dist.is_main else _quiet  # only rank 0 speaks
    r = setup_run(stage, cfg, run_dir, log, dist)
    for sink in sinks or []:
        r.metrics.add_sink(sink)
    cfg = r.cfg
    r.model.train()
    last_eval, last_save, bad_in_row = -1, (r.step if cfg.resume and r.step else -1), 0
    val: dict[str, Any] = {}
    win: dict[str, float] = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}  # the current log interval
    session_tokens, session_time, last_loss = 0, 0.0, float("nan")
    r.t_start = time.perf_counter()
    spikes = _SpikeWatch()
    disable = None if dist.is_main else True  # None: tqdm shows the bar on a terminal only
    bar = tqdm(total=r.length.total, initial=r.step, unit="step", disable=disable, dynamic_ncols=True)
    say = bar.write if (log is print and not bar.disable) else log  # keep the bar on its own line
    with contextlib.closing(r.metrics), bar, _StopRequest(not dist.enabled).installed() as stop:
        while (reason := _agreed_stop_reason(r, stop)) is None:
            t0 = time.perf_counter()
            lr = r.length.lr(r.step, cfg.lr, cfg.min_lr_ratio)
            for g in r.optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)  # lr_scale: per-group multiplier seam (e.g. Muon)
            torch.manual_seed(step_seed(cfg.seed, dist.rank, r.step))  # this rank's dropout masks, rollouts
            stage.begin_step(r.step, r.length.total)
            step_loss, grad_norm, tokens, ok, metrics = _optimizer_step(r)
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
            for k, v in metrics.items():
                win["m:" + k] = win.get("m:" + k, 0.0) + v
            if stage.watch_spikes and (ratio := spikes.check(step_loss)) is not None:
                r.metrics.log("spike", step=r.step, loss=step_loss, mean_loss=step_loss / ratio, ratio=ratio)
                say(f"step {r.step:,}: loss spike {step_loss:.4f}, {ratio:.2f}x the running mean")
            if not r.length.fixed:  # a time-based length: every rank estimates it from the same times
                step_time, elapsed = distributed.agree_max(r.dist, [step_time, r.elapsed()], r.device)
                if r.length.observe(r.step, step_time, elapsed):
                    bar.total = r.length.total
            bar.update(1)
            bar.set_postfix(
                loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / step_time:.0f}", refresh=False
            )
            if r.step % cfg.log_every == 0:
                say(_log_train(r, win, lr, grad_norm))
                win = {"loss": 0.0, "steps": 0, "tokens": 0, "time": 0.0}
            if r.step % cfg.eval_every == 0 and (v := validate(r)):
                val, last_eval = v, r.step
                say(val_line(r, val))
            if r.step % cfg.save_every == 0:
                _checkpoint(r)
                last_save = r.step

        # The end: a last validation (not when interrupted: leave quickly) and a last checkpoint.
        if last_eval != r.step and reason != "interrupted" and r.step > 0 and (v := validate(r)):
            val = v
            say(val_line(r, val))
        ckpt = _checkpoint(r) if last_save != r.step else latest_checkpoint(r.run_dir)
        extras = {} if reason == "interrupted" else finish(r)
    if reason == "interrupted":
        launch = " (with the same torchrun launch)" if dist.enabled else ""
        command = COMMANDS.get(stage.kind, stage.kind)
        log(f"interrupted; resume with: qinglm {command} --out {r.run_dir} --resume{launch}")
    else:
        log(f"stopped at step {r.step:,} ({reason}) after {_fmt_time(r.elapsed())}")
    return {
        "step": r.step,
        "train_loss": last_loss,
        "val_loss": val.get("val_loss"),
        "val_ppl": val.get("val_ppl"),
        "val_bpc": val.get("val_bpc"),
        "best_val_loss": r.best_val_loss,
        "elapsed_s": r.elapsed(),
        "tokens_per_s": session_tokens / max(session_time, 1e-9),
        "tokens_seen": r.tokens_seen,
        "skipped_steps": r.skipped_steps,
        "stop_reason": reason,
        "stop_signal": stop.signum,  # None, or the signal that stopped this process (a command exits 128 + it)
        "checkpoint": str(ckpt or ""),
        **extras,
    }
