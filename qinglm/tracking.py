"""Experiment trackers: TensorBoard, Weights & Biases and SwanLab sinks for the metrics log.

Every run writes RUN/metrics.jsonl; `--tracker` adds one of these sinks (MetricsSink,
below), which receives the same records: training lines (loss, lr, grad_norm,
tokens_per_s, memory_mb), validation lines (val_loss, val_ppl, val_bpc) and the greedy sample
generations logged at validation time. Each tracker's package is imported only when it is chosen,
so none of them is a dependency. wandb and swanlab run offline with WANDB_MODE=offline /
SWANLAB_MODE=offline (their own switches); TensorBoard is always local (RUN/tensorboard).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path
from typing import Any, Protocol

from qinglm.errors import QingLMError


class MetricsSink(Protocol):
    """Where metric records go besides metrics.jsonl (the seam for tensorboard / wandb)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


TRACKERS = ("none", "tensorboard", "wandb", "swanlab")
_SKIP = ("kind", "step")


def _require(module: str, package: str | None = None) -> Any:
    """Return the imported module, or raise QingLMError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise QingLMError(
            f"--tracker {package or module} needs the {package or module} package: "
            f"install with pip install {package or module}"
        ) from None


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """Return the numeric fields of a record as {"kind/name": value} (step and kind left out)."""
    kind = record.get("kind", "train")
    return {
        f"{kind}/{k}": float(v)
        for k, v in record.items()
        if k not in _SKIP and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _samples_markdown(samples: list[dict[str, str]]) -> str:
    """Return the validation samples as a small markdown table (prompt | continuation)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = [f"| {cell(s['prompt'])} | {cell(s['text'])} |" for s in samples]
    return "\n".join(["| prompt | continuation |", "|---|---|", *rows])


def _display_name(run_dir: Path) -> str:
    """Return the run's name in a tracker: its directory with the parent (sweep/trial-003, runs/my)."""
    return "/".join(run_dir.parts[-2:])


class TensorBoardSink:
    """Writes scalars (tag "train/loss", "val/val_bpc", ...) and sample text to RUN/tensorboard."""

    def __init__(self, run_dir: str | Path, start_step: int = 0):
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # A run resumed from the checkpoint of step N logs again from step N + 1: purge_step hides the
        # events an earlier session wrote after the checkpoint, and keeps those of step N itself.
        purge = start_step + 1 if start_step else None
        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if record.get("samples"):
            self.writer.add_text("samples", _samples_markdown(record["samples"]), step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Logs to Weights & Biases (project "qinglm", run named after the run directory)."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any]):
        self.wandb = _require("wandb")
        run_dir = Path(run_dir).resolve()
        self.run = self.wandb.init(
            project=os.environ.get("WANDB_PROJECT", "qinglm"),
            name=_display_name(run_dir),
            dir=str(run_dir),
            config=config,
            resume="allow",
            # one id per run directory: a resumed run continues the same wandb run
            id=hashlib.sha256(str(run_dir).encode("utf-8")).hexdigest()[:16],
        )

    def write(self, record: dict[str, Any]) -> None:
        values: dict[str, Any] = _scalars(record)
        if record.get("samples"):
            values["samples"] = self.wandb.Table(
                columns=["prompt", "continuation"], data=[[s["prompt"], s["text"]] for s in record["samples"]]
            )
        self.run.log(values, step=record.get("step", 0))

    def close(self) -> None:
        self.run.finish()


class SwanLabSink:
    """Logs to SwanLab (project "qinglm", logs under RUN/swanlog)."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any]):
        self.swanlab = _require("swanlab")
        run_dir = Path(run_dir).resolve()
        self.run = self.swanlab.init(
            project=os.environ.get("SWANLAB_PROJ_NAME", "qinglm"),
            experiment_name=_display_name(run_dir),
            config=config,
            logdir=str(run_dir / "swanlog"),
        )

    def write(self, record: dict[str, Any]) -> None:
        values: dict[str, Any] = _scalars(record)
        if record.get("samples"):
            values["samples"] = [self.swanlab.Text(s["text"], caption=s["prompt"]) for s in record["samples"]]
        self.swanlab.log(values, step=record.get("step", 0))

    def close(self) -> None:
        self.swanlab.finish()


def check_tracker(name: str) -> None:
    """Return nothing; raise QingLMError for an unknown tracker or one whose package is missing."""
    if name not in TRACKERS:
        raise QingLMError(f"unknown tracker {name!r}; choose one of {', '.join(TRACKERS)}")
    if name != "none":
        _require(name)


def make_trackers(
    name: str, run_dir: str | Path, config: dict[str, Any] | None = None, start_step: int = 0
) -> list[MetricsSink]:
    """Return the sinks for tracker `name` ("none" gives none); config is logged as hyperparameters."""
    check_tracker(name)
    if name == "tensorboard":
        return [TensorBoardSink(run_dir, start_step)]
    if name == "wandb":
        return [WandbSink(run_dir, config or {})]
    if name == "swanlab":
        return [SwanLabSink(run_dir, config or {})]
    return []
