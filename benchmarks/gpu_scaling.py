"""The scaling section of the device check (benchmarks/gpu.py): the scaling grid trained on this device, and the
plan `qinglm plan --budget 10m` makes here (shapes timed on this device, within its memory).

On a GPU: `python -m benchmarks.scaling` at 1e14, 3e14 and 1e15 FLOPs for dials 4, 6 and 8 at the 10k vocabulary
(eager, steps set by the budget, held-out bits per character over pd1998's honest split, scored on the CPU), its
fit written beside the check's JSON, then the plan of a 10-minute budget with the package's fit. With --quick
(and on a CPU): benchmarks.scaling's --quick grid and a plan timed for 0.2 s a shape, eager: the code path only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

GPU_GRID = (["1e14", "3e14", "1e15"], ["4:10000", "6:10000", "8:10000"])


def scaling(c: Any) -> dict:
    """Run the grid and the plan; return the points, the fitted constants and the plan's lines."""
    out = Path(c.work) / "scaling-fit.json"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.scaling",
        "--out",
        str(out),
        "--plot",
        str(out.with_suffix(".png")),
    ]
    if c.args.quick:
        cmd += ["--quick", "--threads", "1"]
    else:
        cmd += ["--budgets", *GPU_GRID[0], "--shapes", *GPU_GRID[1], "--runs", "none"]
    p = c.sub(cmd, c.left() - 40)
    if p.returncode != 0:
        raise RuntimeError(f"benchmarks.scaling exit {p.returncode}: {p.stderr[-800:]}")
    fit = json.loads(out.read_text())
    keys = ("budget_flops", "dial", "vocab", "steps", "bpc", "wall_s", "tokens_per_s")
    points = [{k: pt.get(k) for k in keys} for pt in fit["points"]]
    plan_cmd = [sys.executable, "-m", "qinglm", "plan", "--budget", "10m", "--device", c.args.device]
    if c.args.quick:
        plan_cmd += ["--fit", str(out), "--measure-s", "0.2", "--no-compile"]
    plan = c.sub(plan_cmd, c.left() - 5)
    if plan.returncode != 0:
        raise RuntimeError(f"qinglm plan exit {plan.returncode}: {plan.stderr[-800:]}")
    return {"points": points, "constants": fit["constants"], "plan_10m": plan.stdout.strip().splitlines()}


def scaling_line(s: dict | None) -> str:
    """Return the table's line for the scaling section."""
    if not s:
        return "- scaling: not run"
    if "points" not in s:
        return f"- scaling: {s.get('skipped') or s.get('error')}"
    pts = ", ".join(f"dial {p['dial']} @ {p['budget_flops']:.0e}: {p['bpc']:.3f}" for p in s["points"])
    model = next((ln for ln in s.get("plan_10m", []) if ln.startswith("model:")), "")
    return f"- scaling: held-out bits/char {pts}; plan for 10m here: {model}"
