"""Typed configs, presets, and the merge of config files with command-line flags.

Every command-line flag of `qinglm train` is generated from a field below (``--seq-len`` is
``TrainConfig.seq_len``), so the resolved config saved as ``config.json`` in a run directory is
enough to reproduce or resume the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from qinglm.errors import QingLMError
from qinglm.typecheck import check_types

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

DEFAULT_PROMPTS = ["今天天气真不错", "人工智能的未来", "中国经济"]


def _f(default: Any, help: str, choices: list | None = None, **kw: Any) -> Any:
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    """The Transformer's shape and options; None means 'derive from the rest'."""

    vocab_size: int = _f(10_000, "vocabulary size (taken from the tokenizer when one is given)")
    d_model: int = _f(128, "hidden size")
    n_layers: int = _f(2, "number of Transformer blocks")
    n_heads: int = _f(2, "attention heads")
    n_kv_heads: int | None = _f(None, "key/value heads for grouped-query attention (default: n_heads)")
    d_ff: int | None = _f(None, "MLP hidden size (default: 4*d_model for gelu, ~8/3*d_model for swiglu)")
    max_seq_len: int = _f(512, "maximum context length")
    # The seeds use 0.1; on short pretraining runs 0 learns faster (measured: benchmarks/README.md).
    dropout: float = _f(0.0, "dropout probability (0 is best for short pretraining; try 0.1 for many epochs)")
    family: str = _f(
        "modern",
        "architecture family: fills pos-encoding, norm, mlp, tie-embeddings, bias when not given",
        ["modern", "classic"],
    )
    pos_encoding: str | None = _f(None, "position encoding", ["rope", "sinusoidal", "learned"])
    norm: str | None = _f(None, "normalisation layer", ["rmsnorm", "layernorm"])
    mlp: str | None = _f(None, "feed-forward type", ["swiglu", "gelu"])
    tie_embeddings: bool | None = _f(None, "share the input embedding with the output head")
    rope_theta: float = _f(10_000.0, "RoPE base")
    norm_eps: float = _f(1e-5, "epsilon of the norm layers")
    bias: bool | None = _f(None, "biases in linear layers")
    init_std: float = _f(0.02, "std of the normal init; residual projections get std/sqrt(2*n_layers)")
    init: str = _f(
        "gpt2",
        "weight init: gpt2 = normal(init-std), small = normal(sqrt(2/(5*d_model))) (Nguyen & Salazar), "
        "both with residual projections scaled by 1/sqrt(2*n_layers); default = PyTorch's own",
        ["default", "gpt2", "small"],
    )
    qk_norm: bool = _f(False, "RMSNorm on queries and keys per head")
    gated_attention: bool = _f(
        False, "sigmoid output gate per head computed from the block input, as in Qwen3-Next"
    )
    gradient_checkpointing: bool = _f(
        False, "recompute each block's activations in the backward pass: less memory, ~30%% more time"
    )
    # Mixture of experts (qinglm/moe.py): off while n_experts is 0, so default models are unchanged.
    n_experts: int = _f(0, "routed experts per MoE feed-forward layer (0 = dense MLP)")
    experts_per_token: int = _f(2, "MoE: experts each token is routed to (top-k)")
    shared_experts: int = _f(0, "MoE: always-on experts added to the routed output")
    moe_every: int = _f(
        1, "MoE on every k-th block: block i (from 0) is MoE when i %% k == k-1 (1 = every block)"
    )
    router: str = _f("softmax", "MoE router scores", ["softmax", "sigmoid"])
    moe_aux_coef: float = _f(0.01, "MoE: weight of the load-balancing loss (Switch/GShard)")
    moe_z_coef: float = _f(0.0, "MoE: weight of the router z-loss (mean logsumexp(logits)^2)")

    def __post_init__(self) -> None:
        check_types(self)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass
class TrainConfig:
    """Everything about a training run except the model's shape."""

    data: list[str] = _f(
        ["pd1998"],
        "built-in corpus name, text file(s), directory, glob, or prepared data dir; "
        "SOURCE:WEIGHT ... trains on a mixture by weight",
    )
    tokenizer: str | None = _f(None, "tokenizer directory (default: train one on the data into the run dir)")
    out: str | None = _f(None, "run directory (default: runs/<time>-<preset>-<data>)")
    preset: str = _f("tiny", "model size preset", list(PRESETS))
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    max_time: float | None = _f(
        None, "stop after this many minutes of training (with no limit given: 8 minutes or 8 passes, the first reached)"
    )
    num_epochs: float | None = _f(None, "stop after this many passes over the training data")
    batch_size: int = _f(32, "sequences per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    seq_len: int = _f(256, "training sequence length (<= max_seq_len)")
    lr: float = _f(2e-3, "peak learning rate (the seeds' 3e-4 learns far slower for these sizes)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    lr_schedule: str = _f(
        "cosine",
        "lr after warmup: cosine or linear decay to the floor, wsd (constant, then linear decay), constant",
        ["cosine", "linear", "wsd", "constant"],
    )
    decay_fraction: float = _f(0.2, "WSD: fraction of the run spent decaying")
    seq_len_schedule: str = _f(
        "",
        "progressive sequence length: LENGTH:UNTIL stages, e.g. 64:0.2,128:0.5 trains on 64-token rows "
        "for the first 20%% of steps, 128 until 50%%, then seq_len (same tokens per step)",
    )
    warmup_steps: int = _f(1000, "linear warmup steps (capped at 5%% of a run whose length is known)")
    weight_decay: float = _f(0.01, "AdamW weight decay on matrices only")
    optimizer: str = _f(
        "adamw",
        "adamw, or muon: Muon for the 2-D weight matrices inside the blocks, AdamW for the rest",
        ["adamw", "muon"],
    )
    muon_lr: float = _f(0.02, "Muon learning rate for the hidden 2-D weight matrices")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    device: str = _f("auto", "device", ["auto", "cpu", "cuda", "mps"])
    dtype: str = _f(
        "auto",
        "compute precision (auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32)",
        ["auto", "fp32", "bf16", "fp16"],
    )
    compile: bool | None = _f(
        None, "torch.compile the model (default: on for CUDA and for CPUs with a C++ compiler)"
    )
    fp8: bool = _f(
        False,
        "float8 matmuls for the block linears through torchao (CUDA, compute capability 8.9+: Ada/Hopper); "
        "weights, checkpoints and exports stay unchanged",
    )
    num_threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)")
    seed: int = _f(0, "random seed")
    eval_every: int = _f(200, "validate every N optimizer steps")
    eval_tokens: int = _f(200_000, "tokens used by each periodic validation (0 = whole split)")
    log_every: int = _f(50, "log a metrics line every N steps")
    save_every: int = _f(200, "write a checkpoint every N optimizer steps")
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep")
    patience: int | None = _f(None, "early stop after N validations without improvement")
    resume: bool = _f(False, "continue the run in --out from its last complete checkpoint")
    overwrite: bool = _f(False, "write into a non-empty --out that QingLM did not create")
    init_from: str | None = _f(
        None,
        "start from the weights of this run directory (another run, or one made by `qinglm import hf`) "
        "instead of random ones; its model config and tokenizer are used",
    )
    parallel: str = _f(
        "auto",
        "multi-process training under torchrun: ddp (replicas), fsdp (sharded, FSDP2); auto = ddp",
        ["auto", "ddp", "fsdp"],
    )
    nproc: int = _f(0, "launch this many processes on this machine with torchrun (0 = no launch)")
    val_fraction: float = _f(0.02, "fraction of the data held out for validation")
    split_by: str = _f(
        "auto",
        "held out whole: document, block (--split-block consecutive documents) or file; auto: block for "
        ".txt (document if too small for one block), document for JSONL/Parquet (built-in: article "
        "blocks, reviews, idioms)",
        ["auto", "document", "block", "file"],
    )
    split_block: int = _f(100, "documents per held-out block with --split-by block")
    encoding: str | None = _f(None, "text encoding of data files (default: detect)")
    nfkc: bool = _f(True, "normalise full-width Latin letters and digits")
    text_field: str = _f("text", "JSONL/Parquet field holding the text")
    tokenizer_sample_bytes: int = _f(
        32 << 20, "train the tokenizer on an even sample of about this many bytes of the corpus"
    )
    pre_tokenizer: str = _f(
        "qwen2",
        "how a new tokenizer splits text before BPE: qwen2 (words of Chinese characters can merge), "
        "chars (one piece per Chinese character; pinyin syllables stay whole)",
        ["qwen2", "chars"],
    )
    sample_prompts: list[str] = _f(DEFAULT_PROMPTS, "prompts to sample from after training")
    sample_tokens: int = _f(
        60, "tokens to generate per sample prompt (after training; greedy ones at each validation)"
    )
    tracker: str = _f(
        "none",
        "experiment tracker besides metrics.jsonl: tensorboard (RUN/tensorboard), wandb or swanlab "
        "(offline with WANDB_MODE=offline / SWANLAB_MODE=offline)",
        ["none", "tensorboard", "wandb", "swanlab"],
    )

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class SamplingConfig:
    """How to pick the next token; temperature 0 means greedy."""

    max_new_tokens: int = _f(100, "tokens to generate")
    temperature: float = _f(0.8, "softmax temperature (0 = greedy)")
    top_k: int | None = _f(50, "keep the k most likely tokens (0 or None = all)")
    top_p: float | None = _f(0.95, "nucleus sampling mass (1.0 or None = off)")
    repetition_penalty: float = _f(1.1, "penalty > 1 makes already generated tokens less likely")
    seed: int | None = _f(None, "random seed for sampling")
    stop_at_eos: bool = _f(True, "stop when the model emits [EOS]")

    def __post_init__(self) -> None:
        check_types(self)


# ---------------------------------------------------------------------------- resolving


def resolve_model(cfg: ModelConfig) -> ModelConfig:
    """Return a copy with every derived field filled in; raise QingLMError if impossible."""
    c = dataclasses.replace(cfg)
    if c.family not in FAMILIES:
        raise QingLMError(f"unknown family {c.family!r}; choose one of {', '.join(FAMILIES)}")
    for k, v in FAMILIES[c.family].items():
        if getattr(c, k) is None:
            setattr(c, k, v)
    if c.n_kv_heads is None:
        c.n_kv_heads = c.n_heads
    if c.d_ff is None:
        # SwiGLU has three matrices, so 2/3 of 4*d keeps the parameter count of a 4*d GELU MLP.
        c.d_ff = 4 * c.d_model if c.mlp == "gelu" else 64 * math.ceil(8 * c.d_model / 3 / 64)
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
        if getattr(c, name) <= 0:
            raise QingLMError(f"{name} must be positive, got {getattr(c, name)}")
    if c.d_model % c.n_heads:
        raise QingLMError(f"d_model ({c.d_model}) must be divisible by n_heads ({c.n_heads})")
    if c.n_heads % c.n_kv_heads:
        raise QingLMError(f"n_heads ({c.n_heads}) must be divisible by n_kv_heads ({c.n_kv_heads})")
    if c.pos_encoding in ("rope", "sinusoidal") and c.head_dim % 2 and c.pos_encoding == "rope":
        raise QingLMError(f"RoPE needs an even head dimension, got {c.head_dim}")
    if c.pos_encoding == "sinusoidal" and c.d_model % 2:
        raise QingLMError(f"sinusoidal positions need an even d_model, got {c.d_model}")
    if not 0.0 <= c.dropout < 1.0:
        raise QingLMError(f"dropout must be in [0, 1), got {c.dropout}")
    if c.init not in ("default", "gpt2", "small"):
        raise QingLMError(f"unknown init {c.init!r}; choose one of default, gpt2, small")
    if c.n_experts < 0:
        raise QingLMError(f"n_experts must be 0 (dense) or positive, got {c.n_experts}")
    if c.n_experts > 0:
        if not 1 <= c.experts_per_token <= c.n_experts:
            raise QingLMError(
                f"experts_per_token must be between 1 and n_experts ({c.n_experts}), got {c.experts_per_token}"
            )
        if c.shared_experts < 0:
            raise QingLMError(f"shared_experts must be 0 or positive, got {c.shared_experts}")
        if c.moe_every < 1:
            raise QingLMError(f"moe_every must be positive, got {c.moe_every}")
        if c.router not in ("softmax", "sigmoid"):
            raise QingLMError(f"unknown router {c.router!r}; choose one of softmax, sigmoid")
        if c.moe_aux_coef < 0 or c.moe_z_coef < 0:
            raise QingLMError("moe_aux_coef and moe_z_coef must not be negative")
    elif c.shared_experts:
        raise QingLMError("shared_experts needs n_experts > 0")
    return c


def check_train(t: TrainConfig, m: ModelConfig) -> None:
    """Raise QingLMError for a training config that cannot run with model config m."""
    if t.preset not in PRESETS:
        raise QingLMError(f"unknown preset {t.preset!r}; choose one of {', '.join(PRESETS)}")
    for name in ("batch_size", "grad_accum", "seq_len", "eval_every", "log_every", "save_every"):
        if getattr(t, name) <= 0:
            raise QingLMError(f"{name} must be positive, got {getattr(t, name)}")
    if t.seq_len > m.max_seq_len:
        raise QingLMError(f"seq_len ({t.seq_len}) is longer than the model's max_seq_len ({m.max_seq_len})")
    if t.lr <= 0:
        raise QingLMError(f"lr must be positive, got {t.lr}")
    if t.lr_schedule not in ("cosine", "linear", "wsd", "constant"):
        raise QingLMError(
            f"unknown lr schedule {t.lr_schedule!r}; choose one of cosine, linear, wsd, constant"
        )
    if not 0.0 < t.decay_fraction <= 1.0:
        raise QingLMError(f"decay_fraction must be in (0, 1], got {t.decay_fraction}")
    from qinglm.train.schedule import parse_seq_len_schedule

    parse_seq_len_schedule(t.seq_len_schedule, t.seq_len)
    if not 0.0 < t.val_fraction < 1.0:
        raise QingLMError(f"val_fraction must be between 0 and 1, got {t.val_fraction}")
    if t.parallel not in ("auto", "ddp", "fsdp"):
        raise QingLMError(f"unknown parallel mode {t.parallel!r}; choose one of auto, ddp, fsdp")
    if t.nproc < 0:
        raise QingLMError(f"nproc must be 0 (no launch) or a number of processes, got {t.nproc}")
    if t.parallel == "fsdp" and t.optimizer != "adamw":
        raise QingLMError("--parallel fsdp works with --optimizer adamw; use --parallel ddp for Muon")
    from qinglm.tracking import check_tracker

    check_tracker(t.tracker)  # an unknown tracker or a missing package fails before any slow work


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


def split_sections(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a config dict into (model, train) parts; flat keys go where the field lives."""
    for part in ("model", "train"):
        if not isinstance(d.get(part) or {}, dict):
            raise QingLMError(f"the '{part}' section of a config file must be a mapping of keys to values")
    model, train = dict(d.get("model") or {}), dict(d.get("train") or {})
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    for k, v in d.items():
        if k in ("model", "train"):
            continue
        k = k.replace("-", "_")
        if k in model_names:
            model[k] = v
        elif k in train_names:
            train[k] = v
        else:
            raise QingLMError(f"unknown config key: {k}")
    return model, train


# ---------------------------------------------------------------------------- argparse


def _base_type(tp: Any) -> Any:
    if get_origin(tp) is not None and type(None) in get_args(tp):
        tp = next(a for a in get_args(tp) if a is not type(None))
    return tp


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
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
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
