"""`qinglm export gguf`: a run directory to one GGUF file for llama.cpp (and Ollama, LM Studio).

The weights go through the same HF layout as `export hf` (qinglm.export.hf.qinglm_to_hf), then get
llama.cpp's tensor names. llama.cpp's `llama` architecture rotates interleaved pairs of q/k dimensions,
QingLM (like HF) rotates halves, so q and k rows are permuted exactly as llama.cpp's own HF converter does;
`qwen3` / `qwen3moe` rotate halves (NEOX), so their rows stay as they are.

    dense                      -> llama        QK-norm dense        -> qwen3
    MoE every block (Mixtral)  -> llama        QK-norm MoE          -> qwen3moe
llama.cpp's qwen2moe does not renormalise the top-k expert weights, so shared-expert models are refused,
and its gpt2 computes the tanh approximation of GELU, so the classic family (exact GELU) is too.
The tokenizer goes in as byte-level BPE ("gpt2") with the Qwen2 pre-tokenizer, which is QingLM's split.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qinglm.config import ModelConfig, resolve_model
from qinglm.errors import QingLMError
from qinglm.export.hf_config import HF_OPTIONS, hf_model_type
from qinglm.export.options import Table, unreproduced
from qinglm.io import claim_file, remove_stale_temps, temp_path
from qinglm.tokenizer import BOS_ID, EOS_ID, IM_END_ID, PAD_ID, UNK_ID, Tokenizer

if TYPE_CHECKING:  # torch and numpy load when a file is written, so the CLI's --help stays fast
    import numpy as np
    import torch

DTYPES = ("f32", "f16", "q8_0")  # the matrices' precision in the file (_tensor_data); `--dtype` offers these
GGUF_ARCH = {"llama": "llama", "mixtral": "llama", "qwen3": "qwen3", "qwen3_moe": "qwen3moe"}
PRE_TOKENIZER = "qwen2"  # llama.cpp's name for the Qwen2 split regex (qinglm.tokenizer.QWEN2_PATTERN)
# What GGUF_ARCH's architectures reproduce: the transformers exporter's options (the weights take its
# layout), less the classic family, shared experts and MoE on some blocks only.
GGUF_OPTIONS: Table = {
    **HF_OPTIONS,
    "pos_encoding": ("rope",),
    "norm": ("rmsnorm",),
    "mlp": ("swiglu",),
    "shared_experts": (0,),
    "moe_every": (1,),
}

_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# HF module inside a layer -> llama.cpp tensor inside blk.N
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",  # Qwen-MoE router
    "block_sparse_moe.gate": "ffn_gate_inp",  # Mixtral router
}
_EXPERT = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_EXPERT_NAME = re.compile(r"(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)")


def gguf_arch(cfg: ModelConfig) -> str:
    """Return the llama.cpp architecture that runs cfg exactly; QingLMError when there is none."""
    cfg = resolve_model(cfg)
    model_type = hf_model_type(cfg)  # refuses what no HF architecture reproduces either
    if model_type == "gpt2":
        raise QingLMError(
            "cannot export to GGUF: llama.cpp's gpt2 uses the tanh approximation of GELU, QingLM's classic "
            "family the exact one; export it with `qinglm export hf` (GPT-2) instead"
        )
    if model_type not in GGUF_ARCH:
        raise QingLMError(
            "cannot export to GGUF: llama.cpp's qwen2moe does not renormalise the top-k expert weights, "
            "so shared-expert models would run differently; export to transformers instead"
        )
    if cfg.n_experts and cfg.moe_every != 1:
        raise QingLMError(
            f"cannot export to GGUF: llama.cpp's {GGUF_ARCH[model_type]} needs MoE in every block"
        )
    reason = unreproduced(cfg, GGUF_OPTIONS)
    if reason:
        raise QingLMError(f"cannot export to GGUF: {reason}")
    return GGUF_ARCH[model_type]


def permute_for_llama_cpp(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Return q or k rows (or bias) reordered from rotate-half RoPE to llama.cpp's interleaved pairs."""
    # per head: [x_0..x_{d/2-1}, y_0..y_{d/2-1}] -> [x_0, y_0, x_1, y_1, ...]
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig, arch: str) -> dict[str, torch.Tensor]:
    """Return llama.cpp-named fp32 tensors for QingLM weights (model_tensors(): a tied head appears once)."""
    import torch

    from qinglm.export.hf import qinglm_to_hf

    cfg = resolve_model(cfg)
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in qinglm_to_hf(tensors, cfg).items():
        t = t.float()
        if name in _TOP:
            out[_TOP[name]] = t
            continue
        layer, module, kind = _LAYER_NAME.fullmatch(name).groups()
        if m := _EXPERT_NAME.fullmatch(module):
            experts.setdefault((int(layer), _EXPERT[m.group(2)]), {})[int(m.group(1))] = t
            continue
        short = _LAYER[module]
        if arch == "llama" and short in ("attn_q", "attn_k"):
            t = permute_for_llama_cpp(t, cfg.n_heads if short == "attn_q" else cfg.n_kv_heads)
        out[f"blk.{layer}.{short}.{kind}"] = t
    for (layer, part), by_expert in sorted(experts.items()):
        # (n_experts, rows, cols): GGUF stores all experts of a layer in one tensor
        out[f"blk.{layer}.ffn_{part}_exps.weight"] = torch.stack([by_expert[e] for e in sorted(by_expert)])
    return out


def tokenizer_metadata(tok: Tokenizer, vocab_size: int) -> dict[str, Any]:
    """Return {"tokens", "types", "merges"} of a byte-level BPE tokenizer, padded to the model's vocab."""
    import gguf

    d = json.loads(tok.backend.to_str())
    model = d["model"]
    if model.get("type") != "BPE":
        raise QingLMError("GGUF export needs a byte-level BPE tokenizer (the kind QingLM trains)")
    if tok.pre_tokenizer != PRE_TOKENIZER:
        raise QingLMError(
            f"cannot export to GGUF: llama.cpp has no pre-tokenizer for this tokenizer's {tok.pre_tokenizer!r} "
            "split, only for qwen2; export to transformers instead (`qinglm export hf`)"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for added in d.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges}


def _tensor_data(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """Return (array, GGML type) of one tensor in the requested file dtype; 1-D tensors stay fp32."""
    import gguf
    import numpy as np

    a = t.contiguous().numpy().astype(np.float32)
    if a.ndim == 1 or dtype == "f32":
        return a, gguf.GGMLQuantizationType.F32
    if dtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quantize(a, q), q
    return a.astype(np.float16), gguf.GGMLQuantizationType.F16


def export_gguf(
    run_dir: str | Path, out_path: str | Path, dtype: str = "f16", overwrite: bool = False
) -> Path:
    """Return out_path after writing the run's model, tokenizer and chat template as one GGUF file.

    An existing out_path QingLM did not write needs overwrite.

    dtype: f32, f16 or q8_0 for the matrices (norm weights stay f32; q8_0 falls back to f16 for rows
    not a multiple of 32). Raises QingLMError for a model llama.cpp cannot run exactly.
    """
    import gguf

    import qinglm
    from qinglm.export.hf import chat_template_of
    from qinglm.train.checkpoint import model_tensors

    if dtype not in DTYPES:
        raise QingLMError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    lm = qinglm.load(run_dir, device="cpu")
    cfg = lm.model.cfg
    arch = gguf_arch(cfg)
    tensors = gguf_tensors(model_tensors(lm.model), cfg, arch)
    vocab = tokenizer_metadata(lm.tokenizer, cfg.vocab_size)
    out = claim_file(out_path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out.parent, [out.name])  # .OUT.tmp-PID of an export that was killed
    tmp = temp_path(out)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}.get(
        dtype, gguf.LlamaFileType.MOSTLY_Q8_0
    )
    w = gguf.GGUFWriter(tmp, arch)
    try:
        w.add_name(lm.run_dir.name)
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        if cfg.n_experts:
            w.add_expert_count(cfg.n_experts)
            w.add_expert_used_count(cfg.experts_per_token)
            w.add_expert_feed_forward_length(cfg.d_ff)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(PRE_TOKENIZER)
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        w.add_bos_token_id(BOS_ID)
        w.add_eos_token_id(EOS_ID)
        w.add_unk_token_id(UNK_ID)
        w.add_pad_token_id(PAD_ID)
        w.add_eot_token_id(IM_END_ID)  # <|im_end|> ends an assistant turn in chat
        w.add_add_bos_token(True)  # QingLM's documents start with [BOS]
        w.add_add_eos_token(False)
        w.add_chat_template(chat_template_of(lm.run_dir / "tokenizer"))
        for name, t in tensors.items():
            data, qtype = _tensor_data(t, dtype)
            w.add_tensor(name, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
