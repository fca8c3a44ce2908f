"""A PNG of training curves, several runs overlaid for comparison (`qinglm plot`: qinglm.plot_cli).

Four panels drawn from each run's metrics.jsonl: training and validation loss, learning rate,
gradient norm and throughput (tokens/s), against the optimizer step or the tokens seen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qinglm.errors import QingLMError

PANELS = (
    ("loss", "loss (train solid, validation dashed)"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("tokens_per_s", "throughput (tokens/s)"),
)
X_AXES = {"step": ("step", "optimizer step"), "tokens": ("tokens_seen", "tokens seen")}


def load_run(path: str | Path) -> list[dict[str, Any]]:
    """Return the records of a run directory's metrics.jsonl (or of the file itself)."""
    from qinglm.run_dir import read_metrics

    p = Path(path)
    if not p.exists():
        raise QingLMError(f"{p}: no such run directory or metrics file")
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise QingLMError(f"{p} has no metrics.jsonl; is it a QingLM run directory?")
    try:
        records = [r for r in read_metrics(file) if isinstance(r, dict)]
    except UnicodeDecodeError:
        raise QingLMError(f"{file} is not a UTF-8 metrics.jsonl file") from None
    if not any("step" in r for r in records):
        raise QingLMError(f"{file} holds no metric records yet; train for at least --log-every steps")
    return records


def run_names(paths: list[str | Path]) -> list[str]:
    """Return a legend label per run: the directory name, with its parent when names repeat."""
    dirs = [Path(p) if Path(p).is_dir() else Path(p).parent for p in paths]
    names = [d.resolve().name for d in dirs]
    if len(set(names)) < len(names):
        names = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in dirs]
    return names


def _series(records: list[dict[str, Any]], kind: str, key: str, x_key: str) -> tuple[list, list]:
    """Return (xs, ys) of the records of one kind that have both x_key and a numeric key."""
    pts = [
        (r[x_key], r[key])
        for r in records
        if r.get("kind", "train") == kind
        and isinstance(r.get(key), (int, float))
        and r.get(x_key) is not None
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_runs(runs: list[str | Path], out: str | Path, x: str = "step") -> Path:
    """Return the path of the PNG written with the four panels for every run overlaid."""
    if x not in X_AXES:
        raise QingLMError(f"x axis must be one of {', '.join(X_AXES)}, got {x!r}")
    try:
        import matplotlib
    except ImportError:
        raise QingLMError("qinglm plot needs matplotlib: install with pip install matplotlib") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    from qinglm.io import atomic_open

    data = [load_run(r) for r in runs]
    x_key, x_label = X_AXES[x]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(zip(run_names(runs), data)):
        color = colors[i % len(colors)]
        for ax, (key, _) in zip(axes.flat, PANELS):
            xs, ys = _series(records, "train", key, x_key)
            if xs:
                ax.plot(xs, ys, color=color, label=name, linewidth=1.2)
        xs, ys = _series(records, "val", "val_loss", x_key)
        if xs:
            axes.flat[0].plot(
                xs, ys, color=color, linestyle="--", marker="o", markersize=3, label=f"{name} (val)"
            )
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    except OSError as e:
        raise QingLMError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out
