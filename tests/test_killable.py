"""Ctrl-C (or SIGTERM) stops `qinglm tokenizer train` at once, although the Rust trainer ignores it."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory) -> Path:
    """Return a file of 600,000 random CJK characters: BPE training on it takes ~10 s on 2 CPU cores."""
    rng = random.Random(0)
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    lines = [
        "，".join("".join(rng.choices(chars, k=rng.randint(2, 8))) for _ in range(6)) + "。"
        for _ in range(15_000)
    ]
    path = tmp_path_factory.mktemp("slow") / "random.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_tokenizer_training_at_once_and_writes_nothing(slow_corpus, tmp_path, signum):
    out = tmp_path / "tok"
    cmd = [sys.executable, "-m", "qinglm", "tokenizer", "train", "--data", slow_corpus]
    cmd += ["--vocab-size", "20000", "--out", out]
    proc = subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # started, reading or merging in Rust
    assert proc.poll() is None, proc.communicate()
    sent = time.monotonic()
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 3.0
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["qinglm: interrupted"]
    assert not out.exists()  # no tokenizer files, not even the staging directory
