"""Corpus-scale benchmark: `qinglm tokenizer train` and `qinglm prepare` on a generated JSONL corpus of
distinct sentences, each stage's MB/s and peak RSS.

    python -m benchmarks.corpus_scale [--mb 300] [--vocab 16000] [--keep DIR] [--stages prepare]

The corpus is pd1998's paragraphs over and over with 8% of the characters replaced at random
(seeded), so nearly every clause is distinct: the worst case for the BPE trainer's memory. It is
written to a temporary directory and deleted afterwards (unless --keep). Each stage runs as its own
process; peak RSS is that process's ru_maxrss, CPU is its user + system time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qinglm.data.builtin import builtin_documents


def write_corpus(path: Path, mb: int, seed: int = 0) -> int:
    """Return the bytes written: about `mb` MB of {"text": ...} lines, pd1998 with random substitutions."""
    docs = builtin_documents("pd1998")
    chars = np.array(sorted({ord(c) for d in docs for c in d if "\u4e00" <= c <= "\u9fff"}), dtype=np.uint32)
    rng = np.random.default_rng(seed)
    target, written = mb << 20, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            for doc in docs:
                cps = np.frombuffer(doc.encode("utf-32-le"), dtype=np.uint32).copy()
                mask = rng.random(len(cps)) < 0.08
                cps[mask] = chars[rng.integers(0, len(chars), int(mask.sum()))]
                line = json.dumps({"text": cps.tobytes().decode("utf-32-le")}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line.encode("utf-8"))
                if written >= target:
                    break
    return written


def run_stage(args: list[str]) -> dict:
    """Return wall seconds, CPU seconds and peak RSS (MB) of `python -m qinglm ARGS` run as a child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qinglm", *args], stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"qinglm {' '.join(args)} failed:\n{out}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
        "log": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=300, help="corpus size in MiB")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--keep", help="write the corpus and outputs here and keep them")
    ap.add_argument(
        "--stages",
        nargs="+",
        choices=["tokenizer", "prepare"],
        default=["tokenizer", "prepare"],
        help="stages to run; prepare alone uses the tokenizer an earlier run left in --keep DIR",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        corpus = root / "corpus.jsonl"
        size = corpus.stat().st_size if corpus.is_file() else write_corpus(corpus, args.mb)
        mb = size / 1e6
        commands = {
            "tokenizer train": ["tokenizer", "train", "--data", str(corpus), "--vocab-size", str(args.vocab)]
            + ["--out", str(root / "tok")],
            "prepare": ["prepare", "--data", str(corpus), "--tokenizer", str(root / "tok")]
            + ["--out", str(root / "data")],
        }
        if "tokenizer" not in args.stages and not (root / "tok").is_dir():
            raise SystemExit("--stages prepare needs --keep DIR holding tok/ from an earlier run")
        print(f"corpus: {mb:,.1f} MB of JSONL, vocab {args.vocab:,}, {os.cpu_count()} CPUs")
        print("| stage | wall s | MB/s | CPU s | MB per CPU-s | peak RSS MB |")
        print("|---|---:|---:|---:|---:|---:|")
        for stage in args.stages:
            name = "tokenizer train" if stage == "tokenizer" else stage
            r = run_stage(commands[name])
            print(
                f"| {name} | {r['wall']:.1f} | {mb / r['wall']:.2f} | {r['cpu']:.1f} | "
                f"{mb / r['cpu']:.2f} | {r['rss_mb']:,.0f} |",
                flush=True,
            )
            sample = [line for line in r["log"].splitlines() if line.startswith("tokenizer sample")]
            if sample:
                print(f"  ({sample[0]})")


if __name__ == "__main__":
    main()
