"""SFTConfig: every flag of `qinglm sft` is a field; the resolved config is saved in the run's config.json."""

from __future__ import annotations

from dataclasses import dataclass

from qinglm.config import _f

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SFTConfig:
    """Supervised fine-tuning (full or LoRA) of a pretrained run on chat data."""

    base: str = _f("", "the pretrained run directory to start from")
    data: str = _f(
        "idioms-sft",
        "idioms-sft (built-in) or a JSONL file of {'conversations': [...]} "
        "or {'instruction', 'input', 'output'} lines",
    )
    out: str | None = _f(None, "run directory for the result (default: runs/<time>-sft or -lora)")
    overwrite: bool = _f(False, "write into a non-empty --out that QingLM did not create")
    lora: bool = _f(False, "train LoRA adapters only; the base weights stay frozen")
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/rank")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = _f(LORA_TARGETS, "HF module names that get LoRA (default: every linear layer)")
    num_epochs: float | None = _f(None, "passes over the training examples (default 1 if no other limit)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps")
    max_time: float | None = _f(None, "stop after this many minutes of training")
    max_examples: int | None = _f(None, "use at most this many training examples (a seeded random subset)")
    idiom_kinds: list[str] | None = _f(
        None, "idioms-sft: only these question kinds (meaning origin example pinyin; default all four)"
    )
    eval_examples: int = _f(500, "held-out examples for the assistant-token loss (0 = all)")
    eval_pinyin: int = _f(100, "idioms-sft: held-out idioms asked for their pinyin after training (0 = skip)")
    val_fraction: float = _f(0.05, "JSONL data: fraction of conversations held out for the loss")
    batch_size: int = _f(4, "rows per batch (packed rows of seq-len tokens, or padded chats)")
    seq_len: int | None = _f(None, "longest row in tokens (default: the model's context)")
    batching: str = _f(
        "pack",
        "pack: samples concatenated into full rows (each attends to the earlier samples of its row); "
        "pad: samples of similar length padded to the longest in the batch",
        ["pack", "pad"],
    )
    lr: float | None = _f(None, "peak learning rate (default: 1e-3 full, 3e-3 LoRA)")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of the peak")
    warmup_steps: int = _f(50, "linear warmup steps (capped at 5%% of the run)")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    log_every: int = _f(20, "log a metrics line every N steps")
    device: str = _f("auto", "device", ["auto", "cpu", "cuda", "mps"])
    dtype: str = _f("auto", "compute precision", ["auto", "fp32", "bf16", "fp16"])
    num_threads: int | None = _f(None, "CPU threads for torch (default: torch's choice)")
    seed: int = _f(0, "random seed (example subset, batch order, LoRA init)")
