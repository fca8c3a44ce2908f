"""The training engine (loop.py) and its parts; `train` is imported lazily so that the configs
(qinglm.train.config) load without torch."""

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from qinglm.train.loop import train

        return train
    raise AttributeError(name)
