"""The `stages` section of benchmarks/gpu.py: each post-training command, a few steps on the device.

Each of `qinglm sft`, `dpo`, `grpo` and `distill` runs in its own process from the main job's run
(the base, and distillation's teacher and data), with the built-in data and the stage's defaults on
the device (bf16 on CUDA; compile on, except for grpo, whose reply lengths change every step). From
its metrics.jsonl (one line per step): the median step time after the first step (which compiles),
the first step's time, the peak memory (CUDA max allocated; peak RSS on a CPU) and whether every
loss was finite.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("sft", "dpo", "grpo", "distill")


def stage_flags(stage: str, run: str, device: str, quick: bool) -> list[str]:
    """Return the command line of `qinglm STAGE` for a short run from the main job's run."""
    steps = 4 if quick else 12
    common = ["--device", device, "--max-steps", str(steps), "--log-every", "1", "--eval-every", "1000"]
    common += ["--save-every", "1000"]
    if quick:  # the code path on a CPU: small, no compile
        common += ["--dtype", "fp32", "--no-compile", "--num-threads", "1", "--seq-len", "128"]
    else:
        common += ["--dtype", "bf16"]
    own = {
        "sft": ["--base", run, "--max-examples", "512", "--eval-examples", "32", "--eval-pinyin", "0"],
        "dpo": ["--base", run, "--max-examples", "512", "--eval-examples", "16"],
        "grpo": ["--base", run, "--eval-prompts", "4"],
        # a student half the teacher's width, on the teacher's pretraining data
        "distill": ["--teacher", run, "--data", f"{run}/data", "--preset", "tiny", "--d-model", "64"]
        + ["--eval-tokens", "4096", "--sample-tokens", "2"],
    }[stage]
    if quick:
        own += {
            "grpo": ["--group-size", "4", "--max-new-tokens", "16"],
            "distill": ["--batch-size", "4"],
        }.get(stage, [])
    return [*own, *common]


def read_steps(run_dir: Path) -> dict[str, Any]:
    """Return the step figures of a finished stage run's metrics.jsonl (one train line per step)."""
    from qinglm.train.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    if not rows:
        raise RuntimeError(f"no train lines in {run_dir}/metrics.jsonl")
    seen = [0] + [r["tokens_seen"] for r in rows]
    ms = [1000 * (seen[i + 1] - seen[i]) / r["tokens_per_s"] for i, r in enumerate(rows)]
    return {
        "steps": len(rows),
        "first_step_ms": round(ms[0], 1),
        "median_step_ms": round(statistics.median(ms[1:] or ms), 2),
        "peak_mem_gib": round(max(r["memory_mb"] for r in rows) / 1024, 3),
        "finite_losses": all(math.isfinite(r["loss"]) for r in rows),
        "last_loss": round(rows[-1]["loss"], 4),
    }


def stages(c: Any) -> dict[str, Any]:
    """Return each stage's figures (see the module doc); c is benchmarks.gpu's Check."""
    run = c.results.get("data", {}).get("run")
    if not run:
        return {"skipped": "needs the main job's run"}
    out: dict[str, Any] = {}
    for stage in STAGES:
        if c.left() < 15 and not c.args.quick:
            out[stage] = {"skipped": "budget"}
            continue
        out_dir = c.work / f"stage-{stage}"
        cmd = [sys.executable, "-m", "qinglm", stage, "--out", str(out_dir)]
        cmd += stage_flags(stage, run, c.args.device, c.args.quick)
        t = time.perf_counter()
        p = c.sub(cmd, c.left() - 5)
        res: dict[str, Any] = {"wall_s": round(time.perf_counter() - t, 1)}
        res["finished"] = p.returncode == 0 and bool(re.search(r"stopped at step \d+ \(finished\)", p.stdout))
        head = re.search(r"^device: .*$", p.stdout, re.M)
        res["log"] = head.group(0) if head else ""
        if p.returncode != 0:
            res["error"] = f"exit {p.returncode}: {p.stderr[-600:]}"
        else:
            res |= read_steps(out_dir)
        out[stage] = res
    return out


def stage_lines(s: dict[str, Any] | None) -> list[str]:
    """Return the table rows of the stages section (or one line saying why there are none)."""
    if not s or "error" in s or isinstance(s.get("skipped"), str):
        why = "not run" if not s else str(s.get("error") or s.get("skipped"))[:300]
        return [f"- stages: {why}"]
    lines = [
        "",
        "| stage | finished | median step ms | first step ms | peak mem GiB | finite losses | run |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for name in STAGES:
        v = s.get(name)
        if not isinstance(v, dict) or "median_step_ms" not in v:
            why = "not run" if v is None else (v.get("error") or v.get("skipped") or "no steps")
            lines.append(f"| {name} | {bool(v and v.get('finished'))} | {str(why)[:200]} |")
            continue
        lines.append(
            f"| {name} | {v['finished']} | {v['median_step_ms']} | {v['first_step_ms']} | {v['peak_mem_gib']} "
            f"| {v['finite_losses']} | {v['log'].removeprefix('device: ').replace(' | ', ', ')} |"
        )
    return lines
