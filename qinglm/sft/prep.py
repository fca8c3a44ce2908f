"""What SFT and DPO share before training: configs resolved, examples read and split, the held-out
assistant-token loss."""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from qinglm.data.idioms_sft import NAME as IDIOMS
from qinglm.data.idioms_sft import idioms_sft
from qinglm.data.tools_sft import NAME as TOOLS
from qinglm.data.tools_sft import tools_sft
from qinglm.device import autocast
from qinglm.errors import QingLMError
from qinglm.model.transformer import IGNORE_INDEX
from qinglm.sft import data as sft_data
from qinglm.sft.config import SFTConfig


def resolve_sft(cfg: SFTConfig, max_seq_len: int) -> SFTConfig:
    """Return a copy of cfg with defaults filled in (lr 1e-3 full, 3e-3 LoRA; see resolve_tuning)."""
    return resolve_tuning(cfg, max_seq_len, (1e-3, 3e-3), "lora" if cfg.lora else "sft")


def resolve_tuning(cfg: Any, max_seq_len: int, lr: tuple[float, float], name: str) -> Any:
    """Return a copy of a fine-tuning config (SFT, DPO) with defaults filled in: lr (full, LoRA), seq_len
    (the model's context), one epoch when no length is given, out (runs/<time>-name); raise QingLMError
    if impossible."""
    c = dataclasses.replace(cfg, lora_targets=list(cfg.lora_targets))
    if not c.base:
        raise QingLMError("give the run to fine-tune with --base RUN")
    if c.lr is None:
        c.lr = lr[1] if c.lora else lr[0]
    if c.seq_len is None:
        c.seq_len = max_seq_len
    if c.max_steps is None and c.num_epochs is None and c.max_time is None:
        c.num_epochs = 1.0
    if not 0 < c.seq_len <= max_seq_len:
        raise QingLMError(f"seq_len must be between 1 and the model's context {max_seq_len}, got {c.seq_len}")
    if c.out is None:
        c.out = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    c.__post_init__()  # every part's checks, on the filled-in values
    return c


def load_conversations(cfg: SFTConfig, log: Callable[[str], None]) -> tuple[list, list]:
    """Return (train, held-out) conversations of cfg.data (see load_examples): idioms-sft, tools-sft or a file."""
    if cfg.data == TOOLS:
        return load_examples(cfg, TOOLS, tools_sft, sft_data.read_sft_jsonl, "chats", log)

    def splits(split: str) -> list:
        return idioms_sft(split, cfg.idiom_kinds)

    return load_examples(cfg, IDIOMS, splits, sft_data.read_sft_jsonl, "chats", log)


def load_examples(
    cfg: Any,
    builtin: str,
    splits: Callable[[str], list],
    read: Callable[[str], tuple[list, Any]],
    noun: str,
    log: Callable[[str], None],
) -> tuple[list, list]:
    """Return (train, held-out) examples of cfg.data: the built-in data set's "train" and "heldout"
    splits(), or the examples read(file) gives with a seeded cfg.val_fraction held out (hash-free: the
    same file and seed hold out the same ones). Then cut to cfg.max_examples and cfg.eval_examples
    (seeded samples; None/0 = all)."""
    if cfg.data == builtin:
        train, val = splits("train"), splits("heldout")
        log(f"{builtin}: {len(train):,} training {noun}, {len(val):,} held-out {noun}")
    else:
        items, report = read(cfg.data)
        log(report.summary())
        order = list(range(len(items)))
        random.Random(cfg.seed).shuffle(order)
        n_val = max(1, round(cfg.val_fraction * len(items))) if len(items) > 1 else 0
        val = [items[i] for i in order[:n_val]]
        train = [items[i] for i in sorted(order[n_val:])]
        if not train:
            raise QingLMError(f"{cfg.data} has too few {noun} to hold some out; add more")
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
