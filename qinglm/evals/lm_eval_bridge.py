"""`qinglm eval --lm-eval TASKS`: a run exported to a temporary transformers folder, scored by lm-eval.

lm-evaluation-harness (`pip install qinglm[lm-eval]`) downloads its tasks' data from the Hugging Face
Hub (a mirror through HF_ENDPOINT); include_path adds task YAMLs of lm-eval's own format, such as a
task over local JSON files. The exported tokenizer starts every text with [BOS] and lm-eval is told
to keep it (add_bos_token), so lm-eval sees what QingLM trained on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from qinglm.errors import QingLMError

# What lm-eval raises when a task's data cannot be fetched (names of the classes, so no import is needed).
_OFFLINE = ("ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError", "Timeout")


def _offline(e: BaseException) -> bool:
    while e is not None:
        if any(n in cls.__name__ for cls in type(e).__mro__ for n in _OFFLINE):
            return True
        e = e.__cause__ or e.__context__
    return False


def run_lm_eval(
    run_dir: str | Path,
    tasks: str,
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """Return {task: {metric: value}} of lm-eval's tasks (comma-separated names) on the run."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise QingLMError("--lm-eval needs lm-evaluation-harness: pip install 'qinglm[lm-eval]'") from None
    from qinglm.export.hf import export_hf

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if include_path is not None and not Path(include_path).is_dir():
        raise QingLMError(f"--lm-eval-include {include_path}: no such directory of task YAMLs")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise QingLMError(f"unknown lm-eval task {(unknown or [''])[0]!r}; `lm-eval ls tasks` lists them")
    with tempfile.TemporaryDirectory(prefix="qinglm-lm-eval-") as tmp:
        folder = export_hf(run_dir, Path(tmp) / "hf")
        try:
            out = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(folder), "dtype": "float32", "add_bos_token": True},
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                device=device,
                batch_size=batch_size,
                task_manager=manager,
                log_samples=False,
            )
        except Exception as e:
            if _offline(e):
                raise QingLMError(
                    f"lm-eval could not download the data of {tasks} ({type(e).__name__}); connect to the "
                    "internet, set HF_ENDPOINT to a Hugging Face mirror, or give local task YAMLs with "
                    "--lm-eval-include DIR"
                ) from None
            raise
    return {
        task: {k: v for k, v in metrics.items() if k != "alias"} for task, metrics in out["results"].items()
    }


def format_lm_eval(results: dict[str, dict[str, Any]]) -> str:
    """Return lm-eval's results as lines "task  metric value ± stderr"."""
    lines = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            err = metrics.get(key.replace(metric, metric + "_stderr", 1))
            shown = f"{value:.4f}" + (f" ± {err:.4f}" if isinstance(err, (int, float)) else "")
            lines.append(f"{task:<24} {metric:<10} {shown}")
    return "\n".join(lines)
