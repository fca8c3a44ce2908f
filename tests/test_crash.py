"""Fault injection: a training process killed with SIGKILL at random moments resumes and ends bit-identical.

Each attempt runs `qinglm train ... --resume` in a subprocess and kills it a random time after its
first training step (so some kills land while a checkpoint or best/ is being written); the last
attempt runs to the end. Under the defaults (torch.compile where a C++ compiler exists, dtype auto)
on the CPU with 2 threads, the final weights, optimizer state and loss curve of the run equal those
of an uninterrupted run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qinglm.pipeline import run_train
from qinglm.train.driver import cli_flags as _cli_flags
from qinglm.train.metrics import read_metrics

STEPS, KILLS = 60, 4


@pytest.fixture(scope="module")
def corpus(phrase_corpus) -> tuple[Path, Path]:
    """Return (data_dir, tokenizer_dir) of a small corpus."""
    return phrase_corpus[:2]


def flags(corpus: tuple[Path, Path], out: Path) -> tuple[dict, dict]:
    data, tok = corpus
    model = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.1)  # dropout: RNG matters
    train = dict(
        data=[str(data)],
        tokenizer=str(tok),
        out=str(out),
        resume=True,
        max_steps=STEPS,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        eval_every=10,
        eval_tokens=256,
        log_every=1,
        save_every=2,
        keep_checkpoints=2,
        num_threads=2,  # one thread would hide an order that changes with thread scheduling
        device="cpu",
        sample_prompts=["你好"],
        sample_tokens=2,
    )
    return model, train


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(corpus, tmp_path, sigkill_resume):
    ref = tmp_path / "reference"
    run_train(*flags(corpus, ref), log=lambda _: None)
    run = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "qinglm",
        "train",
        *_cli_flags({k: v for d in flags(corpus, run) for k, v in d.items()}),
    ]
    kills = sigkill_resume(cmd, ref, run, STEPS, KILLS, seed=20261123)
    print("\n" + "\n".join(kills))


def test_a_non_finite_step_is_skipped_and_a_loss_spike_is_logged(
    corpus, tmp_path, monkeypatch, faulty_transformer
):
    import qinglm.train.pretrain as pretrain
    from qinglm.config import ModelConfig
    from qinglm.train import train
    from qinglm.train.config import TrainConfig

    # training forward 25 gives a NaN loss, forward 32 a loss 3x too high
    monkeypatch.setattr(pretrain, "Transformer", faulty_transformer({25: float("nan"), 32: 3.0}))
    data, _ = corpus
    model = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    cfg = TrainConfig(
        max_steps=40,
        batch_size=4,
        seq_len=16,
        lr=3e-3,
        eval_every=100,
        log_every=10,
        save_every=100,
        num_threads=1,
        device="cpu",
        dtype="fp32",
        compile=False,
    )
    lines: list[str] = []
    r = train(model, cfg, tmp_path / "run", data, log=lines.append)
    assert r["step"] == 40 and r["skipped_steps"] == 1
    assert any("step 25: non-finite loss/gradients, update skipped (1 in a row)" in line for line in lines)
    spikes = [x for x in read_metrics(tmp_path / "run") if x["kind"] == "spike"]
    assert [x["step"] for x in spikes] == [31]  # forward 32 is update 31: forward 25 was skipped
    # 3x the loss of that step, about 2.4x the running mean (which lags behind a falling loss)
    assert spikes[0]["ratio"] > 2 and spikes[0]["loss"] == pytest.approx(
        spikes[0]["ratio"] * spikes[0]["mean_loss"]
    )
    assert any(line.startswith("step 31: loss spike") for line in lines)
