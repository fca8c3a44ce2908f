"""The training metrics log: RUN/metrics.jsonl, one JSON object per line, plus optional extra sinks."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

from qinglm.io import atomic_open
from qinglm.run_dir import read_metrics as read_metrics  # the run directory's file, read where it is owned
from qinglm.tracking import MetricsSink as MetricsSink  # the sinks' interface, beside the sinks

TRAIN_KEYS = (
    "step",
    "loss",
    "lr",
    "tokens_per_s",
    "epoch",
    "tokens_seen",
    "elapsed_s",
    "grad_norm",
    "memory_mb",
)
VAL_KEYS = ("step", "val_loss", "val_ppl", "val_bpc")


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


def peak_memory_mb(device: Any = None) -> float:
    """Return the peak memory of training in MiB: CUDA max allocated on a CUDA device, else peak RSS."""
    if device is not None and getattr(device, "type", str(device)) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@functools.lru_cache(maxsize=4)
def _tokenizer(directory: str, mtime_ns: int) -> Any:
    from qinglm.tokenizer import Tokenizer

    return Tokenizer.load(directory)  # cached per (directory, file time): a rewritten tokenizer is reloaded


def sample_generations(
    model: Any, tokenizer_dir: str | Path, prompts: list[str], max_new_tokens: int, device: Any = None
) -> list[dict[str, str]]:
    """Return [{"prompt", "text"}]: greedy continuations of the prompts, logged at validation time.

    Empty when there is no tokenizer in tokenizer_dir or max_new_tokens is 0; a prompt longer than
    the model's context is left out.
    """
    from qinglm.config import SamplingConfig
    from qinglm.errors import QingLMError
    from qinglm.infer.generate import generate  # here: reading metrics must not need torch

    file = Path(tokenizer_dir) / "tokenizer.json"
    if max_new_tokens <= 0 or not prompts or not file.is_file():
        return []
    tokenizer = _tokenizer(str(tokenizer_dir), file.stat().st_mtime_ns)
    greedy = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)
    samples = []
    for prompt in prompts:
        try:
            samples.append(
                {"prompt": prompt, "text": generate(model, tokenizer, prompt, greedy, device=device)}
            )
        except QingLMError:
            continue  # longer than the context
    return samples
