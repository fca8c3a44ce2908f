"""Scaling study: train a grid of shapes at a few FLOP budgets on pd1998's honest split, measure held-out bits
per character, fit BPC(N, D) = E_v + A/N^alpha + B/D'^beta (D': repeated passes worth less, constant R), and
write the constants with their points into the file `qinglm plan` and `qinglm train --budget` read
(qinglm/train/scaling_fit.json), plus a frontier plot.

    python -m benchmarks.scaling [--budgets 1e12 2.5e12 6e12] [--shapes 1:4000 2:10000 ...] [--quick]
                                 [--out FILE] [--plot PNG] [--threads N] [--add] [--min-steps 300]
                                 [--runs FILE | --runs none]

A shape is DIAL:VOCAB: qinglm.train.scaling.shape_for(DIAL) (n_layers = DIAL, d_model = 64 x DIAL, its lr and
batch) with a QingLM tokenizer of VOCAB trained on pd1998 train. A budget is FLOPs =
Transformer.flops_per_token(256) x tokens (6 x (block matrices + output layer) + attention): each shape trains
for the steps that spend it (at least one), so a shape's tokens per parameter follow from the budget, and
runs are reproducible on a busy machine (steps, not seconds). Training is `qinglm.train.train` through
benchmarks.quality.run_qinglm, eager (compile off: the runs are short), and BPC is quality.bpc over the whole
val split. The fit also takes the real recipe's runs listed in --runs (default
benchmarks/results/scaling-runs.json: 10- and 30-minute runs of benchmarks.quality, copied from
benchmarks/README.md), and only points of at least --min-steps steps (300: below that a run measures its
warmup and schedule more than its size; all points stay in the file). Each budget (a FLOP count of the grid,
or a run's wall-clock budget) is held out in turn: the law fitted on the others predicts it, and the errors
are recorded in the file; then the law is fitted on every point. Wall and CPU seconds and tokens/s are
recorded too (they depend on the machine's load; `qinglm plan --measure-s 0` uses them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks import common, quality
from qinglm.io import atomic_open
from qinglm.train.scaling import (
    DROPOUT_FITTED,
    FIT_FILE,
    ScalingFit,
    fit_law,
    fit_repeats,
    load_fit,
    shape_for,
)

BUDGETS = [1e12, 2.5e12, 6e12]
SHAPES = ["1:4000", "2:4000", "1:10000", "2:10000", "3:10000"]
FRONTIER_PNG = Path(__file__).parent / "results" / "scaling_frontier.png"
RUNS_FILE = Path(__file__).parent / "results" / "scaling-runs.json"
MIN_FIT_STEPS = 300  # shorter runs measure their warmup and schedule more than their size
QUICK_BUDGETS = [3e10, 1e11, 2e11]
QUICK_SHAPES = ["1:400", "2:400"]


def model_facts(dial: int, vocab: int) -> dict:
    """Return the non-embedding and total parameters and training FLOPs per token of a shape."""
    from qinglm.config import ModelConfig
    from qinglm.model.transformer import Transformer

    s = shape_for(dial)
    with torch.device("meta"):
        m = Transformer(
            ModelConfig(vocab_size=vocab, n_layers=s["n_layers"], d_model=s["d_model"], n_heads=s["n_heads"])
        )
    counts = m.param_counts()
    return {
        "n": counts["blocks"],
        "params": counts["total"],
        "flops_per_token": m.flops_per_token(s["seq_len"]),
    }


def corpus_facts(vocab: int) -> dict:
    """Return the train split's characters and characters per token under the tokenizer of vocab."""
    from qinglm.data.shards import TokenShards

    train = TokenShards(common.data_dir(vocab, "auto"), "train")
    return {"train_characters": train.n_characters, "chars_per_token": train.n_characters / train.n_tokens}


def run_point(dial: int, vocab: int, budget: float) -> dict:
    """Return the measured point of one shape trained for the steps that spend budget FLOPs."""
    s = shape_for(dial)
    real_vocab = common.qinglm_tokenizer(vocab, "auto")[0].vocab_size
    facts = model_facts(dial, real_vocab)
    step_tokens = s["batch_size"] * s["seq_len"]
    steps = max(1, round(budget / (facts["flops_per_token"] * step_tokens)))
    over = {"vocab": vocab, "max_steps": steps, "num_epochs": 1e6, "compile": False}
    over |= {k: s[k] for k in ("n_layers", "d_model", "n_heads", "lr", "batch_size", "seq_len")}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    r = quality.run_qinglm(1e9, over, "auto")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    cpt = corpus_facts(vocab)["chars_per_token"]
    tokens = r["steps"] * step_tokens
    return {
        "dial": dial,
        "vocab": real_vocab,
        **facts,
        "budget_flops": budget,
        "steps": r["steps"],
        "tokens": tokens,
        "characters": tokens * cpt,
        "tokens_per_param": tokens / facts["params"],
        "flops": tokens * facts["flops_per_token"],
        "bpc": r["bpc"],
        "train_loss": r["train_loss"],
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": r["tokens_per_s"],
    }


def fit_points(points: list[dict], unique: float) -> tuple:
    """Return fit_law's constants (R included) for points, on a corpus of `unique` training characters."""
    return fit_law(*([p[k] for p in points] for k in ("n", "characters", "bpc", "vocab")), unique=unique)


def fitted_as(p: dict, min_steps: int) -> str | None:
    """Return what point p is fitted for: "law" (the law's constants), "R_dropout" (a run with dropout
    DROPOUT_FITTED), or None (fewer than min_steps steps, or another dropout)."""
    if p["steps"] < min_steps:
        return None
    if not p.get("dropout"):
        return "law"
    return "R_dropout" if p["dropout"] == DROPOUT_FITTED else None


def budget_of(p: dict) -> str:
    """Return the budget a point belongs to: a run's wall-clock budget, or the grid's FLOP count."""
    return p.get("budget") or f"{p['budget_flops']:.2g}"


def load_runs(path: Path) -> list[dict]:
    """Return the run points of the --runs file (each has "run", its name, and "budget")."""
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))["runs"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: cannot read the runs file {path}: {e}") from None
    return [r for r in runs if r.get("run") and r.get("budget")]


def build_fit(
    points: list[dict],
    chars_per_token: dict[int, float],
    train_characters: int,
    machine: str,
    min_steps: int = 0,
) -> ScalingFit:
    """Return the law fitted on every point of at least min_steps steps, with the prediction errors of each
    budget from the law fitted on the others (holdout["by_budget"]; the largest grid budget's also at the top
    level)."""
    fitted = [p for p in points if fitted_as(p, min_steps) == "law"]
    dropped = [p for p in points if fitted_as(p, min_steps) == "R_dropout"]
    grid_budgets = {budget_of(p) for p in fitted if not p.get("run")}
    by_budget = []
    for budget in sorted(
        {budget_of(p) for p in fitted}, key=lambda b: min(p["flops"] for p in fitted if budget_of(p) == b)
    ):
        rest = [p for p in fitted if budget_of(p) != budget]
        try:
            e, a, alpha, b, beta, r = fit_points(rest, train_characters)
        except Exception as err:  # too few points without this budget: say so in the file
            by_budget.append({"budget": budget, "skipped": str(err)})
            continue
        probe = ScalingFit(e, a, alpha, b, beta, train_characters=train_characters, R=r)
        errors = [
            probe.predict(p["n"], p["characters"], p["vocab"]) - p["bpc"]
            for p in fitted
            if budget_of(p) == budget
        ]
        by_budget.append(
            {
                "budget": budget,
                "points": len(errors),
                "fitted_on": sorted({budget_of(p) for p in rest}),
                "mean_abs_error_bpc": sum(abs(x) for x in errors) / len(errors),
                "max_abs_error_bpc": max(abs(x) for x in errors),
                "errors_bpc": [round(x, 4) for x in errors],
            }
        )
    holdout: dict = {"min_steps": min_steps, "by_budget": by_budget}
    grid = [b for b in by_budget if "skipped" not in b and b["budget"] in grid_budgets]
    if grid:  # the largest grid budget, as files before by_budget had it
        top = max(grid, key=lambda b: float(b["budget"]))
        holdout |= {
            "budget_flops": float(top["budget"]),
            "fitted_on_budgets": sorted(float(b) for b in top["fitted_on"] if b in grid_budgets),
            "mean_abs_error_bpc": top["mean_abs_error_bpc"],
            "max_abs_error_bpc": top["max_abs_error_bpc"],
        }
    e, a, alpha, b, beta, r = fit_points(fitted, train_characters)
    fit = ScalingFit(e, a, alpha, b, beta, points, chars_per_token, train_characters, machine, holdout, r)
    if dropped and r is not None:
        fit.R_dropout, holdout["dropout"] = dropout_repeats(fit, dropped)
    return fit


def dropout_repeats(fit: ScalingFit, points: list[dict]) -> tuple[float, dict]:
    """Return R_dropout fitted on the runs with dropout (the law's other constants kept) and the errors of
    each run predicted with R_dropout fitted on the others (leave one out)."""

    def fitted_r(pts: list[dict]) -> float:
        return fit_repeats(*([p[k] for p in pts] for k in ("n", "characters", "bpc", "vocab")), fit)

    errors = []
    for i, p in enumerate(points):
        rest = points[:i] + points[i + 1 :]
        if not rest:
            break
        probe = dataclasses.replace(fit, R=fitted_r(rest), R_dropout=None)
        errors.append(probe.predict(p["n"], p["characters"], p["vocab"]) - p["bpc"])
    held = {"points": len(points), "leave_one_out_errors_bpc": [round(x, 4) for x in errors]}
    if errors:
        held |= {
            "mean_abs_error_bpc": sum(abs(x) for x in errors) / len(errors),
            "max_abs_error_bpc": max(abs(x) for x in errors),
        }
    return fitted_r(points), held


def plot_frontier(fit: ScalingFit, path: Path) -> Path | None:
    """Return the PNG of measured BPC against FLOPs per shape with the law's curves; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    min_steps = fit.holdout.get("min_steps", 0)
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    shapes = sorted({(p["dial"], p["vocab"]) for p in fit.points})
    c_all = [p["flops"] for p in fit.points]
    grid = np.geomspace(min(c_all) / 2, max(c_all) * 4, 60)
    for i, (dial, vocab) in enumerate(shapes):
        pts = sorted(
            (p for p in fit.points if (p["dial"], p["vocab"]) == (dial, vocab)), key=lambda p: p["flops"]
        )
        color = f"C{i % 10}"
        fitted = [p for p in pts if fitted_as(p, min_steps) == "law"]
        others = [p for p in pts if p not in fitted]
        ax.plot([p["flops"] for p in fitted], [p["bpc"] for p in fitted], "o", color=color)
        ax.plot([p["flops"] for p in others], [p["bpc"] for p in others], "o", color=color, mfc="none")
        ax.plot([], [], "o-", color=color, label=f"dial {dial}, vocab {vocab:,}")
        f = pts[0]
        law = [
            fit.predict(f["n"], c / f["flops_per_token"] * f["characters"] / f["tokens"], vocab) for c in grid
        ]
        ax.plot(grid, law, "-", color=color, alpha=0.5)
    bpcs = [p["bpc"] for p in fit.points]
    ax.set_ylim(min(bpcs) - 0.3, max(bpcs) + 0.3)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out bits per character (honest split)")
    ax.set_title(
        "measured points (hollow: not fitted, too short or with dropout) and the law (lines);\n"
        "the lower envelope is the frontier",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--budgets", nargs="+", type=float, default=None, help="FLOP budgets (default: 1e12 2.5e12 6e12)"
    )
    ap.add_argument(
        "--shapes", nargs="+", default=None, help="DIAL:VOCAB shapes (default: dials 1-2 at 4k, 1-3 at 10k)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="a tiny grid (vocab 400, 2 dials, 3 small budgets) for tests"
    )
    ap.add_argument("--out", type=Path, default=FIT_FILE, help="fit file to write (default: the package's)")
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="frontier PNG (default: benchmarks/results/scaling_frontier.png, or beside --out)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help=f"fit only points of at least this many steps (default {MIN_FIT_STEPS}; 0 with --quick)",
    )
    ap.add_argument(
        "--runs",
        default=None,
        help="JSON of the real recipe's runs to fit too (default benchmarks/results/scaling-runs.json; "
        "'none' for the grid alone, the default with --quick)",
    )
    ap.add_argument(
        "--add",
        action="store_true",
        help="keep the points already in --out and train only the grid's points it lacks (extend a grid)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS)
    shapes = [
        tuple(int(x) for x in s.split(":")) for s in (args.shapes or (QUICK_SHAPES if args.quick else SHAPES))
    ]
    points = load_fit(args.out).points if args.add and args.out.is_file() else []
    points = [p for p in points if not p.get("run")]  # the runs file's points are read afresh below
    have = {(p["budget_flops"], p["dial"], p["vocab"]) for p in points}
    sizes = {v: common.qinglm_tokenizer(v, "auto")[0].vocab_size for _, v in shapes}  # the points' "vocab"
    for budget in sorted(budgets):
        for dial, vocab in shapes:
            if (budget, dial, sizes[vocab]) in have:
                continue
            p = run_point(dial, vocab, budget)
            points.append(p)
            print(json.dumps(p), flush=True)
    runs = args.runs or ("none" if args.quick else str(RUNS_FILE))
    if runs != "none":
        points += load_runs(Path(runs))
    points.sort(key=lambda p: (bool(p.get("run")), p["budget_flops"], p["vocab"], p["dial"]))
    vocabs = sorted({v for _, v in shapes} | ({p["vocab"] for p in points} if args.add else set()))
    facts = {v: corpus_facts(v) for v in vocabs}
    real = {v: common.qinglm_tokenizer(v, "auto")[0].vocab_size for v in vocabs}
    machine = (
        f"{platform.machine()} {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d')}, load {os.getloadavg()[0]:.1f}"
    )
    fit = build_fit(
        points,
        {real[v]: facts[v]["chars_per_token"] for v in vocabs},
        facts[vocabs[0]]["train_characters"],
        machine,
        min_steps=args.min_steps if args.min_steps is not None else 0 if args.quick else MIN_FIT_STEPS,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out) as f:
        f.write(json.dumps(fit.to_json(), indent=1) + "\n")
    default_png = FRONTIER_PNG if args.out == FIT_FILE else args.out.with_suffix(".png")
    png = plot_frontier(fit, args.plot or default_png)
    print(f"\nwrote {args.out}" + (f" and {png}" if png else ""))
    print_table(fit)


def print_table(fit: ScalingFit) -> None:
    """Print the points, the fitted constants and the held-out errors as markdown."""
    min_steps = fit.holdout.get("min_steps", 0)
    print(
        "\n| budget | dial | vocab | N (non-emb.) | params | tokens | passes | steps | val BPC | law | fitted | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for p in fit.points:
        law = fit.predict(p["n"], p["characters"], p["vocab"], dropout=bool(p.get("dropout")))
        passes = p["characters"] / fit.train_characters if fit.train_characters else float("nan")
        name = f"{p['budget']}: {p['run']}" if p.get("run") else f"{p['budget_flops']:.2g}"
        fitted = {"law": "yes", "R_dropout": "R_dropout", None: "no"}[fitted_as(p, min_steps)]
        wall = f"{p['wall_s']:.0f}" if "wall_s" in p else "-"
        print(
            f"| {name} | {p['dial']} | {p['vocab']:,} | {p['n']:,} | {p['params']:,} | {p['tokens']:,} | "
            f"{passes:.1f} | {p['steps']} | {p['bpc']:.3f} | {law:.3f} | {fitted} | {wall} |"
        )
    e = ", ".join(f"E[{v}] = {x:.3f}" for v, x in fit.E.items())
    r = f", R = {fit.R:.3f}" if fit.R is not None else ""
    print(f"\n{e}, A = {fit.A:.4g}, alpha = {fit.alpha:.3f}, B = {fit.B:.4g}, beta = {fit.beta:.3f}{r}")
    print("\n| held-out budget | points | fitted on | mean abs error | max abs error |")
    print("|---|---:|---|---:|---:|")
    for b in fit.holdout.get("by_budget", []):
        if "skipped" in b:
            print(f"| {b['budget']} | - | skipped: {b['skipped']} | - | - |")
            continue
        print(
            f"| {b['budget']} | {b['points']} | {', '.join(b['fitted_on'])} | "
            f"{b['mean_abs_error_bpc']:.3f} | {b['max_abs_error_bpc']:.3f} |"
        )
    if fit.R is not None:
        floors = ", ".join(f"{fit.floor(v):.3f} (vocab {v:,})" for v in fit.E)
        print(f"\nthe data's floor (any size, any passes): {floors}")
    if fit.R_dropout is not None:
        d = fit.holdout.get("dropout", {})
        print(
            f"runs with dropout {DROPOUT_FITTED:g}: R_dropout = {fit.R_dropout:.3f} ({d.get('points')} runs; each "
            f"predicted from the others: mean abs error {d.get('mean_abs_error_bpc', float('nan')):.3f}, "
            f"max {d.get('max_abs_error_bpc', float('nan')):.3f}); floor "
            + ", ".join(f"{fit.floor(v, dropout=True):.3f} (vocab {v:,})" for v in fit.E)
        )


if __name__ == "__main__":
    main()
