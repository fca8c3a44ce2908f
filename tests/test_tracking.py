"""Experiment tracking: metrics.jsonl fields, TensorBoard event files, trackers that are not installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qinglm import run_dir as run_dirs
from qinglm.config import ModelConfig
from qinglm.data.shards import prepare_shards
from qinglm.errors import QingLMError
from qinglm.plot import plot_runs
from qinglm.tokenizer import train_tokenizer
from qinglm.tracking import check_tracker, make_trackers
from qinglm.train import train
from qinglm.train.config import TrainConfig
from qinglm.train.metrics import read_metrics

PHRASES = ["今天天气真不错", "我们一起去公园散步", "人工智能改变了世界", "中国经济持续发展", "学习使人进步"]


def tiny_run(root: Path, tracker: str = "none", steps: int = 8, resume_to: int | None = None) -> Path:
    """Return a run directory trained for `steps` steps on a small repetitive corpus (about 2 s).

    With resume_to, a second session resumes the run from its last checkpoint and goes on to that step.
    """
    rng = random.Random(0)
    docs = ["，".join(rng.choice(PHRASES) for _ in range(4)) + "。" for _ in range(200)]
    tok = train_tokenizer(docs, 300, show_progress=False)
    run = root / "run"
    run_dirs.claim(run)  # a QingLM run directory, as `qinglm train` makes it, before its tokenizer goes in
    tok.save(run / "tokenizer")
    prepare_shards({"train": docs[:180], "val": docs[180:]}, tok, root / "data", show_progress=False)
    model = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=4,
        seq_len=16,
        eval_every=4,
        eval_tokens=128,
        log_every=2,
        save_every=4,
        sample_prompts=["今天天气", "中国经济"],
        sample_tokens=4,
        device="cpu",
        dtype="fp32",
        compile=False,
        num_threads=1,
        tracker=tracker,
    )
    train(model, cfg, run, root / "data", log=lambda _line: None)
    if resume_to is not None:
        cfg = dataclasses.replace(cfg, max_steps=resume_to, resume=True)
        train(model, cfg, run, root / "data", log=lambda _line: None)
    return run


def qinglm_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qinglm", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    pytest.importorskip("tensorboard")
    return tiny_run(tmp_path_factory.mktemp("tb"), tracker="tensorboard")


def test_metrics_jsonl_has_memory_and_sample_generations(tb_run):
    records = read_metrics(tb_run)
    train_lines = [r for r in records if r["kind"] == "train"]
    val_lines = [r for r in records if r["kind"] == "val"]
    assert train_lines and all(r["memory_mb"] > 10 for r in train_lines)  # peak RSS of a torch process
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= train_lines[0].keys()
    assert [r["step"] for r in val_lines] == [4, 8]
    for r in val_lines:
        assert [s["prompt"] for s in r["samples"]] == ["今天天气", "中国经济"]
        assert all(isinstance(s["text"], str) for s in r["samples"])
        assert {"val_loss", "val_ppl", "val_bpc"} <= r.keys()


def test_tensorboard_event_files_hold_the_scalars_and_samples(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tb_run / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tb_run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/memory_mb"):
        assert tag in tags, tags
    for tag in ("val/val_loss", "val/val_ppl", "val/val_bpc"):
        assert tag in tags, tags
    logged = {r["step"]: r["loss"] for r in read_metrics(tb_run) if r["kind"] == "train"}
    from_tb = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert from_tb.keys() == logged.keys()
    assert all(abs(from_tb[s] - logged[s]) < 1e-5 for s in logged)
    assert [e.step for e in acc.Scalars("val/val_bpc")] == [4, 8]
    texts = acc.Tensors("samples/text_summary")  # add_text is stored as a string tensor
    assert [t.step for t in texts] == [4, 8]
    assert "| 今天天气 |" in texts[-1].tensor_proto.string_val[0].decode("utf-8")


def test_tensorboard_keeps_the_checkpoint_steps_scalars_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tiny_run(tmp_path, tracker="tensorboard", steps=8, resume_to=12)  # resumes from step 8
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    logged = {r["step"] for r in read_metrics(run) if r["kind"] == "train"}
    assert logged == {2, 4, 6, 8, 10, 12}
    assert sorted({e.step for e in acc.Scalars("train/loss")}) == sorted(logged)
    assert sorted({e.step for e in acc.Scalars("val/val_bpc")}) == [4, 8, 12]


@pytest.mark.parametrize("name", ["wandb", "swanlab"])
def test_missing_tracker_package_is_one_clear_line(name, tmp_path):
    if importlib.util.find_spec(name) is not None:
        pytest.skip(f"{name} is installed")
    with pytest.raises(QingLMError, match=f"install with pip install {name}"):
        make_trackers(name, tmp_path)
    if name != "wandb":
        return  # one trip through the command line is enough
    proc = qinglm_cli("train", "--tracker", name, "--out", tmp_path / "r", "--max-steps", 1)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == f"qinglm: error: --tracker {name} needs the {name} package: install with pip install {name}"
    )
    assert not (tmp_path / "r").exists()  # refused before any work


def test_unknown_tracker_is_a_user_error():
    with pytest.raises(QingLMError, match="unknown tracker 'mlflow'"):
        check_tracker("mlflow")
    assert make_trackers("none", ".") == []


# ---------------------------------------------------------------------------- qinglm plot


def synthetic_run(root: Path, name: str, scale: float) -> Path:
    """Return a run directory whose metrics.jsonl is written by hand in the documented format."""
    run = root / name
    run.mkdir()
    lines = []
    for step in range(10, 210, 10):
        lines.append(
            {
                "kind": "train",
                "step": step,
                "loss": scale * 8 / (1 + step / 50),
                "lr": 2e-3 * min(1.0, step / 50),
                "grad_norm": 0.5 + step / 400,
                "tokens_per_s": 15000 + 100 * (step % 30),
                "tokens_seen": step * 8192,
            }
        )
        if step % 50 == 0:
            lines.append({"kind": "val", "step": step, "val_loss": scale * 8.5 / (1 + step / 50)})
    (run / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in lines) + "\n{cut shor", encoding="utf-8"
    )
    return run


def test_plot_overlays_runs_in_a_png(tb_run, tmp_path):
    import matplotlib.image

    a, b = synthetic_run(tmp_path, "lr-2e-3", 1.0), synthetic_run(tmp_path, "lr-1e-3", 1.2)
    out = tmp_path / "pics" / "cmp.png"
    proc = qinglm_cli("plot", a, b, tb_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and out.is_file()
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (800, 1200)  # 12 x 8 inches at 100 dpi
    assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50  # curves, not a blank canvas

    one = plot_runs([a], tmp_path / "one.png", x="tokens")
    overlaid = matplotlib.image.imread(plot_runs([a, b], tmp_path / "two.png", x="tokens"))
    assert not np.array_equal(matplotlib.image.imread(one), overlaid)  # the second run is drawn too


def test_plot_errors_are_one_line(tmp_path):
    proc = qinglm_cli("plot", tmp_path / "nope", "--out", tmp_path / "x.png")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"qinglm: error: {tmp_path / 'nope'}: no such run directory or metrics file"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QingLMError, match="has no metrics.jsonl"):
        plot_runs([empty], tmp_path / "x.png")
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(QingLMError, match="no metric records"):
        plot_runs([empty], tmp_path / "x.png")
