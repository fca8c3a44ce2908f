"""The configs of the post-training stages, built from the shared parts (qinglm/train/config.py); no
torch here, so the command line builds without it."""

from __future__ import annotations

from dataclasses import dataclass

from qinglm.config import _f
from qinglm.data.verifiable import TASKS
from qinglm.post.dpo_data import BUILTIN as DPO_BUILTIN
from qinglm.sft.config import LoRAPart
from qinglm.train.config import EngineConfig, TrainConfig


@dataclass
class DistillConfig(TrainConfig):
    """Pretraining a student (its size from --preset and the model flags) against a teacher run."""

    teacher: str = _f("", "the teacher run directory (any kind); its tokenizer is the student's")
    alpha: float = _f(
        0.5, "weight of the distillation loss; 1 - alpha weighs the ordinary next-token loss", within="[0, 1]"
    )
    temperature: float = _f(
        2.0, "softmax temperature of both distributions in the distillation loss", within="(0, inf)"
    )


@dataclass
class GRPOConfig(EngineConfig):
    """RL with verifiable rewards (GRPO) from a trained run on a task's prompts."""

    base: str = _f("", "the run to start from (any kind: pretrain, sft, dpo, grpo, ...)")
    task: str = _f(
        "idioms-pinyin",
        f"{', '.join(TASKS)} (built-in) or MODULE:FUNCTION, a function returning a qinglm.post.tasks.Task",
    )
    tools: str = _f(
        "builtin",
        "tools a multi-turn task's episodes call (e.g. --task tools): builtin (calculator, date_calc, "
        "idiom_lookup) or MODULE:FUNCTION, a function (name, arguments) -> result text",
    )
    max_tool_calls: int = _f(
        4, "tool calls an episode of a multi-turn task may make before it is cut off", within="[0, 16]"
    )
    out: str | None = _f(None, "run directory for the result (default: runs/<time>-grpo)")
    group_size: int = _f(
        8, "replies sampled per prompt; each is judged against its group's mean reward", within="[2, 65536]"
    )
    kl_coef: float = _f(
        0.04, "weight of the KL to the frozen base model (0: no reference model is kept)", within="[0, inf)"
    )
    clip_eps: float = _f(
        0.2, "the probability ratio is clipped to [1 - clip_eps, 1 + clip_eps]", within="(0, 1]"
    )
    max_new_tokens: int = _f(32, "longest reply in tokens", within="[1, inf)")
    temperature: float = _f(
        1.0, "sampling temperature of the replies (the log-probabilities use it too)", within="(0, inf)"
    )
    eval_prompts: int = _f(
        50, "held-out prompts answered greedily at each validation (0 = all)", within="[0, inf)"
    )
    batch_size: int = _f(2, "prompts per micro-batch (each gets group_size replies)")
    seq_len: int | None = _f(None, "longest prompt + reply in tokens (default: the model's context)")
    lr: float = _f(1e-4, "peak learning rate")
    warmup_steps: int = _f(10, "linear warmup steps (capped at 5%% of the run)")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    compile: bool | None = _f(False, "torch.compile the model (off: reply lengths change every step)")
    eval_every: int = _f(50, "validate every N optimizer steps")
    log_every: int = _f(10, "log a metrics line every N steps")


@dataclass
class DPOConfig(LoRAPart, EngineConfig):
    """Direct Preference Optimization (full or LoRA) of a fine-tuned run on preference pairs."""

    base: str = _f("", "the run to align (usually an SFT run; a run of any kind)")
    data: str = _f(
        DPO_BUILTIN,
        f"{DPO_BUILTIN} (built-in) or a JSONL file of {{'prompt', 'chosen', 'rejected'}} strings or "
        "{'chosen': [messages], 'rejected': [messages]} lines",
    )
    ref: str | None = _f(
        None, "the frozen reference run (default: the base; with --lora, the base without its adapters)"
    )
    beta: float = _f(
        0.1, "DPO beta: the strength of the pull towards the reference (TRL's default)", within="(0, inf)"
    )
    out: str | None = _f(None, "run directory for the result (default: runs/<time>-dpo)")
    num_epochs: float | None = _f(None, "passes over the training pairs (default 1 if no other limit)")
    max_examples: int | None = _f(
        None, "use at most this many training pairs (a seeded random subset)", within="[1, inf)"
    )
    eval_examples: int = _f(
        200, "held-out pairs for the DPO loss and reward accuracy (0 = all)", within="[0, inf)"
    )
    val_fraction: float = _f(0.05, "JSONL data: fraction of pairs held out", within="(0, 1)")
    batch_size: int = _f(4, "preference pairs per micro-batch (each pair is a chosen and a rejected row)")
    seq_len: int | None = _f(None, "longest row in tokens (default: the model's context)")
    lr: float | None = _f(None, "peak learning rate (default: 1e-4 full, 5e-4 LoRA)")
    warmup_steps: int = _f(20, "linear warmup steps (capped at 5%% of the run)")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices")
    log_every: int = _f(10, "log a metrics line every N steps")
    seed: int = _f(0, "random seed (pair subset, batch order, LoRA init)")
