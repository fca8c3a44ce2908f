"""Quality at equal wall-clock budget: train each recipe from scratch for --minutes on pd1998 train,
then bits per character over the *whole* pd1998 val split (NLL in bits / characters, so it is
tokenizer-independent). Runs are sequential, so each has the whole machine.

    python -m benchmarks.quality [--minutes 10] [--threads N] [--recipes baseline qinglm]

baseline: benchmarks.baseline_gpt at tiny dims, eager fp32, plain AdamW lr 1e-3 betas (0.9, 0.95),
          dropout 0.1, batch 32 x 256, 5% warmup + cosine (nanoGPT's baby-GPT recipe).
qinglm:   `qinglm.train.train` itself on the tiny preset with the TrainConfig / ModelConfig defaults, i.e.
          what `qinglm train --max-time M` does (lr 2e-3, dropout 0, dtype auto, compile auto, 32 x 256);
          only periodic eval / checkpoints / samples are switched off (the baseline has none either).
Extra recipes "qinglm:lr=3e-3,dropout=0.1,dtype=fp32" override TrainConfig/ModelConfig fields, and
"baseline:lr=6e-4,dropout=0.0" the baseline's (lr sweep: --recipes baseline:lr=6e-4 baseline:lr=2e-3).
Both use the same QingLM 10k tokenizer and the same prepared data.
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


def bpc(model: torch.nn.Module, seq_len: int, dtype: str = "fp32") -> float:
    """Return bits per character of model over the whole val split (model(x) -> logits)."""
    from qinglm.data.loader import eval_batches
    from qinglm.data.shards import TokenShards
    from qinglm.device import autocast

    val = TokenShards(common.data_dir(10_000), "val")
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


def run_baseline(seconds: float, over: dict) -> dict:
    r = {**BASELINE, **over}
    torch.manual_seed(0)
    vocab = common.qinglm_tokenizer(10_000)[0].vocab_size
    model = bg.GPT(bg.GPTConfig(vocab_size=vocab, block_size=r["seq_len"], dropout=r["dropout"]))
    res = bg.train_for(
        model,
        common.token_stream(10_000, "train"),
        seconds=seconds,
        lr=r["lr"],
        batch_size=r["batch_size"],
        block_size=r["seq_len"],
    )
    return {**res, "bpc": bpc(model, r["seq_len"]), "recipe": r}


def run_qinglm(seconds: float, over: dict) -> dict:
    from qinglm.config import PRESETS, ModelConfig, TrainConfig
    from qinglm.train import train

    r = {**QINGLM, **over}
    model_keys = {"dropout", "family", "max_seq_len"}
    mcfg = ModelConfig(**PRESETS["tiny"], **{k: v for k, v in r.items() if k in model_keys})
    mcfg.vocab_size = common.qinglm_tokenizer(10_000)[0].vocab_size
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
        res = train(mcfg, tcfg, run_dir, common.data_dir(10_000), log=lambda s: None)
        seconds_used = time.perf_counter() - t0
        from qinglm.model import Transformer
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
        "train_loss": res["train_loss"],
        "seconds": seconds_used,
        "bpc": bpc(model, tcfg.seq_len),
        "recipe": r,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--recipes", nargs="+", default=["baseline", "qinglm"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common.data_dir(10_000)
    results = {}
    for spec in args.recipes:
        name, _, over = spec.partition(":")
        fn = {"baseline": run_baseline, "qinglm": run_qinglm}[name]
        results[spec] = fn(args.minutes * 60, parse_overrides(over))
        print(f"{spec}: {results[spec]}", flush=True)
    base = next((r["bpc"] for s, r in results.items() if s.startswith("baseline")), None)
    print(
        f"\n{args.minutes:g} min per recipe, {torch.get_num_threads()} threads, val = whole pd1998 val split\n"
    )
    print("| recipe | steps | train s | final train loss | val BPC | vs baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for s, r in results.items():
        rel = f"{r['bpc'] / base:.3f}" if base else "-"
        print(
            f"| {s} | {r['steps']:,} | {r['seconds']:.0f} | {r['train_loss']:.3f} | {r['bpc']:.4f} | {rel} |"
        )


if __name__ == "__main__":
    main()
