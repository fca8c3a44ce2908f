"""Ctrl-C (or SIGTERM) stops `qinglm tokenizer train` at once, although the Rust trainer ignores it.

"At once" is judged by the CPU time the command used, not by a clock: on a busy machine the seconds
until a process exits stretch, but a training that was stopped uses a fraction of the CPU time of
one that ran to its end.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory) -> Path:
    """Return a file of 2.4 million random CJK characters: BPE training on it takes ~20 CPU seconds."""
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    lines = [
        "，".join("".join(rng.choices(chars, k=rng.randint(2, 8))) for _ in range(6)) + "。"
        for _ in range(60_000)
    ]
    path = tmp_path_factory.mktemp("slow") / "random.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_tokenizer_training_at_once_and_writes_nothing(slow_corpus, tmp_path, signum):
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "qinglm", "tokenizer", "train", "--data", slow_corpus]
    cmd += ["--vocab-size", "20000", "--out", out]
    before = cpu_seconds_of_children()
    proc = subprocess.Popen(
        list(map(str, cmd)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )
    deadline = time.monotonic() + 120  # liveness only
    while cpu_seconds_of_child(proc.pid) < 1.0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # until the training process has worked for a CPU second: reading, merging
    assert cpu_seconds_of_child(proc.pid) >= 1.0, proc.communicate()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err  # 130 for Ctrl-C, 143 for SIGTERM
    assert err.strip().splitlines() == ["qinglm: interrupted"]
    assert not out.exists()  # no tokenizer files, not even the staging directory
    # One CPU second of training and starting Python twice; training to the end would cost about 20.
    assert cpu_seconds_of_children() - before < 8


def sigint_as_in_a_terminal() -> None:
    """Give the child Ctrl-C's default action: a job a shell script starts with `&` ignores SIGINT, and its
    children (this test run, then `qinglm`) inherit that, so under such a CI the command never sees the signal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cpu_seconds_of_child(pid: int) -> float:
    """Return the CPU seconds used so far by the child processes of pid (Linux /proc)."""
    ticks = 0
    for d in Path("/proc").iterdir():
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split() if d.name.isdigit() else []
        except OSError:
            continue
        if fields and int(fields[1]) == pid:  # state ppid ... utime (14th field) stime (15th)
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds_of_children() -> float:
    """Return the CPU seconds used so far by this process's finished children and theirs."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
