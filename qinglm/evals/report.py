"""`qinglm report RUN [RUN ...]`: RUN/report.md and RUN/report/*.png, a report card per run.

Sections: the model (parameters by part, active ones for MoE), the data, time and throughput, the
loss and learning-rate curves (qinglm.plot), validation bits per character, task scores with 95 %
intervals (RUN/eval_results.json, evaluated first when missing), greedy samples for fixed prompts,
and for post-training runs the scores before and after (the base run's next to this run's, and the
stage's own held-out figures). Several runs: each gets its report, and the report of each holds a
side-by-side table of all of them. The training commands write it at the end of a run
(write_end_report): cheap, so no task is evaluated then; the scores already in the run are shown.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from qinglm.config import DEFAULT_PROMPTS
from qinglm.evals.suite import RESULTS_FILE, detail_interval, evaluate_tasks, merged_results, write_run_file

REPORT, PLOTS = "report.md", "report"
SAMPLE_TOKENS = 40
SECTIONS = ("Model", "Data", "Time and throughput", "Curves", "Validation", "Tasks", "Samples")
POST_FILES = ("sft_results.json", "dpo_results.json", "grpo_results.json")  # the stages' held-out figures


def _records(run: Path) -> list[dict[str, Any]]:
    from qinglm.run_dir import read_metrics

    path = run / "metrics.jsonl"
    return [r for r in read_metrics(path) if isinstance(r, dict)] if path.is_file() else []


def _last(records: list[dict], kind: str, key: str) -> Any:
    return next((r[key] for r in reversed(records) if r.get("kind") == kind and key in r), None)


def _results(run: Path) -> dict[str, Any]:
    """Return RUN/eval_results.json ({} when there is none)."""
    path = run / RESULTS_FILE
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return results if isinstance(results, dict) else {}


def _val_scores(records: list[dict]) -> dict[str, Any]:
    """Return {"step", "scores": {task: score}} of the last validation that ran --eval-tasks ({} if none)."""
    last = next((r for r in reversed(records) if r.get("kind") == "val" and "task/summary" in r), None)
    if last is None:
        return {}
    scores = {k.removeprefix("task/"): v for k, v in last.items() if k.startswith("task/")}
    return {"step": last.get("step"), "scores": scores}


def task_scores(run: Path) -> dict[str, float]:
    """Return {task: score} already in a run: eval_results.json's, else its last --eval-tasks validation's."""
    results = _results(run)
    if results.get("tasks"):
        return {k: r["score"] for k, r in results["tasks"].items()}
    return _val_scores(_records(run)).get("scores", {})


def collect(run: Path, tasks: str, limit: int | None, device: str, evaluate: bool = True) -> dict[str, Any]:
    """Return what a report shows about one run (evaluate: run the tasks when it has no results yet)."""
    import qinglm
    from qinglm.run_dir import read_config

    lm = qinglm.load(run, device=device)
    config = read_config(run)
    records = _records(run)
    results_path = run / RESULTS_FILE
    results = _results(run)
    if evaluate and not results.get("tasks"):
        out = evaluate_tasks(
            lm.model,
            lm.tokenizer,
            tasks,
            limit=limit,
            val_fraction=lm.val_fraction,
            split_by=lm.split_by,
            kind=config.get("kind"),
        )
        results = merged_results(results_path, out)
        write_run_file(run, RESULTS_FILE, json.dumps(results, ensure_ascii=False, indent=2))
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    prompts = train.get("sample_prompts") or DEFAULT_PROMPTS
    samples = [(p, lm.generate(p, max_new_tokens=SAMPLE_TOKENS, temperature=0.0)) for p in prompts]
    model = lm.model
    active = model.active_matmul_params() if model.cfg.n_experts else None
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and "tokens_per_s" in r]
    base = config.get("base") or config.get("teacher") or train.get("init_from")
    return {
        "run": run,
        "kind": config.get("kind", "?"),
        "model_cfg": config.get("model", {}),
        "params": model.param_counts(),
        "active": active,
        "config": config,
        "records": records,
        "steps": _last(records, "train", "step"),
        "tokens_seen": _last(records, "train", "tokens_seen"),
        "epoch": _last(records, "train", "epoch"),
        "elapsed_s": _last(records, "train", "elapsed_s"),
        "tokens_per_s": statistics.median(speeds[1:] or speeds) if speeds else None,
        "mfu": _last(records, "train", "mfu"),
        "val_bpc": _last(records, "val", "val_bpc"),
        "results": results,
        "val_scores": _val_scores(records),
        "samples": samples,
        "post": {
            n: json.loads((run / n).read_text(encoding="utf-8")) for n in POST_FILES if (run / n).is_file()
        },
        "base": (str(base), task_scores(Path(base)) if (Path(base) / "config.json").is_file() else {})
        if base
        else None,
    }


def _fmt(v: Any, spec: str = ",") -> str:
    return "–" if v is None else format(v, spec)


def _tasks_table(results: dict[str, Any]) -> list[str]:
    lines = ["| task | metric | score | 95% interval | random | n |", "|---|---|---|---|---|---|"]
    for name, r in (results.get("tasks") or {}).items():
        lo, hi = r["interval"]
        lines.append(
            f"| {name} | {r['metric']} | {r['score']:.4f} | [{lo:.4f}, {hi:.4f}] | {r['random']:.4f} | {r['n']} |"
        )
    tasks = results.get("tasks") or {}
    notes = [
        f"- {name}: {k} {v:.4f}{detail_interval(r, k)}"
        for name, r in tasks.items()
        for k, v in (r.get("details") or {}).items()
    ]
    lines += ["", *notes] if notes else []
    if results.get("summary") is not None:
        lines.append(
            f"\nSummary score (mean accuracy rescaled, random = 0, perfect = 1): **{results['summary']:.4f}**"
        )
    return lines


def _task_lines(info: dict[str, Any]) -> list[str]:
    """Return the Tasks section's lines: the suite's results, else the last --eval-tasks scores, else how."""
    if info["results"].get("tasks"):
        return _tasks_table(info["results"])
    if v := info["val_scores"]:
        lines = [f"Scores at the last validation (step {v['step']}, `--eval-tasks`):", "", "| task | score |"]
        return lines + ["|---|---|", *(f"| {k} | {x:.4f} |" for k, x in v["scores"].items())]
    run = info["run"]
    return [
        f"No task scores in this run yet. To add them: `qinglm eval --model {run} --tasks all`, "
        f"then `qinglm report {run}`."
    ]


def _post_lines(info: dict[str, Any]) -> list[str]:
    """Return the Post-training section: the base run's task scores next to this run's, and the stage's
    own held-out figures before and after ([] for a run with neither)."""
    rows = []
    if info["base"] is not None:
        _, before = info["base"]
        after = {k: r["score"] for k, r in (info["results"].get("tasks") or {}).items()}
        after = after or info["val_scores"].get("scores", {})
        rows += [f"| {k} | {before[k]:.4f} | {after[k]:.4f} |" for k in before if k in after]
    for name, post in info["post"].items():
        if name == "sft_results.json":
            rows.append(f"| held-out val loss | {_fmt(post.get('val_loss_before'), '.4f')} | "
                        f"{_fmt(post.get('val_loss_after'), '.4f')} |")  # fmt: skip
            if isinstance(post.get("pinyin"), dict):
                rows.append(f"| held-out pinyin exact match | – | {post['pinyin'].get('accuracy', 0):.2%} |")
        elif name == "grpo_results.json":
            b, a = post.get("heldout_before") or {}, post.get("heldout_after") or {}
            for k in ("val_reward", "val_pass_rate"):
                rows.append(
                    f"| held-out {k[4:]} ({post.get('task')}) | {_fmt(b.get(k), '.4f')} | {_fmt(a.get(k), '.4f')} |"
                )
        elif name == "dpo_results.json" and "rewards/accuracies" in post:
            rows.append(f"| held-out pair accuracy | – | {post['rewards/accuracies']:.2%} |")
    if not rows and info["base"] is None:
        return []
    head = ["", "## Post-training", ""]
    if info["base"] is not None:
        head += [f"Before: the base run {info['base'][0]}; after: this run.", ""]
    if not rows:
        return head + ["No figure that both runs hold (evaluate both with `qinglm eval --tasks all`)."]
    return head + ["| | before | after |", "|---|---|---|", *rows]


def _compare_table(infos: list[dict[str, Any]]) -> list[str]:
    names = [i["run"].name for i in infos]
    rows = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    rows.append("| parameters | " + " | ".join(f"{i['params']['total']:,}" for i in infos) + " |")
    rows.append("| tokens seen | " + " | ".join(_fmt(i["tokens_seen"]) for i in infos) + " |")
    rows.append("| val bpc | " + " | ".join(_fmt(i["val_bpc"], ".4f") for i in infos) + " |")
    tasks = list(dict.fromkeys(t for i in infos for t in (i["results"].get("tasks") or {})))
    for t in tasks:
        cells = []
        for i in infos:
            r = (i["results"].get("tasks") or {}).get(t)
            cells.append(f"{r['score']:.4f} [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]" if r else "–")
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    rows.append("| summary | " + " | ".join(_fmt(i["results"].get("summary"), ".4f") for i in infos) + " |")
    return rows


def render(info: dict[str, Any], plots: dict[str, str] | None, others: list[dict[str, Any]]) -> str:
    """Return the report.md text of one run (others: the runs compared side by side, itself included;
    plots None: matplotlib is missing)."""
    p, m = info["params"], info["model_cfg"]
    out = [f"# Report: {info['run'].name}", "", f"Run kind: {info['kind']}", "", "## Model", ""]
    shape = ", ".join(
        f"{k} {m[k]}"
        for k in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "family")
        if k in m
    )
    out += [shape, "", "| part | parameters |", "|---|---|"]
    out += [f"| {k} | {v:,} |" for k, v in p.items()]
    if info["active"] is not None:
        out.append(f"| active block matrices per token (MoE) | {info['active']:,} |")
    train = info["config"].get("train") or info["config"].get("sft") or {}
    out += ["", "## Data", ""]
    out.append(
        f"Sources: {', '.join(map(str, train.get('data') or [])) if isinstance(train.get('data'), list) else train.get('data', '–')}"
    )
    out.append(
        f"Held out: val_fraction {train.get('val_fraction', '–')}, split_by {train.get('split_by', '–')}"
    )
    out.append(f"Tokens seen: {_fmt(info['tokens_seen'])}; epochs: {_fmt(info['epoch'], '.3f')}")
    out += ["", "## Time and throughput", ""]
    out.append(f"Optimizer steps: {_fmt(info['steps'])}; time: {_fmt(info['elapsed_s'], '.1f')} s")
    out.append(
        f"Throughput (median): {_fmt(info['tokens_per_s'], ',.0f')} tokens/s; MFU: {_fmt(info['mfu'], '.2%')}"
    )
    out += ["", "## Curves", ""]
    if plots is None:
        out.append(
            f"matplotlib is not installed: no plots (`pip install matplotlib`, then `qinglm report {info['run']}`)"
        )
    else:
        out += [f"![{k}]({v})" for k, v in plots.items()] or ["(no metrics.jsonl: nothing to plot)"]
    out += [
        "",
        "## Validation",
        "",
        f"Last validation bits per character (training's split): {_fmt(info['val_bpc'], '.4f')}",
        "",
    ]
    bpc = {k: r for k, r in (info["results"].get("tasks") or {}).items() if r.get("kind") == "bpc"}
    out += [
        f"- {k}: {r['score']:.4f} bits/char [{r['interval'][0]:.4f}, {r['interval'][1]:.4f}]"
        for k, r in bpc.items()
    ]
    out += ["", "## Tasks", "", *_task_lines(info), ""]
    lm_eval = info["results"].get("lm_eval") or {}
    out += [f"- lm-eval {t}: {json.dumps(v, ensure_ascii=False)}" for t, v in lm_eval.items()]
    out += ["", "## Samples", "", f"Greedy, {SAMPLE_TOKENS} new tokens:", ""]
    out += [f"- **{pr}** → {text}" for pr, text in info["samples"]]
    out += _post_lines(info)
    if len(others) > 1:
        out += ["", "## Side by side", "", *_compare_table(others)]
    return "\n".join(out) + "\n"


def _plots(run: Path, runs: list[Path], info: dict[str, Any]) -> dict[str, str] | None:
    """Return {title: path relative to run} of the PNGs written into RUN/report/ (None: no matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    from qinglm.io import claim_file
    from qinglm.plot import plot_runs

    claim_file(run / PLOTS)
    with_records = [r for r in runs if (r / "metrics.jsonl").is_file()]
    plots = {}
    if info["records"]:
        plot_runs(with_records, run / PLOTS / "curves.png")
        plots["loss, learning rate, gradient norm and throughput"] = f"{PLOTS}/curves.png"
    if _plot_tasks(info["results"], run / PLOTS / "tasks.png"):
        plots["task accuracy with 95% intervals (dashes: random)"] = f"{PLOTS}/tasks.png"
    return plots


def _plot_tasks(results: dict[str, Any], out: Path) -> bool:
    """Return True after drawing the choice tasks' accuracies, intervals and random baselines to out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qinglm.io import atomic_open

    tasks = {k: r for k, r in (results.get("tasks") or {}).items() if r.get("kind") in ("choice", "chat")}
    if not tasks:
        return False
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 4), constrained_layout=True)
    xs = range(len(tasks))
    scores = [r["score"] for r in tasks.values()]
    errs = [
        [max(0.0, s - r["interval"][0]) for s, r in zip(scores, tasks.values())],
        [max(0.0, r["interval"][1] - s) for s, r in zip(scores, tasks.values())],
    ]
    ax.bar(xs, scores, yerr=errs, capsize=4, color="tab:blue")
    for x, r in zip(xs, tasks.values()):
        ax.hlines(r["random"], x - 0.4, x + 0.4, colors="black", linestyles="dashed")
    ax.set_xticks(list(xs), list(tasks), rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(out, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return True


def write_reports(
    runs: list[Path], tasks: str = "all", limit: int | None = 200, device: str = "auto"
) -> list[Path]:
    """Return the report.md paths written, one per run (each compares all runs when there are several)."""
    infos = [collect(r, tasks, limit, device) for r in runs]
    paths = []
    for info in infos:
        plots = _plots(info["run"], runs, info)
        paths.append(write_run_file(info["run"], REPORT, render(info, plots, infos)))
    return paths


def write_end_report(run: Path, device: str = "auto") -> Path:
    """Return RUN/report.md, written at the end of a training command: cheap, no task is evaluated."""
    info = collect(run, "all", None, device, evaluate=False)
    return write_run_file(run, REPORT, render(info, _plots(run, [run], info), [info]))
