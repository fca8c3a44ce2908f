"""Knowledge distillation as a stage of the engine: a student learns from a frozen teacher's distribution.

loss = (1 - alpha) * CE(student, data) + alpha * T^2 * KL(teacher_T || student_T), the KL over the
vocabulary at temperature T, averaged over the target tokens (Hinton et al. 2015; the T^2 keeps the
soft-target gradients' scale independent of T). alpha = 0 is ordinary pretraining, step for step.
The teacher runs frozen under no_grad and the run's autocast; it must share the student's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from qinglm import run_dir as run_dirs
from qinglm.errors import QingLMError
from qinglm.model.transformer import IGNORE_INDEX
from qinglm.post.config import DistillConfig
from qinglm.train.pretrain import PretrainStage
from qinglm.train.stage import StepOut


def check_teacher(cfg: DistillConfig) -> Path:
    """Return the teacher's tokenizer directory; refuse a missing teacher or another tokenizer in one line."""
    from qinglm.tokenizer import Tokenizer

    if not cfg.teacher:
        raise QingLMError("give the teacher run with --teacher RUN")
    tok_dir = Path(cfg.teacher) / run_dirs.TOKENIZER
    run_dirs.read_config(cfg.teacher)  # a run of any kind, or one clear line
    if cfg.tokenizer and Path(cfg.tokenizer).resolve() != tok_dir.resolve():
        if Tokenizer.load(cfg.tokenizer).fingerprint() != Tokenizer.load(tok_dir).fingerprint():
            raise QingLMError(
                f"the teacher {cfg.teacher} has another tokenizer than {cfg.tokenizer}; distillation "
                "compares distributions over the same tokens: drop --tokenizer to use the teacher's"
            )
    return tok_dir


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, t: float) -> torch.Tensor:
    """Return T^2 * KL(softmax(teacher/T) || softmax(student/T)) averaged over targets != IGNORE_INDEX."""
    keep = targets.reshape(-1) != IGNORE_INDEX
    s = F.log_softmax(student.float().flatten(0, -2)[keep] / t, dim=-1)
    p = F.log_softmax(teacher.float().flatten(0, -2)[keep] / t, dim=-1)
    kl = F.kl_div(s, p, log_target=True, reduction="sum") / max(int(keep.sum()), 1)
    return kl * t * t


class DistillStage(PretrainStage):
    """Pretraining of a student with the teacher's soft targets mixed into the loss."""

    kind = "distill"

    def __init__(self, model_cfg: Any, cfg: DistillConfig, data_dir: str | Path):
        super().__init__(model_cfg, cfg, data_dir)

    def build_model(self) -> nn.Module:
        from qinglm.sft.stage import load_base

        student = super().build_model()
        teacher = load_base(self.cfg.teacher, self.ctx.device)
        if teacher.cfg.vocab_size < student.cfg.vocab_size:
            raise QingLMError(
                f"the teacher has {teacher.cfg.vocab_size} tokens, the student {student.cfg.vocab_size}; "
                "use the teacher's tokenizer"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        t = sum(p.numel() for p in teacher.parameters()) / 1e6
        self.ctx.log(
            f"teacher: {self.cfg.teacher} ({t:.2f}M parameters), alpha {self.cfg.alpha}, T {self.cfg.temperature}"
        )
        return student

    def loss_units(self, batch: Any) -> int:
        return int((batch[1] != IGNORE_INDEX).sum())  # both terms are means over the target tokens

    def loss(self, forward: Any, model: nn.Module, batch: Any) -> StepOut:
        x, y = self.xy(batch)
        logits = forward(x)
        ce = model.loss_from_logits(logits, y)
        with torch.no_grad():  # not inference_mode: its tensors cannot be saved for the student's backward
            teacher = self.teacher(x)[..., : logits.size(-1)]  # a padded teacher vocabulary: its real ids
        kd = kd_loss(logits, teacher, y, self.cfg.temperature)
        a = self.cfg.alpha
        return StepOut((1 - a) * ce + a * kd, x.numel(), {"ce_loss": ce.detach(), "kd_loss": kd.detach()})

    def sections(self) -> dict[str, Any] | None:
        return None  # the pipeline writes config.json (model, distill, teacher, data_dir)
