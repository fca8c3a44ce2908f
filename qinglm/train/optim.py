"""Optimizers: AdamW with weight decay on matrices only, behind a name-keyed table of builders."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from qinglm.config import TrainConfig
from qinglm.errors import QingLMError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Return [decay group (dim >= 2: matrices, embeddings), no-decay group (norms, biases)].

    named_parameters() yields a tied tensor once, so the shared embedding/head is optimised once.
    The group "names" list is kept for inspection; torch ignores keys it does not know.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Return AdamW over param_groups(model): the fused kernel on CUDA and CPU, foreach elsewhere (MPS).

    Fused beat foreach on the CPU too: 0.6 vs 3.0 ms per step for the tiny preset (1.7M params, 2 threads).
    """
    impl = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **impl
    )


# The seam for other optimizers (Muon comes in another issue): name -> builder(model, cfg, device).
OPTIMIZERS: dict[str, Callable[[nn.Module, TrainConfig, torch.device], torch.optim.Optimizer]] = {
    "adamw": build_adamw,
}


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Return the optimizer named by cfg.optimizer (default "adamw") for model's parameters."""
    name = getattr(cfg, "optimizer", None) or "adamw"
    if name not in OPTIMIZERS:
        raise QingLMError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name](model, cfg, device)
