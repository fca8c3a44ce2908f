"""SFTConfig: the shared training parts plus what fine-tuning adds; every flag of `qinglm sft` is a field
and the resolved config is saved in the run's config.json."""

from __future__ import annotations

from dataclasses import dataclass

from qinglm.config import _f
from qinglm.errors import QingLMError
from qinglm.model.hf_layout import LINEAR_NAMES, check_lora_targets
from qinglm.train.config import EngineConfig, Part

BATCHING = ("pack", "pad")


@dataclass
class LoRAPart(Part):
    """LoRA adapters: which layers, their rank and scale (off unless lora is set)."""

    lora: bool = _f(False, "train LoRA adapters only; the base weights stay frozen")
    lora_rank: int = _f(8, "LoRA rank r", within="[1, 65536]")
    lora_alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/rank", within="(0, inf)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input", within="[0, 1)")
    lora_targets: list[str] = _f(
        list(LINEAR_NAMES), "HF module names that get LoRA (default: every linear layer)"
    )

    def check(self) -> None:
        check_lora_targets(self.lora_targets)


@dataclass
class SFTConfig(LoRAPart, EngineConfig):
    """Supervised fine-tuning (full or LoRA) of a pretrained run on chat data."""

    base: str = _f("", "the pretrained run directory to start from")
    data: str = _f(
        "idioms-sft",
        "idioms-sft (built-in) or a JSONL file of {'conversations': [...]} "
        "or {'instruction', 'input', 'output'} lines",
    )
    out: str | None = _f(None, "run directory for the result (default: runs/<time>-sft or -lora)")
    num_epochs: float | None = _f(None, "passes over the training examples (default 1 if no other limit)")
    max_examples: int | None = _f(
        None, "use at most this many training examples (a seeded random subset)", within="[1, inf)"
    )
    idiom_kinds: list[str] | None = _f(
        None, "idioms-sft: only these question kinds (meaning origin example pinyin; default all four)"
    )
    eval_examples: int = _f(
        500, "held-out examples for the assistant-token loss (0 = all)", within="[0, inf)"
    )
    eval_pinyin: int = _f(
        100, "idioms-sft: held-out idioms asked for their pinyin after training (0 = skip)", within="[0, inf)"
    )
    val_fraction: float = _f(
        0.05, "JSONL data: fraction of conversations held out for the loss", within="(0, 1)"
    )
    batch_size: int = _f(4, "rows per batch (packed rows of seq-len tokens, or padded chats)")
    seq_len: int | None = _f(None, "longest row in tokens (default: the model's context)")
    batching: str = _f(
        "pack",
        "pack: samples concatenated into full rows (each attends to the earlier samples of its row); "
        "pad: samples of similar length padded to the longest in the batch",
        list(BATCHING),
    )
    lr: float | None = _f(None, "peak learning rate (default: 1e-3 full, 3e-3 LoRA)")
    warmup_steps: int = _f(50, "linear warmup steps (capped at 5%% of the run)")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    log_every: int = _f(20, "log a metrics line every N steps")
    seed: int = _f(0, "random seed (example subset, batch order, LoRA init)")

    def check(self) -> None:
        if self.batching not in BATCHING:
            raise QingLMError(f"unknown batching {self.batching!r}; choose one of {', '.join(BATCHING)}")
