"""SFT figures on idioms-sft: packing vs padding, then full SFT and LoRA from one pretrained tiny base.

    python -m benchmarks.sft --base RUN [--minutes 8] [--batching-examples 2000] [--pinyin 100]

1. full SFT and LoRA (rank 8, alpha 16, every linear) for --minutes each on all training chats (the
   cosine schedule is fitted to the time), then held-out assistant-token loss before/after, exact-match
   pinyin accuracy on the first --pinyin held-out idioms, time per epoch and trainable parameters.
2. pack vs pad: full SFT for one epoch on the same --batching-examples training chats each way, with
   about the same tokens per step (--pack-batch-size rows of --seq-len vs 16 padded chats); prints the
   time per epoch and the held-out assistant-token loss.
Runs are sequential; outputs go under --work (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from qinglm.sft.config import SFTConfig
from qinglm.sft.train import run_sft


def _run(name: str, work: Path, **kw) -> dict:
    res = run_sft(SFTConfig(out=str(work / name), log_every=25, **kw), log=lambda s: print(f"  [{name}] {s}"))
    print(json.dumps({"run": name, **{k: v for k, v in res.items() if k != "pinyin"}}, ensure_ascii=False))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="pretrained run directory")
    ap.add_argument("--minutes", type=float, default=8.0, help="training time of each of full SFT and LoRA")
    ap.add_argument("--batching-examples", type=int, default=2000)
    ap.add_argument(
        "--pack-batch-size",
        type=int,
        default=2,
        help="rows per packed batch (2 x 256 ~ the tokens of 16 padded chats)",
    )
    ap.add_argument("--pinyin", type=int, default=100, help="held-out idioms asked for their pinyin")
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--work", default=None)
    ap.add_argument("--skip-batching", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="qinglm-sft-bench-"))
    common = dict(
        base=args.base, seq_len=args.seq_len, eval_examples=args.eval_examples, num_threads=args.threads
    )

    results = {}
    for name, lora in (("full", False), ("lora", True)):
        results[name] = _run(
            name, work, lora=lora, max_time=args.minutes, eval_pinyin=args.pinyin, batch_size=4, **common
        )
    print(
        "\n| run | trainable params | steps | training chats | time per epoch (s, extrapolated) | "
        "held-out loss before | after | pinyin exact | right format | syllables right |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        p = r["pinyin"]
        print(
            f"| {name} | {r['trainable_params']:,} | {r['steps']} | {r['examples']:,} | "
            f"{r['time_per_epoch_s']:.0f} | {r['val_loss_before']:.4f} | {r['val_loss_after']:.4f} | "
            f"{p['exact']}/{p['n']} ({p['accuracy']:.1%}) | {p['format_ok']:.1%} | "
            f"{p['syllable_accuracy']:.1%} |"
        )
        for ex in p["examples"][:3]:
            print(f"    {ex['idiom']}: want {ex['want']!r} got {ex['got']!r}")
    if not args.skip_batching:
        rows = []
        for mode in ("pack", "pad"):
            r = _run(
                f"batching-{mode}",
                work,
                batching=mode,
                batch_size=args.pack_batch_size if mode == "pack" else 16,
                num_epochs=1.0,
                eval_pinyin=0,
                max_examples=args.batching_examples,
                **common,
            )
            rows.append((mode, r))
        print("\n| batching | steps | time per epoch (s) | held-out loss before | after |")
        print("|---|---|---|---|---|")
        for mode, r in rows:
            print(
                f"| {mode} | {r['steps']} | {r['time_per_epoch_s']:.1f} | {r['val_loss_before']:.4f} | "
                f"{r['val_loss_after']:.4f} |"
            )

    print(f"\nruns in {work}")


if __name__ == "__main__":
    main()
