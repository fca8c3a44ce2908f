"""Shared helpers of the benchmarks: cached tokenizers and token data, step timing, peak FLOP/s, peak RSS."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import torch

CACHE = Path(os.environ.get("QINGLM_BENCH_CACHE", ".cache/benchmarks"))


def qinglm_tokenizer(vocab_size: int, split_by: str = "auto"):
    """Return (QingLM tokenizer of `vocab_size` trained on pd1998 train, training seconds); cached on disk.

    split_by: "auto" is pd1998's honest split (blocks of whole articles), "document" the older split
    by single paragraphs (qinglm.data.builtin.builtin_labelled)."""
    from qinglm.data.builtin import builtin_documents
    from qinglm.tokenizer import Tokenizer, train_tokenizer

    d = CACHE / f"tok-{vocab_size}-{split_by}"
    meta = d / "bench.json"
    if meta.is_file():
        return Tokenizer.load(d), json.loads(meta.read_text())["train_s"]
    docs = builtin_documents("pd1998", "train", split_by=split_by)
    t0 = time.perf_counter()
    tok = train_tokenizer(docs, vocab_size, show_progress=False)
    train_s = time.perf_counter() - t0
    tok.save(d)
    meta.write_text(json.dumps({"train_s": train_s}))
    return tok, train_s


def data_dir(vocab_size: int, split_by: str = "auto") -> Path:
    """Return a prepared (train + val) pd1998 data directory for the QingLM tokenizer of `vocab_size`."""
    from qinglm.data.builtin import builtin_documents
    from qinglm.data.shards import prepare_shards

    out = CACHE / f"data-{vocab_size}-{split_by}"
    if not (out / "index.json").is_file():
        tok, _ = qinglm_tokenizer(vocab_size, split_by)
        docs = {s: builtin_documents("pd1998", s, split_by=split_by) for s in ("train", "val")}
        prepare_shards(docs, tok, out, show_progress=False)
    return out


def token_stream(vocab_size: int, split: str, split_by: str = "auto") -> np.ndarray:
    """Return the whole split as one int64 token stream (what a nanoGPT-style train.bin holds)."""
    from qinglm.data.shards import TokenShards

    shards = TokenShards(data_dir(vocab_size, split_by), split)
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in shards.shards])


def peak_rss_mb() -> float:
    """Return this process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 7) -> float:
    """Return the median FLOP/s of an n x n x n matmul in `dtype` with the current thread count."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, oneDNN kernels
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def time_steps(step, warmup: int, steps: int) -> tuple[list[float], float]:
    """Return (seconds of each timed step, seconds of the warm-up steps) of calling step() repeatedly."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times, warm_s
