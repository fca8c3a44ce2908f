"""What a training stage supplies to the one training engine (qinglm/train/loop.py).

The engine owns the loop: the optimizer step with accumulation, AMP and a GradScaler, clipping and the
non-finite skip; the lr schedule; validation, best/ and early stop; atomic checkpoints and exact resume
(data position, every RNG); SIGINT/SIGTERM; torchrun DDP/FSDP; compile; trackers, metrics.jsonl, the
progress bar, the time budget and the end-of-run line. A stage (pretraining, SFT, LoRA-SFT, DPO, GRPO,
distillation) supplies only what differs, by overriding the methods of Stage below.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qinglm.errors import QingLMError


@dataclass
class StepOut:
    """One micro-batch's result: the loss to minimise (a mean over the micro-batch), the tokens it
    trained on (this rank's), and extra scalar metrics (averaged over the step, logged as named)."""

    loss: torch.Tensor
    tokens: int
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StageContext:
    """What the engine tells a stage before it builds anything."""

    device: torch.device
    dtype: str  # fp32 | bf16 | fp16: the autocast precision
    dist: Any  # qinglm.train.distributed.Dist
    run_dir: Path
    log: Callable[[str], None]
    resuming: bool = False  # a checkpoint's weights will be loaded over build_model()'s


class Stage:
    """A training stage: override what differs from pretraining's defaults.

    kind          config.json's kind (qinglm.run_dir.KINDS): pretrain | sft | dpo | grpo | distill
    sections()    config.json's sections besides kind; None when the caller has written config.json
    tokenizer()   the tokenizer the engine saves as RUN/tokenizer (None: the run already holds it)
    build_model() the model to train with its weights loaded (a base run's), LoRA applied and frozen
                  parameters marked requires_grad=False; frozen helpers (a reference, a teacher) are
                  built here too. On --resume the engine then loads the checkpoint's weights over it.
    batches()     resumable micro-batches (EpochBatches, or data.loader.TrainBatches for token shards)
    begin_step()  called before each optimizer step with the 0-based step (after the step's seed is set)
    loss_units()  how many units (target tokens, pairs) a micro-batch's mean loss averages over; the
                  engine then weighs each micro-batch by its share of the step's units (None: equally)
    loss()        one micro-batch: forward(x) -> logits or forward(x, y) -> loss is the (wrapped,
                  maybe compiled) model, to be called once per micro-batch; model is the bare model
    validate()    held-out metrics named as logged, holding "val_loss" (lower is better: best/ and
                  --patience follow it); None when the stage has no held-out data
    inference_weights() what best/ and exports hold (LoRA: the merged weights)
    finish()      end-of-run extras (an adapter folder, held-out figures) -> merged into the result;
                  whole is the model unsharded on rank 0 (None elsewhere): what rank 0 alone may run
    state_dict()  what the stage measured that a resumed run must keep (the held-out figures before
                  training), saved in each checkpoint's state.json; load_state_dict() restores it
    """

    kind = "pretrain"
    watch_spikes = True  # the engine flags loss spikes (meaningless for losses near 0 or negative: RL)
    rows = "tokens"  # what a batch row is, for the header's batch line

    def batch_line(self, cfg: Any, global_batch: int, procs: str) -> str:
        """Return the header's line describing one optimizer step's batch."""
        if self.rows != "tokens":
            return f"batch: {cfg.batch_size} x {cfg.grad_accum} accum{procs} = {global_batch:,} {self.rows} per step"
        return (
            f"batch: {cfg.batch_size} x {cfg.grad_accum} accum{procs} x {cfg.seq_len} tokens = "
            f"{global_batch * cfg.seq_len:,} tokens per step"
        )

    def bind(self, ctx: StageContext) -> None:
        self.ctx = ctx

    def sections(self) -> dict[str, Any] | None:
        return None

    def tokenizer(self) -> Any:
        return None

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def batches(self, cfg: Any) -> Any:
        raise NotImplementedError

    def begin_step(self, step: int, total: int | None) -> None:
        pass

    def loss_units(self, batch: Any) -> int | None:
        """Return how many units the micro-batch's mean loss is taken over, or None when every
        micro-batch weighs the same (pretraining's full rows)."""
        return None

    def loss(self, forward: Callable, model: nn.Module, batch: Any) -> StepOut:
        x, y = (t.to(self.ctx.device, non_blocking=True) for t in batch)
        return StepOut(forward(x, y), x.numel())

    def validate(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        return None

    def val_line(self, v: dict[str, Any]) -> str:
        return " | ".join(
            f"{k.removeprefix('val_').replace('_', ' ')} {x:.4f}" for k, x in _floats(v).items()
        )

    def inference_weights(self, model: nn.Module) -> nn.Module:
        return model

    def finish(self, model: nn.Module, whole: nn.Module | None) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def header(self) -> list[str]:
        return []


def _floats(v: dict[str, Any]) -> dict[str, float]:
    return {k: x for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}


class EpochBatches:
    """Micro-batches of a list of examples, epoch after epoch, each epoch in its own (seeded) order.

        items_for_epoch(e) returns epoch e's examples in the order steps take them; collate(list) makes a
        micro-batch. Every optimizer step takes the next batch_size x grad_accum x world_size examples (the
        global batch); micro-batch m of rank r is the (m * world_size + r)-th slice of batch_size in it, as
        data.loader.TrainBatches does. An epoch's last, partial global batch is filled from the start of the
        same epoch where a micro-batch would otherwise be empty (its last non-empty one may be short), so
    every example is trained on once per epoch (on one process) and all ranks stay in step.
    """

    HOLD_AHEAD = 3  # epochs after the current one whose examples are kept once built (memory vs time)

    def __init__(
        self,
        items_for_epoch: Callable[[int], Sequence[Any]],
        collate: Callable[[list[Any]], Any],
        batch_size: int,
        *,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        n_tokens: int = 0,
    ):
        self.items_for_epoch, self.collate = items_for_epoch, collate
        self.batch_size, self.grad_accum = batch_size, max(1, grad_accum)
        self.rank, self.world_size, self.n_tokens = rank, world_size, n_tokens
        self.epoch, self.position = 0, 0  # micro-batches served by this rank in the current epoch
        # Epochs built and not yet trained past (steps_for_epochs builds the run's epochs ahead: up to
        # HOLD_AHEAD after the current one are kept to be built once), and every epoch's count.
        self._built: dict[int, Sequence[Any]] = {}
        self._counts: dict[int, int] = {}
        self.n_items = len(self._items())
        if self.n_items == 0:
            raise QingLMError("no training examples")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    def _items(self, epoch: int | None = None) -> Sequence[Any]:
        epoch = self.epoch if epoch is None else epoch
        items = self._built.get(epoch)
        if items is None:
            items = self.items_for_epoch(epoch)
            self._counts[epoch] = len(items)
            if self.epoch <= epoch <= self.epoch + self.HOLD_AHEAD:
                self._built[epoch] = items
        for e in [e for e in self._built if e < self.epoch]:  # trained past: never needed again
            del self._built[e]
        return items

    def _steps(self, epoch: int) -> int:
        """Return the optimizer steps of epoch (its examples may vary: packed rows, for instance)."""
        n = self._counts[epoch] if epoch in self._counts else len(self._items(epoch))
        return max(1, math.ceil(n / self.global_batch))

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches of this rank in the current epoch."""
        return self._steps(self.epoch) * self.grad_accum

    def steps_for_epochs(self, num_epochs: float) -> int:
        """Return the optimizer steps of the first num_epochs epochs (a fraction of the last rounded up)."""
        whole = int(num_epochs)
        steps = sum(self._steps(e) for e in range(whole))
        if num_epochs > whole:
            steps += math.ceil((num_epochs - whole) * self._steps(whole))
        return max(1, steps)

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> Any:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        items = self._items()
        start = (self.position * self.world_size + self.rank) * self.batch_size
        self.position += 1
        if start < len(items):  # the epoch's last micro-batch may be short
            return self.collate(list(items[start : start + self.batch_size]))
        return self.collate([items[(start + i) % len(items)] for i in range(self.batch_size)])

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "done": self.position * self.world_size * self.batch_size,  # examples over all ranks
            "n_items": self.n_items,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n_items"] != self.n_items:
            raise QingLMError(
                f"cannot resume the data order: the run had {state['n_items']} examples per epoch, now "
                f"{self.n_items}; resume with the same data and settings, or start a new run"
            )
        old = state["batch_size"] * state["grad_accum"] * state["world_size"]
        if old != self.global_batch:
            raise QingLMError(
                f"cannot resume the data order: the global batch was {old}, now {self.global_batch}; "
                f"resume with --batch-size/--grad-accum giving {old}"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["done"]) // (self.world_size * self.batch_size)
