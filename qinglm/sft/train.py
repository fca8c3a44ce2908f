"""The SFT run: full fine-tuning or LoRA of a pretrained run, written as an ordinary run directory.

RUN2 gets config.json ({"model", "sft", "base"}), tokenizer/, metrics.jsonl and checkpoints/step-N/
(the full weights; after LoRA the merged ones), so qinglm.load, generate, eval and the exporter work
on it unchanged. A LoRA run also writes RUN2/adapter/ in PEFT's format.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qinglm import run_dir as run_dirs
from qinglm.device import autocast
from qinglm.errors import QingLMError
from qinglm.lora import merge_lora
from qinglm.model import IGNORE_INDEX
from qinglm.sft import data as sft_data
from qinglm.sft.config import SFTConfig
from qinglm.sft.idioms import NAME as IDIOMS
from qinglm.sft.idioms import idioms_sft


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
    if c.out is None:
        c.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{'lora' if c.lora else 'sft'}"
    c.__post_init__()  # every part's checks, on the filled-in values
    return c


def load_conversations(cfg: SFTConfig, log: Callable[[str], None]) -> tuple[list, list]:
    """Return (train, held-out) conversations of cfg.data; train capped at cfg.max_examples (seeded)."""
    if cfg.data == IDIOMS:
        train, val = idioms_sft("train"), idioms_sft("heldout")
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


def run_sft(
    cfg: SFTConfig, log: Callable[[str], None] = print, flags: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return the run's figures (losses before/after, time per epoch, trainable parameters, ...) after SFT
    on the training engine. flags: the command-line fields given (for a --nproc launch)."""
    from qinglm.sft.stage import SFTStage
    from qinglm.train.driver import run_stage_command

    cfg = resolve_sft(cfg, run_dirs.model_config(cfg.base).max_seq_len if cfg.base else 0)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    flags = {**(flags or {}), **{k: getattr(cfg, k) for k in ("base", "out", "seq_len", "lr")}}
    res = run_stage_command("sft", "sft", cfg, flags, lambda: SFTStage(cfg, log), log)
    if not res:  # the torchrun launcher: its workers trained
        return res
    steps = res["step"]
    per_epoch = res.get("steps_per_epoch") or steps
    res.update(
        checkpoint=res["checkpoint"],
        steps=steps,
        train_s=res["elapsed_s"],
        # A finished epoch is timed directly; a shorter run extrapolates its step time to a whole epoch.
        time_per_epoch_s=res["elapsed_s"] * per_epoch / max(steps, 1),
        time_per_epoch_measured=steps >= per_epoch,
    )
    log(f"wrote {res['checkpoint']}" + (f" and {Path(cfg.out) / 'adapter'}" if cfg.lora else ""))
    return res


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
