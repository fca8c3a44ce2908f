"""The command-line side of the suite: `qinglm eval --tasks / --lm-eval` and `qinglm report RUN [RUN ...]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qinglm.errors import QingLMError


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """Add the suite's flags to the `qinglm eval` parser."""
    p.add_argument("--tasks", help="built-in tasks, NAME[,NAME...] or all (see qinglm.evals.TASKS)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per task (spread evenly)")
    p.add_argument("--lm-eval", dest="lm_eval", help="lm-evaluation-harness tasks, e.g. ceval-valid,cmmlu")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples per question")
    p.add_argument("--lm-eval-include", default=None, help="lm-eval: a folder of extra task YAMLs")


def _check_run(path: str) -> Path:
    run = Path(path)
    if not (run / "config.json").is_file():
        raise QingLMError(f"{run} is not a QingLM run directory (no config.json); give --model RUN")
    return run


def run_eval(args: argparse.Namespace) -> None:
    """Run --tasks and/or --lm-eval on --model, print the tables and write RUN/eval_results.json."""
    import qinglm
    from qinglm.evals.suite import RESULTS_FILE, evaluate_tasks, format_table
    from qinglm.evals.tasks import resolve

    run = _check_run(args.model)
    if args.limit is not None and args.limit < 1:
        raise QingLMError(f"--limit must be a positive number of items, got {args.limit}")
    tasks = resolve(args.tasks) if args.tasks else []  # an unknown name fails before the model loads
    out: dict[str, Any] = {}
    if tasks:
        lm = qinglm.load(run, device=args.device)
        out = evaluate_tasks(
            lm.model,
            lm.tokenizer,
            tasks,
            limit=args.limit,
            val_fraction=lm.val_fraction,
            split_by=lm.split_by,
        )
        print(format_table(out) if not args.json else json.dumps(out, ensure_ascii=False))
    if args.lm_eval:
        from qinglm.evals.lm_eval_bridge import format_lm_eval, run_lm_eval

        device = "cpu" if args.device == "auto" else args.device
        res = run_lm_eval(
            run,
            args.lm_eval,
            limit=args.limit,
            num_fewshot=args.num_fewshot,
            include_path=args.lm_eval_include,
            device=device,
        )
        out["lm_eval"] = res
        print(format_lm_eval(res) if not args.json else json.dumps(res, ensure_ascii=False))
    write_run_file(run, RESULTS_FILE, json.dumps(merged_results(run / RESULTS_FILE, out), indent=2))


def merged_results(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """Return the results in path (an earlier eval) updated with the new ones, the summary recomputed."""
    from qinglm.evals.stats import summary_score

    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
    old = old if isinstance(old, dict) else {}
    tasks = {**(old.get("tasks") or {}), **new.get("tasks", {})}
    lm_eval = {**(old.get("lm_eval") or {}), **new.get("lm_eval", {})}
    return {"tasks": tasks, "summary": summary_score(tasks), "lm_eval": lm_eval}


def write_run_file(run: Path, name: str, data: str | bytes) -> Path:
    """Write RUN/name atomically, first recording it in the run's manifest; refuse a file QingLM did not write."""
    from qinglm.io import OwnedDir, atomic_open

    owned = OwnedDir.read(run)
    path = run / name
    if path.exists() and not (owned and owned.owns(name)):
        raise QingLMError(f"{path} exists and was not written by QingLM; move it away first")
    if owned:
        owned.add(name)
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    """Add `qinglm report` to sub; return its handler."""
    p = sub.add_parser(
        "report",
        help="a report card per run: RUN/report.md and PNG plots (several runs: side by side)",
        description="Write RUN/report.md and RUN/report/*.png: the model, data, time, throughput, loss and "
        "learning-rate curves, validation bits per character, task scores with intervals and greedy samples.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (several: compared side by side)")
    p.add_argument("--tasks", default="all", help="tasks to run when RUN has no eval_results.json")
    p.add_argument("--limit", type=int, default=200, help="items per task for that evaluation")
    p.add_argument("--device", default="auto")
    return {"report": cmd_report}


def cmd_report(args: argparse.Namespace) -> None:
    from qinglm.evals.report import write_reports

    for path in write_reports([_check_run(r) for r in args.runs], args.tasks, args.limit, args.device):
        print(f"wrote {path}")
