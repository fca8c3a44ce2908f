"""Training throughput (tokens/s), MFU and peak memory: nanoGPT-style baseline vs QingLM.

    python -m benchmarks.throughput [--steps 30] [--rounds 2] [--threads N] [--configs baseline classic tiny small]

Each config runs in a fresh subprocess (peak RSS is per process), rounds interleave the configs so
background load hits all alike, and tokens/s is the median over every timed step of every round.
A config is a base name plus "+" modifiers, so the same command sweeps levers:
  bases: baseline (nanoGPT-style, tiny dims), classic (QingLM classic family at exactly the baseline's
         dims: learned positions, LayerNorm+bias, GELU 4x, tied head, dropout 0.1), tiny, small, medium (presets),
         dialN (the shape `--budget` derives from dial N: qinglm.train.scaling.shape_for, vocab 10k)
  mods:  fp32|bf16, compile|eager, dN (dropout N/10: d0, d1), bN (batch), tN (seq len),
         plain|foreach|fused (AdamW implementation; QingLM default: fused),
         keys|weights (where attention's dropout goes: ModelConfig.attention_dropout; default auto)
tiny and small alone mean the recommended recipe (RECOMMENDED below).
MFU = model FLOPs/s (Transformer.flops_per_token x tokens/s) / median 2048^3 matmul FLOP/s of the
dtype the config computes in, measured in the same run with the same threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from benchmarks import common

# The recommended CPU recipe per preset (what `tiny` and `small` alone expand to).
RECOMMENDED = {
    "tiny": "+bf16+compile+d0+b32+t256",
    "small": "+bf16+compile+d0+b32+t256",
    "medium": "+bf16+compile+d0+b16+t256",
}
PRESET_VOCAB = {"tiny": 10_000, "small": 30_000, "medium": 50_000}


def parse(spec: str) -> dict:
    """Return the settings of a config spec such as 'tiny+bf16+compile+b64'."""
    base, *mods = spec.split("+")
    if base in RECOMMENDED and not mods:
        base, *mods = (base + RECOMMENDED[base]).split("+")
    s = {
        "base": base,
        "dtype": "fp32",
        "compile": False,
        "dropout": 0.1,
        "batch": 32,
        "seq": 256,
        "optim": "plain" if base == "baseline" else "fused",
        "attention_dropout": "auto",
    }
    for m in mods:
        if m in ("fp32", "bf16"):
            s["dtype"] = m
        elif m in ("compile", "eager"):
            s["compile"] = m == "compile"
        elif m in ("plain", "foreach", "fused"):
            s["optim"] = m
        elif m in ("keys", "weights"):
            s["attention_dropout"] = m
        elif m[0] in "dbt" and m[1:].isdigit():
            key = {"d": "dropout", "b": "batch", "t": "seq"}[m[0]]
            s[key] = int(m[1:]) / 10 if m[0] == "d" else int(m[1:])
        else:
            raise SystemExit(f"unknown modifier {m!r} in {spec!r}")
    return s


def vocab_of(base: str) -> int:
    return PRESET_VOCAB.get(base, 10_000)


def qinglm_model_cfg(s: dict, vocab: int):
    from qinglm.config import PRESETS, ModelConfig

    if s["base"] == "classic":
        return ModelConfig(
            vocab_size=vocab,
            d_model=128,
            n_heads=2,
            n_layers=2,
            max_seq_len=s["seq"],
            family="classic",
            pos_encoding="learned",
            bias=True,
            tie_embeddings=True,
            dropout=s["dropout"],
        )
    if s["base"].startswith("dial"):
        from qinglm.train.scaling import shape_for

        shape = {
            k: v for k, v in shape_for(int(s["base"][4:])).items() if k in ("n_layers", "d_model", "n_heads")
        }
    else:
        shape = PRESETS[s["base"]]
    return ModelConfig(
        **{**shape, "vocab_size": vocab},
        max_seq_len=max(512, s["seq"]),
        dropout=s["dropout"],
        attention_dropout=s["attention_dropout"],
    )


def build(s: dict):
    """Return (step function, model FLOPs per token, parameter count) for the config."""
    from qinglm.data.loader import TrainBatches
    from qinglm.data.shards import TokenShards
    from qinglm.device import autocast
    from qinglm.model.transformer import Transformer
    from qinglm.train.optim import param_groups

    torch.manual_seed(0)
    vocab = common.qinglm_tokenizer(vocab_of(s["base"]))[0].vocab_size
    if s["base"] == "baseline":
        from benchmarks import baseline_gpt as bg

        cfg = bg.GPTConfig(vocab_size=vocab, block_size=s["seq"], dropout=s["dropout"])
        model = bg.GPT(cfg)
        opt = bg.make_optimizer(model, 1e-3)
        flops = Transformer(qinglm_model_cfg({**s, "base": "classic"}, vocab)).flops_per_token(s["seq"])
        data = common.token_stream(10_000, "train")
        step = bg.make_step(torch.compile(model) if s["compile"] else model, opt, data, s["batch"], s["seq"])
        return step, flops, sum(p.numel() for p in model.parameters())
    model = Transformer(qinglm_model_cfg(s, vocab))
    impl = {"plain": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[s["optim"]]
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3, **impl)
    batches = TrainBatches(TokenShards(common.data_dir(vocab_of(s["base"])), "train"), s["batch"], s["seq"])
    fwd = torch.compile(model) if s["compile"] else model
    device = torch.device("cpu")

    def step() -> float:  # what qinglm.train.loop._optimizer_step does with grad_accum 1
        x, y = next(batches)
        with autocast(device, s["dtype"]):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, model.flops_per_token(s["seq"]), model.param_counts()["total"]


def child(spec: str, steps: int, warmup: int) -> None:
    s = parse(spec)
    step, flops, params = build(s)
    times, warm_s = common.time_steps(step, warmup, steps)
    out = {
        "spec": spec,
        "times": times,
        "warm_s": warm_s,
        "flops_per_token": flops,
        "params": params,
        "tokens_per_step": s["batch"] * s["seq"],
        "dtype": s["dtype"],
        "rss_mb": common.peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(out))


def run_child(spec: str, args: argparse.Namespace, env: dict[str, str] | None = None) -> dict:
    """Return the result of one config measured in a fresh subprocess (env: its environment, default ours)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.throughput",
        "--child",
        spec,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ] + (["--threads", str(args.threads)] if args.threads else [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{spec} failed:\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["baseline", "classic", "tiny", "small"])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per config per round (>= 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the whole set")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.steps, args.warmup)

    for v in sorted({vocab_of(parse(c)["base"]) for c in args.configs}):
        common.data_dir(v)  # prepare the cached data once, before any timing
    results: dict[str, list[dict]] = {c: [] for c in args.configs}
    peaks: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for dt, lst in peaks.items():
            lst.append(common.matmul_peak(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[dt])))
        for c in args.configs:
            results[c].append(run_child(c, args))
            print(f"round {r + 1}/{args.rounds} {c}: done", file=sys.stderr)
    peak = {k: statistics.median(v) for k, v in peaks.items()}
    print(
        f"\nthreads {torch.get_num_threads()} | matmul peak 2048^3: fp32 {peak['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s | {args.rounds} rounds x {args.steps} steps (medians)\n"
    )
    print("| config | params | batch x seq | tokens/s | vs baseline | MFU | warm-up s | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base_tps = None
    for c, rs in results.items():
        step_s = statistics.median([t for r in rs for t in r["times"]])
        tps = rs[0]["tokens_per_step"] / step_s
        if parse(c)["base"] == "baseline" and base_tps is None:
            base_tps = tps
        mfu = tps * rs[0]["flops_per_token"] / peak[rs[0]["dtype"]]
        rel = f"{tps / base_tps:.2f}x" if base_tps else "-"
        s = parse(c)
        print(
            f"| {c} | {rs[0]['params'] / 1e6:.2f}M | {s['batch']} x {s['seq']} | {tps:,.0f} | {rel} | "
            f"{mfu:.1%} ({rs[0]['dtype']}) | {statistics.median(r['warm_s'] for r in rs):.1f} | "
            f"{max(r['rss_mb'] for r in rs):,.0f} |"
        )
    print(
        f"\n(recipes: {', '.join(f'{k} = {k}{v}' for k, v in RECOMMENDED.items())}; "
        f"measured {time.strftime('%Y-%m-%d %H:%M')})"
    )


if __name__ == "__main__":
    main()
