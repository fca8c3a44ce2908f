"""The scaling law behind `--budget` and `qinglm plan`: its form, its fit, the file it lives in, and the one
dial from which a model's shape is derived.

The law (Chinchilla's form, Hoffmann et al. 2022, with the data-constrained D' of Muennighoff et al. 2023),
fitted by benchmarks/scaling.py on the built-in corpus:

    BPC(N, D) = E_v + A / N^alpha + B / D'^beta
    D' = D within the first pass over the U training characters, past it U + U R (1 - exp(-(D/U - 1) / R))

BPC is held-out bits per character on the honest split, N the non-embedding parameters (the blocks), D the
characters of training text seen (tokens seen x characters per token, repeats counted), D' what they are worth:
a repeated pass is worth less than new text, and past a few passes (R, fitted) nearly nothing, so the law has a
floor for a corpus of U characters, E_v + B / (U (1 + R))^beta, that no model size or run length gets it under
(only more text does). Runs with dropout have their own R (R_dropout): dropout makes repeats worth more.
E_v is the irreducible part of vocabulary size v (one constant per vocabulary measured). A fit without R (older
files) counts repeats as new text. Compute is FLOPs =
Transformer.flops_per_token(seq_len) x tokens: 6 x (block matrix parameters + d_model x vocab) + attention,
so the output layer, most of the work at these sizes, is counted although N leaves it out.

The fit's constants and the points they came from are one file, scaling_fit.json beside this module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qinglm.errors import QingLMError

FIT_FILE = Path(__file__).with_name("scaling_fit.json")
LAW = "BPC(N, D) = E_v + A / N^alpha + B / D'^beta, D' = U + U R (1 - exp(-(D/U - 1) / R)) past one pass of U"
MAX_BUDGET_S = 365 * 24 * 3600.0  # a year: anything longer is a typo
MAX_BUDGET_FLOPS = 1e26
DROPOUT_FITTED = 0.1  # the dropout of the runs R_dropout is fitted on
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_TIME = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h|d)\s*$", re.IGNORECASE)
_FLOPS = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\+?\d+)?)\s*(flops?)?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A training budget: wall-clock seconds on this machine, or a count of FLOPs (exactly one is set)."""

    seconds: float | None = None
    flops: float | None = None

    def __str__(self) -> str:
        if self.flops is not None:
            return f"{self.flops:.3g} FLOPs"
        s = self.seconds or 0.0
        return f"{s / 3600:g}h" if s >= 3600 else f"{s / 60:g}m" if s >= 60 else f"{s:g}s"


def parse_budget(text: str) -> Budget:
    """Return the Budget that text gives: 90s, 30m, 2h, 1.5d (time) or 3e15 / 3e15flops (FLOPs); raise
    QingLMError in one line for anything else."""
    m = _TIME.match(text)
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if not 0 < seconds <= MAX_BUDGET_S:
            raise QingLMError(f"budget {text!r} must be more than 0 and at most a year")
        return Budget(seconds=seconds)
    m = _FLOPS.match(text)
    if m:
        flops = float(m.group(1))
        if not 1e6 <= flops <= MAX_BUDGET_FLOPS:
            raise QingLMError(f"budget {text!r}: a FLOP count must be between 1e6 and {MAX_BUDGET_FLOPS:.0e}")
        return Budget(flops=flops)
    raise QingLMError(
        f"cannot read the budget {text!r}: give a time such as 90s, 30m or 2h, or a FLOP count such as 3e15"
    )


def shape_for(dial: int) -> dict[str, Any]:
    """Return the ModelConfig / TrainConfig fields that the one dial `dial` (the depth) derives:

        n_layers = dial, d_model = 64 * dial, n_heads = dial (head_dim 64),
        lr = 2e-3 * min(1, sqrt(4 / dial)), batch_size 32 x seq_len 256.

    Width grows with depth at a fixed aspect ratio, as nanochat derives its model from --depth. dial 2 is the
    `tiny` preset's shape and dial 4 `small`'s (vocabulary aside: `--budget` picks it from the fit). The peak
    learning rate is today's default (measured on tiny and small) up to dial 4, then falls as 1/sqrt(width),
    AdamW's usual width rule. The warmup is the engine's: 5% of the run, at most --warmup-steps.
    """
    if not 1 <= dial <= 64:
        raise QingLMError(f"the model dial must be between 1 and 64, got {dial}")
    return {
        "n_layers": dial,
        "d_model": 64 * dial,
        "n_heads": dial,
        "lr": 2e-3 * min(1.0, math.sqrt(4 / dial)),
        "batch_size": 32,
        "seq_len": 256,
    }


@dataclass
class ScalingFit:
    """A fitted law: BPC(N, D) = E[vocab] + A / N^alpha + B / D'^beta (D' with R over train_characters), the
    points behind it and where they were measured (throughput in `points` is that machine's, under its load)."""

    E: dict[int, float]
    A: float
    alpha: float
    B: float
    beta: float
    points: list[dict[str, Any]] = field(default_factory=list)
    chars_per_token: dict[int, float] = field(default_factory=dict)
    train_characters: int = 0
    measured_on: str = ""
    holdout: dict[str, Any] = field(default_factory=dict)
    R: float | None = None  # repeats: None counts repeated text as new
    # R of runs with dropout DROPOUT_FITTED (repeats are worth more when the model cannot memorise them);
    # None: not measured, such runs get R.
    R_dropout: float | None = None

    def predict(self, n: float, d: float, vocab: int, dropout: bool = False) -> float:
        """Return the law's held-out BPC of a model of n non-embedding parameters after d characters (trained
        with dropout DROPOUT_FITTED when dropout and the fit has R_dropout)."""
        if vocab not in self.E:
            raise QingLMError(f"the fit has no vocabulary of {vocab}; it measured {sorted(self.E)}")
        repeats = self.R_dropout if dropout and self.R_dropout is not None else self.R
        d = effective_characters(d, self.train_characters, repeats)
        return self.E[vocab] + self.A / n**self.alpha + self.B / d**self.beta

    def floor(self, vocab: int, dropout: bool = False) -> float:
        """Return the law's BPC for vocab with no limit on model size or passes (the data's floor)."""
        return self.predict(math.inf, math.inf, vocab, dropout)

    def to_json(self) -> dict[str, Any]:
        return {
            "law": LAW,
            "constants": {
                "E": {str(v): e for v, e in self.E.items()},
                "A": self.A,
                "alpha": self.alpha,
                "B": self.B,
                "beta": self.beta,
                **({"R": self.R} if self.R is not None else {}),
                **({"R_dropout": self.R_dropout} if self.R_dropout is not None else {}),
            },
            "chars_per_token": {str(v): c for v, c in self.chars_per_token.items()},
            "train_characters": self.train_characters,
            "measured_on": self.measured_on,
            "holdout": self.holdout,
            "points": self.points,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScalingFit:
        c = d["constants"]
        return cls(
            E={int(v): float(e) for v, e in c["E"].items()},
            A=float(c["A"]),
            alpha=float(c["alpha"]),
            B=float(c["B"]),
            beta=float(c["beta"]),
            points=list(d.get("points", [])),
            chars_per_token={int(v): float(x) for v, x in d.get("chars_per_token", {}).items()},
            train_characters=int(d.get("train_characters", 0)),
            measured_on=str(d.get("measured_on", "")),
            holdout=dict(d.get("holdout", {})),
            R=float(c["R"]) if c.get("R") is not None else None,
            R_dropout=float(c["R_dropout"]) if c.get("R_dropout") is not None else None,
        )


def effective_characters(d: Any, unique: float, repeats: float | None) -> Any:
    """Return what d characters of training text are worth when the corpus has `unique` of them: d within the
    first pass, then U + U R (1 - exp(-(d/U - 1) / R)) (Muennighoff et al. 2023); d itself without R.
    Works on floats and numpy arrays; an infinite d gives U (1 + R)."""
    import numpy as np

    if repeats is None or not unique or unique <= 0:
        return d
    extra = np.maximum(np.asarray(d, dtype=np.float64) / unique - 1.0, 0.0)
    worth = unique + unique * repeats * -np.expm1(-extra / repeats)
    out = np.where(np.asarray(d) <= unique, d, worth)
    return float(out) if np.ndim(out) == 0 else out


def load_fit(path: str | Path | None = None) -> ScalingFit:
    """Return the fit in path (default: the package's scaling_fit.json)."""
    path = Path(path) if path else FIT_FILE
    try:
        return ScalingFit.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise QingLMError(
            f"no scaling fit at {path}: run python -m benchmarks.scaling to measure one"
        ) from None
    except (ValueError, KeyError, TypeError) as e:
        raise QingLMError(f"{path} is not a scaling fit ({e}); rerun python -m benchmarks.scaling") from None


def fit_law(
    n: Any, d: Any, bpc: Any, vocab: Any, unique: float | None = None
) -> tuple[dict[int, float], float, float, float, float, float | None]:
    """Return (E by vocabulary, A, alpha, B, beta, R) of BPC = E_v + A/N^alpha + B/D'^beta fitted to the points;
    with `unique` (the corpus's characters) D' counts repeated passes as the law says and R is fitted, without
    it D' = D and R is None.

    Least squares on log BPC (relative error), by variable projection: for each (alpha, beta) on a grid (and
    each R of a log grid) the rest is a non-negative linear fit, weighted by 1/BPC (log-space to first order);
    the best grid point is then refined on the log residuals with scipy when it is installed. Needs at least
    as many points as constants.
    """
    import numpy as np

    n, d, y = (np.asarray(a, dtype=np.float64) for a in (n, d, bpc))
    vocab = np.asarray(vocab, dtype=np.int64)
    vocabs = sorted(set(vocab.tolist()))
    constants = len(vocabs) + 4 + (unique is not None)
    if len(y) < constants:
        raise QingLMError(f"{len(y)} points cannot fit {constants} constants; measure more shapes")
    onehot = (vocab[:, None] == np.array(vocabs)[None, :]).astype(np.float64)
    # Scale N and D to about 1 so that A and B stay in a sane range for the solver.
    n0, d0 = float(np.exp(np.log(n).mean())), float(np.exp(np.log(d).mean()))
    ns = n / n0

    def scaled_d(r: float | None) -> Any:
        return effective_characters(d, unique, r) / d0

    best = (math.inf, None, 0.0, 0.0, None)
    for r in [None] if unique is None else REPEAT_GRID:
        sse, coef, alpha, beta = _grid_fit(onehot, ns, scaled_d(r), y)
        if sse < best[0]:
            best = (sse, coef, alpha, beta, r)
    _, coef, alpha, beta, r = best
    params = np.concatenate([coef, [alpha, beta], [] if r is None else [r]])
    params = _refine(params, onehot, ns, scaled_d, y)
    k = len(vocabs)
    e, a_s, b_s, alpha, beta = params[:k], params[k], params[k + 1], params[k + 2], params[k + 3]
    # Back to unscaled N and D: A / (N/n0)^alpha = (A * n0^alpha) / N^alpha.
    return (
        {v: float(x) for v, x in zip(vocabs, e)},
        float(a_s * n0**alpha),
        float(alpha),
        float(b_s * d0**beta),
        float(beta),
        None if r is None else float(params[k + 4]),
    )


def fit_repeats(n: Any, d: Any, bpc: Any, vocab: Any, fit: ScalingFit) -> float:
    """Return the R that makes fit (its other constants kept) best predict these points: least squares on log
    BPC over a fine log grid of R (one constant: the points of one kind of run, such as runs with dropout)."""
    import numpy as np

    y = np.log(np.asarray(bpc, dtype=np.float64))
    if len(y) < 1:
        raise QingLMError("no points to fit R on")
    grid = np.geomspace(REPEAT_GRID[0] / 2, REPEAT_GRID[-1] * 2, 2000)
    probe = ScalingFit(fit.E, fit.A, fit.alpha, fit.B, fit.beta, train_characters=fit.train_characters)

    def sse(r: float) -> float:
        probe.R = float(r)
        pred = np.array([probe.predict(a, b, v) for a, b, v in zip(n, d, vocab)])
        return float(((np.log(pred) - y) ** 2).sum())

    return float(min(grid, key=sse))


REPEAT_GRID = [0.25 * 2 ** (i / 2) for i in range(17)]  # R from a quarter of a pass to 64 passes


def _grid_fit(onehot: Any, ns: Any, ds: Any, y: Any) -> tuple[float, Any, float, float]:
    """Return (log SSE, linear coefficients, alpha, beta) of the best (alpha, beta) on a coarse then a fine grid."""
    import numpy as np

    w = 1.0 / y

    def linear(alpha: float, beta: float) -> tuple[float, Any]:
        x = np.column_stack([onehot, ns**-alpha, ds**-beta])
        coef = _nonneg_lstsq(x * w[:, None], y * w)
        r = np.log(np.maximum(x @ coef, 1e-9)) - np.log(y)
        return float(r @ r), coef

    best = (math.inf, None, 0.0, 0.0)
    for grid in (np.arange(0.02, 2.01, 0.04), None):
        if grid is None:  # a finer grid around the coarse optimum
            a0, b0 = best[2], best[3]
            grid_a, grid_b = np.arange(a0 - 0.04, a0 + 0.041, 0.005), np.arange(b0 - 0.04, b0 + 0.041, 0.005)
        else:
            grid_a = grid_b = grid
        for a in grid_a[grid_a > 0]:
            for b in grid_b[grid_b > 0]:
                sse, coef = linear(float(a), float(b))
                if sse < best[0]:
                    best = (sse, coef, float(a), float(b))
    return best


def _nonneg_lstsq(x: Any, y: Any) -> Any:
    """Return the least-squares coefficients of x @ c = y with c >= 0 (scipy's NNLS, else clipped lstsq)."""
    import numpy as np

    try:
        from scipy.optimize import nnls
    except ImportError:
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        neg = coef < 0
        if neg.any():  # drop the negative terms and refit the rest once
            coef = np.zeros_like(coef)
            coef[~neg] = np.linalg.lstsq(x[:, ~neg], y, rcond=None)[0]
            coef = np.maximum(coef, 0)
        return coef
    return nnls(x, y)[0]


def _refine(params: Any, onehot: Any, ns: Any, scaled_d: Any, y: Any) -> Any:
    """Return params (E..., A, B, alpha, beta[, R]) moved to the least squares of the log residuals (unchanged
    without scipy); scaled_d(R) gives the points' D' / d0."""
    import numpy as np

    try:
        from scipy.optimize import least_squares
    except ImportError:
        return params
    k = onehot.shape[1]
    repeats = len(params) > k + 4

    def residuals(p: Any) -> Any:
        ds = scaled_d(p[k + 4] if repeats else None)
        pred = onehot @ p[:k] + p[k] * ns ** -p[k + 2] + p[k + 1] * ds ** -p[k + 3]
        return np.log(np.maximum(pred, 1e-9)) - np.log(y)

    lo = np.zeros_like(params)
    lo[k + 2 :] = 1e-3
    hi = np.full_like(params, np.inf)
    if repeats:
        lo[k + 4], hi[k + 4] = REPEAT_GRID[0] / 2, REPEAT_GRID[-1] * 2
    start = np.clip(params, lo + 1e-9, hi)
    res = least_squares(residuals, start, bounds=(lo, hi), method="trf")
    return res.x if float(res.fun @ res.fun) <= float(residuals(start) @ residuals(start)) else params
