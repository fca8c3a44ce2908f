"""The model a budget buys: this machine's throughput, the candidate shapes, the law's choice among them, and
the plan `qinglm plan` prints and `qinglm train --budget` follows (the law: qinglm.train.scaling)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qinglm.config import ModelConfig, _f, resolve_model
from qinglm.errors import QingLMError
from qinglm.train.config import DEFAULT_MAX_EPOCHS
from qinglm.train.hardware import ASSUMED_CUDA_FLOPS, speed_line, time_training_steps, training_memory_bytes
from qinglm.train.scaling import DROPOUT_FITTED, Budget, ScalingFit, load_fit, parse_budget, shape_for
from qinglm.typecheck import check_types

# The candidate shapes: shape_for(1) .. shape_for(8), at each vocabulary of the fit.
DIALS = tuple(range(1, 9))
MEASURED_DIALS = (1, 2, 4)  # timed on this machine; the others' speed is read off the line through these
PLAN_DEVICES = ("cpu", "cuda")
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

    def train_fields(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Return (ModelConfig fields, TrainConfig fields) a run of this plan sets."""
        shape = shape_for(self.best.dial)
        model = {k: shape[k] for k in ("n_layers", "d_model", "n_heads")} | {"vocab_size": self.best.vocab}
        if self.dropout:
            model["dropout"] = self.dropout
        train = {k: shape[k] for k in ("lr", "batch_size", "seq_len")}
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
) -> str:
    """Set each candidate's tokens_per_s, timed as the run would train (its batch, compiled or not); return
    where the figures come from."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            for c in cands:
                c.tokens_per_s = ASSUMED_CUDA_FLOPS / c.flops_per_token
            return f"assumed {ASSUMED_CUDA_FLOPS:.0e} training FLOP/s (no CUDA device here to time)"
    if measure_s > 0:
        timed = [c for c in cands if c.dial in MEASURED_DIALS and c.vocab == max(fit.E)]
        rates = [
            time_training_steps(c.model, device, measure_s, shape_for(c.dial)["batch_size"], compile=compile)
            for c in timed
        ]
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
    return source


def make_plan(
    budget: Budget,
    device: str = "cpu",
    measure_s: float = 1.0,
    fit: ScalingFit | None = None,
    compile: bool = False,
) -> Plan:
    """Return the plan of the candidate the law expects the lowest held-out BPC of within budget (shapes
    timed compiled when compile: as the run trains)."""
    fit = fit or load_fit()
    cands = candidates(fit)
    source = throughput(cands, fit, device, measure_s, compile)
    for c in cands:
        _spend(c, budget, fit)
    best = min(cands, key=lambda c: (c.bpc, c.dial))
    train_tokens = fit.train_characters / fit.chars_per_token[best.vocab]
    dropout = planned_dropout(best.n, train_tokens, best.tokens / train_tokens)
    if dropout:
        best.model = dataclasses.replace(best.model, dropout=dropout)
        law = best.bpc
        if measure_s > 0:  # dropout's masks cost time: the run's speed is the shape's with them
            rows = shape_for(best.dial)["batch_size"]
            best.tokens_per_s = time_training_steps(best.model, device, measure_s, rows, compile=compile)
            source += f"; dial {best.dial} with dropout timed again"
            _spend(best, budget, fit)
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
    shape = shape_for(best.dial)
    memory = training_memory_bytes(best.model, shape["batch_size"], shape["seq_len"], device)
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
        f"embedding), lr {shape['lr']:.2g}, batch {shape['batch_size']} x {shape['seq_len']}",
        f"it will see {b.tokens / 1e6:,.1f}M tokens ({plan.passes:.1f} passes over the data) at "
        f"{b.tokens_per_s:,.0f} tokens/s in {duration(b.seconds)}; one pass takes {duration(plan.pass_seconds)}"
        + (
            f" (it stops after {DEFAULT_MAX_EPOCHS:g} passes: more did worse on unseen text)"
            if plan.passes >= DEFAULT_MAX_EPOCHS - 1e-6
            else ""
        ),
        expected_line(plan),
        f"peak training memory: about {plan.memory_bytes / 2**30:.2f} GiB (estimate)",
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
) -> Plan:
    """Return make_plan of a budget given as text (parse_budget), with the fit file fit (default: shipped),
    timed compiled as `qinglm train` would run (compile None: its default for device)."""
    import torch

    from qinglm.device import resolve_compile

    will_compile = resolve_compile(compile, torch.device(device))
    return make_plan(parse_budget(budget), device, measure_s, load_fit(fit), will_compile)


LENGTH_FIELDS = ("max_time", "max_steps", "num_epochs")


def budget_fields(train: Any, given: set[str], log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Return (ModelConfig fields, TrainConfig fields) that `--budget` sets for the training config train (its
    fields named in given were set by the user, who keeps them), after logging the plan and why.

    The run's length is the budget: max_time for a time (the training itself; the tokenizer, the data and
    the timing come before it), max_steps for a FLOP count; and at most DEFAULT_MAX_EPOCHS passes over the data,
    whichever comes first (at 30 CPU-minutes tiny's 19 passes did worse on unseen text than 8).
    """
    from qinglm.device import resolve_compile, resolve_device

    clash = [f"--{k.replace('_', '-')}" for k in LENGTH_FIELDS if k in given]
    if clash:
        raise QingLMError(f"--budget sets the run's length; drop {', '.join(clash)}")
    if train.nproc or train.init_from:
        raise QingLMError("--budget plans a new one-process run; drop --nproc / --init-from")
    budget = parse_budget(train.budget)
    device = resolve_device(train.device)
    plan = make_plan(
        budget, device.type, train.budget_measure_s, compile=resolve_compile(train.compile, device)
    )
    model, fields = plan.train_fields()
    fields["num_epochs"] = DEFAULT_MAX_EPOCHS  # whichever comes first: the budget or the passes
    if budget.seconds is not None:
        fields["max_time"] = budget.seconds / 60
    else:
        fields["max_steps"] = max(1, round(plan.best.tokens / (fields["batch_size"] * fields["seq_len"])))
    log(
        f"--budget {train.budget}: the scaling law's best model for it (qinglm plan --budget {train.budget}):"
    )
    for line in plan_lines(plan):
        log(f"  {line}")
    kept = [k for k in (*model, *fields) if k in given]
    if kept:
        log(f"  kept from your flags: {', '.join(kept)}")
    return model, fields
