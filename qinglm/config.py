"""Typed configs, presets, and the merge of config files with command-line flags.

The model's config and the sampling settings live here; training configs are built from parts in
qinglm/train/config.py. Every command-line flag is generated from a dataclass field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from qinglm.errors import QingLMError
from qinglm.typecheck import check_types, ranges

# (vocab_size, d_model, n_heads, n_layers) exactly as the seed projects give them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=10_000, d_model=128, n_heads=2, n_layers=2),
    "small": dict(vocab_size=30_000, d_model=256, n_heads=4, n_layers=4),
    "medium": dict(vocab_size=50_000, d_model=512, n_heads=8, n_layers=6),
}

# The two families users ask for; fields left unset take the family's value.
FAMILIES: dict[str, dict[str, Any]] = {
    "modern": dict(pos_encoding="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True, bias=False),
    "classic": dict(pos_encoding="sinusoidal", norm="layernorm", mlp="gelu", tie_embeddings=False, bias=True),
}

# The values of ModelConfig's options; qinglm.model.transformer (and qinglm.model.moe for routers) implements each one.
# Each field lists its own as `choices`: the CLI offers them and resolve_model refuses anything else.
POS_ENCODINGS = ("rope", "sinusoidal", "learned")
NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
INITS = ("default", "gpt2", "small")  # Transformer._init_weights
ROUTERS = ("softmax", "sigmoid")
# How dropout reaches attention (qinglm.model.dropout): on the weights after the softmax, or on the keys
# before it (DropKey); auto = keys on a CPU, whose fused attention kernel takes no dropout, weights elsewhere.
ATTENTION_DROPOUTS = ("auto", "weights", "keys")
QUANTIZATIONS = ("none", "int8", "bf16")  # qinglm.model.quantize: weights for inference
QUANTIZE_HELP = (
    "weights for inference: int8 (fastest on a CPU one request at a time), bf16 (fastest for batches on "
    "CPUs with AMX, with --compile, and on GPUs)"
)
# RoPE context extension (qinglm.model.rope), transformers' rope_type of each: default, linear, dynamic, yarn.
ROPE_SCALINGS = ("none", "linear", "dynamic", "yarn")
# The fields that set how far a model reaches, not its weights: a run may change them (continued pretraining
# at a longer context, `--context` at inference) and keep its weights.
CONTEXT_FIELDS = (
    "max_seq_len", "rope_scaling", "rope_factor", "rope_original_max_position_embeddings",
    "rope_beta_fast", "rope_beta_slow", "rope_attention_factor",
)  # fmt: skip

DEFAULT_PROMPTS = ["今天天气真不错", "人工智能的未来", "中国经济"]


def _f(default: Any, help: str, choices: Sequence | None = None, within: str | None = None, **kw: Any) -> Any:
    """Return a dataclass field with its --help text, its allowed values or, for a number, its range: an
    interval such as "(0, 1]" or "[1, inf)" that qinglm.typecheck.check_types enforces (NaN and infinity
    are refused for every float field)."""
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = list(choices)
    if within:
        meta["within"] = within
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    """The Transformer's shape and options; None means 'derive from the rest'."""

    vocab_size: int = _f(
        10_000, "vocabulary size (taken from the tokenizer when one is given)", within="[1, inf)"
    )
    d_model: int = _f(128, "hidden size", within="[1, inf)")
    n_layers: int = _f(2, "number of Transformer blocks", within="[1, inf)")
    n_heads: int = _f(2, "attention heads", within="[1, inf)")
    n_kv_heads: int | None = _f(
        None, "key/value heads for grouped-query attention (default: n_heads)", within="[1, inf)"
    )
    d_ff: int | None = _f(
        None, "MLP hidden size (default: 4*d_model for gelu, ~8/3*d_model for swiglu)", within="[1, inf)"
    )
    max_seq_len: int = _f(512, "maximum context length", within="[1, inf)")
    # The seeds use 0.1; on short pretraining runs 0 learns faster (measured: benchmarks/README.md).
    dropout: float = _f(
        0.0, "dropout probability (0 is best for short pretraining; try 0.1 for many epochs)", within="[0, 1)"
    )
    attention_dropout: str = _f(
        "auto",
        "where attention's dropout goes: weights (after the softmax, as GPT-2), keys (DropKey: before it, "
        "so the CPU's fused kernel runs); auto = keys on a CPU, weights elsewhere",
        ATTENTION_DROPOUTS,
    )
    family: str = _f(
        "modern",
        "architecture family: fills pos-encoding, norm, mlp, tie-embeddings, bias when not given",
        FAMILIES,
    )
    pos_encoding: str | None = _f(None, "position encoding", POS_ENCODINGS)
    norm: str | None = _f(None, "normalisation layer", NORMS)
    mlp: str | None = _f(None, "feed-forward type", MLPS)
    tie_embeddings: bool | None = _f(None, "share the input embedding with the output head")
    rope_theta: float = _f(10_000.0, "RoPE base", within="(0, inf)")
    # RoPE scaling, with the meaning and names of transformers' rope_scaling (qinglm.model.rope).
    rope_scaling: str = _f(
        "none",
        "RoPE scaling to reach past the trained length: linear (position interpolation), dynamic (NTK), "
        "yarn; none = plain RoPE",
        ROPE_SCALINGS,
    )
    rope_factor: float | None = _f(
        None,
        "RoPE scaling factor (default: max-seq-len / rope-original-max-position-embeddings)",
        within="[1, inf)",
    )
    rope_original_max_position_embeddings: int | None = _f(
        None, "the context the model was trained at before scaling (default: max-seq-len)", within="[1, inf)"
    )
    rope_beta_fast: float = _f(
        32.0, "YaRN: rotations above which a dimension is not interpolated", within="(0, inf)"
    )
    rope_beta_slow: float = _f(
        1.0, "YaRN: rotations below which a dimension is fully interpolated", within="(0, inf)"
    )
    rope_attention_factor: float | None = _f(
        None,
        "YaRN: factor on cos/sin, so on attention logits squared (default: 0.1*ln(factor)+1)",
        within="(0, inf)",
    )
    norm_eps: float = _f(1e-5, "epsilon of the norm layers", within="(0, 1)")
    bias: bool | None = _f(None, "biases in linear layers")
    init_std: float = _f(
        0.02, "std of the normal init; residual projections get std/sqrt(2*n_layers)", within="(0, inf)"
    )
    init: str = _f(
        "gpt2",
        "weight init: gpt2 = normal(init-std), small = normal(sqrt(2/(5*d_model))) (Nguyen & Salazar), "
        "both with residual projections scaled by 1/sqrt(2*n_layers); default = PyTorch's own",
        INITS,
    )
    qk_norm: bool = _f(False, "RMSNorm on queries and keys per head")
    gated_attention: bool = _f(
        False, "sigmoid output gate per head computed from the block input, as in Qwen3-Next"
    )
    gradient_checkpointing: bool = _f(
        False, "recompute each block's activations in the backward pass: less memory, ~30%% more time"
    )
    # Mixture of experts (qinglm/model/moe.py): off while n_experts is 0, so default models are unchanged.
    n_experts: int = _f(0, "routed experts per MoE feed-forward layer (0 = dense MLP)", within="[0, inf)")
    experts_per_token: int = _f(2, "MoE: experts each token is routed to (top-k)", within="[1, inf)")
    shared_experts: int = _f(0, "MoE: always-on experts added to the routed output", within="[0, inf)")
    moe_every: int = _f(
        1,
        "MoE on every k-th block: block i (from 0) is MoE when i %% k == k-1 (1 = every block)",
        within="[1, inf)",
    )
    router: str = _f("softmax", "MoE router scores", ROUTERS)
    moe_aux_coef: float = _f(
        0.01, "MoE: weight of the load-balancing loss (Switch/GShard)", within="[0, inf)"
    )
    moe_z_coef: float = _f(
        0.0, "MoE: weight of the router z-loss (mean logsumexp(logits)^2)", within="[0, inf)"
    )

    def __post_init__(self) -> None:
        check_types(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class ContextConfig:
    """How far a trained model reads at inference (generate, chat, serve, eval): `--context N`."""

    context: int | None = _f(
        None,
        "positions the model may use; the KV cache and the server's limits follow (default: max-seq-len)",
    )
    rope_scaling: str | None = _f(
        None,
        "RoPE scaling to reach --context past the trained length (default: the run's own)",
        ROPE_SCALINGS,
    )
    rope_factor: float | None = _f(None, "RoPE scaling factor (default: context / trained length)")

    def __post_init__(self) -> None:
        check_types(self)
        check_choices(self)


@dataclass
class SamplingConfig:
    """How to pick the next token; temperature 0 means greedy."""

    max_new_tokens: int = _f(100, "tokens to generate", within="[0, inf)")
    temperature: float = _f(0.8, "softmax temperature (0 = greedy)", within="[0, inf)")
    top_k: int | None = _f(50, "keep the k most likely tokens (0 or None = all)", within="[0, inf)")
    top_p: float | None = _f(0.95, "nucleus sampling mass (1.0 or None = off)", within="(0, 1]")
    repetition_penalty: float = _f(
        1.1, "penalty > 1 makes already generated tokens less likely", within="(0, inf)"
    )
    seed: int | None = _f(
        None, "random seed for sampling", within="[-9223372036854775808, 18446744073709551615]"
    )
    stop_at_eos: bool = _f(True, "stop when the model emits [EOS]")
    speculate: int = _f(
        0,
        "draft up to N tokens a step from the text so far (prompt lookup) and verify them in one forward; "
        "the same tokens, faster where the text repeats (0 = off)",
        within="[0, 16]",
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise QingLMError for settings that make no sense (each field's range); return None otherwise."""
        check_types(self)


# ---------------------------------------------------------------------------- resolving


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """Return a copy with every derived field filled in; raise QingLMError if impossible."""
    c = dataclasses.replace(cfg)
    check_choices(c)  # family first: it fills the options below
    for k, v in FAMILIES[c.family].items():
        if getattr(c, k) is None:
            setattr(c, k, v)
    if c.n_kv_heads is None:
        c.n_kv_heads = c.n_heads
    if c.d_ff is None:
        # SwiGLU has three matrices, so 2/3 of 4*d keeps the parameter count of a 4*d GELU MLP.
        c.d_ff = 4 * c.d_model if c.mlp == "gelu" else 64 * math.ceil(8 * c.d_model / 3 / 64)
    if c.d_model % c.n_heads:
        raise QingLMError(f"d_model ({c.d_model}) must be divisible by n_heads ({c.n_heads})")
    if c.n_heads % c.n_kv_heads:
        raise QingLMError(f"n_heads ({c.n_heads}) must be divisible by n_kv_heads ({c.n_kv_heads})")
    if c.pos_encoding in ("rope", "sinusoidal") and c.head_dim % 2 and c.pos_encoding == "rope":
        raise QingLMError(f"RoPE needs an even head dimension, got {c.head_dim}")
    if c.pos_encoding == "sinusoidal" and c.d_model % 2:
        raise QingLMError(f"sinusoidal positions need an even d_model, got {c.d_model}")
    _resolve_rope_scaling(c)
    if c.n_experts > 0:  # each field's own range was checked when c was made (check_types)
        if not 1 <= c.experts_per_token <= c.n_experts:
            raise QingLMError(
                f"experts_per_token must be between 1 and n_experts ({c.n_experts}), got {c.experts_per_token}"
            )
    elif c.shared_experts:
        raise QingLMError("shared_experts needs n_experts > 0")
    return c


def _resolve_rope_scaling(c: ModelConfig) -> None:
    """Fill in the derived RoPE scaling fields of c in place; raise QingLMError for impossible ones."""
    extra = ("rope_factor", "rope_original_max_position_embeddings", "rope_attention_factor")
    if c.rope_scaling == "none":
        given_ = [name for name in extra if getattr(c, name) is not None]
        if given_:
            raise QingLMError(f"{given_[0]} needs --rope-scaling linear, dynamic or yarn")
        return
    if c.pos_encoding != "rope":
        raise QingLMError(f"RoPE scaling needs RoPE positions; {c.pos_encoding} positions cannot be scaled")
    if c.rope_original_max_position_embeddings is None:
        c.rope_original_max_position_embeddings = c.max_seq_len
    if c.rope_original_max_position_embeddings <= 0:
        raise QingLMError("rope_original_max_position_embeddings must be positive")
    if c.rope_factor is None:
        c.rope_factor = c.max_seq_len / c.rope_original_max_position_embeddings
    if not c.rope_factor >= 1.0:
        raise QingLMError(f"rope_factor must be 1 or more (it stretches the context), got {c.rope_factor}")
    if not 0 < c.rope_beta_slow < c.rope_beta_fast:
        raise QingLMError("YaRN needs 0 < rope_beta_slow < rope_beta_fast")
    if c.rope_attention_factor is not None and not c.rope_attention_factor > 0:
        raise QingLMError(f"rope_attention_factor must be positive, got {c.rope_attention_factor}")


def with_context(
    cfg: ModelConfig,
    context: int | None = None,
    rope_scaling: str | None = None,
    rope_factor: float | None = None,
    **rope: Any,
) -> ModelConfig:
    """Return cfg run at `context` positions with `rope_scaling`: the length it was trained at (its own
    original length when already scaled, else max_seq_len) becomes the original one, and the factor
    follows context / original unless rope_factor is given; rope sets other CONTEXT_FIELDS (YaRN's betas).
    QingLMError for what cannot reach that far."""
    c = dataclasses.replace(resolve_model(cfg), **rope)
    scaling = rope_scaling or c.rope_scaling
    context = context or c.max_seq_len
    if context <= 0:
        raise QingLMError(f"--context must be positive, got {context}")
    if c.pos_encoding == "learned" and context > c.max_seq_len:
        raise QingLMError(f"learned positions stop at {c.max_seq_len}; a longer --context needs RoPE")
    changed = context != c.max_seq_len or scaling != c.rope_scaling
    original = c.rope_original_max_position_embeddings or c.max_seq_len
    c.max_seq_len, c.rope_scaling = context, scaling
    if scaling == "none":
        if rope_factor is not None:
            raise QingLMError("rope_factor needs --rope-scaling linear, dynamic or yarn")
        c.rope_factor = c.rope_original_max_position_embeddings = c.rope_attention_factor = None
    else:
        c.rope_original_max_position_embeddings = original
        if rope_factor is not None or changed:
            c.rope_factor = rope_factor
    return resolve_model(c)


def check_choices(cfg: Any) -> None:
    """Raise QingLMError for a field of dataclass cfg whose value is not one of its `choices`."""
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise QingLMError(f"unknown {f.name} {value!r}; choose one of {', '.join(map(str, choices))}")


def preset_model(name: str) -> dict[str, Any]:
    """Return the ModelConfig fields of preset `name`; raise QingLMError for an unknown one."""
    if name not in PRESETS:
        raise QingLMError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])


# ---------------------------------------------------------------------------- dicts and files


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def from_dict(cls: type, d: dict[str, Any], where: str = "config") -> Any:
    """Build a dataclass from a dict, rejecting unknown keys with a clear message."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise QingLMError(f"unknown {where} key(s): {', '.join(unknown)}")
    try:
        return cls(**d)
    except QingLMError as e:  # a value of the wrong type
        raise QingLMError(f"{where}: {e}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict (sections 'model'/'train' or flat keys)."""
    p = Path(path)
    if not p.is_file():
        raise QingLMError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QingLMError(f"config file {p} is not UTF-8 text (byte {e.start} is invalid)") from None
    try:
        if p.suffix.lower() == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text)
    except (ValueError, Exception) as e:  # yaml.YAMLError and json.JSONDecodeError
        raise QingLMError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise QingLMError(f"config file {p} must hold a mapping of keys to values")
    return d


# ---------------------------------------------------------------------------- argparse


def _base_type(tp: Any) -> Any:
    if get_origin(tp) is not None and type(None) in get_args(tp):
        tp = next(a for a in get_args(tp) if a is not type(None))
    return tp


DRAFT_TOKENS = 4  # --draft without --speculate: the tokens it drafts a step


def add_draft_arg(parser: argparse.ArgumentParser) -> None:
    """Add --draft RUN (speculative decoding with a smaller model) to a command that generates."""
    parser.add_argument(
        "--draft",
        help="a smaller run with the model's tokenizer that drafts --speculate N tokens a step "
        f"(default {DRAFT_TOKENS} with --draft); without it --speculate drafts by prompt lookup",
    )


def add_generation_args(
    parser: argparse.ArgumentParser, aliases: dict[str, list[str]] | None = None, skip: set[str] = frozenset()
) -> None:
    """Add what a command that generates takes: --quantize, --draft, SamplingConfig's fields (aliases, skip:
    as add_dataclass_args) and ContextConfig's."""
    add_quantize_arg(parser)
    add_draft_arg(parser)
    add_dataclass_args(parser, SamplingConfig, aliases, skip)
    add_dataclass_args(parser, ContextConfig)


def sampling_args(args: argparse.Namespace) -> dict[str, Any]:
    """Return the SamplingConfig fields given on a generating command line; with --draft, speculate defaults
    to DRAFT_TOKENS."""
    sampling = given(args, SamplingConfig)
    if getattr(args, "draft", None):
        sampling.setdefault("speculate", DRAFT_TOKENS)
    return sampling


def add_quantize_arg(parser: argparse.ArgumentParser) -> None:
    """Add --quantize (one of QUANTIZATIONS, default none) to a command that loads a model for inference."""
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none", help=QUANTIZE_HELP)


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    aliases: dict[str, list[str]] | None = None,
    skip: set[str] = frozenset(),
) -> None:
    """Add one --flag per dataclass field (dest = field name, default = not given)."""
    hints = get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name and tp is not bool:  # seed projects spell flags with underscores
            names.append(f"--{f.name}")
        names += (aliases or {}).get(f.name, [])
        help = f.metadata.get("help", "")
        if f.name in ranges(cls):
            help += f" (range {ranges(cls)[f.name]})"
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is list:
            kw["nargs"] = "+"
        else:
            kw["type"] = tp
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        group.add_argument(*names, **kw)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """Return the fields of cls that were given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
