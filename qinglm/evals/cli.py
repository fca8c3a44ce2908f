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


def run_kind(run: Path) -> str:
    """Return the kind config.json gives the run ("?" when it gives none)."""
    try:
        config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except ValueError:
        raise QingLMError(f"{run / 'config.json'} is not valid JSON") from None
    kind = config.get("kind") if isinstance(config, dict) else None
    return kind if isinstance(kind, str) else "?"


def run_eval(args: argparse.Namespace) -> None:
    """Run --tasks and/or --lm-eval on --model, print the tables and write RUN/eval_results.json."""
    import qinglm
    from qinglm.evals.suite import RESULTS_FILE, evaluate_tasks, format_table
    from qinglm.evals.tasks import resolve

    run = _check_run(args.model)
    if args.limit is not None and args.limit < 1:
        raise QingLMError(f"--limit must be a positive number of items, got {args.limit}")
    kind = run_kind(run)
    tasks = resolve(args.tasks, kind) if args.tasks else []  # a wrong name fails before the model loads
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
            kind=kind,
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
    from qinglm.evals.suite import merged_results, write_run_file

    write_run_file(run, RESULTS_FILE, json.dumps(merged_results(run / RESULTS_FILE, out), indent=2))


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
