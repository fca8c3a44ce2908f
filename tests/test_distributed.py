"""Training on several processes (torchrun, gloo on the CPU): same losses as one process, resumable across sizes.

A 2-process run with batch 2 x 2 accumulation steps has the global batch (8) of a 1-process run
with batch 4 x 2: each step trains on the same windows, so the loss curves agree to float rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qinglm.data.loader import TrainBatches
from qinglm.data.shards import TokenShards
from qinglm.errors import QingLMError
from qinglm.pipeline import run_train
from qinglm.train.checkpoint import latest_checkpoint
from qinglm.train.config import TrainConfig
from qinglm.train.distributed import fsdp_available
from qinglm.train.driver import cli_flags as _cli_flags
from qinglm.train.metrics import read_metrics
from qinglm.train.session import _fit_global_batch

STEPS = 12


@pytest.fixture(scope="module")
def corpus(phrase_corpus) -> tuple[Path, Path]:
    """Return (data_dir, tokenizer_dir) of a small corpus."""
    return phrase_corpus[:2]


def flags(corpus: tuple[Path, Path], out: Path, **kw) -> tuple[dict, dict]:
    """Return (model flags, train flags) of a tiny deterministic run; lr constant so max_steps may grow."""
    data, tok = corpus
    model = dict(d_model=32, n_layers=2, n_heads=2, max_seq_len=16)
    train = dict(
        data=[str(data)],
        tokenizer=str(tok),
        out=str(out),
        max_steps=STEPS,
        batch_size=4,
        grad_accum=2,
        seq_len=16,
        lr=3e-3,
        lr_schedule="constant",
        warmup_steps=1,
        eval_every=100,
        eval_tokens=256,
        log_every=1,
        save_every=4,
        num_threads=1,
        device="cpu",
        dtype="fp32",
        compile=False,
        sample_prompts=["你好"],
        sample_tokens=2,
    )
    return model, {**train, **kw}


def command(corpus, out: Path, nproc: int, **kw) -> list[str]:
    """Return the command line `qinglm train --nproc N ...` (torchrun underneath) of a tiny run."""
    model, train = flags(corpus, out, nproc=nproc, **kw)
    return [sys.executable, "-m", "qinglm", "train", *_cli_flags({**model, **train})]


def launch(corpus, out: Path, nproc: int, **kw) -> str:
    """Return the output of `qinglm train --nproc N ...` after checking it succeeded."""
    p = subprocess.run(command(corpus, out, nproc, **kw), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def descendant_with_rank(root: int, rank: int) -> int | None:
    """Return the pid of the process below `root` whose environment says RANK=rank (a torchrun worker)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    for pid in parent:
        up = pid
        while up in parent and up != root:
            up = parent[up]
        if up == root and pid != root:
            try:
                env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return pid
    return None


def interrupt_rank(cmd: list[str], rank: int) -> str:
    """Return the output of cmd after sending SIGINT to its worker of `rank` alone, once training runs."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 1/"):
            pid = descendant_with_rank(p.pid, rank)
            assert pid is not None
            os.kill(pid, signal.SIGINT)
    assert p.wait(timeout=60) == 0, "".join(lines)[-3000:]
    return "".join(lines)


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


def assert_close_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------- data split, global batch


def step_windows(data: Path, batch: int, accum: int, world: int, steps: int) -> list[Counter]:
    """Return, per optimizer step, the windows (a multiset: the phrase corpus repeats itself, so two
    windows may hold the same tokens) all ranks' micro-batches train on."""
    shards = TokenShards(data, "train")
    ranks = [
        TrainBatches(shards, batch, 16, seed=3, rank=r, world_size=world, grad_accum=accum)
        for r in range(world)
    ]
    out = []
    for _ in range(steps):
        rows = [tuple(x.tolist()) for b in ranks for _ in range(accum) for x in next(b)[0]]
        assert len(rows) == batch * accum * world
        out.append(Counter(rows))  # equal to one process's step: ranks and micro-batches are disjoint
    return out


def test_a_step_trains_on_the_same_windows_however_the_global_batch_is_split(corpus):
    data, _ = corpus
    one = step_windows(data, 8, 1, 1, 5)
    assert step_windows(data, 4, 2, 1, 5) == one
    assert step_windows(data, 2, 2, 2, 5) == one
    assert step_windows(data, 1, 2, 4, 5) == one


def test_the_data_position_resumes_on_another_number_of_processes(corpus):
    data, _ = corpus
    shards = TokenShards(data, "train")
    two = [TrainBatches(shards, 2, 16, seed=3, rank=r, world_size=2, grad_accum=2) for r in range(2)]
    for b in two:
        for _ in range(2 * 7):  # 7 steps
            next(b)
    state = two[0].state_dict()
    one = TrainBatches(shards, 4, 16, seed=3, grad_accum=2)
    one.load_state_dict(state)
    reference = TrainBatches(shards, 4, 16, seed=3, grad_accum=2)
    for _ in range(2 * 7 + 2):
        want = next(reference)
    for _ in range(2):
        got = next(one)
    assert torch.equal(got[0], want[0])  # step 8 of the 1-process order
    with pytest.raises(QingLMError, match="global batch"):
        TrainBatches(shards, 4, 16, seed=3).load_state_dict(state)


def test_resuming_keeps_the_global_batch_by_changing_grad_accum_or_says_what_to_pass():
    state = {"loader": {"batch_size": 4, "grad_accum": 1, "world_size": 2}}
    lines: list[str] = []
    cfg = _fit_global_batch(TrainConfig(batch_size=4, grad_accum=1), state, 1, lines.append)
    assert cfg.grad_accum == 2 and "grad_accum 1 -> 2" in lines[0]
    assert _fit_global_batch(TrainConfig(batch_size=2, grad_accum=1), state, 4, lines.append).grad_accum == 1
    with pytest.raises(QingLMError, match="batch_size x grad_accum x 3 = 8"):
        _fit_global_batch(TrainConfig(batch_size=4), state, 3, lines.append)


# ---------------------------------------------------------------------------- torchrun runs


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """Return an uninterrupted 1-process run of STEPS steps: batch 4 x 2 accumulation = global batch 8."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_train(*flags(corpus, out), log=lambda _: None)
    return out


@pytest.mark.slow
def test_two_processes_give_the_loss_curve_of_one_with_the_same_global_batch(corpus, reference, tmp_path):
    # 2 processes x batch 2 x 2 micro-batches (gradients synced on the second only) = global batch 8
    out = launch(corpus, tmp_path / "ddp", 2, batch_size=2, grad_accum=2)
    assert "x 2 processes (ddp)" in out and "held-out" in out  # only rank 0 prints: once each
    assert out.count("held-out") == 1 and out.count("parameters:") == 1
    ref, got = losses(reference), losses(tmp_path / "ddp")
    assert len(got) == STEPS and ref[-1] < ref[0]
    assert got == pytest.approx(ref, rel=1e-5)
    assert_close_weights(reference, tmp_path / "ddp")
    state = json.loads((latest_checkpoint(tmp_path / "ddp") / "state.json").read_text())
    assert state["tokens_seen"] == STEPS * 8 * 16 and state["loader"]["world_size"] == 2


@pytest.mark.slow
def test_ctrl_c_on_one_rank_stops_all_at_one_step_and_the_run_resumes_on_one_process_then_two(
    corpus, reference, tmp_path
):
    run = tmp_path / "run"
    # SIGINT reaches rank 1 only: both ranks must stop after the same step, save it and exit cleanly
    out = interrupt_rank(command(corpus, run, 2, grad_accum=1), rank=1)
    assert f"interrupted; resume with: qinglm train --out {run} --resume" in out
    stopped = int(latest_checkpoint(run).name.split("-")[1])
    assert 1 <= stopped < 8
    lines: list[str] = []
    run_train(*flags(corpus, run, grad_accum=1, max_steps=8, resume=True), log=lines.append)
    assert any("grad_accum 1 -> 2 keeps the checkpoint's global batch of 8" in line for line in lines)
    assert latest_checkpoint(run).name == "step-00000008"
    # back on two processes, sharded this time where torch has FSDP2: its optimizer state is cut from the file
    parallel = "fsdp" if fsdp_available() else "ddp"
    out = launch(corpus, run, 2, grad_accum=1, resume=True, parallel=parallel)
    assert "(step 8," in out and f"x 2 processes ({parallel})" in out
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    assert_close_weights(reference, run)


@pytest.mark.slow
@pytest.mark.skipif(
    not fsdp_available(), reason="this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
)
def test_fsdp_on_two_processes_matches_and_its_checkpoints_resume_anywhere(corpus, reference, tmp_path):
    run = tmp_path / "fsdp"
    out = launch(corpus, run, 2, batch_size=2, grad_accum=2, max_steps=6, parallel="fsdp")
    assert "x 2 processes (fsdp)" in out
    # the gathered checkpoint is a plain one: resume it on one process (2 x 4 micro-batches = 8)
    lines: list[str] = []
    run_train(*flags(corpus, run, batch_size=2, resume=True), log=lines.append)
    assert any("grad_accum 2 -> 4" in line for line in lines)
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    assert_close_weights(reference, run)
