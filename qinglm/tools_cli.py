"""The `qinglm plot` and `qinglm sweep` subcommands (their parsers live beside their code)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], Any]]:
    """Return the handlers of `plot` and `sweep` after adding their parsers to sub."""
    from qinglm import plot, sweep

    return {**plot.register(sub), **sweep.register(sub)}
