"""DPO as a stage of the training engine: preference pairs, a frozen reference, the sigmoid DPO loss.

`qinglm dpo --base RUN --data FILE|idioms-dpo --out RUN2` trains RUN's model (full, or LoRA with --lora)
so that it prefers each pair's chosen reply to its rejected one more than the reference does. The
reference is frozen: a copy of the base (full fine-tuning), the run given with --ref, or, with LoRA,
the policy itself with its adapters switched off (no second copy in memory). As TRL does by default,
the model's dropout is switched off: the log-ratios to the reference are then exact, and 0 at the start.
RUN2 is an ordinary run directory (config.json kind "dpo", tokenizer/, checkpoints/, best/ and with
LoRA adapter/), so load, generate, eval, export, `sft --base` and `train --init-from` use it unchanged.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qinglm import run_dir as run_dirs
from qinglm.device import autocast
from qinglm.errors import QingLMError
from qinglm.io import write_json_atomic
from qinglm.model.transformer import IGNORE_INDEX
from qinglm.post import dpo_data
from qinglm.post.config import DPOConfig
from qinglm.post.dpo_loss import dpo_loss, pair_logps, reference_logps
from qinglm.post.idioms_dpo import NAME as IDIOMS
from qinglm.post.idioms_dpo import idioms_dpo
from qinglm.sft.prep import load_examples, resolve_tuning
from qinglm.sft.stage import TuningStage, load_base
from qinglm.train import distributed
from qinglm.train.stage import EpochBatches, StepOut


def resolve_dpo(cfg: DPOConfig, max_seq_len: int) -> DPOConfig:
    """Return a copy of cfg with defaults filled in (lr 1e-4 full, 5e-4 LoRA; see resolve_tuning)."""
    # 10x below SFT's: on a tiny SFT'd model, 1e-3 full / 5e-3 LoRA pushed the held-out DPO loss above
    # log 2 within 100 steps, while 1e-4 / 5e-4 lowered it (held-out reward accuracy 57% / 56%).
    return resolve_tuning(cfg, max_seq_len, (1e-4, 5e-4), "dpo")


def load_pairs(cfg: DPOConfig, log: Callable[[str], None]) -> tuple[list, list]:
    """Return (train, held-out) preference pairs of cfg.data (see qinglm.sft.train.load_examples)."""
    return load_examples(cfg, IDIOMS, idioms_dpo, dpo_data.read_dpo_jsonl, "pairs", log)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Return model with every dropout (residual and attention) switched off, as TRL's DPO does."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):  # attention's dropout probability
            m.dropout = 0.0
    return model


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


class DPOStage(TuningStage):
    """Align cfg.base with DPO on preference pairs (cfg resolved by resolve_dpo)."""

    kind = "dpo"
    watch_spikes = False  # the loss is not a cross-entropy: its ratio to a running mean means nothing
    rows = "preference pairs (2 rows each)"

    def __init__(self, cfg: DPOConfig, log: Callable[[str], None] = print):
        from qinglm.tokenizer import Tokenizer

        if cfg.ref:  # before the slow part
            tokenizers = [
                Tokenizer.load(Path(r) / run_dirs.TOKENIZER).fingerprint() for r in (cfg.base, cfg.ref)
            ]
            if tokenizers[0] != tokenizers[1]:
                raise QingLMError(
                    f"--ref {cfg.ref} has another tokenizer than --base {cfg.base}; DPO compares the two "
                    "models' log-probabilities token by token, so give a reference with the same tokenizer"
                )
        super().__init__(cfg, *load_pairs(cfg, log), dpo_data.encode_pairs, log)
        self.last_val: dict[str, Any] = {}
        self._ref_val: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # held-out batch -> reference logps

    def build_model(self) -> nn.Module:
        cfg, device = self.cfg, self.ctx.device
        model = self.base_model()
        if cfg.ref:
            self.reference: nn.Module | None = _frozen(disable_dropout(load_base(cfg.ref, device)))
            if self.reference.cfg.vocab_size != model.cfg.vocab_size:
                raise QingLMError(f"--ref {cfg.ref} has another vocabulary size than --base {cfg.base}")
        else:  # LoRA: the policy with its adapters switched off is the reference
            self.reference = None if cfg.lora else _frozen(copy.deepcopy(disable_dropout(model)))
        # Last: the policy's dropout off includes LoRA's (--lora-dropout), which tune() adds.
        return disable_dropout(self.tune(model))

    def batches(self, cfg: DPOConfig) -> EpochBatches:
        def order(epoch: int) -> list[dpo_data.PairIds]:
            pairs = list(self.train)
            random.Random(cfg.seed + epoch).shuffle(pairs)
            return pairs

        n_tokens = sum(
            sum(t != IGNORE_INDEX for t in s.y) for p in self.train for s in (p.chosen, p.rejected)
        )
        return self.epoch_batches(
            cfg, order, lambda pairs: dpo_data.collate_pairs(pairs, self.tok.pad_id), n_tokens
        )

    def loss_units(self, batch: Any) -> int:
        return batch[0].size(0) // 2  # the loss is the mean over pairs: [chosen rows; rejected rows]

    def loss(self, forward: Any, model: nn.Module, batch: Any) -> StepOut:
        x, y = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        # The reference first: with LoRA it is this model, whose MoE layers keep the router losses of
        # their last forward, which must be the policy's.
        ref_chosen, ref_rejected = reference_logps(model, x, y, self.reference)
        policy_chosen, policy_rejected = pair_logps(forward(x), y)
        loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.cfg.beta)
        return StepOut(model.with_router_losses(loss), x.numel(), metrics)  # MoE: as pretraining and SFT

    @torch.no_grad()
    def held_out(self, model: nn.Module, batch_size: int = 16) -> dict[str, float]:
        """Return the held-out pairs' DPO loss, reward accuracy and margin (val_loss, val_rewards/...)."""
        was_training = model.training
        model.eval()
        sums = {"loss": 0.0, "rewards/accuracies": 0.0, "rewards/margins": 0.0}
        for i in range(0, len(self.val), batch_size):
            pairs = self.val[i : i + batch_size]
            x, y = (t.to(self.ctx.device) for t in dpo_data.collate_pairs(pairs, self.tok.pad_id))
            with autocast(self.ctx.device, self.ctx.dtype):
                if i not in self._ref_val:  # the reference is frozen: its log-probabilities never change
                    self._ref_val[i] = reference_logps(model, x, y, self.reference)
                loss, m = dpo_loss(*pair_logps(model(x), y), *self._ref_val[i], self.cfg.beta)
            for k, v in (("loss", loss), *((k, m[k]) for k in sums if k != "loss")):
                sums[k] += float(v) * len(pairs)
        model.train(was_training)
        return {f"val_{k}": v / len(self.val) for k, v in sums.items()}

    def validate(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        if not self.val:
            return None
        self.last_val = distributed.broadcast_object(self.ctx.dist, self.held_out(model))
        return self.last_val

    def header(self) -> list[str]:
        cfg, b = self.cfg, self._batches
        ref = cfg.ref or ("the base without adapters" if cfg.lora else "a frozen copy of the base")
        return [
            f"{len(self.train):,} preference pairs, {b.n_tokens:,} reply tokens, "
            f"{b.steps_per_epoch // b.grad_accum:,} steps per epoch ({cfg.batch_size} pairs = "
            f"{2 * cfg.batch_size} rows x up to {cfg.seq_len} tokens); {len(self.val):,} held-out pairs",
            f"DPO: beta {cfg.beta:g}, reference {ref}, dropout off",
        ]

    def finish(self, model: nn.Module, whole: nn.Module | None) -> dict[str, Any]:
        """Return the held-out figures after training; write adapter/ (LoRA) and dpo_results.json."""
        out, log, v = self.ctx.run_dir, self.ctx.log, self.last_val
        result: dict[str, Any] = {
            "out": str(out),
            "pairs": len(self.train),
            "held_out_pairs": len(self.val),
            "steps_per_epoch": self._batches.steps_for_epochs(1),
            "trainable_params": self.n_train,
            "total_params": self.n_total,
            **{k.removeprefix("val_"): x for k, x in v.items()},
        }
        if v:
            log(
                f"held-out pairs: DPO loss {v['val_loss']:.4f} (log 2 = {math.log(2):.4f} at the start), "
                f"reward accuracy {v['val_rewards/accuracies']:.1%}, margin {v['val_rewards/margins']:.4f}"
            )
        self.save_adapter(whole)
        if self.ctx.dist.is_main:
            write_json_atomic(out / "dpo_results.json", result)
        return result


def run_dpo(
    cfg: DPOConfig, log: Callable[[str], None] = print, flags: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return the run's figures (held-out DPO loss and reward accuracy, steps, ...) after DPO on the
    training engine. flags: the command-line fields given (for a --nproc launch)."""
    from qinglm.train.driver import run_stage_command

    cfg = resolve_dpo(cfg, run_dirs.model_config(cfg.base).max_seq_len if cfg.base else 0)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    res = run_stage_command("dpo", "dpo", cfg, flags or {}, lambda: DPOStage(cfg, log), log)
    if res:  # not the torchrun launcher, whose workers trained
        log(f"wrote {res['checkpoint']}" + (f" and {Path(cfg.out) / 'adapter'}" if cfg.lora else ""))
    return res
