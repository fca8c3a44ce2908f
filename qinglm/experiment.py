"""Train one model per weight initialisation on the same budget and compare (`qinglm experiment init`).

Every run is an ordinary run directory (resumable, loadable) under OUT/init-<name>; the first run
trains the tokenizer and prepares the data, the others reuse both, so the runs differ only in `init`.
OUT/init_comparison.png overlays their curves (`qinglm plot`: training and validation loss, learning
rate, gradient norm, throughput) and OUT/results.md holds the table that is also printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qinglm.errors import QingLMError

RESULTS = ("results.md", "init_comparison.png")  # written into OUT beside the runs
DEFAULT_STEPS = 300  # the budget when no --max-steps / --max-time / --epochs is given (~2 min each for tiny)


def compare_inits(
    model_flags: dict[str, Any],
    train_flags: dict[str, Any],
    inits: list[str],
    config_file: str | None = None,
    log=print,
) -> list[dict[str, Any]]:
    """Return one result row per init after training each; write the PNG and results.md into OUT."""
    from qinglm.io import OwnedDir

    if len(set(inits)) != len(inits):
        raise QingLMError("--inits lists an initialisation twice")
    train_flags = dict(train_flags)
    if not any(train_flags.get(k) is not None for k in ("max_steps", "max_time", "num_epochs")):
        train_flags["max_steps"] = DEFAULT_STEPS
    preset = train_flags.get("preset", "tiny")
    out = Path(train_flags.pop("out", None) or f"runs/experiment-init-{preset}")
    try:  # refused now, not after training every run; each run claims its own folder
        owned = OwnedDir.claim(out, "experiment", RESULTS, overwrite=bool(train_flags.get("overwrite")))
    except OSError as e:
        raise QingLMError(f"cannot write to {out}: {e.strerror or e}") from None
    try:
        return _compare(model_flags, train_flags, inits, config_file, log, out)
    except BaseException:
        owned.release_unused()  # nothing written: the folder is not claimed
        raise


def _compare(
    model_flags: dict[str, Any],
    train_flags: dict[str, Any],
    inits: list[str],
    config_file: str | None,
    log: Any,
    out: Path,
) -> list[dict[str, Any]]:
    """Return compare_inits's rows, out already claimed."""
    from qinglm.io import write_text_atomic
    from qinglm.pipeline import run_train
    from qinglm.plot import plot_runs
    from qinglm.run_dir import read_config
    from qinglm.train.metrics import read_metrics

    rows, first = [], None
    for name in inits:
        flags = {**train_flags, "out": str(out / f"init-{name}")}
        if first is not None:  # same tokenizer and token shards (its own or the given ones) for every run
            flags.update(data=[read_config(first)["data_dir"]], tokenizer=str(first / "tokenizer"))
        log(f"\n=== init {name} ===")
        run_dir = run_train({**model_flags, "init": name}, flags, config_file, log=log)
        first = first or run_dir
        records = read_metrics(run_dir)
        train_recs = [r for r in records if r["kind"] == "train"]
        val_recs = [r for r in records if r["kind"] == "val"]
        if not train_recs:
            raise QingLMError(f"run {run_dir} logged no training steps; give a longer budget")
        rows.append(
            {
                "init": name,
                "run": str(run_dir),
                "first_loss": train_recs[0]["loss"],
                "final_loss": train_recs[-1]["loss"],
                "val_loss": val_recs[-1]["val_loss"] if val_recs else float("nan"),
                "val_bpc": val_recs[-1]["val_bpc"] if val_recs else float("nan"),
                "steps": train_recs[-1]["step"],
                "elapsed_s": train_recs[-1]["elapsed_s"],
            }
        )
    table = results_table(rows)
    write_text_atomic(out / RESULTS[0], table + "\n")
    png = plot_runs([r["run"] for r in rows], out / RESULTS[1])
    log("\n" + table)
    log(f"\nwrote {png} and {out / 'results.md'}")
    return rows


def results_table(rows: list[dict[str, Any]]) -> str:
    """Return a Markdown table: first/final train loss, final val loss and BPC, steps, time per init."""
    lines = [
        "| init | first logged loss | final train loss | final val loss | val bits/char | steps | time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['init']} | {r['first_loss']:.3f} | {r['final_loss']:.3f} | {r['val_loss']:.3f} | "
            f"{r['val_bpc']:.3f} | {r['steps']} | {r['elapsed_s']:.0f} s |"
        )
    return "\n".join(lines)
