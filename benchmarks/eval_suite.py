"""Does the task suite separate models? Train each (preset, minutes) from scratch with `qinglm train`, run
`--tasks all` on it, and print every task's score with its 95 % interval, model by model.

    python -m benchmarks.eval_suite [--models tiny:2 tiny:10 small:30] [--data pd1998 reviews idioms]
                                    [--threads N] [--limit N] [--out DIR]

The issue's table is the default: tiny after 2 and 10 minutes, small after 30 (about 45 minutes of
training on 2 CPU cores). A task separates two neighbouring models when the later one scores better
(higher accuracy, lower bits per character) and their intervals do not overlap; the last lines count the
tasks on which every neighbouring pair is separated, and the time `--tasks all` took per model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def train(spec: str, data: list[str], threads: int, out: Path) -> Path:
    """Return the run directory of `qinglm train` for spec, PRESET:MINUTES (a time budget), PRESET@STEPS
    (a step budget: what those minutes give on an unloaded CPU, so a busy machine does not change the weights)
    or budget:MINUTES (`qinglm train --budget MINUTESm`: the shape the scaling law chooses); reused when it
    exists."""
    preset, _, minutes = spec.partition(":")
    steps = None
    if "@" in spec:
        preset, steps = spec.split("@")
    run = out / (f"{preset}-{steps}steps" if steps else f"{preset}-{float(minutes):g}min")
    if (run / "config.json").is_file():
        return run
    budget = ["--max-steps", steps] if steps else ["--max-time", minutes]
    if preset == "budget":
        budget = ["--budget", f"{float(minutes):g}m"]
    else:
        budget = ["--preset", preset, *budget]
    cmd = [sys.executable, "-m", "qinglm", "train", *budget]
    cmd += ["--data", *data, "--out", str(run), "--num-threads", str(threads), "--eval-every", "100000"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return run


def separated(a: dict, b: dict) -> bool:
    """Return True when model b beats model a on a task with non-overlapping intervals."""
    if a["kind"] == "bpc":
        return b["interval"][1] < a["interval"][0]
    return b["interval"][0] > a["interval"][1]


def main() -> None:
    import torch

    import qinglm
    from qinglm.evals.suite import evaluate_tasks

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["tiny:2", "tiny:10", "small:30"],
        help="PRESET:MINUTES, PRESET@STEPS or budget:MINUTES",
    )
    ap.add_argument("--train-only", action="store_true", help="train the models and stop")
    ap.add_argument("--data", nargs="+", default=["pd1998", "reviews", "idioms"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--out", type=Path, default=Path(".cache/benchmarks/eval_suite"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names, outs, seconds = [], [], []
    for spec in args.models:
        run = train(spec, args.data, args.threads, args.out)
        if args.train_only:
            continue
        lm = qinglm.load(run, device="cpu")
        t0 = time.perf_counter()
        out = evaluate_tasks(lm.model, lm.tokenizer, "all", limit=args.limit, val_fraction=lm.val_fraction)
        seconds.append(time.perf_counter() - t0)
        names.append(spec)
        outs.append(out)
    if args.train_only:
        return
    print(f"{'task':<18} {'random':>7}  " + "  ".join(f"{n:>22}" for n in names))
    tasks = list(outs[0]["tasks"])
    split = 0
    for t in tasks:
        rs = [o["tasks"][t] for o in outs]
        cells = [f"{r['score']:.3f} [{r['interval'][0]:.3f},{r['interval'][1]:.3f}]" for r in rs]
        ok = all(separated(a, b) for a, b in zip(rs, rs[1:]))
        split += ok
        print(
            f"{t:<18} {rs[0]['random']:>7.3f}  "
            + "  ".join(f"{c:>22}" for c in cells)
            + ("  *" if ok else "")
        )
    print(f"{'summary':<18} {'0':>7}  " + "  ".join(f"{o['summary']:>22.4f}" for o in outs))
    print(f"tasks separating every neighbouring pair (*): {split} of {len(tasks)}")
    print("seconds for --tasks all: " + ", ".join(f"{n} {s:.0f}" for n, s in zip(names, seconds)))


if __name__ == "__main__":
    main()
