"""One prepared device check: CUDA tests, training MFU, FP8, NCCL DDP/FSDP, decode speed, the main job.

    python -m benchmarks.gpu [--json gpu.json] [--budget-s 480]      # on a GPU machine
    python -m benchmarks.gpu --device cpu --quick                    # the same code, tiny, on a CPU
    bash benchmarks/gpu.sh ...                                       # installs carried wheels (.whl/) first

Sections run in this order, each in its own process where peak memory matters, and each one's
figures are written to the JSON file as soon as it ends (a run cut short keeps what it measured):

  env          GPU, torch, the bf16 matmul peak measured here (8192^3) and the datasheet's dense bf16 peak
  main_job     `python -m qinglm train` with its defaults: wall time and the held-out line
  cuda_tests   `pytest -m cuda` (tests/test_cuda.py): passed / failed / skipped
  throughput   training tokens/s, MFU and peak GPU memory of small, medium and a GPT-2-small-sized
               config (124M, 12 layers, d_model 768, context 1024): bf16 + compile + fused AdamW, the
               batch chosen to fill the card, on the main job's pd1998 tokens
  fp8          the same at the largest config with --fp8 (torchao float8), losses beside bf16's
  distributed  one-process torchrun DDP and FSDP (NCCL) runs against the plain run: same weights?
  stages       `qinglm sft`, `dpo`, `grpo`, `distill` from the main job's run, a few bf16 steps each:
               median step time, peak GPU memory, finished with finite losses (gpu_stages.py)
  decode       decode tokens/s at batch 1 and 32: QingLM's engine vs transformers `generate`, bf16; at batch
               1 also `--speculate 8` (prompt lookup on a random model's loops: what verifying 9 tokens costs)
  scaling      the scaling grid trained here (dials 4, 6, 8 at 1e14-1e15 FLOPs) and `qinglm plan --budget 10m`
               timed here, within this card's memory (gpu_scaling.py)

A section that would not finish within --budget-s is skipped and says so; one that fails records its
error and the rest go on. The table at the end is what benchmarks/README.md shows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.gpu_parts import child_throughput, decode_speed, env_info, table
from benchmarks.gpu_scaling import scaling
from benchmarks.gpu_stages import stages

# name: (model config, seq len, fp8); "fill" batches are sized from a probe step's memory.
CONFIGS = {
    "small": (dict(vocab_size=30_000, d_model=256, n_heads=4, n_layers=4, max_seq_len=512), 512),
    "medium": (dict(vocab_size=50_000, d_model=512, n_heads=8, n_layers=6, max_seq_len=512), 512),
    "gpt2-124m": (dict(vocab_size=50_304, d_model=768, n_heads=12, n_layers=12, max_seq_len=1024), 1024),
}
# Larger than the check's own sizes, for `--child NAME` by hand: where float8 matmuls start to pay.
LARGE = {"d2048": (dict(vocab_size=50_304, d_model=2048, n_heads=16, n_layers=16, max_seq_len=2048), 2048)}
QUICK = {"tiny": (dict(vocab_size=10_000, d_model=64, n_heads=2, n_layers=2, max_seq_len=64), 64)}
SECTION_MIN_S = {  # the least time a section needs; with less left it is skipped
    "main_job": 90,
    "cuda_tests": 120,
    "throughput": 150,
    "fp8": 70,
    "distributed": 60,
    "stages": 60,
    "decode": 40,
    "scaling": 120,
}


class Check:
    """The results so far, written to the JSON file after every section."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.t0, self.results = args, time.perf_counter(), {"sections": {}}
        self.work = Path(args.work) / time.strftime("%Y%m%d-%H%M%S")  # fresh run directories
        self.work.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn) -> None:
        need = 0 if self.args.quick else SECTION_MIN_S.get(name, 0)
        if self.left() < need:
            self.results["sections"][name] = {
                "skipped": f"{self.left():.0f} s left of the budget, needs {need}"
            }
        else:
            t = time.perf_counter()
            try:
                out = fn(self)
            except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others
                out = {"error": f"{type(e).__name__}: {str(e)[-800:]}"}
            out["seconds"] = round(time.perf_counter() - t, 1)
            self.results["sections"][name] = out
        print(f"[gpu check] {name}: {json.dumps(self.results['sections'][name])[:600]}", flush=True)
        Path(self.args.json).write_text(json.dumps(self.results, indent=1))

    def sub(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Return the finished subprocess (a time-out becomes an error with the output's tail)."""
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, timeout))
        except subprocess.TimeoutExpired as e:
            tail = (e.stdout or b"")[-600:] if isinstance(e.stdout, bytes) else (e.stdout or "")[-600:]
            raise RuntimeError(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} ... {tail}") from None


def _py(*args: str) -> list[str]:
    return [sys.executable, *args]


def main_job(c: Check) -> dict:
    run = c.work / "main-job"
    flags = ["--out", str(run), "--device", c.args.device]
    if c.args.quick:
        flags += ["--max-steps", "10", "--eval-every", "5", "--num-threads", "1"]
    t = time.perf_counter()
    p = c.sub(_py("-m", "qinglm", "train", *flags), c.left() - 30)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {p.stderr[-800:]}")
    held = next((ln for ln in p.stdout.splitlines() if ln.startswith("held-out")), "")
    bpc = re.search(r"bits/char ([\d.]+)", held)
    head = [ln for ln in p.stdout.splitlines() if ln.startswith(("device:", "stopped", "schedule:"))]
    c.results["data"] = {"run": str(run)}
    return {"wall_s": round(wall, 1), "held_out_bpc": float(bpc.group(1)) if bpc else None, "log": head}


def cuda_tests(c: Check) -> dict:
    p = c.sub(
        _py("-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"), c.left() - 20
    )
    summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", summary)}
    fails = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    return {"summary": summary, **counts, "failures": fails[:20]}


def _throughput(c: Check, name: str, fp8: bool, batch: int = 0) -> dict:
    data = c.results.get("data", {}).get("run")
    cmd = _py(
        "-m", "benchmarks.gpu", "--child", name, "--device", c.args.device, "--steps", str(c.args.steps)
    )
    cmd += ["--fp8"] if fp8 else []
    cmd += ["--batch", str(batch)] if batch else []
    cmd += ["--data-run", data] if data else []
    cmd += ["--quick"] if c.args.quick else []
    p = c.sub(cmd, c.left() - 10)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{name}: exit {p.returncode}: {p.stderr[-800:]}")


def throughput(c: Check) -> dict:
    names = list(QUICK if c.args.quick else CONFIGS)
    out = {}
    for name in reversed(names):  # the largest (the MFU target) first
        out[name] = (
            _throughput(c, name, fp8=False) if c.left() > 40 or c.args.quick else {"skipped": "budget"}
        )
    return out


def fp8(c: Check) -> dict:
    from qinglm.device import resolve_device
    from qinglm.train.fp8 import fp8_refusal

    why = fp8_refusal(resolve_device(c.args.device), "bf16")
    if why:
        return {"refused": why}
    name = list(QUICK if c.args.quick else CONFIGS)[-1]
    base = c.results["sections"].get("throughput", {}).get(name, {})
    res = _throughput(c, name, fp8=True, batch=base.get("batch", 0))  # the same batches as bf16
    if "tokens_per_s" in base:
        res["speedup_vs_bf16"] = round(res["tokens_per_s"] / base["tokens_per_s"], 3)
        tail = 10
        a, b = base["losses"][-tail:], res["losses"][-tail:]
        res["loss_last10_bf16"], res["loss_last10_fp8"] = statistics.mean(a), statistics.mean(b)
        res["loss_noise_bf16_std"] = statistics.pstdev(a)
    return res


def distributed(c: Check) -> dict:
    from safetensors.torch import load_file

    from qinglm.train.checkpoint import latest_checkpoint

    run = c.results.get("data", {}).get("run")
    if not run:
        return {"skipped": "needs the main job's data"}
    common = ["--data", f"{run}/data", "--tokenizer", f"{run}/tokenizer", "--max-steps", "20", "--no-compile"]
    common += ["--eval-every", "1000", "--save-every", "20", "--device", c.args.device, "--seed", "0"]
    common += ["--dtype", "fp32"]
    if c.args.quick:
        common += ["--max-steps", "4", "--batch-size", "4", "--seq-len", "64", "--num-threads", "1"]
    torchrun = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "-m",
        "qinglm",
        "train",
    ]
    runs = {
        "plain": _py("-m", "qinglm", "train", *common, "--out", str(c.work / "plain")),
        "ddp": _py(*torchrun, *common, "--parallel", "ddp", "--out", str(c.work / "ddp")),
        "fsdp": _py(*torchrun, *common, "--parallel", "fsdp", "--out", str(c.work / "fsdp")),
    }
    out, weights = {}, {}
    for name, cmd in runs.items():
        p = c.sub(cmd, c.left() - 5)
        if p.returncode != 0:
            out[name] = {"error": p.stderr[-600:]}
            continue
        weights[name] = load_file(latest_checkpoint(c.work / name) / "model.safetensors")
        out[name] = {"ok": True}
    for name in ("ddp", "fsdp"):
        if name in weights and "plain" in weights:
            a, b = weights["plain"], weights[name]
            diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            out[name]["max_weight_diff_vs_plain"] = diff
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", default="cuda", help="cuda (default) or cpu (with --quick: the code path check)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="tiny sizes and steps: checks the code, measures nothing"
    )
    ap.add_argument("--json", default="gpu.json", help="where the full figures go")
    ap.add_argument("--work", default=".cache/gpu-check", help="scratch directory for runs")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip sections that would not fit in this")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per config")
    ap.add_argument(
        "--sections", default="main_job,cuda_tests,throughput,fp8,distributed,stages,decode,scaling"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--fp8", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data-run", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = (QUICK if args.quick else CONFIGS | LARGE)[args.child]
        print("RESULT " + json.dumps(child_throughput(args, *spec)), flush=True)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; run with --device cpu --quick to check the code path")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    c = Check(args)
    c.results["env"] = env_info(args.device, args.quick)
    if args.data_run:  # a finished main job's run directory instead of running it again
        c.results["data"] = {"run": args.data_run}
    fns = {"main_job": main_job, "cuda_tests": cuda_tests, "throughput": throughput, "fp8": fp8}
    fns |= {
        "distributed": distributed,
        "stages": stages,
        "decode": lambda c: decode_speed(c.args.device, c.args.quick),
        "scaling": scaling,
    }
    for name in args.sections.split(","):
        c.run(name, fns[name])
    c.results["total_s"] = round(time.perf_counter() - c.t0, 1)
    Path(args.json).write_text(json.dumps(c.results, indent=1))
    print(table(c.results))


if __name__ == "__main__":
    main()
