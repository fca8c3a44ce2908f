"""Which transformers architecture reproduces a QingLM model exactly, and its config.json, both ways.

    classic family (LayerNorm, GELU)       -> GPT2LMHeadModel      (qinglm.export.gpt2)
    dense, no QK-norm                      -> LlamaForCausalLM     (biases: attention_bias + mlp_bias)
    dense, QK-norm                         -> Qwen3ForCausalLM
    MoE in every block, no shared expert   -> MixtralForCausalLM
    MoE with shared experts                -> Qwen2MoeForCausalLM  (one shared expert of all of them,
                                              its sigmoid gate zero: 0.5, so its down_proj is doubled)
    MoE with QK-norm, no shared expert     -> Qwen3MoeForCausalLM

Everything else is refused with the reason: mixes of the two families, gated attention, the sigmoid
router, MoE layouts none of the above has, and any option HF_OPTIONS does not list.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.export.gpt2 import gpt2_config, gpt2_refusal
from qinglm.export.options import ANY, SHAPE, TRAINING_ONLY, Table, unreproduced
from qinglm.tokenizer import BOS_ID, EOS_ID, PAD_ID

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
MOE_STYLE = {"mixtral": "mixtral", "qwen2_moe": "qwen", "qwen3_moe": "qwen"}  # hf_layout.MOE_STYLES key
# What the architectures above reproduce together; _refuse adds the rules between options, and the
# classic family must also pass qinglm.export.gpt2.GPT2_OPTIONS.
HF_OPTIONS: Table = {
    **SHAPE,
    **TRAINING_ONLY,
    "pos_encoding": ("rope", "learned", "sinusoidal"),
    "norm": ("rmsnorm", "layernorm"),
    "mlp": ("swiglu", "gelu"),
    "tie_embeddings": ANY,
    "rope_theta": ANY,
    "rope_scaling": ANY,  # transformers' rope_scaling: linear, dynamic, yarn (hf_rope_scaling)
    "rope_factor": ANY,
    "rope_original_max_position_embeddings": ANY,
    "rope_beta_fast": ANY,
    "rope_beta_slow": ANY,
    "rope_attention_factor": ANY,
    "bias": ANY,
    "qk_norm": ANY,
    "gated_attention": (False,),
    "n_experts": ANY,
    "experts_per_token": ANY,
    "shared_experts": ANY,
    "moe_every": ANY,
    "router": ("softmax",),
}


def _refuse(cfg: ModelConfig) -> str | None:
    """Return why no HF architecture reproduces cfg exactly, or None when one does."""
    if cfg.pos_encoding != "rope" or cfg.norm != "rmsnorm" or cfg.mlp != "swiglu":
        return gpt2_refusal(cfg)
    if cfg.gated_attention:
        return "gated attention (Qwen3-Next style) has no exact Llama/Qwen3/Mixtral counterpart"
    if cfg.n_experts == 0:
        if cfg.bias and cfg.qk_norm:
            return "Qwen3 (the QK-norm architecture) has no MLP biases; train with --no-bias to export"
        return None
    if cfg.bias:
        return "HF MoE architectures have no biases in experts; train MoE models with --no-bias to export"
    if cfg.router != "softmax":
        return "the sigmoid router has no exact HF MoE counterpart (Mixtral/Qwen-MoE route with softmax)"
    if cfg.shared_experts and cfg.qk_norm:
        return "no HF MoE architecture has both QK-norm and a shared expert (Qwen2-MoE has no QK-norm)"
    if not cfg.shared_experts and not cfg.qk_norm and cfg.moe_every != 1:
        return (
            "Mixtral has MoE in every layer, but this model has it every "
            f"{cfg.moe_every} blocks; export needs moe_every 1, a shared expert or QK-norm"
        )
    return None


# QingLM's rope_scaling -> transformers' rope_type
HF_ROPE_TYPES = {"none": "default", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn"}


def hf_rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    """Return transformers' rope_scaling dict of a resolved cfg (None without scaling)."""
    if cfg.rope_scaling == "none":
        return None
    d: dict[str, Any] = {"rope_type": HF_ROPE_TYPES[cfg.rope_scaling], "factor": float(cfg.rope_factor)}
    if cfg.rope_scaling == "yarn":
        d.update(
            original_max_position_embeddings=cfg.rope_original_max_position_embeddings,
            beta_fast=float(cfg.rope_beta_fast),
            beta_slow=float(cfg.rope_beta_slow),
        )
        if cfg.rope_attention_factor is not None:
            d["attention_factor"] = float(cfg.rope_attention_factor)
    return d


def hf_max_position_embeddings(cfg: ModelConfig) -> int:
    """Return max_position_embeddings: transformers' dynamic NTK reads it as the trained length."""
    if cfg.rope_scaling == "dynamic":
        return cfg.rope_original_max_position_embeddings
    return cfg.max_seq_len


def hf_model_type(cfg: ModelConfig) -> str:
    """Return the HF model_type ("llama", "qwen3", "mixtral", ...) that reproduces cfg; QingLMError if none."""
    cfg = resolve_model(cfg)
    reason = _refuse(cfg) or unreproduced(cfg, HF_OPTIONS)
    if reason:
        raise QingLMError(f"cannot export to transformers: {reason}")
    if cfg.norm == "layernorm":
        return "gpt2"
    if cfg.n_experts == 0:
        return "qwen3" if cfg.qk_norm else "llama"
    if cfg.shared_experts:
        return "qwen2_moe"
    return "qwen3_moe" if cfg.qk_norm else "mixtral"


def hf_config(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """Return the config.json of the HF model that reproduces cfg (QingLMError when none does)."""
    cfg = resolve_model(cfg)
    model_type = hf_model_type(cfg)
    special = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, use_cache=True)
    if model_type == "gpt2":
        return {**gpt2_config(cfg), **special, "torch_dtype": dtype, "dtype": dtype}
    theta, scaling = float(cfg.rope_theta), hf_rope_scaling(cfg)
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": hf_max_position_embeddings(cfg),
        "rms_norm_eps": cfg.norm_eps,
        # transformers < 5 reads rope_theta and rope_scaling, >= 5 rope_parameters (rope_scaling first
        # when given): all of them, so every version computes the same frequencies.
        "rope_theta": theta,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta},
        "rope_scaling": scaling,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        **special,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if model_type == "llama":
        d.update(attention_bias=bool(cfg.bias), mlp_bias=bool(cfg.bias), pretraining_tp=1)
    if model_type in ("qwen3", "qwen2_moe", "qwen3_moe"):
        d.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=cfg.n_layers,
            layer_types=["full_attention"] * cfg.n_layers,
        )
    if model_type in ("qwen3", "qwen3_moe"):
        d["attention_bias"] = False
    if model_type == "mixtral":
        d.update(num_local_experts=cfg.n_experts, sliding_window=None, router_jitter_noise=0.0)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        d.update(
            num_experts=cfg.n_experts,
            moe_intermediate_size=cfg.d_ff,
            decoder_sparse_step=cfg.moe_every,
            mlp_only_layers=[],
            norm_topk_prob=True,  # QingLM renormalises the top-k weights to sum to 1
        )
    if model_type == "qwen2_moe":
        # One HF shared expert holds all of QingLM's side by side; the exporter writes zero q/k/v biases
        # because transformers < 5 always builds them for Qwen2-MoE.
        d.update(shared_expert_intermediate_size=cfg.shared_experts * cfg.d_ff, qkv_bias=True)
    if cfg.n_experts:
        d.update(num_experts_per_tok=cfg.experts_per_token, router_aux_loss_coef=cfg.moe_aux_coef)
        d["output_router_logits"] = False
    return d


# ---------------------------------------------------------------------------- HF config -> QingLM


def _get(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise QingLMError(f"{where} has no {key!r}; is it a transformers config.json?")
    return d[key]


def _rope(d: dict[str, Any], where: str) -> dict[str, Any]:
    """Return the ModelConfig fields of a config.json's RoPE: theta, scaling, and max_seq_len."""
    # transformers >= 5 reads rope_scaling before rope_parameters; older ones only rope_scaling
    params = {**(d.get("rope_parameters") or {}), **(d.get("rope_scaling") or {})}
    kind = params.get("rope_type", params.get("type", "default"))
    kinds = {hf: ours for ours, hf in HF_ROPE_TYPES.items()}
    if kind not in kinds:
        raise QingLMError(
            f"{where} uses {kind!r} RoPE scaling, which QingLM does not implement (only linear, dynamic, yarn)"
        )
    if (
        params.get("partial_rotary_factor", 1.0) != 1.0
        or params.get("mscale")
        or params.get("mscale_all_dim")
    ):
        raise QingLMError(f"{where}: partial rotary dimensions and YaRN's mscale are not implemented")
    if params.get("truncate", True) is not True:
        raise QingLMError(f"{where}: YaRN with truncate false is not implemented")
    max_len = _get(d, "max_position_embeddings", where)
    kw: dict[str, Any] = dict(
        rope_theta=float(params.get("rope_theta", d.get("rope_theta", 10_000.0))),
        rope_scaling=kinds[kind],
        max_seq_len=max_len,
    )
    factor = params.get("factor")
    if kind in ("linear", "dynamic") and not (isinstance(factor, (int, float)) and factor >= 1):
        raise QingLMError(f"{where}: {kind} RoPE scaling needs a factor of 1 or more, got {factor!r}")
    if kind == "linear":
        kw.update(
            rope_factor=float(factor), rope_original_max_position_embeddings=max(1, round(max_len / factor))
        )
    elif kind == "dynamic":  # max_position_embeddings is the trained length; factor says how far it reaches
        kw.update(rope_factor=float(factor), rope_original_max_position_embeddings=max_len)
        kw["max_seq_len"] = round(max_len * factor)
    elif kind == "yarn":
        original = params.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        kw.update(
            rope_original_max_position_embeddings=original or max_len,
            rope_factor=None if factor is None else float(factor),
            rope_beta_fast=float(params.get("beta_fast") or 32.0),
            rope_beta_slow=float(params.get("beta_slow") or 1.0),
        )
        if params.get("attention_factor") is not None:
            kw["rope_attention_factor"] = float(params["attention_factor"])
    return kw


def model_config_from_hf(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Return the QingLM ModelConfig of a Llama / Qwen3 / Mixtral / Qwen2-MoE / Qwen3-MoE config.json.

    Raises QingLMError for other architectures or options QingLM cannot reproduce.
    """
    model_type = d.get("model_type")
    if model_type == "gpt2":
        raise ValueError("GPT-2 configs need the weights: use qinglm.export.gpt2.model_config_from_gpt2")
    if model_type is None:
        raise QingLMError(f"{where} has no model_type; pass a transformers model folder (not a QingLM run)")
    if model_type not in ARCHITECTURES:
        raise QingLMError(
            f"{where} is a {model_type!r} model; QingLM imports {', '.join(ARCHITECTURES)} checkpoints"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise QingLMError(f"{where} uses hidden_act {d['hidden_act']!r}; QingLM's SwiGLU needs silu")
    if d.get("use_sliding_window") or (model_type == "mixtral" and d.get("sliding_window")):
        raise QingLMError(f"{where} uses sliding-window attention, which QingLM does not implement")
    d_model, n_heads = _get(d, "hidden_size", where), _get(d, "num_attention_heads", where)
    if d.get("head_dim") not in (None, d_model // n_heads):
        raise QingLMError(f"{where} has head_dim {d['head_dim']} != hidden_size / num_attention_heads")
    attn_bias, mlp_bias = bool(d.get("attention_bias", False)), bool(d.get("mlp_bias", False))
    if attn_bias != mlp_bias:
        raise QingLMError(f"{where}: QingLM has biases in attention and MLP together or in neither")
    kw: dict[str, Any] = dict(
        vocab_size=_get(d, "vocab_size", where),
        d_model=d_model,
        n_layers=_get(d, "num_hidden_layers", where),
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        d_ff=_get(d, "intermediate_size", where),
        family="modern",
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        **_rope(d, where),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        bias=attn_bias,
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
    )
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        n_experts = d.get("num_local_experts", d.get("num_experts"))
        kw.update(n_experts=n_experts, experts_per_token=_get(d, "num_experts_per_tok", where))
        if model_type != "mixtral":
            if not d.get("norm_topk_prob", False) or d.get("mlp_only_layers"):
                raise QingLMError(f"{where}: QingLM's MoE needs norm_topk_prob true and no mlp_only_layers")
            step, d_ff = d.get("decoder_sparse_step", 1), _get(d, "moe_intermediate_size", where)
            if step != 1 and d_ff != kw["d_ff"]:
                raise QingLMError(f"{where}: QingLM's dense and expert MLPs must have the same width")
            kw.update(d_ff=d_ff, moe_every=step)
        if model_type == "qwen2_moe":
            shared = d.get("shared_expert_intermediate_size", 0)
            if shared % kw["d_ff"]:
                raise QingLMError(f"{where}: the shared expert is not a whole number of expert widths")
            kw["shared_experts"] = shared // kw["d_ff"]
    try:
        return resolve_model(ModelConfig(**kw))
    except QingLMError as e:
        raise QingLMError(f"{where}: {e}") from None


def same_function(a: ModelConfig, b: ModelConfig) -> bool:
    """Return True when two configs describe the same network (training-only fields ignored)."""
    skip = set(TRAINING_ONLY)
    fa, fb = dataclasses.asdict(resolve_model(a)), dataclasses.asdict(resolve_model(b))
    return all(fa[k] == fb[k] for k in fa if k not in skip)
