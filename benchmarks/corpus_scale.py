"""Corpus-scale benchmark: `qinglm data clean`, `data dedup`, `tokenizer train` and `prepare`, each on the
one before it's output, on a generated JSONL corpus of distinct sentences: each stage's MB/s and peak RSS.

    python -m benchmarks.corpus_scale [--mb 300] [--vocab 16000] [--keep DIR] [--stages clean dedup tokenizer prepare]

The corpus is pd1998's paragraphs over and over with 8% of the characters replaced at random
(seeded), so nearly every clause is distinct: the worst case for the BPE trainer's memory. It is
written to a temporary directory and deleted afterwards (unless --keep). Each stage runs as its own
process; peak RSS is its largest process's ru_maxrss and, for stages with worker processes, the sum over
the process and its workers (sampled every 0.2 s); CPU is user + system time, workers included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from qinglm.data.builtin import builtin_documents


def write_corpus(path: Path, mb: int, seed: int = 0) -> int:
    """Return the bytes written: about `mb` MB of {"text": ...} lines, pd1998 with random substitutions
    (8% of the characters replaced by random CJK characters of pd1998, a fresh draw each round)."""
    docs = builtin_documents("pd1998")
    chars = np.array(sorted({ord(c) for d in docs for c in d if "\u4e00" <= c <= "\u9fff"}), dtype=np.uint32)
    cps = np.frombuffer("".join(docs).encode("utf-32-le"), dtype=np.uint32)
    ends = np.cumsum([len(d) for d in docs])
    plain = [json.dumps(d, ensure_ascii=False) == f'"{d}"' for d in docs]  # no escaping needed
    rng = np.random.default_rng(seed)
    target, written = mb << 20, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            round_cps = cps.copy()
            mask = rng.random(len(cps)) < 0.08
            round_cps[mask] = chars[rng.integers(0, len(chars), int(mask.sum()))]
            text = round_cps.tobytes().decode("utf-32-le")
            start = 0
            lines = []
            for end, ok in zip(ends, plain):
                t = text[start:end]
                start = end
                lines.append(
                    f'{{"text": "{t}"}}\n' if ok else json.dumps({"text": t}, ensure_ascii=False) + "\n"
                )
            block = "".join(lines)
            size = len(block.encode("utf-8"))
            if written + size > target:  # the last round: only the lines that fit
                for line in lines:
                    f.write(line)
                    written += len(line.encode("utf-8"))
                    if written >= target:
                        break
                break
            f.write(block)
            written += size
    return written


def _tree_rss_mb(pid: int) -> float:
    """Return the summed RSS (MB) of pid and its descendants (worker processes), 0 when it is gone."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def run_stage(args: list[str]) -> dict:
    """Return wall seconds, CPU seconds (the process and its workers) and peak RSS (MB; the largest
    process, and the sum over the process and its workers sampled every 0.2 s) of `python -m qinglm ARGS`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qinglm", *args], stdout=subprocess.PIPE, text=True)
    tree, done = {"peak": 0.0}, threading.Event()

    def sample() -> None:  # not proc.poll(): that would reap the child before wait4 reads its usage
        while not done.wait(0.2):
            tree["peak"] = max(tree["peak"], _tree_rss_mb(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    wall = time.perf_counter() - t0
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"qinglm {' '.join(args)} failed:\n{out}")
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,
        "tree_mb": tree["peak"],
        "log": out,
    }


STAGES = ("clean", "dedup", "tokenizer", "prepare")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=300, help="corpus size in MiB")
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--keep", help="write the corpus and outputs here and keep them")
    ap.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES),
        help="stages to run, each on the output of the one before it (kept in --keep DIR from an "
        "earlier run when it is not run now)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        corpus = root / "corpus.jsonl"
        size = corpus.stat().st_size if corpus.is_file() else write_corpus(corpus, args.mb)
        inputs = {
            "clean": corpus,
            "dedup": root / "clean",
            "tokenizer": root / "dedup",
            "prepare": root / "dedup",
        }
        commands = {
            "clean": ["data", "clean", str(corpus), "--out", str(root / "clean")],
            "dedup": [
                "data",
                "dedup",
                str(root / "clean"),
                "--out",
                str(root / "dedup"),
                "--tmp-dir",
                str(root),
            ],
            "tokenizer": [
                "tokenizer",
                "train",
                "--data",
                str(root / "dedup"),
                "--vocab-size",
                str(args.vocab),
            ]
            + ["--out", str(root / "tok")],
            "prepare": ["prepare", "--data", str(root / "dedup"), "--tokenizer", str(root / "tok")]
            + ["--out", str(root / "data")],
        }
        print(f"corpus: {size / 1e6:,.1f} MB of JSONL, vocab {args.vocab:,}, {os.cpu_count()} CPUs")
        print(
            "| stage | input MB | wall s | MB/s | CPU s | MB per CPU-s | peak RSS MB (largest process) "
            "| peak RSS MB (with workers) |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for stage in args.stages:
            src = inputs[stage]
            if not src.exists():
                raise SystemExit(f"{stage} needs {src}: run the stage before it (with --keep DIR)")
            mb = (
                src.stat().st_size if src.is_file() else sum(f.stat().st_size for f in src.glob("*.jsonl"))
            ) / 1e6
            r = run_stage(commands[stage])
            print(
                f"| {stage} | {mb:,.0f} | {r['wall']:.1f} | {mb / r['wall']:.2f} | {r['cpu']:.1f} | "
                f"{mb / r['cpu']:.2f} | {r['rss_mb']:,.0f} | {r['tree_mb']:,.0f} |",
                flush=True,
            )
            for line in r["log"].splitlines():
                if line.startswith(
                    ("tokenizer sample", "kept ", "exact", "near", "length", "cjk", "repetition")
                ):
                    print(f"  {line}")


if __name__ == "__main__":
    main()
