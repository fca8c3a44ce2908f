"""The README's whole path on this CPU: pretrain → SFT → DPO → GRPO, with held-out figures after each stage.

    python -m benchmarks.post_training [--work DIR] [--threads 2] [--pretrain-minutes 6] [--sft-epochs 2]
                                       [--dpo-steps 150] [--grpo-steps 60] [--n 100]

Each stage is the real command (`qinglm train|sft|dpo|grpo`) in a subprocess, its output kept in
WORK/<stage>.log. After each stage the same held-out figures are measured on its run:
  pinyin   the first --n held-out idioms asked for their pinyin, greedy: exact match and syllables right
           (qinglm.evals.chat.pinyin_accuracy; the idioms are held out of the tokenizer, the pretraining
           corpus, idioms-sft, idioms-dpo and the GRPO task's train split: tests/test_heldout_idioms.py)
  dpo acc  held-out idioms-dpo pairs whose chosen reply the model finds more likely than the rejected one
  arith    held-out arithmetic word problems answered right, greedy (the GRPO `arithmetic` task's verifier)
The recipe (chars pre-tokenizer, pinyin questions only, 2 epochs) comes from benchmarks/post_training_notes.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(work: Path, name: str, args: list[str]) -> float:
    """Return the seconds `qinglm ARGS` took; its output goes to WORK/NAME.log (and a tail to stdout)."""
    t0 = time.perf_counter()
    with open(work / f"{name}.log", "w") as f:
        p = subprocess.run([sys.executable, "-m", "qinglm", *args], stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    tail = (work / f"{name}.log").read_text(encoding="utf-8").splitlines()[-6:]
    print(f"== {name} ({seconds:.0f} s, exit {p.returncode})\n" + "\n".join(tail), flush=True)
    if p.returncode:
        raise SystemExit(f"{name} failed; see {work / name}.log")
    return seconds


def figures(run_dir: Path, n: int) -> dict:
    """Return the held-out figures of a run (see the module docstring)."""
    import torch

    import qinglm
    from qinglm.data.verifiable import arithmetic
    from qinglm.evals.chat import pass_rate, pinyin_accuracy
    from qinglm.post import dpo_data
    from qinglm.post.dpo_loss import pair_logps
    from qinglm.post.idioms_dpo import idioms_dpo

    lm = qinglm.load(run_dir, device="cpu")
    p = pinyin_accuracy(lm.model, lm.tokenizer, n)
    pairs, _ = dpo_data.encode_pairs(lm.tokenizer, idioms_dpo("heldout")[: 2 * n], lm.config.max_seq_len)
    right = 0
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            x, y = dpo_data.collate_pairs(pairs[i : i + 16], lm.tokenizer.pad_id)
            chosen, rejected = pair_logps(lm.model(x), y)
            right += int((chosen > rejected).sum())
    task = arithmetic()
    arith = pass_rate(lm.model, lm.tokenizer, task, task.split("heldout")[:n], 16)
    return {
        "pinyin_exact": p["accuracy"],
        "pinyin_syllables": p["syllable_accuracy"],
        "dpo_acc": right / max(len(pairs), 1),
        "arith_pass": arith["pass_rate"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pretrain-minutes", type=float, default=6.0)
    ap.add_argument("--sft-epochs", type=float, default=2.0)
    ap.add_argument("--dpo-steps", type=int, default=150)
    ap.add_argument("--grpo-steps", type=int, default=60)
    ap.add_argument("--n", type=int, default=100, help="held-out items per figure")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qinglm-path-"))
    work.mkdir(parents=True, exist_ok=True)
    t = ["--num-threads", str(args.threads)]
    stages = [
        ("pretrain", ["train", "--data", "idioms", "--pre-tokenizer", "chars", "--max-time", str(args.pretrain_minutes),
                      "--out", str(work / "pretrain"), *t]),
        ("sft", ["sft", "--base", str(work / "pretrain"), "--data", "idioms-sft", "--idiom-kinds", "pinyin",
                 "--num-epochs", str(args.sft_epochs), "--batch-size", "16", "--seq-len", "256", "--lr", "2e-3",
                 "--out", str(work / "sft"), *t]),
        ("dpo", ["dpo", "--base", str(work / "sft"), "--data", "idioms-dpo", "--max-steps", str(args.dpo_steps),
                 "--out", str(work / "dpo"), *t]),
        ("grpo", ["grpo", "--base", str(work / "dpo"), "--task", "idioms-pinyin", "--max-steps", str(args.grpo_steps),
                  "--out", str(work / "grpo"), *t]),
    ]  # fmt: skip
    rows, total = [], 0.0
    for name, cmd in stages:
        seconds = run(work, name, cmd)
        total += seconds
        f = figures(work / name, args.n)
        rows.append({"stage": name, "seconds": round(seconds), **f})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| after | time | pinyin exact | pinyin syllables | DPO pair accuracy | arithmetic pass |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['seconds'] // 60}m{r['seconds'] % 60:02d}s | {r['pinyin_exact']:.0%} | "
            f"{r['pinyin_syllables']:.1%} | {r['dpo_acc']:.1%} | {r['arith_pass']:.0%} |"
        )
    print(f"total {total / 60:.1f} min; runs in {work}")


if __name__ == "__main__":
    main()
