"""The scaling law, the budget and the plan: budgets are read or refused, the fit recovers known constants, the
chosen model grows with the budget, `qinglm plan` prints a plan, `qinglm train --budget` trains within it, and
benchmarks.scaling --quick writes a fit file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PHRASES  # noqa: E402

from qinglm.cli import main
from qinglm.errors import QingLMError
from qinglm.train import scaling
from qinglm.train.budget import make_plan, plan_lines
from qinglm.train.config import DEFAULT_MAX_EPOCHS
from qinglm.train.hardware import speed_line
from qinglm.train.scaling import (
    Budget,
    ScalingFit,
    effective_characters,
    fit_law,
    load_fit,
    parse_budget,
    shape_for,
)

ROOT = Path(__file__).resolve().parents[1]


def synthetic_fit(vocab: int = 300) -> ScalingFit:
    """Return a law with Chinchilla-like exponents and throughput points of a CPU-like speed line."""
    points = [
        {
            "n": n,
            "characters": 1e6,
            "vocab": vocab,
            "bpc": 3.0,
            "flops_per_token": f,
            "tokens_per_s": 3e10 / f,
        }
        for n, f in ((5e4, 1e6), (4e5, 5e6), (1.3e6, 2e7))
    ]
    return ScalingFit(
        E={vocab: 1.0},
        A=60.0,
        alpha=0.35,
        B=300.0,
        beta=0.3,
        points=points,
        chars_per_token={vocab: 1.5},
        train_characters=20_000,
        measured_on="synthetic",
    )


@pytest.mark.parametrize(
    "text, budget",
    [
        ("90s", Budget(seconds=90)),
        ("30m", Budget(seconds=1800)),
        ("2h", Budget(seconds=7200)),
        ("1.5H", Budget(seconds=5400)),
        ("3e15", Budget(flops=3e15)),
        ("3e15flops", Budget(flops=3e15)),
    ],
)
def test_budgets_are_read_as_time_or_flops(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text", ["", "30", "10x", "-5m", "0s", "2 hours", "1e40", "nan", "9999999h"])
def test_bad_budgets_are_refused_in_one_line(text):
    with pytest.raises(QingLMError) as e:
        parse_budget(text)
    assert "\n" not in str(e.value)


def test_fit_recovers_known_constants_from_synthetic_points():
    n = np.repeat([2e4, 1e5, 5e5, 2e6], 4)
    d = np.tile([1e5, 1e6, 1e7, 1e8], 4)
    vocab = np.array([4000, 10000] * 8)
    e = {4000: 1.6, 10000: 1.4}
    bpc = np.array([e[v] for v in vocab]) + 300 / n**0.45 + 900 / d**0.3
    fe, a, alpha, b, beta, r = fit_law(n, d, bpc, vocab)
    assert r is None  # no corpus size given: repeats are not modelled
    assert fe == pytest.approx(e, rel=0.02)
    assert (alpha, beta) == pytest.approx((0.45, 0.3), abs=0.01)
    assert (a, b) == pytest.approx((300, 900), rel=0.1)


def test_fit_refuses_fewer_points_than_constants():
    with pytest.raises(QingLMError, match="cannot fit"):
        fit_law([1e4, 1e5, 1e6], [1e5, 1e6, 1e7], [3.0, 2.5, 2.0], [400, 400, 400])


def test_the_dial_derives_tiny_and_small_shapes():
    assert {k: shape_for(2)[k] for k in ("n_layers", "d_model", "n_heads")} == dict(
        n_layers=2, d_model=128, n_heads=2
    )
    assert {k: shape_for(4)[k] for k in ("n_layers", "d_model", "n_heads")} == dict(
        n_layers=4, d_model=256, n_heads=4
    )
    assert shape_for(2)["lr"] == shape_for(4)["lr"] == 2e-3 > shape_for(8)["lr"]


def test_the_chosen_model_grows_with_the_budget():
    fit = synthetic_fit()
    chosen = [
        make_plan(parse_budget(b), measure_s=0, fit=fit).best for b in ("10s", "5m", "1h", "10h", "1000h")
    ]
    sizes = [c.n for c in chosen]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    bpcs = [c.bpc for c in chosen]
    assert bpcs == sorted(bpcs, reverse=True)


def test_a_flop_budget_spends_its_flops_up_to_the_pass_limit():
    fit = synthetic_fit()
    for flops in (1e10, 1e14):  # 1.2 passes, then past the limit
        plan = make_plan(Budget(flops=flops), measure_s=0, fit=fit)
        cap = DEFAULT_MAX_EPOCHS * fit.train_characters / fit.chars_per_token[plan.best.vocab]
        assert plan.best.tokens == pytest.approx(min(flops / plan.best.flops_per_token, cap))
        assert plan.passes <= DEFAULT_MAX_EPOCHS + 1e-9
    assert plan.passes == pytest.approx(DEFAULT_MAX_EPOCHS)  # 1e14 buys more than 8 passes of this data


def test_speed_line_is_never_faster_for_a_larger_model():
    line = speed_line([1e6, 5e6, 2e7], [3e4, 7e3, 1.4e3])
    assert line(1e6) > line(5e6) > line(2e7) > line(1e8) > 0


def test_the_fit_file_round_trips(tmp_path):
    fit = synthetic_fit()
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(fit.to_json()))
    again = load_fit(path)
    assert again.predict(1e5, 1e6, 300) == pytest.approx(fit.predict(1e5, 1e6, 300))
    assert again.points == fit.points


def test_the_shipped_fit_loads_and_predicts_lower_bpc_for_more_data():
    if not scaling.FIT_FILE.is_file():
        pytest.skip("no fit shipped yet")
    fit = load_fit()
    v = min(fit.E)
    assert fit.predict(1e6, 1e8, v) < fit.predict(1e6, 1e6, v)
    assert len(fit.points) >= len(fit.E) + 4


def test_qinglm_plan_prints_a_plan(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(synthetic_fit().to_json()))
    assert main(["plan", "--budget", "2h", "--fit", str(path), "--measure-s", "0"]) == 0
    out = capsys.readouterr().out
    assert (
        "budget 2h on cpu" in out and "expected held-out bits/char" in out and "peak training memory" in out
    )


def test_qinglm_plan_for_cuda_without_a_gpu_assumes_its_speed(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(synthetic_fit().to_json()))
    assert main(["plan", "--budget", "3e15", "--device", "cuda", "--fit", str(path), "--measure-s", "0"]) == 0
    assert "3e+15 FLOPs on cuda" in capsys.readouterr().out


def test_a_bad_budget_is_one_line_and_exit_2(capsys):
    assert main(["plan", "--budget", "10x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read the budget '10x'" in err


def test_budget_with_max_time_is_refused(capsys):
    assert main(["train", "--budget", "5m", "--max-time", "3"]) == 2
    assert "drop --max-time" in capsys.readouterr().err


def test_train_with_a_tiny_budget_picks_a_shape_and_stops(tmp_path, monkeypatch, capsys):
    from qinglm.run_dir import read_config

    fit = tmp_path / "fit.json"
    fit.write_text(json.dumps(synthetic_fit(vocab=300).to_json()))
    monkeypatch.setattr(scaling, "FIT_FILE", fit)
    text = tmp_path / "t.txt"
    rng = random.Random(0)
    text.write_text("\n".join("，".join(rng.choice(PHRASES) for _ in range(6)) + "。" for _ in range(400)))
    out = tmp_path / "run"
    args = ["train", "--budget", "3s", "--budget-measure-s", "0", "--data", str(text), "--out", str(out)]
    args += [
        "--split-by",
        "document",
        "--sample-prompts",
        "你好",
        "--sample-tokens",
        "2",
        "--num-threads",
        "1",
        "--no-report",
        "--no-compile",
    ]
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "--budget 3s: the scaling law's best model" in log
    cfg = read_config(out)
    assert cfg["train"]["max_time"] == pytest.approx(3 / 60)
    assert cfg["train"]["num_epochs"] == DEFAULT_MAX_EPOCHS  # or the passes, whichever comes first
    assert cfg["train"]["budget"] == "3s"
    assert cfg["model"]["d_model"] == 64 * cfg["model"]["n_layers"]


@pytest.mark.slow
def test_benchmark_quick_writes_a_fit_file(tmp_path):
    out = tmp_path / "fit.json"
    env = {**os.environ, "QINGLM_BENCH_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--quick", "--out", str(out), "--threads", "1"]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    fit = load_fit(out)
    assert len(fit.points) == 6 and fit.alpha > 0 and fit.beta > 0
    assert set(fit.E) == {p["vocab"] for p in fit.points}


@pytest.mark.parametrize("flag,compiled", [("--compile", True), ("--no-compile", False)])
def test_plan_times_shapes_as_the_run_trains(tmp_path, monkeypatch, capsys, flag, compiled):
    """The plan times each measured shape at its training batch, compiled when the run would compile:
    an eager 8-row timing said 7.7k tokens/s where the compiled run trained at 18k (benchmarks/README.md)."""
    from qinglm.train import budget

    calls = []

    def fake(cfg, device, seconds, rows, seq_len=256, compile=False):
        calls.append((cfg.n_layers, rows, compile))
        return 1e6 / cfg.n_layers

    monkeypatch.setattr(budget, "time_training_steps", fake)
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(synthetic_fit().to_json()))
    assert main(["plan", "--budget", "5m", "--fit", str(path), "--measure-s", "0.5", flag]) == 0
    assert calls and all(rows == shape_for(dial)["batch_size"] for dial, rows, _ in calls)
    assert {c for _, _, c in calls} == {compiled}
    assert ("compiled, 0.5s each" if compiled else "eager, 0.5s each") in capsys.readouterr().out


def test_timing_a_shape_gives_tokens_per_second():
    from qinglm.config import ModelConfig
    from qinglm.train.hardware import time_training_steps

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
    assert time_training_steps(cfg, "cpu", 0.01, rows=2, seq_len=16) > 0


def test_benchmark_add_trains_only_the_missing_points(tmp_path, monkeypatch):
    """`benchmarks.scaling --add` keeps the fit file's points, trains only the grid's new ones, adds the runs
    file's points, refits on the points of enough steps (repeats counted) and predicts each budget from the
    others."""
    from benchmarks import common
    from benchmarks import scaling as bench

    trained = []

    def law(n, chars):  # a known law with repeats worth less (R = 2 passes of 1e6 characters)
        return 1.0 + 60 / n**0.35 + 300 / effective_characters(chars, 1e6, 2.0) ** 0.3

    def fake_point(dial, vocab, budget):  # a point on the law, no training
        trained.append((dial, budget))
        n, f = 5e4 * 8**dial, 1e6 * 4**dial
        chars = budget / f * 1.5
        point = dict.fromkeys(("params", "tokens", "tokens_per_param", "train_loss", "wall_s", "cpu_s"), 1.0)
        return point | {
            "dial": dial,
            "vocab": vocab,
            "n": n,
            "flops_per_token": f,
            "budget_flops": budget,
            "flops": budget,
            "steps": 10 if (dial, budget) == (3, 1e12) else 1000,
            "characters": chars,
            # the short run is far off the law: the fit must leave it out
            "bpc": law(n, chars) + (3.0 if (dial, budget) == (3, 1e12) else 0.0),
            "tokens_per_s": 3e10 / f,
        }

    monkeypatch.setattr(bench, "run_point", fake_point)
    monkeypatch.setattr(bench, "corpus_facts", lambda v: {"train_characters": 1e6, "chars_per_token": 1.5})
    monkeypatch.setattr(
        common, "qinglm_tokenizer", lambda v, split="auto": (type("T", (), {"vocab_size": v}), None)
    )
    runs = tmp_path / "runs.json"
    run = {"run": "a 5-minute run", "budget": "5m", "dial": 2, "vocab": 300, "n": 3.2e6, "params": 4e6}
    run |= {"flops_per_token": 1.6e7, "steps": 500, "tokens": 4e6, "characters": 6e6, "flops": 6.4e13}
    runs.write_text(json.dumps({"runs": [run | {"budget_flops": 6.4e13, "bpc": law(3.2e6, 6e6)}]}))
    out = tmp_path / "fit.json"
    grid = ["--shapes", "1:300", "2:300", "3:300", "--out", str(out), "--plot", str(tmp_path / "f.png")]
    grid += ["--runs", str(runs)]
    bench.main(["--budgets", "1e12", "3e12", "1e13", *grid])
    assert len(trained) == 9
    bench.main(["--budgets", "3e13", "--add", *grid])
    assert trained[9:] == [(1, 3e13), (2, 3e13), (3, 3e13)]
    fit = load_fit(out)
    assert len(fit.points) == 13 and sum(1 for p in fit.points if p.get("run")) == 1  # the run once
    assert fit.R == pytest.approx(2.0, rel=0.05) and fit.alpha == pytest.approx(0.35, abs=0.01)
    assert fit.holdout["budget_flops"] == 3e13 and fit.holdout["min_steps"] == bench.MIN_FIT_STEPS
    assert fit.holdout["fitted_on_budgets"] == [1e12, 3e12, 1e13]
    assert fit.holdout["mean_abs_error_bpc"] < 0.05  # the points lie on one law
    held = {b["budget"]: b for b in fit.holdout["by_budget"]}
    assert set(held) == {"1e+12", "3e+12", "1e+13", "3e+13", "5m"}
    assert held["1e+12"]["points"] == 2  # dial 3's 10-step point is not fitted nor scored
    assert held["5m"]["mean_abs_error_bpc"] < 0.05


def test_repeated_text_is_worth_less_than_new_text():
    u, r = 1e6, 1.5
    assert effective_characters(5e5, u, r) == 5e5  # the first pass is all new
    worth = [effective_characters(k * u, u, r) for k in (1, 1.5, 2, 4, 8, 100)]
    assert worth == sorted(worth) and worth[0] == u
    assert worth[2] == pytest.approx(u + u * r * (1 - math.exp(-1 / r)))
    assert worth[-1] == pytest.approx(u * (1 + r), rel=1e-6) and worth[-1] < 2.6 * u
    assert effective_characters(1.001 * u, u, r) == pytest.approx(1.001 * u, rel=1e-6)  # no jump at one pass
    assert effective_characters(8 * u, u, None) == 8 * u  # no R: repeats count as new
    assert np.allclose(effective_characters(np.array([5e5, 8e6]), u, r), [5e5, worth[4]])


def test_the_law_with_repeats_has_a_floor_no_run_goes_under():
    fit = dataclasses.replace(synthetic_fit(), R=2.0)
    v, u = 300, fit.train_characters
    floor = fit.floor(v)
    assert floor == pytest.approx(1.0 + 300 / (u * 3.0) ** 0.3)
    assert fit.predict(1e9, 1e12, v) > floor
    assert fit.predict(1e6, 100 * u, v) - fit.predict(1e6, 50 * u, v) > -1e-3  # 50 more passes buy nothing
    plain = synthetic_fit()
    assert plain.predict(1e6, 100 * u, v) < fit.predict(1e6, 100 * u, v)  # without R repeats count as new
    again = ScalingFit.from_json(json.loads(json.dumps(fit.to_json())))
    assert again.R == 2.0 and again.predict(1e6, 8 * u, v) == fit.predict(1e6, 8 * u, v)
    assert ScalingFit.from_json(plain.to_json()).R is None  # files before R load as they were


def test_fit_recovers_the_repeat_constant():
    n = np.repeat([2e4, 1e5, 5e5, 2e6], 5)
    d = np.tile([1e5, 1e6, 3e6, 1e7, 3e7], 4)
    u, r = 1e6, 1.5
    bpc = 1.4 + 300 / n**0.45 + 900 / effective_characters(d, u, r) ** 0.3
    e, a, alpha, b, beta, fitted_r = fit_law(n, d, bpc, [400] * len(n), unique=u)
    assert fitted_r == pytest.approx(r, rel=0.05)
    assert (alpha, beta) == pytest.approx((0.45, 0.3), abs=0.01) and e[400] == pytest.approx(1.4, rel=0.05)


def test_the_plan_says_what_repeats_are_worth():
    fit = dataclasses.replace(synthetic_fit(), R=2.0)
    plan = make_plan(Budget(flops=1e14), measure_s=0, fit=fit)
    assert plan.passes > 4
    note = [line for line in plan_lines(plan) if line.startswith("note:")]
    assert (
        len(note) == 1
        and f"{fit.floor(plan.best.vocab):.3f}" in note[0]
        and "more text goes further" in note[0]
    )


def test_the_memory_estimate_counts_a_cpu_process_and_the_batch():
    from qinglm.train.budget import _sized
    from qinglm.train.hardware import CPU_PROCESS_BYTES, training_memory_bytes

    cfg = _sized(2, 10_000, 256)[0]
    cpu, cuda = training_memory_bytes(cfg, 32, 256, "cpu"), training_memory_bytes(cfg, 32, 256, "cuda")
    assert cpu - cuda >= CPU_PROCESS_BYTES  # the process itself (and fp32 activations where no bf16)
    half = training_memory_bytes(cfg, 16, 256, "cpu")
    assert 0.5 < (half - CPU_PROCESS_BYTES) / (cpu - CPU_PROCESS_BYTES) < 0.52  # weights are the rest


def test_dropout_is_planned_for_a_model_that_can_memorise_its_data():
    from qinglm.train.budget import MEMORISING_DROPOUT, REPEATS_WARNED, planned_dropout

    assert planned_dropout(10_600_000, 1_190_000, 8) == MEMORISING_DROPOUT  # dial 6 at 30 CPU-minutes
    assert planned_dropout(10_600_000, 1_190_000, REPEATS_WARNED) == 0.0  # few passes
    assert planned_dropout(400_000, 1_190_000, 8) == 0.0  # fewer weights than tokens a pass (tiny)


def test_a_plan_with_dropout_sets_it_times_it_and_says_why(monkeypatch):
    from qinglm.train import budget

    timed = []

    def fake(cfg, device, seconds, rows, seq_len=256, compile=False):
        timed.append(cfg.dropout)
        return 1e6 / cfg.n_layers * (0.8 if cfg.dropout else 1.0)

    monkeypatch.setattr(budget, "time_training_steps", fake)
    fit = synthetic_fit()  # 13k tokens a pass: every dial has more weights than that
    plan = make_plan(Budget(seconds=3600), measure_s=0.1, fit=fit)
    assert plan.dropout == budget.MEMORISING_DROPOUT and plan.best.model.dropout == plan.dropout
    assert timed[-1] == plan.dropout and timed.count(plan.dropout) == 1  # the chosen shape, again
    assert plan.best.tokens_per_s == pytest.approx(0.8e6 / plan.best.model.n_layers)
    assert plan.train_fields()[0]["dropout"] == plan.dropout
    assert any(line.startswith("dropout 0.1:") and "DropKey" in line for line in budget.plan_lines(plan))
    short = make_plan(Budget(seconds=1), measure_s=0, fit=fit)  # under a pass: no dropout
    assert short.dropout == 0.0 and "dropout" not in short.train_fields()[0]


def test_a_run_shorter_than_the_fitted_ones_gets_no_expected_figure():
    """The law is fitted on runs of at least min_steps steps; a plan for fewer says so instead of a number."""
    fit = dataclasses.replace(synthetic_fit(), R=1.4)
    steps = [make_plan(Budget(flops=f), measure_s=0, fit=fit).best.tokens / 8192 for f in (1e9, 1e14)]
    assert steps[0] < steps[1]
    fit.holdout = {"min_steps": round((steps[0] + steps[1]) / 2)}
    lines = plan_lines(make_plan(Budget(flops=1e9), measure_s=0, fit=fit))
    assert any("not predicted" in line and f"at least {fit.holdout['min_steps']}" in line for line in lines)
    assert not any("bits/char" in line for line in lines if line.startswith("next best"))
    lines = plan_lines(make_plan(Budget(flops=1e14), measure_s=0, fit=fit))
    assert any(line.startswith("expected held-out bits/char: ") and "not" not in line for line in lines)


def test_the_plan_keeps_to_the_memory_it_is_given():
    """A shape whose training does not fit the memory limit takes fewer rows a micro-batch with accumulation
    (the batch stays 32 rows), one that never fits is not chosen, and nothing fitting is one clear error."""
    from qinglm.train.budget import BATCH_ROWS, _sized
    from qinglm.train.hardware import training_memory_bytes

    fit = synthetic_fit()
    free = make_plan(Budget(flops=1e16), device="cuda", measure_s=0, fit=fit, memory_limit=2**50)
    assert free.best.accum == 1 and free.best.rows == BATCH_ROWS
    big = _sized(free.best.dial, free.best.vocab, 256)[0]
    limit = training_memory_bytes(big, 8, 256, "cuda") + 1  # that shape fits 8 rows a micro-batch, not 16
    plan = make_plan(Budget(flops=1e16), device="cuda", measure_s=0, fit=fit, memory_limit=limit)
    assert plan.memory_bytes <= limit
    assert all(training_memory_bytes(c.model, c.rows, 256, "cuda") <= limit for c in plan.candidates)
    assert all(c.rows * c.accum == BATCH_ROWS for c in plan.candidates)
    assert plan.best.dial == free.best.dial and (plan.best.rows, plan.best.accum) == (8, 4)
    assert plan.train_fields()[1]["batch_size"] == 8 and plan.train_fields()[1]["grad_accum"] == 4
    assert any("8 rows a micro-batch x 4 accumulated" in line for line in plan_lines(plan))
    assert min(c.rows for c in plan.candidates) == 8 and max(c.rows for c in plan.candidates) == BATCH_ROWS
    small = min(training_memory_bytes(c.model, 1, 256, "cuda") for c in plan.candidates)
    with pytest.raises(QingLMError, match="no shape trains in"):
        make_plan(Budget(flops=1e16), device="cuda", measure_s=0, fit=fit, memory_limit=small // 2)


def test_qinglm_plan_memory_flag_refuses_what_cannot_fit(tmp_path, capsys):
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(synthetic_fit().to_json()))
    args = ["plan", "--budget", "2h", "--fit", str(path), "--measure-s", "0", "--memory-gib", "0.0001"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no shape trains in" in err and len(err.strip().splitlines()) == 1
    assert main(["plan", "--budget", "2h", "--fit", str(path), "--measure-s", "0", "--memory-gib", "64"]) == 0
    assert "64.0 GiB to use" in capsys.readouterr().out


def test_a_plan_with_dropout_expects_what_the_law_fitted_on_dropout_runs_says():
    """With R_dropout in the fit, the plan's figure for a run with dropout is the law's with that R (at the
    run's speed); without it, the law's figure for the shape without dropout, said so."""
    plain = dataclasses.replace(synthetic_fit(), R=1.4)
    with_dropout = dataclasses.replace(plain, R_dropout=3.0)
    a = make_plan(Budget(flops=1e14), measure_s=0, fit=plain)
    b = make_plan(Budget(flops=1e14), measure_s=0, fit=with_dropout)
    assert a.dropout == b.dropout > 0 and a.best.dial == b.best.dial
    chars = b.best.tokens * with_dropout.chars_per_token[b.best.vocab]
    assert b.best.bpc == pytest.approx(with_dropout.predict(b.best.n, chars, b.best.vocab, dropout=True))
    assert b.best.bpc < a.best.bpc == pytest.approx(plain.predict(a.best.n, chars, a.best.vocab))
    assert any("the law's R for runs with dropout" in line for line in plan_lines(b))
    assert any("without dropout, as for the others" in line for line in plan_lines(a))


def test_the_memory_estimate_counts_dropout_masks_on_a_cpu():
    import dataclasses

    from qinglm.train.budget import _sized
    from qinglm.train.hardware import training_memory_bytes

    cfg = _sized(6, 10_000, 256)[0]
    dropped = dataclasses.replace(cfg, dropout=0.1)
    masks = training_memory_bytes(dropped, 32, 256, "cpu") - training_memory_bytes(cfg, 32, 256, "cpu")
    assert masks == 6 * (2 * 6 * 256 + 2 * 384) * 32 * 256  # kept keys twice, two residual masks, per layer
    assert training_memory_bytes(dropped, 32, 256, "cuda") == training_memory_bytes(cfg, 32, 256, "cuda")
