"""Where QingLM's weights live in the Hugging Face Llama layout, defined once.

QingLM fuses q/k/v into one `attn.qkv` matrix and SwiGLU's gate/up into one `mlp.up` matrix (one matmul
each is faster); Llama keeps them apart. `hf_parts(name, cfg)` says which rows of a QingLM tensor are which
HF tensor, for every dense modern-family parameter. The exporter, the importer and LoRA adapter names all
use it. RoPE needs no permutation: QingLM rotates halves, as transformers' Llama does.

    embed.weight                  -> model.embed_tokens.weight
    blocks.N.norm1.weight         -> model.layers.N.input_layernorm.weight
    blocks.N.attn.qkv.weight      -> model.layers.N.self_attn.{q,k,v}_proj.weight  (rows split)
    blocks.N.attn.out.weight      -> model.layers.N.self_attn.o_proj.weight
    blocks.N.attn.{q,k}_norm      -> model.layers.N.self_attn.{q,k}_norm.weight   (Qwen3-style QK-norm)
    blocks.N.norm2.weight         -> model.layers.N.post_attention_layernorm.weight
    blocks.N.mlp.up.weight        -> model.layers.N.mlp.{gate,up}_proj.weight    (rows split, gate first)
    blocks.N.mlp.down.weight      -> model.layers.N.mlp.down_proj.weight
    norm.weight                   -> model.norm.weight
    head.weight                   -> lm_head.weight (absent when embeddings are tied)

MoE blocks: `hf_moe_parts` names the router and routed experts in Mixtral's or Qwen-MoE's layout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from qinglm.config import ModelConfig
from qinglm.errors import QingLMError

# QingLM module path inside a block -> HF module paths inside a layer, in row order of the fused matrix.
LINEAR_PARTS = {
    "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.out": ("self_attn.o_proj",),
    "mlp.up": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down": ("mlp.down_proj",),
}
# HF short names of a layer's linear layers, in layer order: what LoRA may target (qinglm.model.lora).
LINEAR_NAMES = tuple(path.rpartition(".")[2] for paths in LINEAR_PARTS.values() for path in paths)


def check_lora_targets(targets: Sequence[str]) -> list[str]:
    """Return targets as a list of LINEAR_NAMES; raise QingLMError for an unknown one or none."""
    targets = list(targets)
    bad = [t for t in targets if t not in LINEAR_NAMES]
    if bad or not targets:
        raise QingLMError(
            f"unknown LoRA target(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(LINEAR_NAMES)}"
        )
    return targets


_BLOCK_PARAMS = {
    "norm1.weight": "input_layernorm.weight",
    "norm2.weight": "post_attention_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
}
_TOP_PARAMS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def row_sizes(module: str, cfg: ModelConfig) -> tuple[int, ...]:
    """Return the output sizes of the HF parts of a QingLM linear module ("attn.qkv", "mlp.up", ...)."""
    if module == "attn.qkv":
        return (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
    if module == "mlp.up":
        return (cfg.d_ff, cfg.d_ff)
    if module == "attn.out":
        return (cfg.d_model,)
    if module == "mlp.down":
        return (cfg.d_model,)
    raise KeyError(module)


def hf_module(layer: int, part: str) -> str:
    """Return the HF module path of one part in one layer, e.g. model.layers.3.self_attn.q_proj."""
    return f"model.layers.{layer}.{part}"


def hf_parts(name: str, cfg: ModelConfig) -> list[tuple[str, int, int | None]]:
    """Return [(hf_name, first_row, end_row), ...] for a QingLM parameter name of a dense modern model.

    A fused matrix gives one entry per HF tensor; the rows [first_row, end_row) of the QingLM tensor are
    that tensor (end_row None: the whole tensor), so `t[first:end]` slices it. Unknown names (MoE
    experts, classic-family extras) raise KeyError.
    """
    if name in _TOP_PARAMS:
        return [(_TOP_PARAMS[name], 0, None)]
    if name == "head.weight":
        return [("lm_head.weight", 0, None)]
    m = _BLOCK.fullmatch(name)
    if not m:
        raise KeyError(name)
    layer, rest = int(m.group(1)), m.group(2)
    if rest in _BLOCK_PARAMS:
        return [(hf_module(layer, _BLOCK_PARAMS[rest]), 0, None)]
    module, _, kind = rest.rpartition(".")
    if module not in LINEAR_PARTS or kind not in ("weight", "bias"):
        raise KeyError(name)
    out, row = [], 0
    for part, size in zip(LINEAR_PARTS[module], row_sizes(module, cfg)):
        out.append((f"{hf_module(layer, part)}.{kind}", row, row + size))
        row += size
    return out


# ---------------------------------------------------------------------------- mixture of experts

# HF MoE block layouts: the block's module path inside a layer and each routed expert's
# (gate, up, down) names. Mixtral calls them w1 / w3 / w2; Qwen2-MoE and Qwen3-MoE use the dense names.
MOE_STYLES = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
_MOE = re.compile(r"blocks\.(\d+)\.mlp\.(router|experts\.(\d+)\.(up|down))\.weight")


def hf_moe_parts(name: str, cfg: ModelConfig, style: str) -> list[tuple[str, int, int | None]]:
    """Return [(hf_name, first_row, end_row), ...] for a router or routed-expert parameter of a MoE block.

    style is a key of MOE_STYLES. Like hf_parts: the fused up matrix of an expert gives gate then up.
    Shared experts are not a row split (HF has one shared expert; the exporter concatenates them), and
    other names raise KeyError.
    """
    m = _MOE.fullmatch(name)
    if not m:
        raise KeyError(name)
    block, (gate, up, down) = MOE_STYLES[style]
    prefix = hf_module(int(m.group(1)), block)
    if m.group(2) == "router":
        return [(f"{prefix}.gate.weight", 0, None)]
    expert = f"{prefix}.experts.{m.group(3)}"
    if m.group(4) == "down":
        return [(f"{expert}.{down}.weight", 0, None)]
    return [(f"{expert}.{gate}.weight", 0, cfg.d_ff), (f"{expert}.{up}.weight", cfg.d_ff, 2 * cfg.d_ff)]
