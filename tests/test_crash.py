"""Fault injection: a training process killed with SIGKILL at random moments resumes and ends bit-identical.

Each attempt runs `qinglm train ... --resume` in a subprocess and kills it a random time after its
first training step (so some kills land while a checkpoint or best/ is being written); the last
attempt runs to the end. Under the defaults (torch.compile where a C++ compiler exists, dtype auto)
on the CPU with 2 threads, the final weights, optimizer state and loss curve of the run equal those
of an uninterrupted run.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qinglm.pipeline import _cli_flags, run_train
from qinglm.train.checkpoint import latest_checkpoint, load_trainer_state
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


def run_and_maybe_kill(cmd: list[str], kill_step: int | None, delay: float) -> tuple[int, str, str]:
    """Return (exit status, output, last line before the kill) of cmd, killed `delay` s after it logs kill_step."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:
        for line in p.stdout:
            lines.append(line)
            m = re.match(r"step ([\d,]+)/", line)
            if kill_step is not None and m and int(m.group(1).replace(",", "")) >= kill_step:
                reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    last = ""
    if kill_step is not None and reached.wait(timeout=240):
        time.sleep(delay)
        last = lines[-1].strip()
        p.send_signal(signal.SIGKILL)
    rc = p.wait(timeout=300)
    reader.join(timeout=10)
    return rc, "".join(lines), last


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(corpus, tmp_path):
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
    # Random moments: a random step to reach, then a random part of a step's time (~30 ms here) or more.
    rng = random.Random(20261123)
    targets = sorted(rng.sample(range(3, STEPS - 3), KILLS)) + [None]
    kills: list[str] = []
    for attempt, target in enumerate(targets):
        delay = rng.uniform(0.0, 0.1)
        rc, out, last = run_and_maybe_kill(cmd, target, delay)
        if attempt > 0:
            assert "resuming from" in out or "starting a fresh run" in out, out[-2000:]
        if target is not None:
            assert rc == -signal.SIGKILL, out[-3000:]
            torn = sorted(p.name for p in (run / "checkpoints").glob("*.tmp-*"))
            kills.append(f"killed {delay * 1000:.0f} ms after '{last[:30]}'; half-written dirs: {torn}")
    assert rc == 0 and f"stopped at step {STEPS}" in out, out[-3000:]
    print("\n" + "\n".join(kills))

    a, b = latest_checkpoint(ref), latest_checkpoint(run)
    assert a.name == b.name == f"step-{STEPS:08d}"
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = (load_trainer_state(d)["optimizer"]["state"] for d in (a, b))
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    # the metrics of the killed run hold every step once, with the uninterrupted run's losses
    ra, rb = ([r for r in read_metrics(d) if r["kind"] == "train"] for d in (ref, run))
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]


def test_a_non_finite_step_is_skipped_and_a_loss_spike_is_logged(
    corpus, tmp_path, monkeypatch, faulty_transformer
):
    import qinglm.train.session as session
    from qinglm.config import ModelConfig
    from qinglm.train import train
    from qinglm.train.config import TrainConfig

    # training forward 25 gives a NaN loss, forward 32 a loss 3x too high
    monkeypatch.setattr(session, "Transformer", faulty_transformer({25: float("nan"), 32: 3.0}))
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
