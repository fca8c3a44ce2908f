"""The run directory's contract: its paths, config.json and its kind, the overwrite guard and the lock.

A run directory holds config.json ({"kind", "model", ...the sections of its kind}), tokenizer/, best/,
checkpoints/, metrics.jsonl and, when the run prepared its own data, data/. Its manifest
(.qinglm-manifest.json, see qinglm.io.OwnedDir) lists the names QingLM may replace or delete there;
whatever else the directory holds is the user's. A run being written is locked (.qinglm.lock).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qinglm.config import ModelConfig, from_dict
from qinglm.errors import QingLMError
from qinglm.io import LOCK_FILE, OwnedDir, exclusive_lock, read_json, write_json_atomic

CONFIG, TOKENIZER, BEST, CHECKPOINTS, DATA = "config.json", "tokenizer", "best", "checkpoints", "data"
METRICS = "metrics.jsonl"
# What writes each kind of run; its config.json holds "model" plus these sections.
KINDS = {
    "pretrain": ("train",),
    "sft": ("sft", "base"),
    "dpo": ("dpo", "base"),
    "grpo": ("grpo", "base"),
    "distill": ("distill", "teacher"),
    "import": (),
    "merge": ("merged_from",),
}
# Every name a run of any kind writes at its top level (trackers' folders included).
RUN_NAMES = (
    CONFIG, TOKENIZER, BEST, CHECKPOINTS, DATA, METRICS, LOCK_FILE,
    "adapter", "sft_results.json", "dpo_results.json", "grpo_results.json", "distill_results.json",
    "tensorboard", "wandb", "swanlog", "report.md", "report", "eval_results.json",
)  # fmt: skip
# Set by a process that holds a run's lock for the processes it starts (torchrun workers).
LOCK_HELD_ENV = "QINGLM_RUN_LOCK_HELD"


def _legacy_run(path: Path) -> list[str] | None:
    """Return the QingLM names in a run written before manifests existed, or None if path is no run."""
    try:
        config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(config, dict) and isinstance(config.get("model"), dict)):
        return None
    if not (path / TOKENIZER / "tokenizer.json").is_file():
        return None
    return [name for name in RUN_NAMES if (path / name).exists()]


def claim(path: str | Path, overwrite: bool = False, kind: str | None = None) -> OwnedDir:
    """Return run directory path (created if needed) as a QingLM run; refuse someone else's directory.

    A directory of an older QingLM run is recognised; any other non-empty directory needs overwrite.
    With kind, a directory that already holds a run of another kind is refused too.
    """
    try:
        owned = OwnedDir.claim(path, "run", RUN_NAMES, overwrite=overwrite, legacy=_legacy_run)
    except OSError as e:  # not a directory, no permission, a read-only or full disk
        raise QingLMError(f"cannot write to run directory {path}: {e.strerror or e}") from None
    try:
        if kind is not None and (Path(path) / CONFIG).is_file():
            found = read_config(path)["kind"]
            if found != kind:
                raise QingLMError(
                    f"{path} holds a run of kind {found!r}; write this {kind} run to another directory"
                )
    except QingLMError:
        owned.release_unused()  # a refused directory is left as it was found
        raise
    return owned


@contextlib.contextmanager
def writing(path: str | Path, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Claim and lock run directory path for this process (and the processes it starts) while the block runs.

    Under torchrun only rank 0 claims and locks: the other ranks write nothing into the run.
    """
    path = Path(path)
    if os.environ.get("RANK", "0") != "0":
        yield path
        return
    owned = claim(path, overwrite, kind)
    held_by_parent = os.environ.get(LOCK_HELD_ENV) == str(path.resolve())
    lock = contextlib.nullcontext() if held_by_parent else exclusive_lock(path)
    try:
        with lock:
            owned.remove_leftovers()  # temp files of a killed writer (best.tmp-PID, .config.json.tmp-PID-...)
            old = os.environ.get(LOCK_HELD_ENV)
            os.environ[LOCK_HELD_ENV] = str(path.resolve())
            try:
                yield path
            finally:
                if old is None:
                    os.environ.pop(LOCK_HELD_ENV, None)
                else:
                    os.environ[LOCK_HELD_ENV] = old
    except BaseException:
        owned.release_unused()  # a run that failed before writing anything does not claim the directory
        raise


def holds_run(path: str | Path) -> bool:
    """Return whether path already holds a run (its config.json or checkpoints)."""
    path = Path(path)
    return (path / CONFIG).exists() or any((path / CHECKPOINTS).glob("step-*"))


def write_config(path: str | Path, kind: str, sections: dict[str, Any]) -> None:
    """Return nothing; write RUN/config.json as {"kind": kind, **sections} (sections holds "model")."""
    if kind not in KINDS:
        raise ValueError(f"unknown run kind {kind!r}")
    missing = [s for s in ("model", *KINDS[kind]) if s not in sections]
    if missing:
        raise ValueError(f"a {kind} run's config.json needs {', '.join(missing)}")
    path = Path(path)
    owned = OwnedDir.read(path)
    if owned is None or not owned.owns(CONFIG):
        raise ValueError(f"{path} is not claimed as a run directory; call run_dir.claim first")
    write_json_atomic(path / CONFIG, {"kind": kind, **sections})


def read_config(path: str | Path) -> dict[str, Any]:
    """Return RUN/config.json with its "kind" (inferred for runs written before kinds were recorded)."""
    path = Path(path)
    config = read_json(path / CONFIG, f"{path} has no {CONFIG}; is it a QingLM run directory?")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise QingLMError(f"{path / CONFIG} has no 'model' section; is it a QingLM run directory?")
    if "kind" not in config:
        guess = [k for k in ("sft", "merge", "pretrain") if all(s in config for s in KINDS[k])]
        config["kind"] = guess[0] if guess else "import"
    return config


def model_config(path: str | Path) -> ModelConfig:
    """Return the model config of a run of any kind."""
    return from_dict(ModelConfig, read_config(path)["model"], "model config")


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
