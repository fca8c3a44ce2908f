"""Run tasks of the suite on a model: scores, random baselines, 95 % intervals, the summary score.

A "choice" task's score is its metric (acc_norm unless the task says otherwise) with a Wilson
interval, and so is a "chat" task's pass rate (random: 0); a "bpc" task's score is bits per
character with a percentile-bootstrap interval over documents, and its "random" is a uniform
distribution over the vocabulary. The summary score is the mean over the choice and chat tasks of
(accuracy - random) / (1 - random).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from qinglm.data.splits import SPLIT_BY, VAL_FRACTION
from qinglm.evals.chat import pass_rate
from qinglm.evals.scoring import calibrated_picks, choose, encode_pair, score_ids
from qinglm.evals.stats import bootstrap_ratio_interval, summary_score, wilson_interval
from qinglm.evals.tasks import CHAT_ITEMS, TOOLS_SFT, VERIFIABLE, Item, Task, resolve
from qinglm.evals.tool_use import FIGURES, score_episodes
from qinglm.io import write_json_atomic
from qinglm.model.transformer import Transformer
from qinglm.tokenizer import Tokenizer

RESULTS_FILE = "eval_results.json"


def _take(items: tuple, limit: int | None) -> tuple:
    """Return at most `limit` items spread evenly over the task (all when limit is None or 0)."""
    if not limit or limit >= len(items):
        return items
    step = len(items) / limit
    return tuple(items[int(i * step)] for i in range(limit))


_CACHE: dict[tuple, tuple] = {}


def _items(task: Task, val_fraction: float, split_by: str, tokenizer: Tokenizer) -> tuple:
    """Return the task's items, built once per process for each split and tokenizer."""
    key = (task.name, val_fraction, split_by, tokenizer.fingerprint())
    if key not in _CACHE:
        _CACHE[key] = task.build(val_fraction, split_by, tokenizer)
    return _CACHE[key]


def score_choice(
    model: Transformer,
    tokenizer: Tokenizer,
    items: tuple[Item, ...],
    device: Any = None,
    calibrate: bool = False,
) -> dict[str, Any]:
    """Return {"acc", "acc_norm", "n"} of multiple-choice items, every choice of every item in one batched
    pass; calibrate: also "acc_calibrated" (items sharing their choices, see scoring.calibrated_picks)."""
    pairs = [encode_pair(tokenizer, it.context, c) for it in items for c in it.choices]
    lls = [ll for ll, _ in score_ids(model, pairs, device)]
    per_item, k = [], 0
    for it in items:
        per_item.append(lls[k : k + len(it.choices)])
        k += len(it.choices)
    picks = [choose(item_lls, it.choices) for item_lls, it in zip(per_item, items)]
    n = len(items)
    out = {
        "acc": sum(p == it.gold for (p, _), it in zip(picks, items)) / n,
        "acc_norm": sum(p == it.gold for (_, p), it in zip(picks, items)) / n,
        "n": n,
    }
    if calibrate:
        out["acc_calibrated"] = sum(p == it.gold for p, it in zip(calibrated_picks(per_item), items)) / n
    return out


def score_bpc(model: Transformer, tokenizer: Tokenizer, docs: tuple[str, ...], device: Any = None) -> dict:
    """Return {"score" (bits/char), "interval", "random", "n"} of documents read as [BOS] doc [EOS].

    Characters are len(doc) + 1 (the break), as in qinglm.evaluate. A document longer than the
    context is scored in windows without context across them.
    """
    win = model.cfg.max_seq_len
    pairs, owner = [], []
    n_tokens = 0
    for d, ids in enumerate(tokenizer.encode_batch(list(docs))):
        seq = [tokenizer.bos_id, *ids, tokenizer.eos_id]
        n_tokens += len(seq) - 1
        for s in range(0, len(seq) - 1, win):
            piece = seq[s : s + win + 1]
            pairs.append((piece[:1], piece[1:]))
            owner.append(d)
    nll = [0.0] * len(docs)
    for d, (ll, _) in zip(owner, score_ids(model, pairs, device)):
        nll[d] -= ll / math.log(2)
    chars = [len(d) + 1 for d in docs]
    return {
        "score": sum(nll) / sum(chars),
        "interval": list(bootstrap_ratio_interval(nll, chars)),
        "random": math.log2(tokenizer.vocab_size) * n_tokens / sum(chars),
        "n": len(docs),
    }


def evaluate_tasks(
    model: Transformer,
    tokenizer: Tokenizer,
    tasks: str | list[str] | list[Task],
    *,
    device: Any = None,
    limit: int | None = None,
    val_fraction: float = VAL_FRACTION,
    split_by: str = SPLIT_BY[0],
    kind: str | None = None,
) -> dict[str, Any]:
    """Return {"tasks": {name: result}, "summary": score | None, "seconds"} of the tasks on the model.

    val_fraction and split_by must be the run's own (they choose the held-out split; see tasks.py).
    limit: at most this many items (documents for bpc) per task, spread evenly (chat tasks: CHAT_ITEMS
    without a limit). kind: the run's kind, which says whether "all" holds the chat tasks (tasks.resolve).
    """
    chosen = tasks if tasks and isinstance(tasks[0], Task) else resolve(tasks, kind)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for task in chosen:
        default = CHAT_ITEMS if task.kind == "chat" else None
        items = _take(_items(task, val_fraction, split_by, tokenizer), limit or default)
        if task.kind == "bpc":
            r = {"kind": "bpc", "metric": "bpc", **score_bpc(model, tokenizer, items, device)}
        elif task.verifier == TOOLS_SFT:  # thinking off (the score), then on (its figures end "_thinking")
            off, on = (score_episodes(model, tokenizer, items, task.max_new_tokens, t) for t in (False, True))
            both = [(f, s) for s in (off, on) for f in FIGURES]
            tail = lambda s: "_thinking" if s["thinking"] else ""  # noqa: E731
            r = {
                "kind": "chat",
                "metric": task.metric,
                "score": off["answer_right_rate"],
                "interval": off["answer_right_interval"],
                "random": 0.0,
                "n": off["n"],
                "details": {f + tail(s): s[f + "_rate"] for f, s in both},
                "intervals": {f + tail(s): s[f + "_interval"] for f, s in both},
                "examples": off["examples"] + on["examples"][:1],
            }
        elif task.kind == "chat":
            s = pass_rate(model, tokenizer, VERIFIABLE[task.verifier](), items, task.max_new_tokens)
            r = {
                "kind": "chat",
                "metric": task.metric,
                "score": s["pass_rate"],
                "interval": list(wilson_interval(s["passed"], s["n"])),
                "random": 0.0,
                "n": s["n"],
                "details": {task.detail: s["mean_reward"]},
                "examples": s["examples"],
            }
        else:
            s = score_choice(model, tokenizer, items, device, calibrate=task.metric == "acc_calibrated")
            correct = round(s[task.metric] * s["n"])
            r = {
                "kind": "choice",
                "metric": task.metric,
                "score": s[task.metric],
                "interval": list(wilson_interval(correct, s["n"])),
                "random": sum(1 / len(it.choices) for it in items) / len(items),
                **s,
            }
        results[task.name] = r
    return {"tasks": results, "summary": summary_score(results), "seconds": time.perf_counter() - t0}


def run_tasks(
    model: Transformer,
    tokenizer: Tokenizer,
    names: str | list[str],
    device: torch.device | str | None = None,
    limit: int | None = None,
    **split: Any,
) -> dict[str, float]:
    """Return flat scores for metrics.jsonl: {"task/NAME": score, ..., "task/summary": score}.

    What the training engine calls at each validation (split: val_fraction=, split_by= of the run).
    """
    out = evaluate_tasks(model, tokenizer, names, device=device, limit=limit, **split)
    flat = {f"task/{name}": r["score"] for name, r in out["tasks"].items()}
    if out["summary"] is not None:
        flat["task/summary"] = out["summary"]
    return flat


def detail_interval(result: dict[str, Any], key: str) -> str:
    """Return " [lo, hi]", the 95 % interval of a task's detail figure, or "" when it has none."""
    lo_hi = (result.get("intervals") or {}).get(key)
    return f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""


def format_table(out: dict[str, Any]) -> str:
    """Return the results as an aligned text table, the summary score last."""
    lines = [f"{'task':<20} {'metric':<14} {'score':>7}  {'95% interval':<17} {'random':>7} {'n':>6}"]
    for name, r in out["tasks"].items():
        lo, hi = r["interval"]
        lines.append(
            f"{name:<20} {r['metric']:<14} {r['score']:>7.4f}  [{lo:.4f}, {hi:.4f}]  {r['random']:>7.4f} {r['n']:>6}"
        )
    for name, r in out["tasks"].items():
        lines += [f"{name}: {k} {v:.4f}{detail_interval(r, k)}" for k, v in (r.get("details") or {}).items()]
    if out["summary"] is not None:
        lines.append(f"summary (mean accuracy rescaled: random 0, perfect 1): {out['summary']:.4f}")
    return "\n".join(lines)


def write_results(run_dir: str | Path, out: dict[str, Any]) -> Path:
    """Write the results to RUN/eval_results.json atomically (merged with earlier tasks' results)."""
    path = Path(run_dir) / RESULTS_FILE
    write_json_atomic(path, out)
    return path


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
    from qinglm.io import atomic_open, claim_file

    path = claim_file(run / name)
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path
