"""The SFT run: full fine-tuning or LoRA of a pretrained run, written as an ordinary run directory.

RUN2 gets config.json ({"model", "sft", "base"}), tokenizer/, metrics.jsonl and checkpoints/step-N/
(the full weights; after LoRA the merged ones), so qinglm.load, generate, eval and the exporter work
on it unchanged. A LoRA run also writes RUN2/adapter/ in PEFT's format.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qinglm import run_dir as run_dirs
from qinglm.config import TrainConfig, to_dict
from qinglm.device import autocast, grad_scaler, resolve_dtype
from qinglm.errors import QingLMError
from qinglm.io import write_json_atomic
from qinglm.lora import apply_lora, check_targets, merge_lora, save_adapter, trainable_parameters
from qinglm.model import IGNORE_INDEX
from qinglm.sft import data as sft_data
from qinglm.sft.config import SFTConfig
from qinglm.sft.idioms import NAME as IDIOMS
from qinglm.sft.idioms import idioms_sft, pinyin_accuracy
from qinglm.train.checkpoint import save_checkpoint
from qinglm.train.metrics import MetricsLogger
from qinglm.train.optim import build_optimizer, step_optimizer
from qinglm.train.schedule import RunLength


def resolve_sft(cfg: SFTConfig, max_seq_len: int) -> SFTConfig:
    """Return a copy of cfg with defaults filled in (lr, seq_len, length); raise QingLMError if impossible."""
    c = dataclasses.replace(cfg, lora_targets=list(cfg.lora_targets))
    if not c.base:
        raise QingLMError("give the pretrained run to fine-tune with --base RUN")
    if c.lr is None:
        c.lr = 3e-3 if c.lora else 1e-3
    if c.seq_len is None:
        c.seq_len = max_seq_len
    if c.max_steps is None and c.num_epochs is None and c.max_time is None:
        c.num_epochs = 1.0
    if not 0 < c.seq_len <= max_seq_len:
        raise QingLMError(f"seq_len must be between 1 and the model's context {max_seq_len}, got {c.seq_len}")
    for name in ("batch_size", "log_every"):
        if getattr(c, name) <= 0:
            raise QingLMError(f"{name} must be positive, got {getattr(c, name)}")
    if c.lr <= 0:
        raise QingLMError(f"lr must be positive, got {c.lr}")
    if not 0.0 < c.val_fraction < 1.0:
        raise QingLMError(f"val_fraction must be between 0 and 1, got {c.val_fraction}")
    if c.max_examples is not None and c.max_examples <= 0:
        raise QingLMError(f"max_examples must be positive, got {c.max_examples}")
    if c.lora:
        if c.lora_rank <= 0 or c.lora_alpha <= 0:
            raise QingLMError(f"lora_rank and lora_alpha must be positive, got {c.lora_rank}, {c.lora_alpha}")
        if not 0.0 <= c.lora_dropout < 1.0:
            raise QingLMError(f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
        check_targets(c.lora_targets)
    if c.batching not in ("pack", "pad"):
        raise QingLMError(f"unknown batching {c.batching!r}; choose pack or pad")
    if c.out is None:
        c.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{'lora' if c.lora else 'sft'}"
    return c


def load_conversations(cfg: SFTConfig, log: Callable[[str], None]) -> tuple[list, list]:
    """Return (train, held-out) conversations of cfg.data; train capped at cfg.max_examples (seeded)."""
    if cfg.data == IDIOMS:
        train, val = idioms_sft("train", cfg.idiom_kinds), idioms_sft("heldout", cfg.idiom_kinds)
        log(f"{IDIOMS}: {len(train):,} training chats, {len(val):,} chats about held-out idioms")
    else:
        convs, report = sft_data.read_sft_jsonl(cfg.data)
        log(report.summary())
        # A hash-free, seeded split: the same file and seed give the same held-out conversations.
        order = list(range(len(convs)))
        random.Random(cfg.seed).shuffle(order)
        n_val = max(1, round(cfg.val_fraction * len(convs))) if len(convs) > 1 else 0
        val = [convs[i] for i in order[:n_val]]
        train = [convs[i] for i in sorted(order[n_val:])]
        if not train:
            raise QingLMError(f"{cfg.data} has too few conversations to hold some out; add more")
    if cfg.max_examples is not None and cfg.max_examples < len(train):
        train = random.Random(cfg.seed).sample(train, cfg.max_examples)
    if cfg.eval_examples and cfg.eval_examples < len(val):
        val = random.Random(cfg.seed + 1).sample(val, cfg.eval_examples)
    return train, val


@torch.no_grad()
def assistant_loss(
    model: torch.nn.Module,
    samples: list[sft_data.Sample],
    pad_id: int,
    device: torch.device,
    dtype: str = "fp32",
    batch_size: int = 32,
) -> float:
    """Return the mean loss over every assistant token of samples (each sample alone, padded, no packing)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    ordered = sorted(samples, key=lambda s: len(s.x))
    for i in range(0, len(ordered), batch_size):
        x, y = sft_data.collate(ordered[i : i + batch_size], pad_id)
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            logits = model(x)
        total += F.cross_entropy(
            logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((y != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)


def _refuse_a_run(out: Path) -> None:
    """Return nothing; raise QingLMError if out already holds a run (a new run never replaces one)."""
    if run_dirs.holds_run(out):
        raise QingLMError(f"{out} already holds a run; choose another --out")


def _train_loop(
    model: torch.nn.Module,
    optimizer: Any,
    train: list[sft_data.Sample],
    cfg: SFTConfig,
    length: RunLength,
    pad_id: int,
    metrics: MetricsLogger,
    log: Callable[[str], None],
) -> tuple[int, int, float, list[float]]:
    """Return (steps, tokens, seconds, seconds of each finished epoch) after training until cfg's limit."""
    device = next(model.parameters()).device
    dtype = resolve_dtype(cfg.dtype, device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scaler = grad_scaler(dtype, device)  # fp16 on CUDA, as in pretraining
    batches = sft_data.batch_stream(train, cfg.batch_size, cfg.seq_len, cfg.batching, pad_id, cfg.seed)
    model.train()
    step, tokens, win_loss, win_n, cur_epoch = 0, 0, 0.0, 0, 0
    epoch_times: list[float] = []
    t0 = epoch_start = time.perf_counter()
    while not (length.cap is not None and step >= length.total):
        if cfg.max_time is not None and time.perf_counter() - t0 >= cfg.max_time * 60:
            break
        epoch, (x, y) = next(batches)
        if epoch != cur_epoch:
            epoch_times.append(time.perf_counter() - epoch_start)
            epoch_start, cur_epoch = time.perf_counter(), epoch
        ts = time.perf_counter()
        lr = length.lr(step, cfg.lr, cfg.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = x.to(device), y.to(device)
        with autocast(device, dtype):
            loss = model(x, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        step_optimizer(optimizer, scaler, math.isfinite(loss.item()))  # a non-finite loss skips the update
        step, tokens = step + 1, tokens + x.numel()
        win_loss, win_n = win_loss + loss.item(), win_n + 1
        length.observe(step, time.perf_counter() - ts, time.perf_counter() - t0)
        if step % cfg.log_every == 0:
            elapsed = round(time.perf_counter() - t0, 3)
            metrics.log(
                "train",
                step=step,
                loss=win_loss / win_n,
                lr=lr,
                epoch=cur_epoch,
                tokens_seen=tokens,
                elapsed_s=elapsed,
            )
            log(
                f"step {step:,}/{length.total or '?'} | loss {win_loss / win_n:.4f} | lr {lr:.2e} | "
                f"{elapsed:.0f}s"
            )
            win_loss, win_n = 0.0, 0
    return step, tokens, time.perf_counter() - t0, epoch_times


def run_sft(cfg: SFTConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Return the run's figures (losses before/after, time per epoch, trainable parameters, ...) after SFT."""
    with contextlib.ExitStack() as held:  # the run directory's lock, once taken
        return _run_sft(cfg, log, held)


def _run_sft(cfg: SFTConfig, log: Callable[[str], None], held: contextlib.ExitStack) -> dict[str, Any]:
    import qinglm

    lm = qinglm.load(cfg.base, device=cfg.device)
    model, tok, device = lm.model, lm.tokenizer, lm.device
    cfg = resolve_sft(cfg, model.cfg.max_seq_len)
    out = Path(cfg.out)
    _refuse_a_run(out)  # before the slow part
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    dtype = resolve_dtype(cfg.dtype, device)

    train_convs, val_convs = load_conversations(cfg, log)
    train, counts = sft_data.make_samples(tok, train_convs, cfg.seq_len)
    val, _ = sft_data.make_samples(tok, val_convs, cfg.seq_len)
    if not train:
        raise QingLMError("no training example has an assistant token within --seq-len; raise --seq-len")
    if counts:
        log(
            f"examples: {counts['truncated']:,} cut to --seq-len {cfg.seq_len}, "
            f"{counts['no_target']:,} dropped (no reply left)"
        )

    if cfg.lora:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    n_train, n_total = trainable_parameters(model), sum(p.numel() for p in model.parameters())
    log(f"trainable parameters: {n_train:,} of {n_total:,} ({100 * n_train / n_total:.2f}%)")

    _refuse_a_run(out)
    held.enter_context(run_dirs.writing(out, cfg.overwrite))
    tok.save(out / "tokenizer", model_max_length=model.cfg.max_seq_len)
    run_dirs.write_config(
        out, "sft", {"model": to_dict(model.cfg), "sft": to_dict(cfg), "base": str(cfg.base)}
    )
    metrics = MetricsLogger(out)
    val_before = assistant_loss(model, val, tok.pad_id, device, dtype) if val else float("nan")
    log(f"held-out assistant-token loss before: {val_before:.4f} ({sft_data.assistant_tokens(val):,} tokens)")
    metrics.log("val", step=0, val_loss=val_before)

    batching = (train, cfg.batch_size, cfg.seq_len, cfg.batching, cfg.seed)
    per_epoch = sft_data.steps_per_epoch(*batching)  # batches of the first epoch, counted
    epochs = sft_data.steps_for_epochs(*batching, cfg.num_epochs) if cfg.num_epochs is not None else None
    length = RunLength(
        min((n for n in (cfg.max_steps, epochs) if n is not None), default=None),
        cfg.max_time * 60 if cfg.max_time is not None else None,
        cfg.warmup_steps,
    )
    opt_cfg = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, min_lr_ratio=cfg.min_lr_ratio)
    optimizer = build_optimizer(model, opt_cfg, device)
    log(
        f"{len(train):,} examples, {sft_data.assistant_tokens(train):,} assistant tokens, "
        f"{per_epoch:,} steps per epoch ({cfg.batching}, {cfg.batch_size} x {cfg.seq_len})"
    )

    step, tokens, train_s, epoch_times = _train_loop(
        model, optimizer, train, cfg, length, tok.pad_id, metrics, log
    )
    # A finished epoch is timed directly; a shorter run extrapolates its step time to a whole epoch.
    time_per_epoch = (
        sum(epoch_times) / len(epoch_times) if epoch_times else train_s * per_epoch / max(step, 1)
    )
    val_after = assistant_loss(model, val, tok.pad_id, device, dtype) if val else float("nan")
    log(f"held-out assistant-token loss after: {val_after:.4f} (before {val_before:.4f})")
    metrics.log("val", step=step, val_loss=val_after, elapsed_s=round(train_s, 3))

    weights = model
    if cfg.lora:
        save_adapter(model, out / "adapter", base=str(cfg.base))
        weights = merge_lora(copy.deepcopy(model))
    state = {"step": step, "tokens_seen": tokens, "elapsed_s": train_s, "kind": "lora" if cfg.lora else "sft"}
    ckpt = save_checkpoint(out, step, weights, optimizer, state, keep=1)
    result: dict[str, Any] = {
        "out": str(out),
        "checkpoint": str(ckpt),
        "steps": step,
        "examples": len(train),
        "trainable_params": n_train,
        "total_params": n_total,
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "train_s": train_s,
        "time_per_epoch_s": time_per_epoch,
        "time_per_epoch_measured": bool(epoch_times),
    }
    if cfg.data == IDIOMS and cfg.eval_pinyin:
        result["pinyin"] = pinyin_accuracy(qinglm.LM(weights, tok, run_dir=out), cfg.eval_pinyin)
        p = result["pinyin"]
        log(
            f"held-out pinyin exact match: {p['exact']}/{p['n']} = {p['accuracy']:.1%} "
            f"(right format {p['format_ok']:.1%}, syllables right {p['syllable_accuracy']:.1%})"
        )
    metrics.close()
    write_json_atomic(out / "sft_results.json", result)
    log(f"wrote {ckpt}" + (f" and {out / 'adapter'}" if cfg.lora else ""))
    return result


def merge_run(
    adapter: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    device: str = "cpu",
    overwrite: bool = False,
) -> Path:
    """Return the run directory out after writing base + adapter merged into plain weights (out/best).

    adapter is a PEFT LoRA directory or an SFT run holding adapter/; base defaults to the adapter's
    base_model_name_or_path. out gets config.json, tokenizer/ and best/model.safetensors.
    """
    import qinglm
    from qinglm.lora import load_adapter, read_adapter_config
    from qinglm.train.checkpoint import save_run

    adapter = Path(adapter)
    if (adapter / "adapter").is_dir():
        adapter = adapter / "adapter"
    base = base or read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise QingLMError(f"{adapter} does not name its base run; pass --base RUN")
    out = Path(out)
    _refuse_a_run(out)  # before the slow part
    lm = qinglm.load(base, device=device)
    model = merge_lora(load_adapter(lm.model, adapter))
    merged = {"merged_from": {"base": str(base), "adapter": str(adapter)}}
    return save_run(out, model, lm.tokenizer, merged, merged, kind="merge", overwrite=overwrite)
