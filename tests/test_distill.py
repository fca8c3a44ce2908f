"""Distillation: the loss formula, alpha = 0 is pretraining step for step, another tokenizer is refused,
SIGKILL + --resume ends bit-identical, and the run is accepted by --init-from."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from qinglm.cli import main
from qinglm.config import ModelConfig, resolve_model
from qinglm.model.transformer import IGNORE_INDEX, Transformer
from qinglm.pipeline import run_train
from qinglm.post.distill import kd_loss
from qinglm.tokenizer import Tokenizer, train_tokenizer
from qinglm.train.checkpoint import latest_checkpoint, save_run
from qinglm.train.driver import cli_flags
from qinglm.train.metrics import read_metrics

STUDENT = dict(d_model=32, n_layers=1, n_heads=2, max_seq_len=16)


@pytest.fixture(scope="module")
def teacher(phrase_corpus, tmp_path_factory) -> Path:
    """Return a teacher run (a 2-layer random model) with the phrase corpus's tokenizer."""
    _, tok_dir, vocab = phrase_corpus
    torch.manual_seed(1)
    model = Transformer(
        resolve_model(ModelConfig(vocab_size=vocab, d_model=48, n_layers=2, n_heads=2, max_seq_len=16))
    )
    return save_run(tmp_path_factory.mktemp("teacher") / "run", model, Tokenizer.load(tok_dir))


def train_flags(phrase_corpus, out: Path, **kw) -> dict:
    data, tok, _ = phrase_corpus
    return {
        "data": [str(data)], "tokenizer": str(tok), "out": str(out), "max_steps": 12, "batch_size": 4,
        "seq_len": 16, "lr": 3e-3, "warmup_steps": 2, "eval_every": 6, "eval_tokens": 256, "log_every": 1,
        "save_every": 2, "num_threads": 1, "device": "cpu", "dtype": "fp32", "compile": False,
        "sample_prompts": ["你好"], "sample_tokens": 2, **kw,
    }  # fmt: skip


def test_kd_loss_is_t_squared_times_the_kl_over_target_tokens():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    y = torch.tensor([[1, 2, IGNORE_INDEX], [3, IGNORE_INDEX, 4]])
    T = 2.0
    keep = (y != IGNORE_INDEX).flatten()
    p = F.softmax(t.flatten(0, 1)[keep] / T, -1)
    want = (p * (p.log() - F.log_softmax(s.flatten(0, 1)[keep] / T, -1))).sum(-1).mean() * T * T
    assert kd_loss(s, t, y, T).item() == pytest.approx(want.item(), rel=1e-6)
    assert kd_loss(t, t, y, T).item() == pytest.approx(0.0, abs=1e-6)  # the same distribution: no loss


def test_alpha_zero_is_ordinary_pretraining_step_for_step(phrase_corpus, teacher, tmp_path):
    # grad_accum 3: distillation weighs micro-batches by their target tokens (loss_units), pretraining
    # equally; with equal counts the two must stay bit-identical (the engine divides by 3 either way).
    accum = {"grad_accum": 3, "batch_size": 2}
    run_train(STUDENT, train_flags(phrase_corpus, tmp_path / "plain", **accum), log=lambda _: None)
    flags = train_flags(phrase_corpus, tmp_path / "kd0", teacher=str(teacher), alpha=0.0, **accum)
    flags.pop("tokenizer")  # the teacher's
    run_train(STUDENT, flags, log=lambda _: None, job="distill")
    a, b = ([r for r in read_metrics(tmp_path / d) if r["kind"] == "train"] for d in ("plain", "kd0"))
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 12
    assert all(r["kd_loss"] > 0 for r in b)  # the KL was computed, with weight 0
    wa, wb = (load_file(latest_checkpoint(tmp_path / d) / "model.safetensors") for d in ("plain", "kd0"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    config = json.loads((tmp_path / "kd0" / "config.json").read_text())
    assert config["kind"] == "distill" and config["teacher"] == str(teacher)
    # a distillation run is a base like any other: --init-from continues from its weights
    out = tmp_path / "continued"
    run_train(
        {}, train_flags(phrase_corpus, out, init_from=str(tmp_path / "kd0"), max_steps=2), log=lambda _: None
    )
    assert json.loads((out / "config.json").read_text())["model"]["n_layers"] == 1


def test_a_teacher_with_another_tokenizer_is_refused_in_one_line(phrase_corpus, teacher, tmp_path, capsys):
    other = train_tokenizer(["完全不同的文本，另一个词表。"] * 50, 280, show_progress=False)
    other.save(tmp_path / "other-tok")
    flags = train_flags(
        phrase_corpus, tmp_path / "kd", teacher=str(teacher), tokenizer=str(tmp_path / "other-tok")
    )
    assert main(["distill", *cli_flags(flags), *cli_flags(STUDENT)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another tokenizer" in err[0]
    assert main(["distill", *cli_flags({**flags, "teacher": str(tmp_path / "nope")})]) == 2


@pytest.mark.slow
def test_distillation_killed_at_random_moments_resumes_bit_identical(
    phrase_corpus, teacher, tmp_path, sigkill_resume
):
    flags = train_flags(phrase_corpus, tmp_path / "ref", teacher=str(teacher), max_steps=30)
    flags.pop("tokenizer")
    student = {**STUDENT, "dropout": 0.1}  # the RNG state matters
    run_train(student, flags, log=lambda _: None, job="distill")
    run = tmp_path / "killed"
    resumed = cli_flags({**flags, "out": str(run), "resume": True})
    cmd = [sys.executable, "-m", "qinglm", "distill", *resumed, *cli_flags(student)]
    sigkill_resume(cmd, tmp_path / "ref", run, 30, 3, seed=11)
