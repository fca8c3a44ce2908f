"""LoRA: low-rank adapters on the linear layers of a QingLM Transformer, saved in PEFT's format.

    apply_lora(model, rank, alpha, dropout, targets)  the model, linears wrapped, only LoRA trainable
    save_adapter(model, out_dir, base=...)            writes adapter_config.json + adapter_model.safetensors
    load_adapter(model, directory)                    applies the adapter in `directory` to a plain model
    merge_lora(model)                                 folds W += scaling * B @ A into plain nn.Linear
    adapters_disabled(model)                          a context in which the model acts as its base

scaling is alpha/rank, or alpha/sqrt(rank) with rsLoRA (PEFT's use_rslora). PEFT options that change what
the weights mean and that QingLM does not implement (DoRA, trained biases, fan_in_fan_out, per-module
alpha_pattern/rank_pattern, layers_to_transform, modules_to_save) are refused in one line, never ignored.
The adapter's names are Llama's, so LoRA is refused on classic-family models (exported as GPT-2).

QingLM fuses q/k/v into `attn.qkv` and gate/up into `mlp.up`, but each HF part (q_proj, k_proj, ...) gets
its own A/B pair acting on its own rows of the fused output, so the adapter maps one-to-one onto the
Hugging Face Llama modules and PEFT can load it onto an exported model. B starts at zero, so applying
LoRA leaves the model's output unchanged until training moves B.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qinglm.errors import QingLMError
from qinglm.io import read_json, write_json_atomic
from qinglm.model.hf_layout import LINEAR_NAMES, LINEAR_PARTS, check_lora_targets, hf_module, row_sizes

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ALL_TARGETS = LINEAR_NAMES  # HF short names, in the order they appear in a layer
_PEFT_PREFIX = "base_model.model."
# adapter_config.json keys that change what the weights mean, with the (truthy) value meaning plain LoRA.
_PLAIN_LORA = {
    "use_dora": None,
    "bias": "none",
    "fan_in_fan_out": None,
    "alpha_pattern": None,
    "rank_pattern": None,
    "layers_to_transform": None,
    "modules_to_save": None,
}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus one low-rank update per targeted row block (HF part) of its output."""

    def __init__(
        self,
        base: nn.Linear,
        parts: Sequence[tuple[str, int]],
        rank: int,
        alpha: float,
        dropout: float,
        rslora: bool = False,
    ):
        """parts: (HF short name or None if untargeted, rows) in row order, summing to out_features."""
        super().__init__()
        self.base = base
        self.parts = [(name, rows) for name, rows in parts]
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank  # as PEFT computes it
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: act as the base linear (see adapters_disabled)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, rows in self.parts:
            if name is None:
                continue
            a = torch.empty(rank, base.in_features, device=base.weight.device)
            nn.init.kaiming_uniform_(a, a=5**0.5)  # PEFT's default init of A; B is zero
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(rows, rank, device=base.weight.device))

    def delta_weight(self) -> torch.Tensor:
        """Return scaling * B @ A for the whole fused matrix (out, in); zero rows where untargeted."""
        blocks = []
        for name, rows in self.parts:
            if name is None:
                blocks.append(self.base.weight.new_zeros(rows, self.base.in_features))
            else:
                blocks.append(self.lora_B[name] @ self.lora_A[name])
        return torch.cat(blocks, dim=0) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = self.dropout(x)
        outs = []
        for name, rows in self.parts:
            if name is None:
                outs.append(h.new_zeros(*h.shape[:-1], rows))
            else:
                outs.append(h @ self.lora_A[name].to(h.dtype).T @ self.lora_B[name].to(h.dtype).T)
        return y + torch.cat(outs, dim=-1).to(y.dtype) * self.scaling


def _linear_parts(model: nn.Module, module: str) -> tuple[str, ...]:
    """Return the HF part paths (inside a layer) of a QingLM linear module of this model."""
    if module == "mlp.up" and model.cfg.mlp != "swiglu":
        return ("mlp.up_proj",)  # a GELU MLP has one up matrix (no gate)
    return LINEAR_PARTS[module]


def _part_sizes(model: nn.Module, module: str) -> tuple[int, ...]:
    if module == "mlp.up" and model.cfg.mlp != "swiglu":
        return (model.cfg.d_ff,)
    return row_sizes(module, model.cfg)


def apply_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = ALL_TARGETS,
    rslora: bool = False,
) -> nn.Module:
    """Return model with LoRA on the targeted linears of every block; every other parameter is frozen.

    rslora scales the update by alpha/sqrt(rank) instead of alpha/rank (PEFT's use_rslora).
    """
    if model.cfg.norm == "layernorm":
        raise QingLMError(
            "LoRA needs a modern-family model: adapters use Llama module names, which PEFT cannot find "
            "on a classic-family model's GPT-2 export; fine-tune it fully (without --lora)"
        )
    if rank <= 0:
        raise QingLMError(f"LoRA rank must be positive, got {rank}")
    if alpha <= 0:
        raise QingLMError(f"LoRA alpha must be positive, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise QingLMError(f"LoRA dropout must be in [0, 1), got {dropout}")
    wanted = set(check_lora_targets(targets))
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:
        for module in LINEAR_PARTS:
            owner_path, _, attr = module.rpartition(".")
            owner = getattr(block, owner_path)
            linear = getattr(owner, attr, None)
            if not isinstance(linear, nn.Linear):  # a MoE feed-forward layer has no dense up/down
                continue
            names = [p.rpartition(".")[2] for p in _linear_parts(model, module)]
            parts = [(n if n in wanted else None, rows) for n, rows in zip(names, _part_sizes(model, module))]
            if any(n is not None for n, _ in parts):
                setattr(owner, attr, LoRALinear(linear, parts, rank, alpha, dropout, rslora))
    if not lora_layers(model):
        raise QingLMError(f"no layer of this model matches the LoRA targets {', '.join(sorted(wanted))}")
    model.lora_config = {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": list(targets),
        "use_rslora": rslora,
    }
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Return {QingLM module path (blocks.N.attn.qkv): LoRALinear} of a model with LoRA applied."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Return (as a context) model with every LoRA layer acting as its frozen base; restored on exit.

    This is DPO's reference model under LoRA: the base weights are shared, nothing is copied.
    """
    layers = list(lora_layers(model).values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.enabled = was


def trainable_parameters(model: nn.Module) -> int:
    """Return the number of parameters that require gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _adapter_params(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Return (PEFT name, parameter) of every LoRA weight.

    Names look like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight.
    """
    for path, layer in lora_layers(model).items():
        _, layer_idx, module = path.split(".", 2)  # blocks.N.attn.qkv
        part_path = {p.rpartition(".")[2]: p for p in _linear_parts(model, module)}
        for name in layer.lora_A:
            hf = _PEFT_PREFIX + hf_module(int(layer_idx), part_path[name])
            yield f"{hf}.lora_A.weight", layer.lora_A[name]
            yield f"{hf}.lora_B.weight", layer.lora_B[name]


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the LoRA weights on the CPU under PEFT's names."""
    return {name: p.detach().cpu().contiguous() for name, p in _adapter_params(model)}


def save_adapter(model: nn.Module, out_dir: str | Path, base: str = "") -> Path:
    """Return out_dir after writing adapter_config.json and adapter_model.safetensors (PEFT's LoRA format)."""
    from safetensors.torch import save

    from qinglm.io import atomic_open

    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise QingLMError("this model has no LoRA layers to save; apply_lora first")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / ADAPTER_WEIGHTS, "wb") as f:
        f.write(save(adapter_tensors(model), metadata={"format": "pt"}))
    write_json_atomic(
        out / ADAPTER_CONFIG,
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base),
            "r": cfg["r"],
            "lora_alpha": cfg["lora_alpha"],
            "lora_dropout": cfg["lora_dropout"],
            "target_modules": cfg["target_modules"],
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": bool(cfg.get("use_rslora", False)),
            "init_lora_weights": True,
            "modules_to_save": None,
        },
    )
    return out


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    """Return adapter_config.json of an adapter directory; raise QingLMError if missing or not LoRA."""
    path = Path(directory) / ADAPTER_CONFIG
    cfg = read_json(path, f"no {ADAPTER_CONFIG} in {directory}; pass a LoRA adapter directory")
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA" or "r" not in cfg:
        raise QingLMError(f"{path} is not a LoRA adapter config (peft_type LORA with r)")
    for key, plain in _PLAIN_LORA.items():
        if cfg.get(key) and cfg[key] != plain:  # missing, null, false and empty all mean plain LoRA
            raise QingLMError(
                f"{path} sets {key}={cfg[key]!r:.60}, which QingLM does not implement; "
                "merge this adapter with PEFT (merge_and_unload) and import the merged model instead"
            )
    return cfg


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Return model with the LoRA adapter saved in directory applied (its weights loaded, B included)."""
    from safetensors.torch import load_file

    cfg = read_adapter_config(directory)
    targets = cfg.get("target_modules") or list(ALL_TARGETS)
    if isinstance(targets, str):  # PEFT also allows one regex string; we only write lists
        raise QingLMError(f"target_modules as a regex is not supported: {targets!r}")
    r, alpha, dropout = int(cfg["r"]), float(cfg["lora_alpha"]), float(cfg.get("lora_dropout", 0.0))
    apply_lora(model, r, alpha, dropout, targets, rslora=bool(cfg.get("use_rslora", False)))
    try:
        loaded = load_file(Path(directory) / ADAPTER_WEIGHTS, device="cpu")
    except Exception as e:  # a missing, truncated or foreign file
        raise QingLMError(f"cannot read {Path(directory) / ADAPTER_WEIGHTS}: {str(e)[:200]}") from None
    expected = dict(_adapter_params(model))
    if set(loaded) != set(expected):
        detail = sorted(set(expected) ^ set(loaded))[:2]
        raise QingLMError(f"adapter in {directory} does not fit this model (e.g. {', '.join(detail)})")
    with torch.no_grad():
        for name, param in expected.items():
            if loaded[name].shape != param.shape:
                raise QingLMError(
                    f"adapter tensor {name} has shape {tuple(loaded[name].shape)}, this model needs "
                    f"{tuple(param.shape)}: it was trained on another base model"
                )
            param.copy_(loaded[name])
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Return model with every LoRALinear replaced by its base nn.Linear holding W + scaling * B @ A."""
    for path, layer in lora_layers(model).items():
        owner_path, _, attr = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        base = layer.base
        base.weight += layer.delta_weight().to(base.weight.dtype)
        setattr(owner, attr, base)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
