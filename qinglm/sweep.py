"""Hyperparameter search (`qinglm sweep`, qinglm.sweep_cli) with Optuna (TPE sampler, median pruner).

The space file (YAML or JSON) maps TrainConfig / ModelConfig field names to ranges:

    lr: {low: 1.0e-4, high: 3.0e-3, log: true}
    warmup_steps: {low: 0, high: 200}
    batch_size: {choices: [8, 16, 32]}
    dropout: {choices: [0.0, 0.1]}

Integer fields draw integers, float fields floats, `choices` one of the values. Every trial is a
normal run directory SWEEP/trial-000, ... trained with the same tokenizer and prepared data, for the
per-trial budget (--max-steps / --max-time). Validation losses are reported to Optuna as the trial
runs, so unpromising trials are stopped early. The sweep writes results.jsonl (one line per trial),
results.md (a table, best first) and best_config.json, a config file for `qinglm train --config`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, get_type_hints

from qinglm.config import ModelConfig
from qinglm.errors import QingLMError
from qinglm.io import OwnedDir, claim_file
from qinglm.train.config import TrainConfig

SWEEP_NAMES = ("results.md", "best_config.json", "tokenizer", "data")  # what a sweep writes beside its trials
PRUNERS = ("median", "none")  # Optuna's MedianPruner, or no pruning
# Fields that decide the data, the tokenizer or the run's bookkeeping, not what is learnt.
NOT_SEARCHABLE = {
    "data", "tokenizer", "out", "resume", "vocab_size", "max_steps", "max_time", "num_epochs", "device",
    "tracker", "encoding", "nfkc", "text_field", "val_fraction", "sample_prompts", "preset", "eval_tokens",
    "eval_every", "log_every", "save_every", "keep_checkpoints", "num_threads", "split_by", "split_block",
    "pre_tokenizer",
}  # fmt: skip


# ---------------------------------------------------------------------------- the search space


def _field_types() -> dict[str, tuple[type, Any]]:
    """Return field name -> (config class, base type) for every TrainConfig and ModelConfig field."""
    from qinglm.config import _base_type

    types = {}
    for cls in (TrainConfig, ModelConfig):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            types[f.name] = (cls, _base_type(hints[f.name]))
    return types


def load_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Return the checked search space of a YAML/JSON file: {field: {"choices": [...]} or {"low", "high", ...}}."""
    from qinglm.config import load_config_file

    raw = load_config_file(path)
    if not raw:
        raise QingLMError(f"search space {path} is empty; give ranges such as lr: {{low: 1e-4, high: 3e-3}}")
    types = _field_types()
    space = {}
    for name, spec in raw.items():
        key = str(name).replace("-", "_")
        if key not in types:
            raise QingLMError(
                f"unknown parameter {name!r} in {path}; use TrainConfig/ModelConfig field names "
                "such as lr, warmup_steps, batch_size, dropout, weight_decay"
            )
        if key in NOT_SEARCHABLE:
            raise QingLMError(f"{name!r} in {path} cannot be searched; set it with a flag for every trial")
        space[key] = _check_range(key, spec, types[key][1], path)
    return space


def _check_range(name: str, spec: Any, tp: type, path: str | Path) -> dict[str, Any]:
    """Return spec after checking it is {"choices": [...]} or numeric {"low", "high"[, "log", "step"]}."""
    where = f"{path}: {name}"
    if not isinstance(spec, dict):
        raise QingLMError(f"{where} must be a mapping like {{low: 1, high: 2}} or {{choices: [...]}}")
    if "choices" in spec:
        if not isinstance(spec["choices"], list) or not spec["choices"] or set(spec) != {"choices"}:
            raise QingLMError(f"{where}: choices must be a non-empty list and stand alone")
        return {"choices": spec["choices"]}
    if tp not in (int, float):
        raise QingLMError(f"{where} is not numeric; give it as {{choices: [...]}}")
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown or not {"low", "high"} <= set(spec):
        raise QingLMError(f"{where} needs low and high (and optionally log, step); got {', '.join(spec)}")
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low > high:
        raise QingLMError(f"{where}: low and high must be numbers with low <= high, got {low} and {high}")
    if spec.get("log") and low <= 0:
        raise QingLMError(f"{where}: a log range needs low > 0, got {low}")
    return {"low": tp(low), "high": tp(high), "log": bool(spec.get("log", False)), "step": spec.get("step")}


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Return {field: value} drawn by an Optuna trial from the space."""
    types = _field_types()
    params = {}
    for name, spec in space.items():
        tp = types[name][1]
        if "choices" in spec:
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif tp is int:
            step = int(spec["step"] or 1)
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], step=step, log=spec["log"])
        else:
            params[name] = trial.suggest_float(
                name, spec["low"], spec["high"], step=spec["step"], log=spec["log"]
            )
    return params


# ---------------------------------------------------------------------------- trials


class _PruningSink:
    """A metrics sink that reports each validation loss to the trial and stops it when pruned."""

    def __init__(self, trial: Any):
        self.trial = trial
        self.last: float | None = None  # the last validation loss reported

    def write(self, record: dict[str, Any]) -> None:
        import optuna

        loss = record.get("val_loss")
        if record.get("kind") == "val" and isinstance(loss, float) and math.isfinite(loss):
            self.trial.report(loss, record["step"])
            self.last = loss
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {record['step']} (val loss {loss:.4f})")

    def close(self) -> None:
        pass


def _prepare_shared(model: ModelConfig, train: TrainConfig, out: Path, log: Any) -> tuple[Any, Path]:
    """Return (tokenizer, prepared data dir) shared by every trial, made once under out if needed."""
    from qinglm.pipeline import is_prepared, prepare_data, train_tokenizer_on
    from qinglm.tokenizer import Tokenizer

    if train.tokenizer:
        tokenizer = Tokenizer.load(train.tokenizer)
    elif (out / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(out / "tokenizer")
    elif len(train.data) == 1 and is_prepared(train.data[0]):
        raise QingLMError("prepared data needs the tokenizer it was made with: pass --tokenizer DIR")
    else:
        tokenizer = train_tokenizer_on(train.data, model.vocab_size, out / "tokenizer", train, log)
    if len(train.data) == 1 and is_prepared(train.data[0]):
        return tokenizer, Path(train.data[0])
    if not is_prepared(out / "data"):
        prepare_data(train.data, tokenizer, out / "data", train, log)
    return tokenizer, out / "data"


def _run_trial(
    trial: Any, space: dict, base: tuple[ModelConfig, TrainConfig], tokenizer: Any, data_dir: Path, out: Path
) -> dict[str, Any]:
    """Return the record of one trial (state complete, pruned or failed) after training it in out/trial-NNN."""
    import optuna

    from qinglm import run_dir as run_dirs
    from qinglm.config import resolve_model, to_dict
    from qinglm.io import write_text_atomic
    from qinglm.train import train
    from qinglm.train.config import check_train

    params = suggest(trial, space)
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    run_dir = out / f"trial-{trial.number:03d}"
    model_cfg = dataclasses.replace(base[0], **{k: v for k, v in params.items() if k in model_names})
    model_cfg.vocab_size = tokenizer.vocab_size
    train_cfg = dataclasses.replace(
        base[1], **{k: v for k, v in params.items() if k not in model_names}, out=str(run_dir)
    )
    record: dict[str, Any] = {"trial": trial.number, "params": params, "run_dir": str(run_dir)}
    sink, lines, t0 = _PruningSink(trial), [], time.perf_counter()
    try:
        model_cfg = resolve_model(model_cfg)
        check_train(train_cfg, model_cfg)
        config = {"model": to_dict(model_cfg), "train": to_dict(train_cfg)}
        with run_dirs.writing(run_dir):
            tokenizer.save(run_dir / "tokenizer")
            run_dirs.write_config(run_dir, "pretrain", {**config, "data_dir": str(data_dir)})
            result = train(model_cfg, train_cfg, run_dir, data_dir, log=lines.append, sinks=[sink])
    except optuna.TrialPruned as e:
        record.update(state="pruned", note=str(e), value=sink.last)
    except QingLMError as e:  # an impossible combination, e.g. n_heads that does not divide d_model
        record.update(state="failed", note=str(e), value=None)
    else:
        best = result["best_val_loss"]
        record.update(
            state="complete",
            value=best if best is not None else result["train_loss"],
            val_bpc=result["val_bpc"],
            steps=result["step"],
            stop_reason=result["stop_reason"],
            config=config,
        )
    record["elapsed_s"] = round(time.perf_counter() - t0, 2)
    if run_dir.is_dir():
        write_text_atomic(claim_file(run_dir / "train.log"), "\n".join(lines) + "\n")
    return record


# ---------------------------------------------------------------------------- the sweep


def run_sweep(
    space_file: str | Path,
    trials: int,
    model_flags: dict[str, Any],
    train_flags: dict[str, Any],
    config_file: str | None = None,
    *,
    pruner: str = "median",
    log: Any = print,
) -> dict[str, Any]:
    """Return the best trial's record after running the search and writing results and best_config.json."""
    try:
        import optuna
    except ImportError:
        raise QingLMError("qinglm sweep needs optuna: install with pip install optuna") from None
    from qinglm.config import load_config_file
    from qinglm.pipeline import build_configs
    from qinglm.train.config import split_sections

    if trials < 1:
        raise QingLMError(f"--trials must be at least 1, got {trials}")
    space = load_space(space_file)
    file_train = split_sections(load_config_file(config_file))[1] if config_file else {}
    if not any(k in {**file_train, **train_flags} for k in ("max_steps", "max_time", "num_epochs")):
        raise QingLMError("give every trial a budget: --max-steps N or --max-time MINUTES")
    if not train_flags.get("out"):
        raise QingLMError("give the sweep a directory: --out DIR")
    base = build_configs(model_flags, train_flags, config_file)
    out = Path(base[1].out)
    if any(out.glob("trial-*")):
        raise QingLMError(f"{out} already holds trials; choose another --out")
    try:  # a folder QingLM did not write is refused unless --overwrite (trials claim their own folders)
        owned = OwnedDir.claim(out, "sweep", SWEEP_NAMES, overwrite=base[1].overwrite)
    except OSError as e:
        raise QingLMError(f"cannot create sweep directory {out}: {e.strerror}") from None
    try:
        tokenizer, data_dir = _prepare_shared(*base, out, log)
    except BaseException:
        owned.release_unused()  # nothing written: the folder is not claimed
        raise

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A trial is compared with the median of earlier ones from its second validation on: the first
    # comes so early (often still in warmup) that it mostly favours the highest learning rate.
    median = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=base[1].eval_every + 1)
    study = optuna.create_study(
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=base[1].seed),
        pruner=median if pruner == "median" else optuna.pruners.NopPruner(),
    )
    records: list[dict[str, Any]] = []

    def objective(trial: Any) -> float:
        rec = _run_trial(trial, space, base, tokenizer, data_dir, out)
        records.append(rec)
        _write_results(out, records)
        log(_trial_line(rec))
        if rec["state"] == "pruned":
            raise optuna.TrialPruned()
        if rec["state"] == "failed" or rec["value"] is None or not math.isfinite(rec["value"]):
            return float("inf")
        if rec.get("stop_reason") == "interrupted":
            trial.study.stop()
        return rec["value"]

    study.optimize(objective, n_trials=trials, catch=())
    done = [
        r
        for r in records
        if r["state"] == "complete" and r["value"] is not None and math.isfinite(r["value"])
    ]
    if not done:
        raise QingLMError(f"no trial completed (see {out}/results.md); widen the space or raise the budget")
    best = min(done, key=lambda r: r["value"])
    best_config = {"model": best["config"]["model"], "train": _portable(best["config"]["train"], base[1])}
    from qinglm.io import write_json_atomic

    write_json_atomic(out / "best_config.json", best_config)
    log(f"best: trial {best['trial']} (val loss {best['value']:.4f}) -> {out / 'best_config.json'}")
    return best


def _portable(train: dict[str, Any], base: TrainConfig) -> dict[str, Any]:
    """Return a trial's train config made reusable: the original data and tokenizer, no run directory."""

    from qinglm.data.builtin import is_builtin

    def absolute(spec: str) -> str:  # so the file works from any directory; corpus names stay names
        return spec if is_builtin(spec) or not Path(spec).exists() else str(Path(spec).resolve())

    cfg = {k: v for k, v in train.items() if k not in ("out", "resume")}
    cfg.update(data=[absolute(d) for d in base.data], tokenizer=base.tokenizer and absolute(base.tokenizer))
    return cfg


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _trial_line(rec: dict[str, Any]) -> str:
    params = " ".join(f"{k}={_fmt(v)}" for k, v in rec["params"].items())
    if rec["state"] == "complete":
        outcome = f"best val loss {_fmt(rec['value'])} ({rec['steps']} steps)"
    else:
        outcome = f"{rec['state']}: {rec['note']}"
    return f"trial {rec['trial']:3d} | {params} | {outcome} | {rec['elapsed_s']:.1f}s"


def _write_results(out: Path, records: list[dict[str, Any]]) -> None:
    """Return nothing; rewrite results.jsonl and results.md (best first) from all finished trials."""
    from qinglm.io import write_text_atomic

    write_text_atomic(
        out / "results.jsonl",
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "config"}, ensure_ascii=False) + "\n"
            for r in records
        ),
    )
    names = list(dict.fromkeys(k for r in records for k in r["params"]))
    order = sorted(
        records, key=lambda r: (r["state"] != "complete", r["value"] if r["value"] is not None else math.inf)
    )
    head = ["trial", "state", "val loss", "val bpc", "steps", "time (s)", *names]
    rows = [
        [
            f"{r['trial']:03d}",
            r["state"],
            _fmt(r["value"]),
            _fmt(r.get("val_bpc")),
            _fmt(r.get("steps")),
            _fmt(r["elapsed_s"]),
            *(_fmt(r["params"].get(n)) for n in names),
        ]
        for r in order
    ]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]
    write_text_atomic(out / "results.md", "# Sweep results (best first)\n\n" + "\n".join(table) + "\n")
