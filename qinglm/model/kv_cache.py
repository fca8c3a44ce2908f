"""The KV cache of the decode engine and the attention helpers of padded and static-shape decoding.

KVCache preallocates keys and values for every layer; padded_positions / padded_causal_mask let prompts of
different lengths prefill together (left padding); decode_attention is one query per row over a static cache.
"""

from __future__ import annotations

import torch

from qinglm.config import ModelConfig


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, batch, n_kv_heads, max_len, head_dim)."""

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) at positions start.. and return all keys/values so far."""
        end = start + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def first_rows(self, n: int) -> KVCache:
        """Return a KVCache of rows 0..n-1 that shares this one's storage (writes go through)."""
        view = object.__new__(KVCache)
        view.max_len, view.k, view.v = self.max_len, self.k[:, :n], self.v[:, :n]
        return view

    def update_at(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_heads, T, head_dim) of rows 0..B-1 at positions[b]..positions[b]+T-1 and
        return those rows' keys/values over positions 0..window-1 (the caller masks what lies past each
        row's length): the static-shape decoding step of qinglm.infer.slots (T > 1: a draft verified)."""
        rows = torch.arange(k.size(0), device=k.device)
        if k.size(2) == 1:
            self.k[layer][rows, :, positions] = k[:, :, 0]  # (B, n_kv_heads, head_dim) written per row
            self.v[layer][rows, :, positions] = v[:, :, 0]
        else:  # (B, T) indices: the slice's dimension goes last, (B, T, n_kv_heads, head_dim)
            at = positions[:, None] + torch.arange(k.size(2), device=k.device)
            self.k[layer][rows[:, None], :, at] = k.transpose(1, 2)
            self.v[layer][rows[:, None], :, at] = v.transpose(1, 2)
        return self.k[layer, : k.size(0), :, :window], self.v[layer, : k.size(0), :, :window]


def padded_positions(start: int, length: int, pad: torch.Tensor) -> torch.Tensor:
    """Return the positions (B, length) of slots start..start+length-1 in rows left-padded by pad (B,).

    Row b's first real token sits in slot pad[b] at position 0; its pad slots get position 0 too.
    """
    slots = torch.arange(start, start + length, device=pad.device)
    return (slots[None, :] - pad[:, None]).clamp(min=0)


def padded_causal_mask(start: int, length: int, pad: torch.Tensor) -> torch.Tensor:
    """Return the attention mask (B, 1, length, start+length) of left-padded rows: True = may attend.

    A query sees earlier slots of its row except pad slots; a pad query sees only itself, so no
    softmax row is empty (an empty one would put NaN into the cache).
    """
    q = torch.arange(start, start + length, device=pad.device)[None, :, None]  # (1, T, 1)
    k = torch.arange(start + length, device=pad.device)[None, None, :]  # (1, 1, S)
    first = torch.minimum(pad[:, None, None], q)  # (B, T, 1): the first slot each query may see
    return ((k <= q) & (k >= first)).unsqueeze(1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Return softmax(q k^T / sqrt(head_dim) + bias) v for T queries per row: (B, n_heads, T, head_dim).

    k, v: (B, n_kv_heads, W, head_dim), each kv head shared by n_heads / n_kv_heads query heads; bias
    (B, 1, T, W): 0 where a query may attend, -inf past its position. Written out because scaled_dot_product
    _attention with a mask costs several times more than these four ops for a single query on a CPU.
    """
    B, H, T, D = q.shape
    G = H // k.size(1)
    q = q.reshape(B, k.size(1), G * T, D)  # (B, n_kv_heads, group * T, head_dim)
    if T > 1:
        bias = bias.repeat(1, 1, G, 1)  # (B, 1, group * T, W): query (g, t) at index g * T + t
    scores = (q @ k.transpose(-1, -2)).float() * D**-0.5 + bias  # (B, n_kv_heads, group * T, W)
    return (scores.softmax(dim=-1).to(v.dtype) @ v).view(B, H, T, D)
