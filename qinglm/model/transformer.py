"""The QingLM Transformer: a decoder-only causal language model, read top to bottom.

Two families share one code path:
  modern  - RoPE (rotate-half layout), RMSNorm, SwiGLU, grouped-query attention, tied embeddings
  classic - sinusoidal positions, LayerNorm, GELU MLP of width 4*d_model (the Andy-LLM style)
Attention goes through F.scaled_dot_product_attention with the causal mask, which picks the flash /
memory-efficient kernels on CUDA. A preallocated KV cache makes decoding one token cost one token;
forward(pad=...) takes left-padded batches (per-row positions, pad keys masked) so prompts of
different lengths prefill and decode together (qinglm.infer.engine). On a CPU, a training forward draws
all its dropout masks at once and attention's dropout drops keys (qinglm.model.dropout).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from qinglm.config import ModelConfig, resolve_model
from qinglm.model.dropout import Dropout, Noise, draw_noise, keep_mask, kept_keys_mask
from qinglm.model.kv_cache import KVCache, decode_attention, padded_causal_mask, padded_positions
from qinglm.model.moe import MoE
from qinglm.model.rope import (
    needs_recompute,
    rope_angles,
    rope_frequencies,
    rope_tables,
    yarn_attention_factor,
)

IGNORE_INDEX = -100  # targets with this value (padding) carry no loss


# ---------------------------------------------------------------------------- positions


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by the angles of its positions (cos/sin: (T, head_dim) or (B, 1, T, head_dim))."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """Return the fixed sin/cos position table of 'Attention Is All You Need': (max_len, d_model)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10_000.0) / d_model))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table.float()


# ---------------------------------------------------------------------------- layers


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # One fused projection for q, k and v: a single matmul is faster than three small ones.
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.out.is_residual_proj = True
        self.dropout, self.dropout_on = cfg.dropout, cfg.attention_dropout
        self.use_rope = cfg.pos_encoding == "rope"
        self.use_qk_norm, self.use_gate = cfg.qk_norm, cfg.gated_attention
        # Optional extras; the modules exist only when switched on, so default state dicts are unchanged.
        if cfg.qk_norm:  # RMSNorm over each head's queries and keys (before RoPE), as in OLMo 2 / Qwen3
            self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        if cfg.gated_attention:  # a sigmoid gate per head from the block input, as in Qwen3-Next
            self.gate = nn.Linear(cfg.d_model, cfg.n_heads, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        layer: int,
        start: int | torch.Tensor,
        mask: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """keep (B, n_heads, T, T), in training: the keys each query keeps (DropKey), drawn by draw_noise."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and isinstance(start, torch.Tensor):  # T tokens per row from its own position
            k, v = cache.update_at(layer, k.to(cache.k.dtype), v.to(cache.v.dtype), start, mask.size(-1))
            k, v = k.to(q.dtype), v.to(q.dtype)
        elif cache is not None:
            k, v = cache.update(layer, k.to(cache.k.dtype), v.to(cache.v.dtype), start)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if isinstance(start, torch.Tensor):  # T queries per row over its cache row: mask is additive
            y = decode_attention(q, k, v, mask)
        # Queries at positions start..start+T-1 see keys 0..their own position.
        elif mask is not None:  # left-padded rows or per-row positions: the caller's mask (B, 1, T, keys)
            causal = False
        elif start == 0 or T == 1:
            mask, causal = None, T > 1
            if self.training and self.dropout > 0 and keep is None and self.drops_keys(x.device):
                keep = keep_mask((B, self.n_heads, T, T), self.dropout, x.device)
            if keep is not None:
                mask, causal = kept_keys_mask(keep), False
        else:  # a chunk appended after cached positions: causal within the chunk, full over the past
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
            causal = False
        if not isinstance(start, torch.Tensor):
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                dropout_p=self.dropout if self.training and not self.drops_keys(x.device) else 0.0,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
        if self.use_gate:
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)  # (B, n_heads, T, 1)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, d_model)
        return self.out(y)

    def drops_keys(self, device: torch.device) -> bool:
        """Return whether this attention's dropout drops keys (DropKey) on device, not weights."""
        return self.dropout_on == "keys" or (self.dropout_on == "auto" and device.type == "cpu")


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        # SwiGLU's gate and up projections are fused into one matmul.
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.d_ff, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.down.is_residual_proj = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.down(h)


def is_moe_block(cfg: ModelConfig, i: int) -> bool:
    """Block i (counting from 0) is a mixture of experts when i % moe_every == moe_every - 1."""
    return cfg.n_experts > 0 and i % cfg.moe_every == cfg.moe_every - 1


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); mlp may be a MoE layer."""

    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MoE(cfg, MLP) if moe else MLP(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x, rope, cache, layer, start, mask=None, noise=None):
        """noise: this block's BlockNoise (masks drawn by draw_noise) or None (dropout draws its own)."""
        keys, attn, mlp = noise or (None, None, None)
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, layer, start, mask, keys), attn)
        return x + self.drop(self.mlp(self.norm2(x)), mlp)


# ---------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg = resolve_model(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos_encoding == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        elif cfg.pos_encoding == "sinusoidal":
            self.register_buffer(
                "pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model), persistent=False
            )
        else:
            cos, sin = rope_tables(cfg)  # scaled (--rope-scaling) to reach max_seq_len
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, is_moe_block(cfg, i)) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if cfg.init != "default":  # "default" keeps PyTorch's own nn.Linear / nn.Embedding init
            self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # gpt2: normal(init_std); small: normal(sqrt(2/(5*d_model))), the "small init" of Nguyen & Salazar.
        std = self.cfg.init_std if self.cfg.init == "gpt2" else math.sqrt(2 / (5 * self.cfg.d_model))
        if isinstance(m, nn.Linear):
            # GPT-2: each residual projection adds to the stream 2*n_layers times, so shrink it.
            scale = 1 / math.sqrt(2 * self.cfg.n_layers) if getattr(m, "is_residual_proj", False) else 1.0
            nn.init.normal_(m.weight, mean=0.0, std=std * scale)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        last_only: bool | torch.Tensor = False,
        pad: torch.Tensor | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        """Return logits (B, T, vocab), or the mean loss over targets != IGNORE_INDEX when targets are given.

        idx: (B, T) token ids at positions start..start+T-1. With a cache, keys and values of
        earlier positions come from it and this call's are stored in it. last_only computes the
        head for the final position only (what decoding needs). pad (B,), for batches of prompts
        of different lengths: row b is left-padded by pad[b] slots, so idx holds slots
        start..start+T-1, its positions are slot - pad[b] and its pad slots are never attended to.
        start as a tensor (B,) (decoding with a static cache, qinglm.infer.slots): idx (B, T) holds T
        tokens per row at positions start[b]..start[b]+T-1 (T > 1: a speculative draft being verified);
        each attends to cache positions 0..its own within the first `window` (default: all) positions. last_only as a tensor (B,) takes each row's
        head at its own index (right-padded prompts of different lengths).
        """
        B, T = idx.shape
        if isinstance(start, torch.Tensor):
            window = window or cache.max_len
            pos = start[:, None] if T == 1 else start[:, None] + torch.arange(T, device=idx.device)  # (B, T)
            # (B, T, W): keys beyond each query's own position (its row's length, then causal within the T)
            past = torch.arange(window, device=idx.device)[None, None, :] > pos[:, :, None]
            mask = torch.zeros(past.shape, device=idx.device).masked_fill(past, float("-inf"))[:, None]
        elif pad is None:
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"positions up to {start + T} exceed max_seq_len {self.cfg.max_seq_len}")
            pos, mask = slice(start, start + T), None
        else:
            pos, mask = padded_positions(start, T, pad), padded_causal_mask(start, T, pad)
            if int(pos[:, -1].max()) >= self.cfg.max_seq_len:
                raise ValueError(f"positions exceed max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(idx)  # (B, T, d_model)
        rope = None
        if self.cfg.pos_encoding == "learned":
            x = x + self.pos_embed.weight[pos]
        elif self.cfg.pos_encoding == "sinusoidal":
            # Scale the embeddings so the fixed table does not drown them (as in the original paper).
            x = x * math.sqrt(self.cfg.d_model) + self.pos_table[pos]
        else:
            if isinstance(start, torch.Tensor):  # no host sync unless dynamic NTK needs the length
                end = int(pos.max()) + 1 if self.cfg.rope_scaling == "dynamic" else 1
            else:
                end = start + T if pad is None else int(pos.max()) + 1
            rope = self.rope_at(pos, end)
            if pad is not None or isinstance(start, torch.Tensor):
                rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))  # (B, 1, T, head_dim)
        # On a CPU every dropout mask of a training forward is drawn at once (qinglm.model.dropout); only a
        # model built with dropout calls draw_noise, which is a graph break under torch.compile.
        noise: Noise | None = None
        cpu_training = self.training and cache is None and mask is None and idx.device.type == "cpu"
        if self.cfg.dropout > 0 and cpu_training and start == 0:
            noise = draw_noise(self, B, T, idx.device)
        x = self.drop(x, noise.embed if noise else None)
        # Gradient checkpointing keeps only each block's input and recomputes the rest in the backward
        # pass; checkpoint() restores the RNG state, so dropout draws the same masks both times.
        recompute = self.training and self.cfg.gradient_checkpointing and cache is None
        for i, block in enumerate(self.blocks):
            bn = noise.blocks[i] if noise else None
            if recompute:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, rope, None, i, start, None, bn, use_reentrant=False
                )
            else:
                x = block(x, rope, cache, i, start, mask, bn)
        x = self.norm(x)
        if isinstance(last_only, torch.Tensor):
            x = x[torch.arange(B, device=x.device), last_only][:, None]  # (B, 1, d_model)
        elif last_only:
            x = x[:, -1:]
        logits = self.head(x)
        if targets is None:
            return logits
        return self.loss_from_logits(logits, targets)

    def rope_at(self, pos: slice | torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (cos, sin) at positions pos ((T, head_dim) or (B, T, head_dim)) of a forward reaching end-1.

        Dynamic NTK scaling past the trained length computes its frequencies for this length, as
        transformers does per forward; every other kind reads the tables.
        """
        if not needs_recompute(self.cfg, end):
            return self.rope_cos[pos], self.rope_sin[pos]
        if isinstance(pos, slice):
            pos = torch.arange(pos.start, pos.stop, device=self.rope_cos.device)
        inv_freq = rope_frequencies(self.cfg, seq_len=end)
        return rope_angles(inv_freq, pos, yarn_attention_factor(self.cfg))

    def loss_from_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return forward(idx, targets)'s loss from forward(idx)'s logits: the mean cross-entropy over
        targets != IGNORE_INDEX plus, in training, the MoE router losses of that forward."""
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )
        return self.with_router_losses(loss)

    def with_router_losses(self, loss: torch.Tensor) -> torch.Tensor:
        """Return loss plus, in training, the MoE router losses (load balancing, z-loss) of the last
        forward; loss itself for a dense model or in eval mode."""
        if self.training and self.cfg.n_experts > 0:
            moes = self.moe_layers()
            loss = loss + self.cfg.moe_aux_coef * sum(m.aux_loss for m in moes.values())
            if self.cfg.moe_z_coef:
                loss = loss + self.cfg.moe_z_coef * sum(m.z_loss for m in moes.values())
        return loss

    def moe_layers(self) -> dict[int, MoE]:
        """Return the MoE feed-forward layers by block index (empty for a dense model)."""
        return {i: b.mlp for i, b in enumerate(self.blocks) if isinstance(b.mlp, MoE)}

    def moe_stats(self) -> dict[str, list[float]]:
        """Return each MoE layer's expert utilisation (fraction of token-slots) in the last forward."""
        return {
            f"blocks.{i}": m.utilisation.tolist()
            for i, m in self.moe_layers().items()
            if m.utilisation is not None
        }

    def param_counts(self) -> dict[str, int]:
        """Return parameter counts by part: embeddings, blocks, head (0 when tied), total."""
        emb = sum(p.numel() for n, p in self.named_parameters() if n.startswith(("embed.", "pos_embed.")))
        blocks = sum(p.numel() for p in self.blocks.parameters())
        head = 0 if self.cfg.tie_embeddings else self.head.weight.numel()
        total = sum(p.numel() for p in self.parameters())  # shared tensors are counted once
        return {
            "embeddings": emb,
            "blocks": blocks,
            "head": head,
            "norm": total - emb - blocks - head,
            "total": total,
        }

    def active_matmul_params(self) -> int:
        """Return the block matrix parameters one token uses: each MoE layer counts k of its experts."""
        total = 0
        for block in self.blocks:
            n = sum(p.numel() for p in block.parameters() if p.dim() == 2)
            if isinstance(block.mlp, MoE):
                per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters() if p.dim() == 2)
                n -= (block.mlp.n_experts - block.mlp.k) * per_expert
            total += n
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Return training FLOPs per token (forward + backward = 6 * matmul params + attention)."""
        c = self.cfg
        matmul = self.active_matmul_params() + c.vocab_size * c.d_model
        attn = 2 * c.n_layers * seq_len * c.d_model  # QK^T and AV, causal half counted in full as usual
        return 6 * matmul + 6 * attn
