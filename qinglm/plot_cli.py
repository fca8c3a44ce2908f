"""`qinglm plot RUN [RUN ...]`: the command line of qinglm.plot."""

from __future__ import annotations

import argparse
from typing import Any

from qinglm.io import claim_file
from qinglm.plot import X_AXES, plot_runs


def register(sub: argparse._SubParsersAction) -> dict[str, Any]:
    """Return {"plot": handler} after adding the `qinglm plot` parser to sub."""
    p = sub.add_parser(
        "plot",
        help="draw training curves of one or more runs as a PNG",
        description="Plot training/validation loss, learning rate, gradient norm and tokens/s from "
        "each run's metrics.jsonl, several runs overlaid for comparison.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directory (or its metrics.jsonl)")
    p.add_argument("--out", default="metrics.png", help="PNG file to write (default: metrics.png)")
    p.add_argument("--x", choices=list(X_AXES), default="step", help="x axis: optimizer step or tokens seen")
    p.add_argument("--overwrite", action="store_true", help="replace an --out file QingLM did not write")
    return {"plot": cmd_plot}


def cmd_plot(args: argparse.Namespace) -> None:
    out = plot_runs(args.runs, claim_file(args.out, args.overwrite), x=args.x)
    print(f"wrote {out} ({len(args.runs)} run{'s' if len(args.runs) > 1 else ''})")
