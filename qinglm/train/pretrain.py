"""Pretraining as a stage of the engine: next-token loss on prepared token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from qinglm.config import ModelConfig
from qinglm.data.loader import TrainBatches
from qinglm.data.mix import MixedBatches, parse_mixture, train_shards
from qinglm.data.shards import TokenShards
from qinglm.errors import QingLMError
from qinglm.memory import allocating
from qinglm.model.transformer import Transformer
from qinglm.train import distributed
from qinglm.train.checkpoint import inference_weights, load_model_weights
from qinglm.train.config import TrainConfig
from qinglm.train.metrics import sample_generations
from qinglm.train.schedule import parse_seq_len_schedule, seq_len_at
from qinglm.train.stage import Stage, StepOut


class PretrainStage(Stage):
    """Random (or --init-from) weights trained on the prepared data in data_dir."""

    kind = "pretrain"

    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data_dir: str | Path):
        self.model_cfg, self.cfg, self.data_dir = model_cfg, cfg, data_dir
        self.seq_stages = parse_seq_len_schedule(cfg.seq_len_schedule, cfg.seq_len)
        self.row_len = cfg.seq_len

    def build_model(self) -> nn.Module:
        self.train_data, self.val_data = self._load_data()
        with allocating(self.model_cfg):
            model = Transformer(self.model_cfg).to(self.ctx.device)
        if self.cfg.init_from and not self.ctx.resuming:  # continued pretraining: another run's weights
            load_model_weights(model, inference_weights(self.cfg.init_from))
            self.ctx.log(f"starting from the weights of {self.cfg.init_from}")
        return model

    def _load_data(self) -> tuple[TokenShards, TokenShards | None]:
        """Return (train (a mixture's first source), val or None) shards after checking they fit the
        model's vocabulary and the run's tokenizer."""
        run_dir, data_dir = self.ctx.run_dir, self.data_dir
        train = TokenShards(data_dir, mix.splits[0] if (mix := parse_mixture(self.cfg.data)) else "train")
        has_tokenizer = (run_dir / "tokenizer" / "tokenizer.json").is_file()
        # A model may have more ids than its tokenizer (a padded vocabulary) when the run's tokenizer
        # proves which one the data was made with.
        padded = has_tokenizer and train.vocab_size < self.model_cfg.vocab_size
        if train.vocab_size != self.model_cfg.vocab_size and not padded:
            raise QingLMError(
                f"{data_dir} was prepared with a {train.vocab_size}-token vocabulary but the model has "
                f"vocab_size {self.model_cfg.vocab_size}; prepare the data with the model's tokenizer"
            )
        if has_tokenizer:
            from qinglm.tokenizer import Tokenizer

            train.check_tokenizer(Tokenizer.load(run_dir / "tokenizer"))
        try:
            return train, TokenShards(data_dir, "val")
        except QingLMError:
            self.ctx.log(f"no 'val' split in {data_dir}: training without validation (no best/ weights)")
            return train, None

    def batches(self, cfg: TrainConfig) -> TrainBatches | MixedBatches:
        dist = self.ctx.dist
        mix = parse_mixture(cfg.data)
        layout = dict(seed=cfg.seed, rank=dist.rank, world_size=dist.world_size, grad_accum=cfg.grad_accum)
        if mix is None:
            self._batches = TrainBatches(self.train_data, cfg.batch_size, cfg.seq_len, **layout)
        else:
            sources = train_shards(self.data_dir, cfg.data)
            self._batches = MixedBatches(sources, mix.weights, cfg.batch_size, cfg.seq_len, **layout)
        return self._batches

    def begin_step(self, step: int, total: int | None) -> None:
        self.row_len = seq_len_at(self.seq_stages, step, total, self.cfg.seq_len)

    def xy(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the micro-batch's (x, y) on the device, cut into rows of the current row length."""
        x, y = batch
        if self.row_len < x.size(1):  # progressive sequence length: shorter rows, same tokens and targets
            x, y = x.reshape(-1, self.row_len), y.reshape(-1, self.row_len)
        return x.to(self.ctx.device, non_blocking=True), y.to(self.ctx.device, non_blocking=True)

    def loss(self, forward: Any, model: nn.Module, batch: Any) -> StepOut:
        x, y = self.xy(batch)
        return StepOut(forward(x, y), x.numel())

    def validate(self, model: nn.Module, step: int) -> dict[str, Any] | None:
        if self.val_data is None:
            return None
        from qinglm.evaluate import evaluate_shards

        cfg = self.cfg
        v = evaluate_shards(
            model,
            self.val_data,
            batch_size=cfg.batch_size,
            seq_len=cfg.seq_len,
            device=self.ctx.device,
            dtype=self.ctx.dtype,
            max_tokens=cfg.eval_tokens or None,
        )
        v = distributed.broadcast_object(self.ctx.dist, v)  # every rank evaluated; all follow rank 0's
        samples = sample_generations(
            model, self.ctx.run_dir / "tokenizer", cfg.sample_prompts, cfg.sample_tokens, self.ctx.device
        )
        return {"val_loss": v["loss"], "val_ppl": v["ppl"], "val_bpc": v["bpc"], "samples": samples}

    def val_line(self, v: dict[str, Any]) -> str:
        return f"val loss {v['val_loss']:.4f} | ppl {v['val_ppl']:.2f} | bpc {v['val_bpc']:.4f}"

    def header(self) -> list[str]:
        b = self._batches
        mix = (
            [
                f"{s} {w:.0%} of rows ({t.n_tokens:,} tokens)"
                for s, w, t in zip(parse_mixture(self.cfg.data).sources, b.weights, b.tables)
            ]
            if isinstance(b, MixedBatches)
            else []
        )
        steps = max(1, b.steps_per_epoch // self.cfg.grad_accum)
        val = self.val_data.n_tokens if self.val_data else 0
        return [
            f"tokens: {b.n_tokens:,} train / {val:,} val; {steps:,} steps per epoch",
            *(["mixture: " + " | ".join(mix)] if mix else []),
        ]
