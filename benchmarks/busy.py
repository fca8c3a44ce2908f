"""Training throughput on a busy machine: tokens/s of the tiny recipe with N spinning processes beside it.

    python -m benchmarks.busy [--busy 0 2] [--settings spin passive th1] [--rounds 3] [--steps 10]
    python -m benchmarks.busy --weights [--settings spin passive]

Each (setting, busy) pair runs `benchmarks.throughput --child tiny` (the main job's recipe: bf16, compile,
batch 32 x 256) in a fresh subprocess, because the OpenMP runtime reads its environment once, when torch
loads it. N `while True: pass` processes run beside it and are killed after; rounds interleave the pairs
so background load hits all alike; tokens/s is the median over every timed step of every round.
Settings (libgomp is torch's OpenMP on Linux):
  spin     libgomp's own default: a waiting thread spins 300,000 times before it sleeps (GOMP_SPINCOUNT=300000)
  passive  OMP_WAIT_POLICY=PASSIVE: a waiting thread sleeps at once (what `qinglm` sets unless told otherwise)
  activeN  GOMP_SPINCOUNT=N
  thN      N torch threads, libgomp's default spinning
--weights trains the same short `qinglm train` run under each setting and compares the weights' sha256:
the wait policy must not change the result (same seed, data and thread count -> the same bits).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common
from benchmarks.throughput import run_child

SPIN_DEFAULT = "300000"  # libgomp's GOMP_SPINCOUNT when neither it nor OMP_WAIT_POLICY is set


def setting_env(name: str) -> tuple[dict[str, str], int | None]:
    """Return (environment variables, torch threads or None) of a setting name."""
    if name == "spin":
        return {"GOMP_SPINCOUNT": SPIN_DEFAULT}, None
    if name == "passive":
        return {"OMP_WAIT_POLICY": "PASSIVE"}, None
    if name.startswith("active") and name[6:].isdigit():
        return {"GOMP_SPINCOUNT": name[6:]}, None
    if name.startswith("th") and name[2:].isdigit():
        return {"GOMP_SPINCOUNT": SPIN_DEFAULT}, int(name[2:])
    raise SystemExit(f"unknown setting {name!r}; use spin, passive, activeN or thN")


def child_env(name: str) -> dict[str, str]:
    """Return this process's environment with the setting's variables (and none of the ones it replaces)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    return {**env, **setting_env(name)[0]}


def spinners(n: int) -> list[subprocess.Popen]:
    """Return n started processes that each keep one CPU core busy."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def measure(name: str, busy: int, args: argparse.Namespace) -> dict:
    """Return throughput.child's result for the tiny recipe under setting `name` beside `busy` spinners."""
    threads = setting_env(name)[1]
    ns = argparse.Namespace(steps=args.steps, warmup=args.warmup, threads=threads)
    load = os.getloadavg()[0]  # the machine's own load before the run (other work on a shared machine)
    procs = spinners(busy)
    try:
        return {**run_child("tiny", ns, env=child_env(name)), "load": load}
    finally:
        stop(procs)


def weights_digest(name: str, data: Path, tok: Path, out: Path) -> str:
    """Return the sha256 of the final weights of a short `qinglm train` run under setting `name`."""
    threads = setting_env(name)[1]
    cmd = [sys.executable, "-m", "qinglm", "train", "--data", str(data), "--tokenizer", str(tok)]
    cmd += ["--preset", "tiny", "--max-steps", "6", "--eval-every", "100", "--save-every", "100"]
    cmd += ["--log-every", "100", "--eval-tokens", "1024", "--no-report", "--out", str(out)]
    cmd += ["--num-threads", str(threads)] if threads else []
    p = subprocess.run(cmd, capture_output=True, text=True, env=child_env(name))
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    (weights,) = out.glob("checkpoints/*/model.safetensors")
    return hashlib.sha256(weights.read_bytes()).hexdigest()


def check_weights(args: argparse.Namespace) -> None:
    data = common.data_dir(10_000)
    tok = common.CACHE / "tok-10000-auto"
    with tempfile.TemporaryDirectory() as tmp:
        digests = {s: weights_digest(s, data, tok, Path(tmp) / s) for s in args.settings}
    for s, d in digests.items():
        print(f"{s}: {d[:16]}")
    same = len({d for s, d in digests.items() if setting_env(s)[1] is None}) <= 1
    print("same weights under every wait policy" if same else "THE WEIGHTS DIFFER")
    if not same:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["spin", "passive", "th1"])
    ap.add_argument("--busy", nargs="+", type=int, default=[0, 2], help="spinning processes beside the run")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every pair")
    ap.add_argument("--weights", action="store_true", help="compare final weights across settings instead")
    args = ap.parse_args()
    for s in args.settings:
        setting_env(s)
    if args.weights:
        return check_weights(args)
    common.data_dir(10_000)  # prepare the cached data once, before any timing
    pairs = [(s, b) for b in args.busy for s in args.settings]
    results: dict[tuple[str, int], list[dict]] = {p: [] for p in pairs}
    for r in range(args.rounds):
        for s, b in pairs:
            res = measure(s, b, args)
            results[s, b].append(res)
            tps = res["tokens_per_step"] / statistics.median(res["times"])
            print(
                f"round {r + 1}/{args.rounds} {s} busy={b}: {tps:,.0f} tokens/s", file=sys.stderr, flush=True
            )
    tps = {
        p: rs[0]["tokens_per_step"] / statistics.median(t for r in rs for t in r["times"])
        for p, rs in results.items()
    }
    print(f"\n{os.cpu_count()} CPUs | {args.rounds} rounds x {args.steps} steps (medians) | tiny recipe\n")
    for b in args.busy:
        loads = [r["load"] for s in args.settings for r in results[s, b]]
        print(f"busy {b}: 1-minute load average before the runs, median {statistics.median(loads):.1f}")
    print("\n| setting | threads | " + " | ".join(f"busy {b}: tokens/s" for b in args.busy) + " |")
    print("|---|---:|" + "---:|" * len(args.busy))
    quiet = {s: tps[s, args.busy[0]] for s in args.settings}
    for s in args.settings:
        cells = [
            f"{tps[s, b]:,.0f}" + (f" ({quiet[s] / tps[s, b]:.1f}x slower)" if b != args.busy[0] else "")
            for b in args.busy
        ]
        print(f"| {s} | {results[s, args.busy[0]][0]['threads']} | " + " | ".join(cells) + " |")
    print(f"\n(measured {time.strftime('%Y-%m-%d %H:%M')})")


if __name__ == "__main__":
    main()
