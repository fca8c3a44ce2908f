"""The training metrics log: RUN/metrics.jsonl, one JSON object per line, plus optional extra sinks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

from qinglm.io import atomic_open

TRAIN_KEYS = ("step", "loss", "lr", "tokens_per_s", "epoch", "tokens_seen", "elapsed_s", "grad_norm")
VAL_KEYS = ("step", "val_loss", "val_ppl", "val_bpc")


class MetricsSink(Protocol):
    """Where metric records go besides metrics.jsonl (the seam for tensorboard / wandb)."""

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; a diverged loss is logged as null rather than producing an unreadable line.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item"):  # numpy / torch scalars
        return _clean(v.item())
    return v


class MetricsLogger:
    """Appends records to RUN/metrics.jsonl, flushing every line so a crash loses at most the last one.

    Appending is not a temp-file-and-rename write: a reader may see a partial final line and should
    skip lines that do not parse (read_metrics does). truncate_after() rewrites the file atomically.
    """

    def __init__(self, run_dir: str | Path, sinks: list[MetricsSink] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sinks = list(sinks or [])
        self._f = None

    def add_sink(self, sink: MetricsSink) -> None:
        self.sinks.append(sink)

    def log(self, kind: str, **values: Any) -> dict[str, Any]:
        """Return the record {"kind": kind, **values} after appending it to metrics.jsonl and the sinks."""
        record = {"kind": kind, **{k: _clean(v) for k, v in values.items()}}
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")  # kept open for the whole run
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        for sink in self.sinks:
            sink.write(record)
        return record

    def truncate_after(self, step: int) -> None:
        """Return nothing; drop records of steps after `step` (a resumed run redoes them), rewriting the file atomically."""
        if not self.path.is_file():
            return
        self._close_file()
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with atomic_open(self.path) as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)

    def _close_file(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def close(self) -> None:
        self._close_file()
        for sink in self.sinks:
            sink.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Return the records of a metrics.jsonl file (or a run directory), skipping lines that do not parse."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    records = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    return records
