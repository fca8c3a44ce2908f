"""The configs of the post-training stages, built from the shared parts (qinglm/train/config.py); no
torch here, so the command line builds without it."""

from __future__ import annotations

from dataclasses import dataclass

from qinglm.config import _f
from qinglm.errors import QingLMError
from qinglm.train.config import TrainConfig


@dataclass
class DistillConfig(TrainConfig):
    """Pretraining a student (its size from --preset and the model flags) against a teacher run."""

    teacher: str = _f("", "the teacher run directory (any kind); its tokenizer is the student's")
    alpha: float = _f(0.5, "weight of the distillation loss; 1 - alpha weighs the ordinary next-token loss")
    temperature: float = _f(2.0, "softmax temperature of both distributions in the distillation loss")

    def check(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise QingLMError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise QingLMError(f"temperature must be positive, got {self.temperature}")
