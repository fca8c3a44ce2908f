"""Dropout that costs little on a CPU: masks drawn cheaply, for a whole forward at once, and attention's as DropKey.

On a CPU two things make torch's dropout slow (measured in benchmarks/README.md, "Dropout on a CPU"):
- `bernoulli_` draws one random number per element, and a torch.compile'd dropout draws them more slowly
  still (inductor's per-element generator);
- scaled_dot_product_attention has no fused CPU kernel that takes dropout: with dropout_p > 0 it runs the
  math path, about 4x the fused kernel's time for one layer's attention.
So on a CPU, in training, the Transformer draws every dropout mask of a forward here, before its first layer
and outside the compiled graph (one graph break instead of one per site):
- keep_mask draws 64 random bits per four elements and keeps an element when its 16 bits clear p's threshold,
  so p is rounded to a multiple of 1/65536 (0.1 -> 0.100006) and kept elements are scaled by 1/(1-p) of
  that rounded p;
- attention's dropout is DropKey (Li et al., "DropKey for Vision Transformer", CVPR 2023) when the model's
  attention_dropout says "keys" (its default, auto, says so on a CPU): each query's keys are dropped
  with probability p before the softmax, which renormalises over the kept ones, instead of dropping the
  attention weights after it. The fused kernel takes the kept keys as a boolean mask. A query always
  keeps its own position, so no softmax row is empty.
Elsewhere (CUDA) nn.Dropout and the attention kernels' own dropout are fast and stay as they are.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

_LEVELS = 65536  # 16 random bits per element


def keep_probability(p: float) -> float:
    """Return the probability keep_mask keeps an element with: 1 - p rounded to a multiple of 1/65536."""
    return 1.0 - _dropped_levels(p) / _LEVELS


def _dropped_levels(p: float) -> int:
    return round(p * _LEVELS)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Return a boolean tensor of shape, True with probability keep_probability(p), from torch's generator.

    One int64 of random_ gives four int16 draws: a quarter of bernoulli_'s calls to the generator."""
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= _dropped_levels(p) / _LEVELS
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    return words.view(torch.int16)[:n].view(shape) >= _dropped_levels(p) - _LEVELS // 2


class Dropout(nn.Dropout):
    """nn.Dropout that takes a mask drawn beforehand: forward(x, keep) is x * keep / keep_probability(p)."""

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if keep is None:
            return super().forward(x)
        return x * keep * (1.0 / keep_probability(self.p))


class BlockNoise(NamedTuple):
    """One block's masks: kept keys (B, H, T, T) of its attention, kept elements (B, T, d) of its two
    residual branches; None where that dropout is off."""

    keys: torch.Tensor | None
    attn: torch.Tensor | None
    mlp: torch.Tensor | None


class Noise(NamedTuple):
    embed: torch.Tensor | None
    blocks: list[BlockNoise]


@torch.compiler.disable
def draw_noise(model: nn.Module, batch: int, length: int, device: torch.device) -> Noise | None:
    """Return the dropout masks of one training forward of a qinglm Transformer over (batch, length) tokens,
    in a fixed order from torch's generator (so a seed fixes them, and gradient checkpointing's recompute
    reuses them); None when every dropout of the model is off."""
    width = (batch, length, model.cfg.d_model)

    def draw(p: float, shape: tuple[int, ...]) -> torch.Tensor | None:
        return keep_mask(shape, p, device) if p > 0 else None

    blocks = []
    for b in model.blocks:
        keys = b.attn.dropout if b.attn.drops_keys(device) else 0.0
        blocks.append(
            BlockNoise(
                draw(keys, (batch, b.attn.n_heads, length, length)),
                draw(b.drop.p, width),
                draw(b.drop.p, width),
            )
        )
    noise = Noise(draw(model.drop.p, width), blocks)
    if noise.embed is None and not any(t is not None for bn in blocks for t in bn):
        return None
    return noise


def kept_keys_mask(keep: torch.Tensor) -> torch.Tensor:
    """Return the causal attention mask (True = may attend) of DropKey's kept keys (B, H, T, T): a query
    sees the kept keys at or before its position, and always its own."""
    T = keep.size(-1)
    eye = torch.eye(T, dtype=torch.bool, device=keep.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()
    return (keep | eye) & causal
