"""sample_rows at GRPO's rollout settings (temperature 1, no top-k, no top-p) vs another version's.

    git show REV:qinglm/infer/sampling.py > /tmp/old_sampling.py
    python -m benchmarks.sampling --baseline /tmp/old_sampling.py [--rounds 7]

Random logits (B, V), 200 calls per timing, the two versions interleaved over --rounds, medians, 1 thread;
microseconds per call (one decoding step's draw for B rows).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from qinglm.config import SamplingConfig
from qinglm.infer import sampling


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", required=True, help="another version's qinglm/infer/sampling.py")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("baseline_sampling", args.baseline)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    torch.set_num_threads(1)
    cfg = SamplingConfig(temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0)
    print("| rows | vocabulary | baseline us/step | this us/step | speed-up |\n|---:|---:|---:|---:|---:|")
    for B, V in ((8, 4000), (8, 10000), (32, 10000), (32, 30000)):
        g = torch.Generator().manual_seed(0)
        logits, u = torch.randn(B, V, generator=g) * 3, torch.rand(B, generator=g)
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.rounds):
            for name, mod in (("old", old), ("new", sampling)):
                rows = mod.RowSettings.of([cfg] * B, logits.device)
                mod.sample_rows(logits, rows, u)
                t0 = time.perf_counter()
                for _ in range(200):
                    mod.sample_rows(logits, rows, u)
                times[name].append((time.perf_counter() - t0) / 200 * 1e6)
        o, n = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"| {B} | {V:,} | {o:,.0f} | {n:,.0f} | {o / n:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
