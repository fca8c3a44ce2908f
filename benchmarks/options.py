"""Every model / training option against the plain recipe: loss at equal steps, step time, peak memory.

    python -m benchmarks.options [--steps 150] [--batch-size 16] [--threads 1] [--variants NAME ...]

Each variant trains the `tiny` preset (or `small` where marked) from the same seed on the same pd1998
token shards (QingLM's 10k / 30k tokenizers) with `qinglm.train.train` for --steps steps, then reports
the validation loss on the first 128k val tokens, the median step time over the logged intervals
(the first one, with warm-up, left out), and the process's peak RSS. Every variant runs in a fresh
subprocess so memory figures do not leak between them. All use bf16 autocast (this CPU has
AVX512-BF16) and eager mode (torch.compile off), so the option itself is what differs.

Pairs the issue asks about:
  moe-8x2 vs dense-2x   8 experts top-2 vs a dense MLP twice as wide: the same active parameters.
  muon vs base          Muon (block matrices) + AdamW (rest) vs AdamW at equal steps.
  small vs small+ckpt   gradient checkpointing on the small preset: memory saved, time paid.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common
from qinglm.config import PRESETS, ModelConfig, resolve_model

TINY_DFF = resolve_model(ModelConfig(**PRESETS["tiny"])).d_ff

# name -> (preset, ModelConfig overrides, TrainConfig overrides)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "base": ("tiny", {}, {}),
    "qk-norm": ("tiny", {"qk_norm": True}, {}),
    "gated-attn": ("tiny", {"gated_attention": True}, {}),
    "init-default": ("tiny", {"init": "default"}, {}),
    "init-small": ("tiny", {"init": "small"}, {}),
    "muon": ("tiny", {}, {"optimizer": "muon"}),
    "sched-linear": ("tiny", {}, {"lr_schedule": "linear"}),
    "sched-wsd": ("tiny", {}, {"lr_schedule": "wsd"}),
    "sched-constant": ("tiny", {}, {"lr_schedule": "constant"}),
    "seq-prog": ("tiny", {}, {"seq_len_schedule": "64:0.3,128:0.6"}),
    "dense-2x": ("tiny", {"d_ff": 2 * TINY_DFF}, {}),
    "moe-8x2": ("tiny", {"n_experts": 8, "experts_per_token": 2}, {}),
    "small": ("small", {}, {}),
    "small+ckpt": ("small", {"gradient_checkpointing": True}, {}),
}
VOCAB = {"tiny": 10_000, "small": 30_000}
REFERENCE = {"moe-8x2": "dense-2x", "small": "small", "small+ckpt": "small"}  # others: base


def child(name: str, steps: int, batch_size: int, threads: int) -> dict:
    """Return the figures of one variant, trained in this process."""
    from qinglm.model.transformer import Transformer
    from qinglm.train import train
    from qinglm.train.config import TrainConfig
    from qinglm.train.metrics import read_metrics

    preset, model_over, train_over = VARIANTS[name]
    data = common.data_dir(VOCAB[preset])
    vocab = common.qinglm_tokenizer(VOCAB[preset])[0].vocab_size
    mcfg = ModelConfig(**{**PRESETS[preset], "vocab_size": vocab, **model_over})
    tcfg = TrainConfig(
        **{
            "max_steps": steps,
            "batch_size": batch_size,
            "seq_len": 256,
            "eval_every": steps,
            "eval_tokens": 131_072,
            "log_every": max(1, steps // 10),
            "save_every": steps,
            "keep_checkpoints": 1,
            "dtype": "bf16",
            "compile": False,
            "device": "cpu",
            "seed": 0,
            "num_threads": threads,
            **train_over,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = train(mcfg, tcfg, Path(tmp) / "run", data, log=lambda _s: None)
        logs = [x for x in read_metrics(Path(tmp) / "run") if x["kind"] == "train"]
    tok_s = statistics.median(x["tokens_per_s"] for x in logs[1:] or logs)
    model = Transformer(mcfg)
    return {
        "variant": name,
        "preset": preset,
        "val_loss": r["val_loss"],
        "step_ms": 1000 * batch_size * 256 / tok_s,
        "peak_rss_mib": common.peak_rss_mb(),
        "params_m": model.param_counts()["total"] / 1e6,
        "active_m": (model.active_matmul_params() + mcfg.vocab_size * mcfg.d_model) / 1e6,
        "expert_load_max": logs[-1].get("expert_load_max"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch_size, args.threads)))
        return
    for preset in {VARIANTS[v][0] for v in args.variants}:  # build cached data before timing anything
        common.data_dir(VOCAB[preset])
    rows = []
    for name in args.variants:
        cmd = [sys.executable, "-m", "benchmarks.options", "--child", name, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"  {name}: val loss {r['val_loss']:.4f}, {r['step_ms']:.0f} ms/step", file=sys.stderr, flush=True
        )
    base = {r["variant"]: r for r in rows}
    threads = args.threads or "default"
    print(
        f"\n{args.steps} steps x {args.batch_size} x 256 tokens, seed 0, bf16 eager, {threads} threads, pd1998\n"
    )
    print(
        "| variant | preset | params (M) | active (M) | val loss | step (ms) | time vs ref | peak RSS (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ref = base.get(REFERENCE.get(r["variant"], "base"), r)
        print(
            f"| {r['variant']} | {r['preset']} | {r['params_m']:.2f} | {r['active_m']:.2f} | "
            f"{r['val_loss']:.4f} | {r['step_ms']:.0f} | {r['step_ms'] / ref['step_ms']:.2f}x | "
            f"{r['peak_rss_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
