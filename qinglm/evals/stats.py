"""Confidence intervals and the summary score of the task suite."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Return the Wilson score interval (low, high) of a proportion correct/n (95 % by default)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_ratio_interval(
    num: Sequence[float], den: Sequence[float], resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Return the 95 % percentile-bootstrap interval of sum(num)/sum(den), resampling items."""
    n = len(num)
    if n == 0:
        return math.nan, math.nan
    rng = random.Random(seed)
    stats = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        d = sum(den[i] for i in idx)
        stats.append(sum(num[i] for i in idx) / d if d else math.nan)
    stats.sort()
    return stats[int(0.025 * (resamples - 1))], stats[int(math.ceil(0.975 * (resamples - 1)))]


def rescale(accuracy: float, random_baseline: float) -> float:
    """Return accuracy rescaled so the random baseline is 0 and perfect is 1 (below random: negative)."""
    return (accuracy - random_baseline) / (1.0 - random_baseline)


def summary_score(results: dict[str, dict]) -> float | None:
    """Return the mean rescaled accuracy of the multiple-choice and chat results (None when there are none)."""
    scaled = [
        rescale(r["score"], r["random"]) for r in results.values() if r.get("kind") in ("choice", "chat")
    ]
    return sum(scaled) / len(scaled) if scaled else None
