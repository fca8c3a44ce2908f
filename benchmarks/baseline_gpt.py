"""A plain nanoGPT-style GPT, the baseline QingLM is measured against.

What a typical seed project does: learned positions, LayerNorm with biases, one c_attn projection,
*manual* causal attention (q @ k^T, masked_fill with a tril buffer, softmax, @ v: nanoGPT's slow
path, not SDPA), GELU MLP of width 4*d, weight tying, eager fp32, plain torch.optim.AdamW (no
fused/foreach flags), and batches cut at random offsets of one token stream (nanoGPT's get_batch).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 10_000
    block_size: int = 256
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 128
    dropout: float = 0.1
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(cfg.dropout), nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd = cfg.n_head, cfg.n_embd
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        self.register_buffer("bias", mask.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.size(1)
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


def get_batch(data: np.ndarray, batch_size: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch: batch_size windows at random offsets of the token stream."""
    ix = torch.randint(len(data) - block_size, (batch_size,)).tolist()
    x = torch.stack([torch.from_numpy(data[i : i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y


def make_optimizer(model: GPT, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """Plain AdamW (no fused/foreach flags) with decay on matrices only, betas (0.9, 0.95) as nanoGPT."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def make_step(model: GPT, opt: torch.optim.Optimizer, data: np.ndarray, batch_size: int, block_size: int):
    """Return step() -> loss: one eager fp32 update with gradient clipping at 1.0."""

    def step() -> float:
        x, y = get_batch(data, batch_size, block_size)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def train_for(
    model: GPT,
    data: np.ndarray,
    *,
    seconds: float,
    lr: float,
    batch_size: int,
    block_size: int,
    warmup_frac: float = 0.05,
    min_lr_ratio: float = 0.1,
    est_steps: int = 20,
    steps: int | None = None,
) -> dict:
    """Train for a wall-clock budget with warmup + cosine (total steps estimated from the first steps),
    or for exactly `steps` steps when given (equal-compute comparisons on a busy machine)."""
    opt = make_optimizer(model, lr)
    step = make_step(model, opt, data, batch_size, block_size)
    model.train()
    t_start, n, total, times = time.perf_counter(), 0, steps, []
    while (n < steps) if steps else (time.perf_counter() - t_start < seconds):
        if total is None:
            frac = min(1.0, (n + 1) / 50)  # provisional warmup until the run length is known
            cur = lr * frac
        else:
            warm = max(1, round(warmup_frac * total))
            if n < warm:
                cur = lr * (n + 1) / warm
            else:
                p = min(1.0, (n - warm) / max(1, total - warm))
                cur = lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
        for g in opt.param_groups:
            g["lr"] = cur
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        n += 1
        if n == est_steps and not steps:
            per = float(np.median(times[1:]))
            total = n + int((seconds - (time.perf_counter() - t_start)) / per)
    return {"steps": n, "train_loss": loss, "seconds": time.perf_counter() - t_start}
