"""`qinglm export hf` and `qinglm import hf`: a run directory to a transformers model folder and back.

The weights are renamed and split with qinglm.model.hf_layout (fused qkv -> q/k/v_proj, fused up -> gate/up_proj,
routed experts by MOE_STYLES), or mapped to GPT-2 for the classic family (qinglm.export.gpt2). No values
change except Qwen2-MoE's shared expert (times 2, see hf_config) and sinusoidal embeddings (times
sqrt(d_model)), so export followed by import gives back bit-identical weights for all but the latter.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch

from qinglm.config import ModelConfig, SamplingConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.export.gpt2 import gpt2_to_qinglm, model_config_from_gpt2, qinglm_to_gpt2
from qinglm.export.hf_config import MOE_STYLE, hf_config, hf_model_type, model_config_from_hf
from qinglm.io import OwnedDir, atomic_open, read_json, write_json_atomic
from qinglm.model.hf_layout import hf_moe_parts, hf_parts
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import BOS_ID, CHAT_TEMPLATE, EOS_ID, IM_END_ID, PAD_ID, SPECIAL_TOKENS, Tokenizer

HF_WEIGHTS = "model.safetensors"
_SHARED_GATE_SCALE = 2.0  # sigmoid(0) = 0.5 in Qwen2-MoE's shared-expert gate, undone by doubling down_proj


def _shared_prefix(layer: int) -> str:
    return f"model.layers.{layer}.mlp"


def _zero_qkv_biases(cfg: ModelConfig, layer: int) -> dict[str, torch.Tensor]:
    """Return the all-zero q/k/v biases Qwen2-MoE always has (for a model without biases)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    pre = f"model.layers.{layer}.self_attn"
    return {f"{pre}.{p}_proj.bias": torch.zeros(n) for p, n in (("q", q), ("k", kv), ("v", kv))}


def qinglm_to_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Return the HF state dict of QingLM weights (model_tensors(): a tied head appears once, as embed)."""
    cfg = resolve_model(cfg)
    model_type = hf_model_type(cfg)
    if model_type == "gpt2":
        return qinglm_to_gpt2(tensors, cfg)
    out: dict[str, torch.Tensor] = {}
    shared: dict[int, list[tuple[int, str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if ".mlp.shared." in name:  # blocks.L.mlp.shared.S.{up,down}.weight
            parts = name.split(".")
            shared.setdefault(int(parts[1]), []).append((int(parts[4]), parts[5], t))
            continue
        if ".mlp.router." in name or ".mlp.experts." in name:
            where = hf_moe_parts(name, cfg, MOE_STYLE[model_type])
        else:
            where = hf_parts(name, cfg)
        for hf_name, first, end in where:
            out[hf_name] = t[first:end].contiguous()
    for layer, items in sorted(shared.items()):
        items.sort(key=lambda x: x[0])
        ups = [t for _, kind, t in items if kind == "up"]
        downs = [t for _, kind, t in items if kind == "down"]
        pre = _shared_prefix(layer)
        out[f"{pre}.shared_expert.gate_proj.weight"] = torch.cat([u[: cfg.d_ff] for u in ups])
        out[f"{pre}.shared_expert.up_proj.weight"] = torch.cat([u[cfg.d_ff :] for u in ups])
        out[f"{pre}.shared_expert.down_proj.weight"] = torch.cat(downs, dim=1) * _SHARED_GATE_SCALE
        out[f"{pre}.shared_expert_gate.weight"] = torch.zeros(1, cfg.d_model, dtype=ups[0].dtype)
    if model_type == "qwen2_moe":
        dtype = tensors["embed.weight"].dtype
        for layer in range(cfg.n_layers):
            out.update({k: v.to(dtype) for k, v in _zero_qkv_biases(cfg, layer).items()})
    return out


def hf_to_qinglm(
    hf: dict[str, torch.Tensor], cfg: ModelConfig, where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Return QingLM weights (head.weight omitted when tied) from an HF state dict; inverse of qinglm_to_hf.

    Raises QingLMError for missing tensors, wrong shapes, or values QingLM cannot represent (nonzero
    Qwen2-MoE q/k/v biases or shared-expert gate).
    """
    cfg = resolve_model(cfg)
    model_type = hf_model_type(cfg)
    with torch.device("meta"):
        template = Transformer(cfg)
    names = [n for n in template.state_dict() if not (cfg.tie_embeddings and n == "head.weight")]
    hf = dict(hf)
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice

    state = template.state_dict()

    def take(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in hf:
            raise QingLMError(f"{where} has no tensor {name}; it does not match its config.json")
        if tuple(hf[name].shape) != tuple(shape):
            raise QingLMError(f"{where}: {name} is {tuple(hf[name].shape)}, expected {tuple(shape)}")
        return hf.pop(name)

    out: dict[str, torch.Tensor] = {}
    for name in names:
        if ".mlp.shared." in name:
            continue
        if ".mlp.router." in name or ".mlp.experts." in name:
            parts = hf_moe_parts(name, cfg, MOE_STYLE[model_type])
        else:
            parts = hf_parts(name, cfg)
        pieces = [take(n, state[name][first:end].shape) for n, first, end in parts]
        out[name] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    f, d = cfg.d_ff, cfg.d_model
    for layer in range(cfg.n_layers):
        if f"blocks.{layer}.mlp.shared.0.up.weight" not in state:
            continue
        pre, width = _shared_prefix(layer), cfg.shared_experts * f
        gate = take(f"{pre}.shared_expert.gate_proj.weight", (width, d))
        up = take(f"{pre}.shared_expert.up_proj.weight", (width, d))
        down = take(f"{pre}.shared_expert.down_proj.weight", (d, width)) / _SHARED_GATE_SCALE
        if take(f"{pre}.shared_expert_gate.weight", (1, d)).any():
            raise QingLMError(f"{where}: layer {layer} has a learned shared-expert gate, which QingLM lacks")
        for s in range(cfg.shared_experts):
            out[f"blocks.{layer}.mlp.shared.{s}.up.weight"] = torch.cat(
                [gate[s * f : (s + 1) * f], up[s * f : (s + 1) * f]]
            )
            out[f"blocks.{layer}.mlp.shared.{s}.down.weight"] = down[:, s * f : (s + 1) * f].contiguous()
    if model_type == "qwen2_moe" and not cfg.bias:
        for layer in range(cfg.n_layers):
            for name in _zero_qkv_biases(cfg, layer):
                if name in hf and hf.pop(name).any():
                    raise QingLMError(f"{where}: {name} is not zero; QingLM has no attention biases")
    leftover = [n for n in hf if not n.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise QingLMError(f"{where} has tensors QingLM does not know: {', '.join(sorted(leftover)[:3])}")
    return out


# ---------------------------------------------------------------------------- folders


def generation_config() -> dict:
    """Return generation_config.json's contents: QingLM's default sampling (SamplingConfig).

    transformers' model.generate() without arguments then samples as `qinglm generate` does; it stops
    at [EOS] and at <|im_end|>, which ends an assistant turn in chat.

    One difference remains: transformers' repetition penalty also counts control tokens and a chat
    template's structure in the prompt, which QingLM's does not (qinglm.infer.sampling.apply_repetition_penalty).
    """
    d = SamplingConfig()
    config = {
        "bos_token_id": BOS_ID,
        "eos_token_id": [EOS_ID, IM_END_ID],
        "pad_token_id": PAD_ID,
        "do_sample": d.temperature > 0,
        "max_new_tokens": d.max_new_tokens,
        "repetition_penalty": d.repetition_penalty,
    }
    if d.temperature > 0:  # transformers warns about sampling settings in a greedy config
        config["temperature"] = d.temperature
        config["top_k"] = d.top_k or 0
        config["top_p"] = d.top_p if d.top_p is not None else 1.0
    return config


def chat_template_of(tok_dir: Path) -> str:
    """Return the chat template saved beside a run's tokenizer (QingLM's ChatML if none is)."""
    path = tok_dir / "tokenizer_config.json"
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError):  # missing, unreadable or not a JSON object
        template = None
    return template if isinstance(template, str) else CHAT_TEMPLATE


def _check_not_a_run(out: Path) -> None:
    """Raise QingLMError when out already holds a QingLM run (writing there would overwrite it)."""
    if (out / "config.json").is_file() and (out / "tokenizer").is_dir():
        raise QingLMError(f"{out} holds a QingLM run; write the export to another directory")


# What an HF export writes into its folder (the only names a later export there replaces).
HF_EXPORT_FILES = (
    HF_WEIGHTS, "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja",
)  # fmt: skip


def export_hf(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Return out_dir after writing config.json, model.safetensors, generation_config.json and the tokenizer.

    The folder loads with transformers' AutoModelForCausalLM and AutoTokenizer. Raises QingLMError for a
    model no HF architecture reproduces exactly (see qinglm.export.hf_config).
    """
    from safetensors.torch import save

    import qinglm
    from qinglm.train.checkpoint import model_tensors

    lm = qinglm.load(run_dir, device="cpu")
    cfg = lm.model.cfg
    hf_model_type(cfg)  # refuse before writing anything
    tensors = model_tensors(lm.model)
    dtype = str(tensors["embed.weight"].dtype).removeprefix("torch.")
    hf = qinglm_to_hf(tensors, cfg)
    out = Path(out_dir)
    _check_not_a_run(out)
    # A folder QingLM did not write (e.g. another model's) is refused unless overwrite.
    try:
        with OwnedDir.claiming(out, "export", HF_EXPORT_FILES, overwrite=overwrite) as owned:
            owned.remove_leftovers()
            with atomic_open(out / HF_WEIGHTS, "wb") as f:
                f.write(save(hf, metadata={"format": "pt"}))
            write_json_atomic(out / "config.json", hf_config(cfg, dtype))
            write_json_atomic(out / "generation_config.json", generation_config())
            template = chat_template_of(lm.run_dir / "tokenizer")
            save_hf_tokenizer(lm.tokenizer, out, cfg.max_seq_len, template)
    except OSError as e:
        raise QingLMError(f"cannot write the export to {out}: {e.strerror or e}") from None
    return out


def save_hf_tokenizer(tok: Tokenizer, out: Path, max_len: int, chat_template: str) -> None:
    """Return nothing; save tok in out so that transformers' tokenizer(text) starts with [BOS].

    QingLM trains on documents that start with [BOS]; tools that call tokenizer(text) (lm-eval-harness,
    pipelines) must see the same, so the exported tokenizer.json adds it (add_special_tokens=False does
    not). The chat template writes its own [BOS].
    """
    from tokenizers.processors import TemplateProcessing

    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    bos = SPECIAL_TOKENS[BOS_ID]
    backend.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, BOS_ID)]
    )
    Tokenizer(backend).save(out, model_max_length=max_len, chat_template=chat_template)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    write_json_atomic(config_path, {**config, "add_bos_token": True})


def load_hf_tokenizer(directory: Path) -> Tokenizer:
    """Return the tokenizer of an HF folder without its post-processor (QingLM adds [BOS] itself)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise QingLMError(f"{directory} has no tokenizer.json; QingLM imports byte-level BPE tokenizers only")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        d["post_processor"] = None
        backend = tokenizers.Tokenizer.from_str(json.dumps(d))
    except Exception as e:  # ValueError from json, a bare Exception from the Rust side
        raise QingLMError(f"{path} is not a valid tokenizer.json ({e})") from None
    try:
        return Tokenizer(backend)
    except QingLMError:
        raise QingLMError(
            f"{path} lacks QingLM's special tokens at ids 0-5 ({' '.join(SPECIAL_TOKENS)}), which its "
            "generation, chat and training rely on; only checkpoints with such a tokenizer import"
        ) from None


def import_hf(hf_dir: str | Path, out_run: str | Path, overwrite: bool = False) -> Path:
    """Return out_run, a QingLM run directory (config.json, tokenizer/, best/) made from an HF model folder.

    The folder holds config.json of a Llama / Qwen3 / Mixtral / Qwen2-MoE / Qwen3-MoE / GPT-2 (exact GELU)
    model, model.safetensors (or model-*.safetensors shards) and a byte-level BPE tokenizer.json in the
    QingLM special-token layout. Generate, evaluate or fine-tune (qinglm sft --base) from out_run.
    """
    from safetensors.torch import load_file

    from qinglm.run_dir import holds_run
    from qinglm.train.checkpoint import save_run

    src, out = Path(hf_dir), Path(out_run)
    if holds_run(out):
        raise QingLMError(f"{out} already holds a run; import into a new run directory")
    config_path = src / "config.json"
    hf_cfg = read_json(config_path, f"{src} has no config.json; pass a transformers model folder")
    if not isinstance(hf_cfg, dict) or not hf_cfg.get("model_type"):
        raise QingLMError(
            f"{config_path} has no model_type; pass a transformers model folder (not a QingLM run)"
        )
    if hf_cfg["model_type"] != "gpt2":
        cfg = model_config_from_hf(hf_cfg, str(config_path))  # refuse an unknown architecture before reading
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise QingLMError(
            f"{src} has no model*.safetensors (.bin checkpoints are not read: they are pickles)"
        )
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf.update(load_file(f, device="cpu"))
        except Exception as e:  # SafetensorError, OSError: a truncated or foreign file
            raise QingLMError(f"cannot read {f} as safetensors ({str(e).splitlines()[0]})") from None
    if hf_cfg["model_type"] == "gpt2":
        cfg = model_config_from_gpt2(hf_cfg, hf, str(config_path))
        tensors = gpt2_to_qinglm(hf, cfg, str(src))
    else:
        tensors = hf_to_qinglm(hf, cfg, str(src))
    tok = load_hf_tokenizer(src)
    if tok.vocab_size > cfg.vocab_size:
        raise QingLMError(f"{src}: the tokenizer has {tok.vocab_size} tokens but the model {cfg.vocab_size}")
    model = Transformer(cfg)
    for name, want in model.state_dict().items():
        if name in tensors and tuple(tensors[name].shape) != tuple(want.shape):
            raise QingLMError(f"{src}: {name} is {tuple(tensors[name].shape)}, expected {tuple(want.shape)}")
    alias = {"head.weight": tensors["embed.weight"]} if cfg.tie_embeddings else {}
    model.load_state_dict({**tensors, **alias}, strict=True)
    state = {"step": 0, "imported_from": str(src.resolve())}
    return save_run(
        out, model, tok, state=state, chat_template=chat_template_of(src), kind="import", overwrite=overwrite
    )
