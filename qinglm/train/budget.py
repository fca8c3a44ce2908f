"""The model a budget buys: this machine's throughput, the candidate shapes, the law's choice among them, and
the plan `qinglm plan` prints and `qinglm train --budget` follows (the law: qinglm.train.scaling)."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

from qinglm.config import ModelConfig, _f, resolve_model
from qinglm.errors import QingLMError
from qinglm.train.config import DEFAULT_MAX_EPOCHS
from qinglm.train.hardware import (
    ASSUMED_CUDA_FLOPS,
    device_memory_bytes,
    speed_line,
    time_training_steps,
    training_memory_bytes,
)
from qinglm.train.scaling import DROPOUT_FITTED, Budget, ScalingFit, load_fit, parse_budget, shape_for
from qinglm.typecheck import check_types

# The candidate shapes: shape_for(1) .. shape_for(8), at each vocabulary of the fit.
DIALS = tuple(range(1, 9))
MEASURED_DIALS = (1, 2, 4)  # timed on this machine; the others' speed is read off the line through these
PLAN_DEVICES = ("cpu", "cuda")
BATCH_ROWS = 32  # every shape's batch (shape_for): rows x accumulation keeps it when memory is short
REPEATS_WARNED = 4  # passes over the data past which the plan says what the repeats are worth
# Dropout for a model that can memorise its data: more weights outside the embedding than tokens in one pass,
# seen more than REPEATS_WARNED times. Measured on the built-in corpus (benchmarks/README.md, "Dropout on a
# CPU"): dial 6 at 30 CPU-minutes (10.6M weights, 1.19M tokens a pass, 7.6 passes) 5.650 -> 5.585 held-out
# bits/char with it, dial 5 (6.35M, 8 passes) 5.671 -> 5.542; tiny after 2 passes lost 0.064 with it. On a CPU attention's dropout drops keys
# (DropKey, qinglm.model.dropout), which keeps the fused attention kernel.
MEMORISING_DROPOUT = DROPOUT_FITTED  # the dropout the law's R_dropout was measured with


@dataclass
class PlanConfig:
    """`qinglm plan`: what a budget buys on this machine, without training."""

    budget: str = _f("30m", "training time (90s, 30m, 2h) or a FLOP count (3e15)")
    device: str = _f("cpu", "where the run would train", PLAN_DEVICES)
    measure_s: float = _f(
        1.0,
        "seconds timing each of a few shapes on this machine (0: use the throughput recorded with the fit)",
        within="[0, 60]",
    )
    fit: str | None = _f(
        None, "a scaling fit file (default: the one QingLM ships, from benchmarks/scaling.py)"
    )
    compile: bool | None = _f(
        None,
        "time the shapes torch.compile'd, as the run would train (default: as `qinglm train`: on for CUDA "
        "and for CPUs with a C++ compiler)",
    )
    memory_gib: float | None = _f(
        None,
        "memory the run may use, in GiB (default: the GPU's when one is here, this machine's RAM on a CPU; give "
        "your card's for --device cuda planned without it)",
        within="(0, inf)",
    )

    def __post_init__(self) -> None:
        check_types(self)
        if self.device not in PLAN_DEVICES:
            raise QingLMError(f"unknown device {self.device!r}; choose one of {', '.join(PLAN_DEVICES)}")


@dataclass
class Candidate:
    """One shape the budget could buy, with what the law expects of it."""

    dial: int
    vocab: int
    model: ModelConfig
    params: int  # all parameters
    n: int  # non-embedding parameters: the law's N
    flops_per_token: int
    tokens_per_s: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0
    bpc: float = float("inf")
    rows: int = BATCH_ROWS  # micro-batch rows: fewer, with accumulation, when the memory limit asks
    accum: int = 1


@dataclass
class Plan:
    """The chosen candidate and how the choice was made."""

    budget: Budget
    device: str
    best: Candidate
    candidates: list[Candidate]
    throughput_from: str
    pass_seconds: float
    passes: float
    memory_bytes: int
    extrapolated: bool
    dropout: float = 0.0
    fit: ScalingFit | None = None  # the law the plan was made with
    memory_limit: int | None = None  # bytes the run may use; None: not known (no check)

    def train_fields(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (ModelConfig fields, TrainConfig fields) a run of this plan sets."""
        shape = shape_for(self.best.dial)
        model = {k: shape[k] for k in ("n_layers", "d_model", "n_heads")} | {"vocab_size": self.best.vocab}
        if self.dropout:
            model["dropout"] = self.dropout
        train = {k: shape[k] for k in ("lr", "batch_size", "seq_len")}
        if self.best.accum > 1:
            train |= {"batch_size": self.best.rows, "grad_accum": self.best.accum}
        return model, train


def candidates(fit: ScalingFit, seq_len: int = 256) -> list[Candidate]:
    """Return every dial at every vocabulary of the fit, sized on the meta device (no memory)."""
    return [
        Candidate(dial, vocab, *_sized(dial, vocab, seq_len)) for vocab in sorted(fit.E) for dial in DIALS
    ]


@functools.lru_cache(maxsize=256)
def _sized(dial: int, vocab: int, seq_len: int) -> tuple[ModelConfig, int, int, int]:
    """Return (model config, parameters, non-embedding parameters, training FLOPs per token) of a shape."""
    import torch

    from qinglm.model.transformer import Transformer

    shape = shape_for(dial)
    cfg = resolve_model(
        ModelConfig(vocab_size=vocab, **{k: shape[k] for k in ("n_layers", "d_model", "n_heads")})
    )
    with torch.device("meta"):
        m = Transformer(cfg)
    counts = m.param_counts()
    return cfg, counts["total"], counts["blocks"], m.flops_per_token(seq_len)


def throughput(
    cands: list[Candidate], fit: ScalingFit, device: str, measure_s: float, compile: bool = False
) -> tuple[str, bool]:
    """Set each candidate's tokens_per_s, timed as the run would train (its batch, compiled or not); return
    where the figures come from and whether they were timed on this machine."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            for c in cands:
                c.tokens_per_s = ASSUMED_CUDA_FLOPS / c.flops_per_token
            return f"assumed {ASSUMED_CUDA_FLOPS:.0e} training FLOP/s (no CUDA device here to time)", False
    if measure_s > 0:
        timed = [c for c in cands if c.dial in MEASURED_DIALS and c.vocab == max(fit.E)]
        rates = [time_training_steps(c.model, device, measure_s, c.rows, compile=compile) for c in timed]
        line = speed_line([c.flops_per_token for c in timed], rates)
        how = "compiled" if compile else "eager"
        dials = ", ".join(f"dial {c.dial}" for c in timed)
        source = f"timed on this {device} ({dials}, {how}, {measure_s:g}s each)"
    else:
        pts = [p for p in fit.points if p.get("tokens_per_s")]
        if not pts:
            raise QingLMError("the fit records no throughput; time this machine with --measure-s 1")
        line = speed_line([p["flops_per_token"] for p in pts], [p["tokens_per_s"] for p in pts])
        source = f"recorded with the fit's eager runs ({fit.measured_on or 'another machine'})"
    for c in cands:
        c.tokens_per_s = line(c.flops_per_token)
    return source, measure_s > 0


def fitting(cands: list[Candidate], device: str, limit: int | None) -> list[Candidate]:
    """Return the candidates whose training fits limit bytes (all when limit is None), each with the most rows
    a micro-batch that fit (BATCH_ROWS, or fewer with accumulation); raise QingLMError when none fits."""
    if limit is None:
        return cands
    out = []
    for c in cands:
        seq_len = shape_for(c.dial)["seq_len"]
        rows = BATCH_ROWS
        while rows >= 1 and training_memory_bytes(c.model, rows, seq_len, device) > limit:
            rows //= 2
        if rows >= 1:
            c.rows, c.accum = rows, BATCH_ROWS // rows
            out.append(c)
    if not out:
        smallest = min(training_memory_bytes(c.model, 1, shape_for(c.dial)["seq_len"], device) for c in cands)
        raise QingLMError(
            f"no shape trains in {limit / 2**30:.2f} GiB on {device}: the smallest needs about "
            f"{smallest / 2**30:.2f} GiB at one row a micro-batch"
        )
    return out


def make_plan(
    budget: Budget,
    device: str = "cpu",
    measure_s: float = 1.0,
    fit: ScalingFit | None = None,
    compile: bool = False,
    memory_limit: int | None = None,
) -> Plan:
    """Return the plan of the candidate the law expects the lowest held-out BPC of within budget (shapes
    timed compiled when compile: as the run trains), among the shapes whose training fits memory_limit bytes
    (default: device_memory_bytes(device); a shape that does not fit at full batch takes fewer rows a
    micro-batch with gradient accumulation)."""
    fit = fit or load_fit()
    limit = memory_limit if memory_limit is not None else device_memory_bytes(device)
    cands = fitting(candidates(fit), device, limit)
    source, timed = throughput(cands, fit, device, measure_s, compile)
    for c in cands:
        _spend(c, budget, fit)
    best = min(cands, key=lambda c: (c.bpc, c.dial))
    train_tokens = fit.train_characters / fit.chars_per_token[best.vocab]
    dropout = planned_dropout(best.n, train_tokens, best.tokens / train_tokens)
    law = best.bpc
    if dropout:
        best.model = dataclasses.replace(best.model, dropout=dropout)
    if (dropout or best.accum > 1) and timed:
        # dropout's masks and smaller micro-batches cost time: the run's speed is the shape's with them
        best.tokens_per_s = time_training_steps(best.model, device, measure_s, best.rows, compile=compile)
        source += f"; dial {best.dial} timed again" + (" with dropout" if dropout else "")
        source += f" at {best.rows} rows" if best.accum > 1 else ""
        _spend(best, budget, fit)
    if dropout:
        if fit.R_dropout is not None:  # what the law expects of the run with dropout, at its speed
            chars = max(best.tokens, 1.0) * fit.chars_per_token[best.vocab]
            best.bpc = fit.predict(best.n, chars, best.vocab, dropout=True)
        else:  # a fit without dropout runs: what it expects of the shape without dropout
            best.bpc = law
    pass_s = train_tokens / best.tokens_per_s
    measured = [p for p in fit.points if p.get("vocab") == best.vocab]
    chars = best.tokens * fit.chars_per_token[best.vocab]
    extrapolated = not measured or not (
        min(p["n"] for p in measured) <= best.n <= max(p["n"] for p in measured)
        and min(p["characters"] for p in measured) <= chars <= max(p["characters"] for p in measured)
    )
    memory = training_memory_bytes(best.model, best.rows, shape_for(best.dial)["seq_len"], device)
    return Plan(
        budget,
        device,
        best,
        cands,
        source,
        pass_s,
        best.tokens / train_tokens,
        memory,
        extrapolated,
        dropout,
        fit,
        limit,
    )


def _spend(c: Candidate, budget: Budget, fit: ScalingFit) -> None:
    """Set c's tokens, seconds and the law's bits/char for budget at c.tokens_per_s."""
    if budget.flops is not None:
        c.tokens = budget.flops / c.flops_per_token
    else:
        c.tokens = c.tokens_per_s * (budget.seconds or 0.0)
    # The run stops after DEFAULT_MAX_EPOCHS passes (more measured worse on unseen text), sooner if need be.
    c.tokens = min(c.tokens, DEFAULT_MAX_EPOCHS * fit.train_characters / fit.chars_per_token[c.vocab])
    c.seconds = c.tokens / c.tokens_per_s if c.tokens_per_s else budget.seconds or 0.0
    c.bpc = fit.predict(c.n, max(c.tokens, 1.0) * fit.chars_per_token[c.vocab], c.vocab)


def planned_dropout(n: int, tokens_per_pass: float, passes: float) -> float:
    """Return the dropout a run of n weights outside the embedding should train with: MEMORISING_DROPOUT when
    it has more of them than tokens in one pass and sees each token more than REPEATS_WARNED times, else 0."""
    return MEMORISING_DROPOUT if n > tokens_per_pass and passes > REPEATS_WARNED else 0.0


def duration(seconds: float) -> str:
    """Return seconds as a short human duration: 45 s, 12.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def plan_lines(plan: Plan) -> list[str]:
    """Return the lines that describe plan to a user."""
    b, shape = plan.best, shape_for(plan.best.dial)
    runner_up = sorted((c for c in plan.candidates if c is not b), key=lambda c: c.bpc)[:2]
    lines = [
        f"budget {plan.budget} on {plan.device}: throughput {plan.throughput_from}",
        f"model: dial {b.dial} -> n_layers {b.model.n_layers}, d_model {b.model.d_model}, n_heads "
        f"{b.model.n_heads}, vocab {b.vocab:,}: {b.params / 1e6:.2f}M parameters ({b.n / 1e6:.2f}M outside the "
        f"embedding), lr {shape['lr']:.2g}, batch {shape['batch_size']} x {shape['seq_len']}"
        + (f" ({b.rows} rows a micro-batch x {b.accum} accumulated, to fit)" if b.accum > 1 else ""),
        f"it will see {b.tokens / 1e6:,.1f}M tokens ({plan.passes:.1f} passes over the data) at "
        f"{b.tokens_per_s:,.0f} tokens/s in {duration(b.seconds)}; one pass takes {duration(plan.pass_seconds)}"
        + (
            f" (it stops after {DEFAULT_MAX_EPOCHS:g} passes: more did worse on unseen text)"
            if plan.passes >= DEFAULT_MAX_EPOCHS - 1e-6
            else ""
        ),
        expected_line(plan),
        f"peak training memory: about {plan.memory_bytes / 2**30:.2f} GiB (estimate)"
        + (f"; {plan.memory_limit / 2**30:.1f} GiB to use" if plan.memory_limit else "; memory not checked"),
        "next best: "
        + "; ".join(
            f"dial {c.dial} vocab {c.vocab:,}" + ("" if too_short(plan) else f": {c.bpc:.3f} bits/char")
            for c in runner_up
        ),
    ]
    if plan.dropout:
        lines.append(
            f"dropout {plan.dropout:g}: {b.n / 1e6:.2f}M weights for {b.tokens / plan.passes / 1e6:.2f}M tokens a "
            f"pass, seen {plan.passes:.1f} times, memorise without it"
            + (
                " (attention drops keys on a CPU: DropKey, which keeps the fused kernel)"
                if plan.device == "cpu"
                else ""
            )
        )
    if plan.passes > REPEATS_WARNED:
        lines.append(repeats_note(plan))
    return lines


def too_short(plan: Plan) -> bool:
    """Return True when the plan's run makes fewer steps than the shortest run the law was fitted on."""
    min_steps = plan.fit.holdout.get("min_steps", 0) if plan.fit is not None else 0
    return plan.best.tokens / _step_tokens(plan.best.dial) < min_steps


def _step_tokens(dial: int) -> int:
    shape = shape_for(dial)
    return shape["batch_size"] * shape["seq_len"]


def expected_line(plan: Plan) -> str:
    """Return the line with the law's expected held-out bits/char of the plan's run, or why there is none."""
    b = plan.best
    if too_short(plan):
        steps = b.tokens / _step_tokens(b.dial)
        return (
            f"expected held-out bits/char: not predicted: {steps:,.0f} steps, and the law is fitted on runs of at "
            f"least {plan.fit.holdout['min_steps']} (a shorter run measures its warmup more than its size)"
        )
    dropout = ""
    if plan.dropout:
        if plan.fit is not None and plan.fit.R_dropout is not None:
            dropout = " (with dropout: the law's R for runs with dropout)"
        else:
            dropout = " (the law's for this shape without dropout, as for the others)"
    extrapolated = " (extrapolated past the measured points)" if plan.extrapolated else ""
    return f"expected held-out bits/char: {b.bpc:.3f}{extrapolated}{dropout}"


def repeats_note(plan: Plan) -> str:
    """Return the line that says what the plan's passes over the same data are worth."""
    fit = plan.fit
    if fit is None or fit.R is None:
        return (
            f"note: {plan.passes:,.0f} passes repeat the data; the law counts repeats as new text, so expect "
            "worse than this on unseen text (give more data)"
        )
    return (
        f"note: {plan.passes:,.0f} passes repeat the data; the law counts a repeated pass as worth less (its R: "
        f"{fit.R:.2f} passes; with dropout {fit.R_dropout or fit.R:.2f}); its floor for this data, whatever the "
        f"model or the run's length, is {fit.floor(plan.best.vocab, dropout=bool(plan.dropout)):.3f} bits/char"
        + (" with dropout" if plan.dropout else " without dropout")
        + ": more text goes further than more passes"
    )


def plan_from_text(
    budget: str,
    device: str = "cpu",
    measure_s: float = 1.0,
    fit: str | None = None,
    compile: bool | None = None,
    memory_gib: float | None = None,
) -> Plan:
    """Return make_plan of a budget given as text (parse_budget), with the fit file fit (default: shipped),
    timed compiled as `qinglm train` would run (compile None: its default for device), within memory_gib
    (None: the device's memory)."""
    import torch

    from qinglm.device import resolve_compile

    will_compile = resolve_compile(compile, torch.device(device))
    limit = round(memory_gib * 2**30) if memory_gib is not None else None
    return make_plan(parse_budget(budget), device, measure_s, load_fit(fit), will_compile, limit)
