"""Decode speed of this tree's engine against another checkout's engine (today's main), side by side.

`git worktree add ../qinglm-old d4549af` (the last commit with the old engine), then
`python -m benchmarks.decode --baseline ../qinglm-old [--presets tiny small] [--batches 1 8 32]
 [--threads 1 2] [--new-tokens 128] [--rounds 7] [--variants fp32 sampled int8 compiled]`

One process per (preset, batch, threads, variant) loads the baseline's ``qinglm/infer/engine.py`` and
``sampling.py`` beside this tree's (both on this tree's model code, which computes the same logits: only the engine differs)
and runs the two in turn, --rounds times each, greedily continuing B prompts of 10 tokens by
--new-tokens tokens (EOS ignored) through ``Generation``, the API both engines share. Tokens/s = B * new
tokens / seconds of the whole generation (prefill included), after one warm-up generation each (when
the compiled variant compiles: its warm-up seconds are printed apart). The table shows the median and
the best round of each: on a shared machine the best round is the least disturbed one. "same tokens"
compares greedy variants only: the old engine drew sampled tokens with torch.multinomial, this one by the
inverse CDF, so the same seed gives each its own (equally distributed) tokens.
Variants: fp32; sampled (temperature 0.8, top-k 50, top-p 0.95, a seed per row); grpo (GRPO's rollouts:
groups of 8 rows share a prompt, temperature 1, no top-k/top-p/repetition penalty, a seed per row: the
post-training benchmark's step is --batches 16 --new-tokens 32); int8 (qinglm.model.quantize); compiled
(this tree's Engine(compile=True), one kept across rounds as the server keeps one; the baseline eager);
bf16 and bf16-compiled (this tree with `--quantize bf16` weights, eager / compiled, against the baseline in
fp32: what a user switching gets; the tokens are bf16's own, so they are not compared).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def baseline_engine(checkout: str):
    """Return the module qinglm/infer/engine.py of checkout with its own sampling module, run on this tree's
    model code."""
    from qinglm.model.kv_cache import KVCache

    if not hasattr(KVCache, "keep_rows"):  # the old engine dropped finished rows by copying the cache

        def keep_rows(self, rows):
            self.k, self.v = self.k[:, rows], self.v[:, rows]

        KVCache.keep_rows = keep_rows
    # Its own sampling too (the old engine sampled row by row with torch.multinomial): bound while it loads.
    ours = sys.modules.get("qinglm.infer.sampling")
    sys.modules["qinglm.infer.sampling"] = _load(
        "baseline_sampling", Path(checkout) / "qinglm/infer/sampling.py"
    )
    try:
        return _load("baseline_engine", Path(checkout) / "qinglm/infer/engine.py")
    finally:
        if ours is None:
            del sys.modules["qinglm.infer.sampling"]
        else:
            sys.modules["qinglm.infer.sampling"] = ours


def _load(name: str, path: Path):
    """Return the module at path, registered as name (dataclasses look themselves up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def worker(args: argparse.Namespace) -> None:
    """Measure both engines for one configuration and print their figures as JSON."""
    import torch

    from qinglm.config import PRESETS, ModelConfig, SamplingConfig
    from qinglm.infer import engine
    from qinglm.model.quantize import quantize
    from qinglm.model.transformer import Transformer
    from qinglm.post.config import GRPOConfig

    torch.set_num_threads(args.threads)
    old = baseline_engine(args.baseline)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS[args.preset], max_seq_len=512)).eval()
    if args.variant == "int8":
        quantize(model, "int8")
    ours = model  # the model this tree's engine runs
    if args.variant.startswith("bf16"):
        ours = quantize(copy.deepcopy(model), "bf16")
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, model.cfg.vocab_size, (args.batch, 10), generator=gen).tolist()
    if args.variant == "grpo":  # a group of rows answers each prompt
        group = GRPOConfig.group_size
        prompts = [prompts[i - i % group] for i in range(len(prompts))]
    n = args.new_tokens
    cfgs = [SamplingConfig(max_new_tokens=n, temperature=0.0, stop_at_eos=False)] * len(prompts)
    if args.variant == "sampled":
        cfgs = [
            SamplingConfig(max_new_tokens=n, temperature=0.8, seed=i, stop_at_eos=False)
            for i in range(len(prompts))
        ]
    if args.variant == "grpo":  # qinglm.post.grpo's sampling: the whole distribution
        cfgs = [
            SamplingConfig(
                max_new_tokens=n,
                temperature=GRPOConfig.temperature,
                top_k=None,
                top_p=None,
                repetition_penalty=1.0,
                seed=i,
                stop_at_eos=False,
            )
            for i in range(len(prompts))
        ]

    def run(module, m) -> list[list[int]]:
        ids = [[] for _ in prompts]
        for events in module.Generation(m, [module.Request([2, *p], c) for p, c in zip(prompts, cfgs)]):
            for ev in events:
                ids[ev.row] += ev.ids
        return ids

    kept = (
        engine.Engine(ours, max_batch_size=len(prompts), compile=True)
        if args.variant.endswith("compiled")
        else None
    )

    def run_kept() -> list[list[int]]:  # compiled: one engine for every round, as the server keeps one
        ids = [[] for _ in prompts]
        for i, (p, c) in enumerate(zip(prompts, cfgs)):
            kept.add(i, engine.Request([2, *p], c))
        while kept.busy:
            for ev in kept.step():
                ids[ev.row] += ev.ids
        return ids

    contestants = {
        "baseline": lambda: run(old, model),
        "this": run_kept if kept is not None else lambda: run(engine, ours),
    }
    out = {}
    for name, fn in contestants.items():
        t0 = time.perf_counter()
        out[name] = {"tokens": fn()[0][:16], "warmup_s": time.perf_counter() - t0, "tok_s": []}
    for _ in range(args.rounds):
        for name, fn in contestants.items():
            t0 = time.perf_counter()
            ids = fn()
            out[name]["tok_s"].append(sum(map(len, ids)) / (time.perf_counter() - t0))
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--baseline",
        required=True,
        help="checkout of the engine to compare with (old engine: commit d4549af)",
    )
    p.add_argument("--presets", nargs="+", default=["tiny"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument(
        "--variants",
        nargs="+",
        default=["fp32"],
        choices=["fp32", "sampled", "grpo", "int8", "compiled", "bf16", "bf16-compiled"],
    )
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return worker(args)
    print("| preset | batch | threads | variant | baseline tok/s median (best) | this tok/s median (best) "
          "| ratio of medians (of bests) | same tokens |")  # fmt: skip
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for preset in args.presets:
        for batch in args.batches:
            for threads in args.threads:
                for variant in args.variants:
                    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": str(threads)}
                    cmd = [sys.executable, "-m", "benchmarks.decode", "--worker", "--baseline", args.baseline]
                    cmd += ["--preset", preset, "--batch", str(batch), "--threads", str(threads)]
                    cmd += [
                        "--variant",
                        variant,
                        "--new-tokens",
                        str(args.new_tokens),
                        "--rounds",
                        str(args.rounds),
                    ]
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=HERE)
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    b, t = r["baseline"]["tok_s"], r["this"]["tok_s"]
                    same = r["baseline"]["tokens"] == r["this"]["tokens"]  # sampled: each engine's own draw
                    warm = f" (warm-up {r['this']['warmup_s']:.1f} s)" if "compiled" in variant else ""
                    print(
                        f"| {preset} | {batch} | {threads} | {variant}{warm} | {statistics.median(b):,.0f} "
                        f"({max(b):,.0f}) | {statistics.median(t):,.0f} ({max(t):,.0f}) | "
                        f"{statistics.median(t) / statistics.median(b):.2f}x ({max(t) / max(b):.2f}x) | "
                        f"{same if variant in ('fp32', 'int8', 'compiled') else '- (own draws)'} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
