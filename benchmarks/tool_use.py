"""Tool use from scratch on this CPU: pretrain → SFT on tools-sft → agentic GRPO (--task tools), with the
held-out chat-tools figures after SFT and after GRPO.

    python -m benchmarks.tool_use [--work DIR] [--threads 2] [--pretrain-minutes 4] [--sft-steps 300]
                                  [--grpo-steps 30] [--n 60] [--mix] [--base PRETRAINED_RUN]

Each stage is the real command (`qinglm train|sft|grpo`) in a subprocess (benchmarks.post_training.run),
its output in WORK/<stage>.log. The pretraining text is tools-sft's training chats with the template's
control tokens taken out (so the tokenizer sees JSON and the tool list: a tools-sft chat is then about 280
tokens, against about 720 with a tokenizer trained on news text; see the README). --mix pretrains on
pd1998 and the idiom dictionary's training entries as well (a 4,000-token vocabulary trained on the same
mix), so ten minutes are about two passes over varied text instead of sixteen over the same chats.
After SFT and after GRPO, --n held-out tools-sft episodes (spread evenly) are played greedily with the
built-in tools running (qinglm.evals.tool_use.score_episodes, thinking off), giving the issue's four
rates with Wilson intervals:
  call_ok       a well-formed call where a tool is needed
  args_right    the right tools with the right arguments, every turn (over all episodes)
  answer_right  the right final answer
  no_call_ok    no call where none is needed
CPU-minutes: the post-training stages' processes' user + system CPU time (all threads), cumulative from
the end of pretraining (the issue's budget is for post-training).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import tempfile
from pathlib import Path

from benchmarks.post_training import run

ROWS = ("call_ok", "args_right", "answer_right", "no_call_ok")


def pretraining_text(path: Path) -> None:
    """Write tools-sft's training chats, rendered, without the control tokens, one chat per paragraph."""
    from qinglm.chat_template import CONTROL_TOKENS, render_chat
    from qinglm.data.tools_sft import tools_sft

    strip = re.compile("|".join(map(re.escape, CONTROL_TOKENS)))
    chats = [strip.sub("", render_chat(chat, bos_token="")) for chat in tools_sft("train")]
    path.write_text("\n\n".join(chats) + "\n", encoding="utf-8")


def figures(run_dir: Path, n: int) -> dict:
    """Return the chat-tools figures of a run on n held-out episodes (thinking off)."""
    import qinglm
    from qinglm.data.tools_sft import tools_sft
    from qinglm.evals.suite import _take
    from qinglm.evals.tool_use import score_episodes

    lm = qinglm.load(run_dir, device="cpu")
    s = score_episodes(lm.model, lm.tokenizer, _take(tuple(tools_sft("heldout")), n), 64)
    return {f: (s[f], s[f + "_n"], s[f + "_interval"]) for f in ROWS}


def cpu_seconds() -> float:
    """Return the CPU time (user + system) of the finished child processes so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pretrain-minutes", type=float, default=4.0)
    ap.add_argument("--sft-steps", type=int, default=300)
    ap.add_argument("--grpo-steps", type=int, default=30)
    ap.add_argument("--n", type=int, default=60, help="held-out episodes per figure")
    ap.add_argument("--mix", action="store_true", help="pretrain on pd1998 + idioms (train) + the chats")
    ap.add_argument("--base", help="a pretrained run to start from (skips pretraining)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qinglm-tools-"))
    work.mkdir(parents=True, exist_ok=True)
    pretraining_text(work / "tools.txt")
    t = ["--num-threads", str(args.threads)]
    data, tok = [str(work / "tools.txt")], ["--vocab-size", "2000"]
    if args.mix:
        data, tok = data + ["pd1998", "idioms"], ["--vocab-size", "4000"]
    stages = [
        ("pretrain", ["train", "--data", *data, *tok, "--d-model", "128",
                      "--n-layers", "4", "--n-heads", "4", "--max-seq-len", "512", "--seq-len", "512",
                      "--batch-size", "8", "--lr", "2e-3", "--max-time", str(args.pretrain_minutes),
                      "--out", str(work / "pretrain"), *t]),
        ("sft", ["sft", "--base", args.base or str(work / "pretrain"), "--data", "tools-sft", "--max-steps", str(args.sft_steps),
                 "--batch-size", "8", "--seq-len", "512", "--lr", "2e-3", "--out", str(work / "sft"), *t]),
        ("grpo", ["grpo", "--base", str(work / "sft"), "--task", "tools", "--tools", "builtin",
                  "--max-tool-calls", "3", "--max-steps", str(args.grpo_steps), "--group-size", "4",
                  "--batch-size", "2", "--max-new-tokens", "48", "--lr", "5e-5", "--eval-prompts", "12",
                  "--eval-every", str(max(args.grpo_steps, 1)), "--out", str(work / "grpo"), *t]),
    ]  # fmt: skip
    rows, cpu0 = [], 0.0
    for name, cmd in stages[1:] if args.base else stages:
        run(work, name, cmd)
        if name == "pretrain":
            cpu0 = cpu_seconds()
            continue
        f = figures(work / name, args.n)
        rows.append(
            {"row": "SFT" if name == "sft" else "SFT + GRPO", "cpu_min": (cpu_seconds() - cpu0) / 60, **f}
        )
        print(json.dumps(rows[-1]), flush=True)
    head = "| model | " + " | ".join(ROWS) + " | post-training CPU-minutes (cumulative) |"
    print("\n" + head + "\n|---|" + "---:|" * (len(ROWS) + 1))
    for r in rows:
        cells = [
            f"{k}/{n} = {k / max(n, 1):.0%} [{lo:.0%}, {hi:.0%}]" for k, n, (lo, hi) in (r[f] for f in ROWS)
        ]
        print(f"| {r['row']} | " + " | ".join(cells) + f" | {r['cpu_min']:.1f} |")
    print(f"runs in {work}")


if __name__ == "__main__":
    main()
