"""Every benchmark in turn, each printing its table: `python -m benchmarks [--minutes 10]`.

Runs the tokenizer comparison, training throughput (tokens/s, MFU, peak RSS) and quality at equal
wall-clock budget against the nanoGPT-style baseline (on the honest and the paragraph split), then
inference speed (KV-cache engine vs no-cache loop vs transformers, int8/bf16 vs fp32), the BPC change
of int8, and every model/training option at equal steps (benchmarks/options.py). Takes about
4 * minutes + 80 minutes on 2 CPU cores.
"""

import argparse
import subprocess
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per recipe in quality.py")
    args = ap.parse_args()
    runs = [
        ["tokenizer"],
        [
            "throughput",
            "--steps",
            "20",
            "--rounds",
            "2",
            "--configs",
            "baseline",
            "classic",
            "classic+bf16+compile",
            "tiny",
            "small",
        ],
        ["quality", "--minutes", f"{args.minutes:g}", "--recipes", "baseline:lr=2e-3", "qinglm"],
        ["inference", "--threads", "1"],
        ["options", "--threads", "1"],
    ]
    for run in runs:
        print(f"\n## python -m benchmarks.{' '.join(run)}\n", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{run[0]}", *run[1:]], check=True)


if __name__ == "__main__":
    main()
