"""The classic family as transformers' GPT-2 (GPT2LMHeadModel), both ways.

GPT-2 is a pre-norm Transformer with LayerNorm, one fused q/k/v projection, a 4x MLP and learned positions,
which is QingLM's classic family. It reproduces it exactly with activation_function "gelu" (QingLM's GELU
is the exact erf form; GPT-2's own "gelu_new" is the tanh approximation) and:
  - learned positions: wpe is QingLM's pos_embed;
  - sinusoidal positions: wpe is the fixed table and wte the embeddings times sqrt(d_model) (QingLM scales
    them before adding the table), so the head cannot be the embedding: tied + sinusoidal is refused;
  - no biases: GPT-2 always has them, so they are written as zeros (and zeros read back as no biases).
GPT-2's Conv1D stores weights as (in, out), the transpose of nn.Linear.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.export.options import ANY, SHAPE, TRAINING_ONLY, Table, unreproduced

if TYPE_CHECKING:
    import torch

# QingLM module inside a block -> GPT-2 module inside transformer.h.N; True where GPT-2 uses Conv1D.
_BLOCK = {
    "norm1": ("ln_1", False),
    "attn.qkv": ("attn.c_attn", True),
    "attn.out": ("attn.c_proj", True),
    "norm2": ("ln_2", False),
    "mlp.up": ("mlp.c_fc", True),
    "mlp.down": ("mlp.c_proj", True),
}
# What GPT2LMHeadModel reproduces; gpt2_refusal adds the rules between options.
GPT2_OPTIONS: Table = {
    **SHAPE,
    **TRAINING_ONLY,
    "pos_encoding": ("learned", "sinusoidal"),
    "norm": ("layernorm",),
    "mlp": ("gelu",),
    "tie_embeddings": ANY,
    "rope_theta": ANY,  # unused without RoPE
    "bias": ANY,  # none: written as zeros
    "qk_norm": (False,),
    "gated_attention": (False,),
    "n_experts": (0,),
}


def gpt2_refusal(cfg: ModelConfig) -> str | None:
    """Return why GPT-2 cannot reproduce a classic-family-like cfg exactly, or None when it can."""
    if cfg.norm != "layernorm" or cfg.mlp != "gelu" or cfg.pos_encoding == "rope":
        return (
            f"{cfg.pos_encoding} + {cfg.norm} + {cfg.mlp} mixes the families; transformers reproduces "
            "rope + rmsnorm + swiglu (Llama) or learned/sinusoidal + layernorm + gelu (GPT-2)"
        )
    if cfg.n_kv_heads != cfg.n_heads or cfg.qk_norm or cfg.gated_attention or cfg.n_experts:
        return "GPT-2 (the classic-family architecture) has no GQA, QK-norm, gated attention or experts"
    if cfg.pos_encoding == "sinusoidal" and cfg.tie_embeddings:
        return (
            "sinusoidal positions scale the embeddings by sqrt(d_model) before the table is added, "
            "which GPT-2 can only reproduce with an untied head; train with --no-tie-embeddings"
        )
    return unreproduced(cfg, GPT2_OPTIONS)


def gpt2_config(cfg: ModelConfig) -> dict[str, Any]:
    """Return the GPT-2 config.json fields of a classic-family cfg (checked by gpt2_refusal first)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "initializer_range": cfg.init_std,
    }


def qinglm_to_gpt2(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Return GPT-2 weights of a classic-family model (model_tensors(): a tied head appears once)."""
    import torch

    from qinglm.model.transformer import sinusoidal_table

    embed = tensors["embed.weight"]
    if cfg.pos_encoding == "sinusoidal":
        wpe = sinusoidal_table(cfg.max_seq_len, cfg.d_model).to(embed.dtype)
        embed = embed * math.sqrt(cfg.d_model)
    else:
        wpe = tensors["pos_embed.weight"]
    out = {"transformer.wte.weight": embed.contiguous(), "transformer.wpe.weight": wpe.contiguous()}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = tensors["head.weight"]
    modules = [
        (f"blocks.{i}.{q}", f"transformer.h.{i}.{g}", conv)
        for i in range(cfg.n_layers)
        for q, (g, conv) in _BLOCK.items()
    ]
    for qname, gname, conv in modules + [("norm", "transformer.ln_f", False)]:
        w = tensors[f"{qname}.weight"]
        out[f"{gname}.weight"] = w.t().contiguous() if conv else w
        bias = tensors.get(f"{qname}.bias")
        out[f"{gname}.bias"] = bias if bias is not None else torch.zeros(w.shape[0], dtype=w.dtype)
    return out


def model_config_from_gpt2(d: dict[str, Any], hf: dict[str, torch.Tensor], where: str) -> ModelConfig:
    """Return the classic-family ModelConfig of a GPT-2 config.json and its weights (zero biases: none)."""
    if d.get("activation_function", "gelu_new") != "gelu":
        raise QingLMError(
            f"{where}: GPT-2 with {d.get('activation_function', 'gelu_new')!r} (tanh GELU) differs from "
            "QingLM's exact GELU; only activation_function 'gelu' imports"
        )
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
        raise QingLMError(f"{where}: GPT-2 attention variants are not supported")
    if not d.get("scale_attn_weights", True):  # attention logits not divided by sqrt(head_dim)
        raise QingLMError(
            f"{where}: GPT-2 with scale_attn_weights false (unscaled attention) is not supported"
        )
    biases = [t for name, t in hf.items() if name.endswith(".bias") and name.startswith("transformer.")]
    n_embd = d.get("n_embd", 768)
    return resolve_model(
        ModelConfig(
            vocab_size=d.get("vocab_size", 50257),
            d_model=n_embd,
            n_layers=d.get("n_layer", 12),
            n_heads=d.get("n_head", 12),
            d_ff=d.get("n_inner") or 4 * n_embd,
            max_seq_len=d.get("n_positions", 1024),
            family="classic",
            pos_encoding="learned",
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
            bias=any(bool(b.any()) for b in biases),
        )
    )


def gpt2_to_qinglm(hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Return QingLM weights (learned positions; head.weight omitted when tied) from GPT-2 weights."""
    cfg = resolve_model(cfg)
    hf = {k: v for k, v in hf.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old buffers

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise QingLMError(f"{where} has no tensor {name}; it does not match its config.json")
        return hf.pop(name)

    out = {"embed.weight": take("transformer.wte.weight"), "pos_embed.weight": take("transformer.wpe.weight")}
    head = hf.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise QingLMError(f"{where} has no lm_head.weight but tie_word_embeddings is false")
        out["head.weight"] = head
    modules = [
        (f"blocks.{i}.{q}", f"transformer.h.{i}.{g}", conv)
        for i in range(cfg.n_layers)
        for q, (g, conv) in _BLOCK.items()
    ]
    for qname, gname, conv in modules + [("norm", "transformer.ln_f", False)]:
        w = take(f"{gname}.weight")
        out[f"{qname}.weight"] = w.t().contiguous() if conv else w
        bias = take(f"{gname}.bias")
        if cfg.bias:
            out[f"{qname}.bias"] = bias
    if hf:
        raise QingLMError(f"{where} has tensors QingLM does not know: {', '.join(sorted(hf)[:3])}")
    return out
