"""Quality at equal wall-clock budget: train each recipe from scratch for --minutes on pd1998 train,
then bits per character over the *whole* pd1998 val split (NLL in bits / characters, so it is
tokenizer-independent). Runs are sequential, so each has the whole machine.

    python -m benchmarks.quality [--minutes 10] [--threads N] [--recipes baseline qinglm]
                                 [--splits paragraph honest]

Each recipe trains once per split: "paragraph" holds out single paragraphs by a hash (the older split,
whose val paragraphs mostly have their article's other paragraphs in training) and "honest" holds out
evenly spaced blocks of whole articles (qinglm's default for pd1998); the table puts them side by side.

baseline: benchmarks.baseline_gpt at tiny dims, eager fp32, plain AdamW lr 1e-3 betas (0.9, 0.95),
          dropout 0.1, batch 32 x 256, 5% warmup + cosine (nanoGPT's baby-GPT recipe).
qinglm:   `qinglm.train.train` itself on the tiny preset with the TrainConfig / ModelConfig defaults and the
          main job's pass limit, i.e. what `qinglm train --max-time M` does (dtype auto, compile auto);
          only periodic eval / checkpoints / samples are switched off (the baseline has none either).
Extra recipes "qinglm:lr=3e-3,dropout=0.1,dtype=fp32" override TrainConfig/ModelConfig fields, and
"baseline:lr=6e-4,dropout=0.0" the baseline's (lr sweep: --recipes baseline:lr=6e-4 baseline:lr=2e-3).
On a busy machine compare at equal steps instead of equal time: "baseline:steps=150", "qinglm:max_steps=300".
"qinglm:vocab=4000,d_model=192" also changes the tokenizer / preset shape. Both use the same QingLM
tokenizer (10k unless vocab= says otherwise) and the same prepared data.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks import baseline_gpt as bg
from benchmarks import common

QINGLM: dict = {}  # the package defaults, nothing overridden
BASELINE = {"lr": 1e-3, "dropout": 0.1, "batch_size": 32, "seq_len": 256}
SPLITS = {"paragraph": "document", "honest": "auto"}  # name -> split_by of qinglm.data.builtin


def bpc(model: torch.nn.Module, seq_len: int, data, dtype: str = "fp32") -> float:
    """Return bits per character of model over the whole val split of `data` (model(x) -> logits)."""
    from qinglm.data.loader import eval_batches
    from qinglm.data.shards import TokenShards
    from qinglm.device import autocast

    val = TokenShards(data, "val")
    nll = 0.0
    model.eval()
    with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
        for x, y in eval_batches(val, 16, seq_len):
            logits = model(x).float()
            nll += F.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-100, reduction="sum"
            ).item()
    return nll / math.log(2) / val.n_characters


def parse_overrides(spec: str) -> dict:
    out = {}
    for kv in filter(None, spec.split(",")):
        k, v = kv.split("=")
        out[k] = {"true": True, "false": False}.get(v.lower(), v)
        if isinstance(out[k], str):
            try:
                out[k] = float(v) if any(c in v for c in ".e") else int(v)
            except ValueError:
                pass
    return out


def run_baseline(seconds: float, over: dict, split_by: str) -> dict:
    r = {**BASELINE, **over}
    torch.manual_seed(0)
    vocab = common.qinglm_tokenizer(10_000, split_by)[0].vocab_size
    model = bg.GPT(bg.GPTConfig(vocab_size=vocab, block_size=r["seq_len"], dropout=r["dropout"]))
    res = bg.train_for(
        model,
        common.token_stream(10_000, "train", split_by),
        seconds=seconds,
        lr=r["lr"],
        batch_size=r["batch_size"],
        block_size=r["seq_len"],
        steps=r.get("steps"),
    )
    return {**res, "bpc": bpc(model, r["seq_len"], common.data_dir(10_000, split_by)), "recipe": r}


def run_qinglm(seconds: float, over: dict, split_by: str) -> dict:
    from qinglm.config import PRESETS, ModelConfig
    from qinglm.train import train
    from qinglm.train.config import DEFAULT_MAX_EPOCHS, TrainConfig

    r = {"num_epochs": DEFAULT_MAX_EPOCHS, **QINGLM, **over}
    vocab = r.pop("vocab", PRESETS["tiny"]["vocab_size"])
    data = common.data_dir(vocab, split_by)
    model_keys = {"dropout", "family", "max_seq_len", "d_model", "n_layers", "n_heads"}
    mcfg = ModelConfig(**{**PRESETS["tiny"], **{k: v for k, v in r.items() if k in model_keys}})
    mcfg.vocab_size = common.qinglm_tokenizer(vocab, split_by)[0].vocab_size
    tcfg = TrainConfig(
        max_time=seconds / 60,
        eval_every=10**9,
        save_every=10**9,
        log_every=10**9,
        num_threads=torch.get_num_threads(),
        sample_prompts=[],
        **{k: v for k, v in r.items() if k not in model_keys},
    )
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.perf_counter()
        res = train(mcfg, tcfg, run_dir, data, log=lambda s: None)
        seconds_used = time.perf_counter() - t0
        from qinglm.model.transformer import Transformer
        from qinglm.train.checkpoint import latest_checkpoint, load_model_weights

        model = Transformer(mcfg)
        load_model_weights(model, latest_checkpoint(run_dir))
    from qinglm.device import resolve_compile, resolve_dtype

    dev = torch.device("cpu")
    r = {
        "lr": tcfg.lr,
        "dropout": mcfg.dropout,
        "dtype": resolve_dtype(tcfg.dtype, dev),
        "compile": resolve_compile(tcfg.compile, dev),
        **r,
    }
    return {
        "steps": res["step"],
        "tokens_seen": res["tokens_seen"],
        "tokens_per_s": res["tokens_per_s"],
        "train_loss": res["train_loss"],
        "seconds": seconds_used,
        "bpc": bpc(model, tcfg.seq_len, data),
        "recipe": r,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--recipes", nargs="+", default=["baseline", "qinglm"])
    ap.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for split in args.splits:
        common.data_dir(10_000, SPLITS[split])
    results: dict[str, dict[str, dict]] = {}
    for spec in args.recipes:
        name, _, over = spec.partition(":")
        fn = {"baseline": run_baseline, "qinglm": run_qinglm}[name]
        for split in args.splits:
            r = fn(args.minutes * 60, parse_overrides(over), SPLITS[split])
            results.setdefault(spec, {})[split] = r
            print(f"{spec} [{split} split]: {r}", flush=True)
    print(
        f"\n{args.minutes:g} min per recipe and split, {torch.get_num_threads()} threads, val = whole pd1998 val"
    )
    print("split (paragraph: single paragraphs by hash; honest: blocks of whole articles)\n")
    cols = " | ".join(f"{s}: steps | train loss | val BPC | vs baseline" for s in args.splits)
    print(f"| recipe | {cols} |")
    print("|---|" + "---:|" * 4 * len(args.splits))
    for spec, by_split in results.items():
        cells = []
        for split in args.splits:
            r = by_split[split]
            base = next((b[split]["bpc"] for s, b in results.items() if s.startswith("baseline")), None)
            rel = f"{r['bpc'] / base:.3f}" if base else "-"
            cells.append(f"{r['steps']:,} | {r['train_loss']:.3f} | {r['bpc']:.4f} | {rel}")
        print(f"| {spec} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
