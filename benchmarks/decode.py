"""Decode speed of this tree's engine against another checkout's (today's main), side by side.

`python -m benchmarks.decode --baseline /work/main [--presets tiny small] [--batches 1 8 32]
 [--threads 1 2] [--new-tokens 128] [--rounds 3] [--variants fp32 int8 compiled]`

Each measurement runs in a fresh process with PYTHONPATH set to one tree (so both engines run the same
random model of the preset: only the engine differs), greedily continuing B prompts of 10 tokens by
--new-tokens tokens (EOS ignored) through ``qinglm.infer.engine.Generation``, the API both trees share.
Tokens/s = B * new tokens / seconds of the whole generation (prefill included), after one warm-up
generation (which is when the compiled variant compiles: its warm-up seconds are printed apart).
The contestants take turns in every round and the table shows medians: the fair way on a shared machine.
Variants: fp32, int8 (qinglm.model.quantize), compiled (fp32, Generation(compile=True); this tree only)
and sampled (fp32, temperature 0.8, top-k 50, top-p 0.95, a seed per row: GRPO rollouts' decoding;
"same tokens" is not expected there, as the new engine draws with one uniform number per row).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """Measure one contestant and print {"tok_s": ..., "warmup_s": ..., "tokens": ...} as JSON."""
    import torch

    from qinglm.config import PRESETS, ModelConfig, SamplingConfig
    from qinglm.infer.engine import Generation, Request
    from qinglm.model.quantize import quantize
    from qinglm.model.transformer import Transformer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.preset], max_seq_len=512)).eval()
    if args.variant == "int8":
        quantize(model, "int8")
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, model.cfg.vocab_size, (args.batch, 10), generator=gen).tolist()
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
    cfgs = [cfg] * len(prompts)
    if args.variant == "sampled":  # as GRPO rollouts: temperature, top-k, top-p, a seed per row
        cfgs = [
            SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.8, seed=i, stop_at_eos=False)
            for i in range(len(prompts))
        ]
    extra = {"compile": True} if args.variant == "compiled" else {}

    def run() -> list[list[int]]:
        ids = [[] for _ in prompts]
        requests = [Request([2, *p], c) for p, c in zip(prompts, cfgs)]
        for events in Generation(model, requests, **extra):
            for ev in events:
                ids[ev.row] += ev.ids
        return ids

    t0 = time.perf_counter()
    run()
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = run()
    seconds = time.perf_counter() - t0
    print(json.dumps({"tok_s": sum(map(len, ids)) / seconds, "warmup_s": warmup, "tokens": ids[0][:16]}))


def measure(tree: str, preset: str, batch: int, threads: int, variant: str, new_tokens: int) -> dict:
    """Return the worker's figures for one contestant, run with tree's qinglm."""
    env = {**os.environ, "PYTHONPATH": f"{tree}:{HERE}", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "benchmarks.decode", "--worker", "--preset", preset, "--batch", str(batch)]
    cmd += ["--threads", str(threads), "--variant", variant, "--new-tokens", str(new_tokens)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="/work/main", help="checkout of the engine to compare with")
    p.add_argument("--presets", nargs="+", default=["tiny"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--variants", nargs="+", default=["fp32"], choices=["fp32", "int8", "compiled", "sampled"])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)
    print("| preset | batch | threads | variant | baseline tok/s | this tok/s | ratio | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for batch in args.batches:
            for threads in args.threads:
                for variant in args.variants:
                    old, new, tokens = [], [], []
                    for _ in range(args.rounds):  # interleaved: old, new, old, new, ...
                        base = "fp32" if variant == "compiled" else variant  # main has no compiled step
                        r = measure(args.baseline, preset, batch, threads, base, args.new_tokens)
                        old.append(r["tok_s"])
                        tokens.append(r["tokens"])
                        r = measure(str(HERE), preset, batch, threads, variant, args.new_tokens)
                        new.append(r["tok_s"])
                        tokens.append(r["tokens"])
                    o, n = statistics.median(old), statistics.median(new)
                    same = all(t == tokens[0] for t in tokens)
                    warm = f" (warm-up {r['warmup_s']:.1f} s)" if variant == "compiled" else ""
                    print(
                        f"| {preset} | {batch} | {threads} | {variant}{warm} | {o:.0f} | {n:.0f} | "
                        f"{n / o:.2f}x | {same} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
