"""Pretraining: the loop, its optimizer, lr schedule, checkpoints and metrics log."""

from qinglm.train.loop import train

__all__ = ["train"]
