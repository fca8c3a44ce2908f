"""Stopping training: Ctrl-C or SIGTERM saves, then the command exits 130 or 143 (never 0 like a finished
run); the `--nproc N` launcher starts no more processes than cores or GPUs, passes a signal on to every
process, and no process outlives a killed launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qinglm.cli import main
from qinglm.errors import Interrupted, QingLMError, exit_status
from qinglm.train import launch
from qinglm.train.checkpoint import latest_checkpoint
from qinglm.train.driver import cli_flags, raise_if_interrupted


def train_command(corpus: tuple[Path, Path, int], out: Path, **kw) -> list[str]:
    """Return `qinglm train ...` of a tiny CPU run long enough to be stopped while it trains."""
    data, tok, _ = corpus
    flags = dict(
        data=[str(data)], tokenizer=str(tok), out=str(out), d_model=32, n_layers=1, n_heads=2,
        max_seq_len=16, seq_len=16, batch_size=2, max_steps=100_000, save_every=1000, log_every=1,
        eval_every=100_000, eval_tokens=256, num_threads=1, device="cpu", dtype="fp32", compile=False, **kw,
    )  # fmt: skip
    return [sys.executable, "-m", "qinglm", "train", *cli_flags(flags)]


def processes_of(out: Path) -> list[int]:
    """Return the ids of live processes whose command line names the run directory out."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            cmdline = (d / "cmdline").read_bytes() if d.name.isdigit() else b""
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0] if cmdline else "Z"
        except OSError:
            continue
        if str(out).encode() in cmdline and state != "Z":
            found.append(int(d.name))
    return found


def start_and_signal(cmd: list[str], signum: int, at_step: int = 2) -> tuple[subprocess.Popen, str]:
    """Return (the process, its output) after sending signum to cmd's process once step at_step is logged."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(f"step {at_step}/"):
            p.send_signal(signum)
            if signum == signal.SIGKILL:
                break
    p.wait(timeout=300)
    return p, "".join(lines)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stopped_training_run_saves_and_exits_128_plus_the_signal(phrase_corpus, tmp_path, signum):
    run = tmp_path / "run"
    p, out = start_and_signal(train_command(phrase_corpus, run), signum)
    assert p.returncode == 128 + signum, out[-3000:]
    assert f"interrupted; resume with: qinglm train --out {run} --resume" in out
    assert out.rstrip().endswith("qinglm: interrupted") and "Traceback" not in out
    assert "held-out" not in out  # no end-of-run report for a run that did not end
    assert latest_checkpoint(run) is not None


def test_every_stage_command_raises_after_saving_an_interrupted_run(tiny_base_run, tmp_path):
    from qinglm.sft.config import SFTConfig
    from qinglm.sft.train import run_sft

    data = tmp_path / "chats.jsonl"
    chat = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "画蛇添足"}]
    data.write_text("\n".join(json.dumps({"conversations": chat}, ensure_ascii=False) for _ in range(16)))
    cfg = SFTConfig(
        base=str(tiny_base_run), data=str(data), out=str(tmp_path / "sft"), max_steps=50, batch_size=2,
        log_every=1, save_every=100, seq_len=32, device="cpu", dtype="fp32", num_threads=1, compile=False,
    )  # fmt: skip

    def log(line: str) -> None:
        if line.startswith("step 2/"):
            signal.raise_signal(signal.SIGTERM)

    with pytest.raises(Interrupted) as stopped:
        run_sft(cfg, log=log)
    assert exit_status(stopped.value) == 143
    assert latest_checkpoint(tmp_path / "sft").name == "step-00000002"


def test_only_a_run_stopped_by_a_signal_raises(monkeypatch):
    raise_if_interrupted({"stop_reason": "finished", "stop_signal": None})
    raise_if_interrupted({"stop_reason": "time limit", "stop_signal": None})
    with pytest.raises(Interrupted) as stopped:
        raise_if_interrupted({"stop_reason": "interrupted", "stop_signal": signal.SIGINT})
    assert exit_status(stopped.value) == 130
    monkeypatch.setenv("RANK", "1")  # a torchrun worker exits 0; its launcher reports the signal
    raise_if_interrupted({"stop_reason": "interrupted", "stop_signal": signal.SIGINT})


def test_more_processes_than_cpu_cores_are_refused_before_any_starts(
    phrase_corpus, tmp_path, monkeypatch, capsys
):
    started = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **kw: started.append(a))
    too_many = launch.cpu_cores() + 1
    argv = train_command(phrase_corpus, tmp_path / "run", nproc=too_many)[3:]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"qinglm: error: --nproc {too_many} starts one training process per CPU core, and this machine "
        f"has {too_many - 1}; use --nproc {too_many - 1} or fewer (or start torchrun yourself to "
        "oversubscribe it)"
    ]
    assert started == []


def test_every_stage_launches_through_the_same_check(tiny_base_run, tmp_path, monkeypatch):
    from qinglm.sft.config import SFTConfig
    from qinglm.sft.train import run_sft

    monkeypatch.setattr(launch, "cpu_cores", lambda: 1)
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **kw: pytest.fail("torchrun started"))
    given = {"base": str(tiny_base_run), "nproc": 2, "device": "cpu", "out": str(tmp_path / "sft")}
    with pytest.raises(QingLMError, match="--nproc 2 starts one training process per CPU core"):
        run_sft(SFTConfig(**given), log=lambda _: None, flags=given)


def test_on_cuda_the_limit_is_one_process_per_gpu(monkeypatch):
    import torch

    import qinglm.device

    monkeypatch.setattr(qinglm.device, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert launch.check_nproc(2, "auto") == "NCCL on 2 of 2 GPUs"
    with pytest.raises(QingLMError, match=r"--nproc 3 starts one training process per GPU, .* has 2; use"):
        launch.check_nproc(3, "auto")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_launcher_stops_every_process_after_a_saved_step(phrase_corpus, tmp_path, signum):
    run = tmp_path / "run"
    p, out = start_and_signal(train_command(phrase_corpus, run, nproc=2), signum)
    assert p.returncode == 128 + signum, out[-3000:]
    assert out.startswith("launching 2 training processes under torchrun (gloo on 2 of")  # says why it waits
    assert "Traceback" not in out and "Root Cause" not in out, out[-3000:]  # no page from torchrun
    assert "Setting OMP_NUM_THREADS" not in out  # the launcher shares the cores out itself
    assert out.rstrip().endswith("qinglm: interrupted")
    assert f"interrupted; resume with: qinglm train --out {run} --resume" in out
    assert latest_checkpoint(run) is not None
    assert processes_of(run) == []


@pytest.mark.slow
def test_no_process_outlives_a_killed_launcher(phrase_corpus, tmp_path):
    run = tmp_path / "run"
    p, _ = start_and_signal(train_command(phrase_corpus, run, nproc=2), signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 60  # a liveness bound, not a speed: without the fix they run for ever
    while processes_of(run) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(run) == []
