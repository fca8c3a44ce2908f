"""qinglm sweep: an Optuna search over a declared space, each trial a normal run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qinglm.errors import QingLMError
from qinglm.sweep import _PruningSink, load_space

optuna = pytest.importorskip("optuna")

TINY = [
    "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--vocab-size", "300", "--seq-len", "16",
    "--max-seq-len", "32", "--eval-every", "2", "--eval-tokens", "256", "--save-every", "100",
    "--log-every", "2", "--sample-tokens", "3", "--device", "cpu", "--dtype", "fp32", "--no-compile",
    "--num-threads", "1",
]  # fmt: skip


def qinglm(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qinglm", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from qinglm.data.builtin import builtin_documents

    path = tmp_path_factory.mktemp("data") / "news.txt"
    path.write_text("\n".join(builtin_documents("pd1998")[:200]) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_three_trials_write_results_and_a_reusable_best_config(corpus, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "lr: {low: 1.0e-4, high: 3.0e-3, log: true}\n"
        "warmup_steps: {low: 0, high: 4}\n"
        "batch_size: {choices: [2, 4]}\n"
        "dropout: {choices: [0.0, 0.1]}\n"
        "weight-decay: {low: 0.0, high: 0.1}\n",
        encoding="utf-8",
    )
    out = tmp_path / "sweep"
    proc = qinglm(
        "sweep", "--space", space, "--trials", 3, "--max-steps", 4, "--out", out, "--data", corpus, *TINY
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("trial ") >= 3 and "best: trial" in proc.stdout

    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in results] == [0, 1, 2]
    for r in results:
        assert set(r["params"]) == {"lr", "warmup_steps", "batch_size", "dropout", "weight_decay"}
        assert 1e-4 <= r["params"]["lr"] <= 3e-3 and r["params"]["batch_size"] in (2, 4)
        assert r["state"] in ("complete", "pruned")
        trial_dir = Path(r["run_dir"])
        assert trial_dir.parent == out and (trial_dir / "metrics.jsonl").is_file()
        cfg = json.loads((trial_dir / "config.json").read_text())  # a normal run directory
        assert cfg["train"]["lr"] == r["params"]["lr"] and cfg["model"]["dropout"] == r["params"]["dropout"]
    table = (out / "results.md").read_text()
    assert table.count("\n| 0") == 3 and "| lr |" in table

    complete = [r for r in results if r["state"] == "complete"]
    best = min(complete, key=lambda r: r["value"])
    from qinglm.config import resolve_model
    from qinglm.pipeline import build_configs
    from qinglm.train.config import check_train

    model, train = build_configs({}, {}, str(out / "best_config.json"))
    check_train(train, resolve_model(model))
    assert train.lr == best["params"]["lr"] and train.batch_size == best["params"]["batch_size"]
    assert model.dropout == best["params"]["dropout"] and train.out is None
    assert train.data == [str(corpus)]  # the original data, not the sweep's copy

    run = tmp_path / "again"
    proc = qinglm("train", "--config", out / "best_config.json", "--out", run, "--max-steps", 1)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == best["params"]["lr"]


def test_median_pruner_stops_a_trial_from_its_reported_validation_losses():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for loss in (5.0, 5.2):
        trial = study.ask()
        sink = _PruningSink(trial)
        sink.write({"kind": "val", "step": 2, "val_loss": loss})
        study.tell(trial, loss)
    trial = study.ask()
    sink = _PruningSink(trial)
    sink.write({"kind": "train", "step": 2, "loss": 9.0})  # training lines are not reported
    with pytest.raises(optuna.TrialPruned, match="pruned at step 2"):
        sink.write({"kind": "val", "step": 2, "val_loss": 9.0})
    assert sink.last == 9.0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"learning_rate": {"low": 1e-4, "high": 1e-3}}', "unknown parameter 'learning_rate'"),
        ('{"data": {"choices": ["pd1998"]}}', "cannot be searched"),
        ('{"lr": {"low": 1e-3, "high": 1e-4}}', "low <= high"),
        ('{"lr": {"low": 0, "high": 1e-3, "log": true}}', "log range needs low > 0"),
        ('{"family": {"low": 0, "high": 1}}', "not numeric"),
        ('{"lr": [1e-3]}', "must be a mapping"),
        ("{}", "is empty"),
    ],
)
def test_bad_spaces_are_user_errors(tmp_path, text, fragment):
    path = tmp_path / "space.json"
    path.write_text(text)
    with pytest.raises(QingLMError, match=fragment):
        load_space(path)


def test_sweep_user_errors_are_one_line(tmp_path, corpus):
    space = tmp_path / "space.json"
    space.write_text('{"lr_max": {"low": 1e-4, "high": 1e-3}}')
    proc = qinglm("sweep", "--space", space, "--max-steps", 2, "--out", tmp_path / "s", "--data", corpus)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("qinglm: error: unknown parameter 'lr_max'")
    assert len(proc.stderr.strip().splitlines()) == 1
