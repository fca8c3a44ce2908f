"""A Mixture-of-Experts feed-forward layer: a router picks top-k experts per token.

Each expert is the model's ordinary MLP (SwiGLU or GELU, width d_ff). Tokens are dispatched by
sorting: the (token, slot) pairs are ordered by expert id, split by the per-expert counts, and each
expert runs once on just its rows; the weighted outputs are scatter-added back. The loop runs over
experts, never over tokens. Shared experts see every token and are added to the routed output.

After each forward the layer keeps, for the model's loss and for logging:
  aux_loss     - Switch/GShard load balancing: n_experts * sum_e f_e * P_e (1 when perfectly balanced)
  z_loss       - router z-loss: mean over tokens of logsumexp(logits)^2
  utilisation  - f_e, the fraction of token-slots routed to each expert (detached)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from qinglm.config import ModelConfig


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, make_expert: Callable[[ModelConfig], nn.Module]):
        super().__init__()
        self.n_experts, self.k, self.router_kind = cfg.n_experts, cfg.experts_per_token, cfg.router
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(make_expert(cfg) for _ in range(cfg.n_experts))
        self.shared = nn.ModuleList(make_expert(cfg) for _ in range(cfg.shared_experts))
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.utilisation: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d_model)
        logits = self.router(flat).float()  # (N, n_experts)
        scores = logits.softmax(-1) if self.router_kind == "softmax" else torch.sigmoid(logits)
        top_w, top_e = scores.topk(self.k, dim=-1)  # (N, k)
        top_w = top_w / top_w.sum(-1, keepdim=True)  # the chosen experts' weights sum to 1

        # Dispatch: sort the N*k (token, slot) pairs by expert, then split by per-expert counts.
        expert_ids = top_e.reshape(-1)
        order = expert_ids.argsort(stable=True)
        counts = torch.bincount(expert_ids, minlength=self.n_experts)
        token_idx = order // self.k
        weights = top_w.reshape(-1)[order]
        out = torch.zeros_like(flat)
        splits = counts.tolist()
        for expert, idx, w in zip(self.experts, token_idx.split(splits), weights.split(splits)):
            if idx.numel():
                y = expert(flat[idx]) * w[:, None].to(flat.dtype)
                out.index_add_(0, idx, y.to(out.dtype))
        for expert in self.shared:
            out = out + expert(flat)

        # Losses and statistics for this step.
        f = counts.float() / expert_ids.numel()  # fraction of token-slots per expert
        probs = scores if self.router_kind == "softmax" else scores / scores.sum(-1, keepdim=True)
        self.aux_loss = self.n_experts * (f * probs.mean(0)).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
        self.utilisation = f.detach()
        return out.view(shape)
