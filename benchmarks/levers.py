"""Lever sweep: training-step time of config variants measured *step by step interleaved* in one process,
so background load hits every variant alike; plus a torch.profiler breakdown of one step.

    python -m benchmarks.levers --variants tiny+fp32+d1 tiny+fp32+d0 tiny+bf16+d0 tiny+bf16+d0+compile
    python -m benchmarks.levers --variants tiny+bf16+d0 --threads-sweep 1 2
    python -m benchmarks.levers --profile tiny+fp32+d0

Variant specs are those of benchmarks.throughput, plus "+chunkce" (vocab head + cross-entropy in
checkpointed chunks of 2048 rows) and "+thN" (torch.set_num_threads(N) before each of its steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from benchmarks import common, throughput


def chunked_ce(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Mean cross-entropy of h @ w.T against y without keeping all logits alive (recomputed in backward)."""
    h, y = h.reshape(-1, h.size(-1)), y.reshape(-1)

    def part(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((hc @ w.t()).float(), yc, reduction="sum")

    total = sum(
        checkpoint(part, h[i : i + chunk], y[i : i + chunk], use_reentrant=False)
        for i in range(0, h.size(0), chunk)
    )
    return total / y.numel()


def build(spec: str):
    """Return (step function, threads or None, tokens per step) of a variant spec."""
    mods = spec.split("+")
    threads = next((int(m[2:]) for m in mods if m.startswith("th")), None)
    chunk = "chunkce" in mods
    base = "+".join(m for m in mods if not m.startswith("th") and m != "chunkce")
    s = throughput.parse(base)
    if not chunk:
        step, _, _ = throughput.build(s)
        return step, threads, s["batch"] * s["seq"]
    from qinglm.data.loader import TrainBatches
    from qinglm.data.shards import TokenShards
    from qinglm.device import autocast
    from qinglm.model.transformer import Transformer
    from qinglm.train.optim import param_groups

    vocab = common.qinglm_tokenizer(throughput.vocab_of(s["base"]))[0].vocab_size
    model = Transformer(throughput.qinglm_model_cfg(s, vocab))
    w = model.embed.weight
    model.head = nn.Identity()  # forward then returns the final hidden states
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3, fused=True)
    batches = TrainBatches(
        TokenShards(common.data_dir(throughput.vocab_of(s["base"])), "train"), s["batch"], s["seq"]
    )

    def step() -> float:
        x, y = next(batches)
        with autocast(torch.device("cpu"), s["dtype"]):
            loss = chunked_ce(model(x), w, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, threads, s["batch"] * s["seq"]


def profile(spec: str, rows: int) -> None:
    step, _, _ = build(spec)
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", default=[])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", help="print a torch.profiler table of one step of this variant")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    if args.profile:
        return profile(args.profile, args.rows)
    default_threads = torch.get_num_threads()
    built = {}
    for v in args.variants:
        step, threads, tokens = build(v)
        torch.set_num_threads(threads or default_threads)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step()
        built[v] = (step, threads, tokens, time.perf_counter() - t0)
    times: dict[str, list[float]] = {v: [] for v in built}
    for _ in range(args.steps):
        for v, (step, threads, _, _) in built.items():
            torch.set_num_threads(threads or default_threads)
            t0 = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t0)
    first = None
    print(f"\n{args.steps} interleaved steps per variant, medians\n")
    print("| variant | ms/step | tokens/s | vs first | warm-up s |")
    print("|---|---:|---:|---:|---:|")
    for v, ts in times.items():
        med = statistics.median(ts)
        first = first or med
        print(
            f"| {v} | {med * 1e3:,.0f} | {built[v][2] / med:,.0f} | {first / med:.2f}x | {built[v][3]:.1f} |"
        )


if __name__ == "__main__":
    main()
