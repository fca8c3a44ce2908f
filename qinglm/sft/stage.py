"""SFT and LoRA-SFT as a stage of the training engine: the loss on assistant tokens only.

The model example for every post-training stage: it loads its base run, applies LoRA when asked,
supplies resumable batches (EpochBatches), its loss, its held-out metric and its end-of-run figures;
the engine does the rest (accumulation, AMP, compile, checkpoints, exact resume, torchrun, trackers).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch.nn as nn

from qinglm import run_dir as run_dirs
from qinglm.config import to_dict
from qinglm.data.idioms_sft import NAME as IDIOMS
from qinglm.errors import QingLMError
from qinglm.evals.chat import pinyin_accuracy
from qinglm.io import write_json_atomic
from qinglm.model.lora import apply_lora, merge_lora, save_adapter, trainable_parameters
from qinglm.model.transformer import IGNORE_INDEX
from qinglm.sft import data as sft_data
from qinglm.sft.config import SFTConfig
from qinglm.train import distributed
from qinglm.train.stage import EpochBatches, Stage, StepOut


def load_base(base: str | Path, device: Any) -> nn.Module:
    """Return the model of a run of any kind (pretrain, sft, dpo, grpo, distill, import, merge) on device."""
    import qinglm

    return qinglm.load(base, device=str(device)).model


class BaseRunStage(Stage):
    """What every stage that starts from the run cfg.base shares (SFT, DPO, GRPO): the base's model
    config and tokenizer, written into the new run, and its model."""

    def __init__(self, cfg: Any):
        from qinglm.tokenizer import Tokenizer

        self.cfg = cfg
        self.model_cfg = run_dirs.model_config(cfg.base)
        self.tok = Tokenizer.load(Path(cfg.base) / run_dirs.TOKENIZER)

    def sections(self) -> dict[str, Any]:
        return {"model": to_dict(self.model_cfg), self.kind: to_dict(self.cfg), "base": str(self.cfg.base)}

    def tokenizer(self) -> Any:
        return self.tok

    def base_model(self) -> nn.Module:
        """Return the base run's model on the stage's device."""
        return load_base(self.cfg.base, self.ctx.device)


class TuningStage(BaseRunStage):
    """What every stage that fine-tunes cfg.base on encoded examples shares (SFT, DPO): the training and
    held-out examples, LoRA when cfg.lora, and the merged inference weights."""

    def __init__(self, cfg: Any, train: list, val: list, encode: Any, log: Any = print):
        """encode(tokenizer, examples, seq_len) -> (encoded, Counter of "truncated" and "no_target")."""
        super().__init__(cfg)
        self.train, counts = encode(self.tok, train, cfg.seq_len)
        self.val, _ = encode(self.tok, val, cfg.seq_len)
        if not self.train:
            raise QingLMError("no training example has a reply token within --seq-len; raise --seq-len")
        if counts:
            log(
                f"examples: {counts['truncated']:,} cut to --seq-len {cfg.seq_len}, "
                f"{counts['no_target']:,} dropped (no reply left)"
            )

    def tune(self, model: nn.Module) -> nn.Module:
        """Return model with LoRA applied when cfg.lora (base frozen), after logging what trains."""
        cfg = self.cfg
        if cfg.lora:
            apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        self.n_train, self.n_total = trainable_parameters(model), sum(p.numel() for p in model.parameters())
        self.ctx.log(
            f"trainable parameters: {self.n_train:,} of {self.n_total:,} ({100 * self.n_train / self.n_total:.2f}%)"
        )
        return model

    def epoch_batches(self, cfg: Any, items_for_epoch: Any, collate: Any, n_tokens: int) -> EpochBatches:
        """Return (and keep as self._batches) this rank's EpochBatches of cfg's batch shape."""
        dist = self.ctx.dist
        self._batches = EpochBatches(
            items_for_epoch,
            collate,
            cfg.batch_size,
            grad_accum=cfg.grad_accum,
            rank=dist.rank,
            world_size=dist.world_size,
            n_tokens=n_tokens,
        )
        return self._batches

    def inference_weights(self, model: nn.Module) -> nn.Module:
        return merge_lora(copy.deepcopy(model)) if self.cfg.lora else model

    def save_adapter(self, model: nn.Module | None) -> None:
        """Return nothing; write RUN/adapter (PEFT's format) of a LoRA run, on the main process (model:
        the whole model there, None elsewhere)."""
        if self.cfg.lora and self.ctx.dist.is_main:
            save_adapter(model, self.ctx.run_dir / "adapter", base=str(self.cfg.base))


class SFTStage(TuningStage):
    """Fine-tune cfg.base on chat data (cfg resolved by resolve_sft)."""

    kind = "sft"

    def __init__(self, cfg: SFTConfig, log: Any = print):
        from qinglm.sft.prep import load_conversations

        super().__init__(cfg, *load_conversations(cfg, log), sft_data.make_samples, log)

    def build_model(self) -> nn.Module:
        model = self.base_model()
        self.val_before = self.held_out_loss(model) if not self.ctx.resuming else None
        if self.val_before is not None:
            n = sft_data.assistant_tokens(self.val)
            self.ctx.log(f"held-out assistant-token loss before: {self.val_before:.4f} ({n:,} tokens)")
        return self.tune(model)

    def held_out_loss(self, model: nn.Module) -> float:
        from qinglm.sft.prep import assistant_loss

        if not self.val:
            return float("nan")
        return assistant_loss(model, self.val, self.tok.pad_id, self.ctx.device, self.ctx.dtype)

    def batches(self, cfg: SFTConfig) -> EpochBatches:
        dist = self.ctx.dist
        # Rows grouped and shuffled by the global batch: a step's rows do not depend on how they are
        # split into processes and micro-batches.
        step_rows = cfg.batch_size * cfg.grad_accum * dist.world_size

        def rows(epoch: int) -> list[sft_data.Sample]:
            batches = sft_data.epoch_rows(self.train, step_rows, cfg.seq_len, cfg.batching, cfg.seed + epoch)
            return [row for b in batches for row in b]

        def collate(items: list[sft_data.Sample]) -> Any:
            return sft_data.collate(items, self.tok.pad_id)

        return self.epoch_batches(cfg, rows, collate, sft_data.assistant_tokens(self.train))

    def loss_units(self, batch: Any) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())  # the loss is the mean over the reply tokens

    def loss(self, forward: Any, model: nn.Module, batch: Any) -> StepOut:
        x, y = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        return StepOut(forward(x, y), x.numel())

    def validate(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        if not self.val:
            return None
        return {"val_loss": distributed.broadcast_object(self.ctx.dist, self.held_out_loss(model))}

    def header(self) -> list[str]:
        cfg, b = self.cfg, self._batches
        steps = b.steps_per_epoch // b.grad_accum
        return [
            f"{len(self.train):,} examples, {b.n_tokens:,} assistant tokens, {steps:,} steps per epoch "
            f"({cfg.batching}, {cfg.batch_size} x {cfg.seq_len})"
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"val_loss_before": self.val_before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.val_before = state.get("val_loss_before", self.val_before)

    def finish(self, model: nn.Module, whole: nn.Module | None) -> dict[str, Any]:
        """Return the held-out figures after training; write adapter/ (LoRA) and sft_results.json."""
        cfg, out, log = self.cfg, self.ctx.run_dir, self.ctx.log
        result: dict[str, Any] = {
            "out": str(out),
            "examples": len(self.train),
            "steps_per_epoch": self._batches.steps_for_epochs(1),
            "trainable_params": self.n_train,
            "total_params": self.n_total,
            "val_loss_before": self.val_before,
            "val_loss_after": self.held_out_loss(model),
        }
        # A checkpoint of an older version lacks the figure before training.
        before = "unknown" if self.val_before is None else f"{self.val_before:.4f}"
        log(f"held-out assistant-token loss after: {result['val_loss_after']:.4f} (before {before})")
        if not self.ctx.dist.is_main:
            return result
        self.save_adapter(whole)
        if cfg.data == IDIOMS and cfg.eval_pinyin:
            p = pinyin_accuracy(self.inference_weights(whole), self.tok, cfg.eval_pinyin)
            result["pinyin"] = p
            log(
                f"held-out pinyin exact match: {p['exact']}/{p['n']} = {p['accuracy']:.1%} "
                f"(right format {p['format_ok']:.1%}, syllables right {p['syllable_accuracy']:.1%})"
            )
        write_json_atomic(out / "sft_results.json", result)
        return result
