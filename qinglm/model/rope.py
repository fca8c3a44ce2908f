"""Rotary position embeddings and their context extensions: the frequencies and the cos/sin tables.

    none     theta_i = base^(-2i/d)                                     (Su et al.)
    linear   theta_i / factor: positions interpolated into the trained range (Chen et al., kaiokendev)
    dynamic  base grows with the sequence: base * (factor*s/L - (factor-1))^(d/(d-2)) for s > L (NTK)
    yarn     per dimension: fast ones (> beta_fast turns in L) extrapolate, slow ones (< beta_slow)
             interpolate, a linear ramp between; cos/sin times 0.1*ln(factor)+1 (Peng et al.)

The formulas are transformers' (modeling_rope_utils: _compute_linear_scaling_rope_parameters,
_compute_dynamic_ntk_parameters, _compute_yarn_parameters with truncate=True), which llama.cpp's
ggml_rope_yarn_corr_dims and rope_yarn_ramp compute too, so exported models compute what QingLM does.
L is rope_original_max_position_embeddings, the length the model was trained at.
"""

from __future__ import annotations

import math

import torch

from qinglm.config import ModelConfig


def yarn_attention_factor(cfg: ModelConfig) -> float:
    """Return the factor YaRN multiplies cos and sin by (1.0 for the other scalings)."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor is not None:
        return float(cfg.rope_attention_factor)
    return 1.0 if cfg.rope_factor <= 1 else 0.1 * math.log(cfg.rope_factor) + 1.0


def _yarn_ramp(cfg: ModelConfig, dim: int) -> torch.Tensor:
    """Return each frequency's interpolation weight (dim/2,): 0 = as trained, 1 = divided by factor."""

    def correction_dim(
        rotations: float,
    ) -> float:  # the dimension that turns `rotations` times in L positions
        L = cfg.rope_original_max_position_embeddings
        return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as transformers and llama.cpp do: no division by zero
    return ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)


def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> torch.Tensor:
    """Return the inverse frequencies (head_dim/2,) in float64 of a resolved cfg; seq_len (the longest
    position + 1 of a forward) matters to dynamic scaling only."""
    dim, base, kind = cfg.head_dim, float(cfg.rope_theta), cfg.rope_scaling
    if kind == "dynamic":
        L, factor = cfg.rope_original_max_position_embeddings, cfg.rope_factor
        s = max(seq_len or L, L)
        base = base * ((factor * s / L) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if kind == "linear":
        return inv_freq / cfg.rope_factor
    if kind == "yarn":
        interpolate = _yarn_ramp(cfg, dim)
        return inv_freq / cfg.rope_factor * interpolate + inv_freq * (1 - interpolate)
    return inv_freq


def rope_angles(
    inv_freq: torch.Tensor, positions: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin) of shape (*positions.shape, head_dim) in float32, rotate-half (Llama/HF) layout,
    times scale (YaRN's attention factor), on positions' device."""
    wide = torch.float32 if positions.device.type == "mps" else torch.float64  # MPS has no float64
    angles = positions.to(wide)[..., None] * inv_freq.to(positions.device, wide)  # (..., head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., head_dim)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (cos, sin) tables (max_seq_len, head_dim) of a resolved cfg (dynamic: as at length L)."""
    return rope_angles(rope_frequencies(cfg), torch.arange(cfg.max_seq_len), yarn_attention_factor(cfg))


def needs_recompute(cfg: ModelConfig, end: int) -> bool:
    """Return True when a forward reaching position end-1 needs frequencies of its own (dynamic past L)."""
    return cfg.rope_scaling == "dynamic" and end > cfg.rope_original_max_position_embeddings
