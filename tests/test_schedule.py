"""The learning-rate schedules, the run length (steps, time, both) and progressive sequence length."""

from __future__ import annotations

import pytest

from qinglm.errors import QingLMError
from qinglm.train.schedule import (
    RunLength,
    effective_warmup,
    known_total,
    lr_at,
    parse_seq_len_schedule,
    seq_len_at,
)

# ---------------------------------------------------------------------------- schedule


def test_schedule_warms_up_then_decays_by_cosine_to_the_floor():
    peak, total, warmup = 1e-3, 200, 10
    lrs = [lr_at(s, peak=peak, warmup=warmup, total=total, min_ratio=0.1) for s in range(total + 20)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # strictly up during warmup
    assert all(a >= b for a, b in zip(lrs[warmup - 1 : total], lrs[warmup : total + 1]))  # then never up
    mid = (warmup + total) // 2
    assert lrs[mid] == pytest.approx(0.1 * peak + 0.9 * peak / 2, rel=0.02)  # cosine's midpoint
    assert lrs[total:] == [pytest.approx(0.1 * peak)] * 20  # constant floor after the end


def _lrs(kind: str, total: int = 200, warmup: int = 10, **kw) -> list[float]:
    return [
        lr_at(s, peak=1.0, warmup=warmup, total=total, min_ratio=0.1, kind=kind, **kw)
        for s in range(total + 5)
    ]


def test_linear_schedule_decays_in_a_straight_line_to_the_floor():
    lrs = _lrs("linear")
    assert lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)  # warmup end
    assert lrs[105] == pytest.approx(0.1 + 0.9 * 0.5)  # midpoint of the decay (warmup 10 .. total 200)
    assert lrs[57] - lrs[58] == pytest.approx(lrs[150] - lrs[151])  # a constant slope
    assert lrs[199] == pytest.approx(0.1 + 0.9 / 190) and lrs[200:] == [pytest.approx(0.1)] * 5


def test_wsd_schedule_holds_the_peak_then_decays_over_the_last_fraction():
    lrs = _lrs("wsd")  # decay_fraction 0.2: decay over steps 160..200
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warmup
    assert lrs[10] == lrs[100] == lrs[159] == pytest.approx(1.0)  # stable at the peak, midpoint included
    assert lrs[160] == pytest.approx(1.0) and lrs[161] == pytest.approx(1.0 - 0.9 / 40)  # decay starts
    assert lrs[180] == pytest.approx(0.1 + 0.9 * 0.5) and lrs[200:] == [pytest.approx(0.1)] * 5
    half = _lrs("wsd", decay_fraction=0.5)  # decay over steps 100..200
    assert half[99] == pytest.approx(1.0) and half[101] < 1.0 and half[150] == pytest.approx(0.55)


def test_constant_schedule_warms_up_then_stays_at_the_peak():
    lrs = _lrs("constant")
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[105] == lrs[199] == lrs[204] == pytest.approx(1.0)
    with pytest.raises(QingLMError, match="unknown lr schedule"):
        lr_at(0, peak=1.0, warmup=1, total=10, min_ratio=0.1, kind="weird")


def test_effective_warmup_is_capped_at_five_percent_of_a_known_run():
    assert effective_warmup(1000, 300) == 15
    assert effective_warmup(10, 10_000) == 10
    assert effective_warmup(1000, 8) == 1
    assert effective_warmup(1000, None) == 1000
    assert (
        known_total(None, 2.5, 40) == 100
        and known_total(30, 2.5, 40) == 30
        and known_total(None, None, 40) is None
    )


def test_time_only_run_estimates_its_length_then_freezes_it():
    length = RunLength(None, max_time_s=60.0, warmup_steps=1000)
    assert length.total is None and length.lr(0, 1.0, 0.1) == pytest.approx(1 / 20)
    for step in range(1, 10):
        assert not length.observe(step, 0.1, elapsed_s=0.1 * step)
    assert length.observe(10, 0.1, elapsed_s=1.0)
    assert length.total == 10 + 590 and length.warmup == 30  # 59 s left at 0.1 s per step
    for step in range(11, 101):
        length.observe(step, 0.2, elapsed_s=1.0 + 0.2 * (step - 10))
    frozen = length.total
    assert length.warmup == 30  # later estimates move only the end of the run
    assert not length.observe(200, 5.0, elapsed_s=30.0) and length.total == frozen
    resumed = RunLength(None, max_time_s=60.0, warmup_steps=1000)
    resumed.restore(frozen, length.warmup, step=150)
    assert resumed.total == frozen and not resumed.observe(160, 9.0, elapsed_s=40.0)
    assert [resumed.lr(s, 1.0, 0.1) for s in range(150, 400)] == [
        length.lr(s, 1.0, 0.1) for s in range(150, 400)
    ]
    fixed = RunLength(300, max_time_s=60.0, warmup_steps=1000)
    fixed.restore(999, 7, step=10)  # a fixed length follows the config, not the checkpoint
    assert (fixed.total, fixed.warmup) == (300, 15)


def test_steps_and_time_together_end_at_whichever_comes_first_without_an_lr_jump():
    """The default main job: 8 passes or 8 minutes. A slow machine ends by time on the whole cosine."""
    for step_s, want in ((1.0, 10 + 470), (0.01, 1152)):
        length = RunLength(1152, max_time_s=480.0, warmup_steps=1000)
        assert not length.fixed and length.warmup == 58  # 5% of the cap, from the start
        lrs = []
        for step in range(1, 11):
            lrs.append(length.lr(step - 1, 1.0, 0.1))
            length.observe(step, step_s, elapsed_s=10.0 if step == 10 else step_s * step)
        assert length.total == min(1152, want)
        lrs += [length.lr(s, 1.0, 0.1) for s in range(10, length.total)]
        assert max(abs(b - a) for a, b in zip(lrs, lrs[1:])) < 1 / 50  # continuous
        assert lrs[-1] == pytest.approx(0.1, abs=1e-3)  # the floor at the run's end, whichever ends it
        resumed = RunLength(1152, max_time_s=480.0, warmup_steps=1000)
        resumed.restore(length.total, length.warmup, step=10)
        assert (resumed.total, resumed.warmup) == (length.total, length.warmup)


def _simulate(length: RunLength, step_s: float, start: int, end_s: float) -> list[float]:
    """Return the lr (fraction of peak) of updates start.. of a simulated time-only run until end_s seconds."""
    lrs, step = [], start
    while step * step_s < end_s:
        lrs.append(length.lr(step, 1.0, 0.1))
        step += 1
        length.observe(step, 5.0 if step == 1 else step_s, elapsed_s=step * step_s)  # step 1 compiles
    return lrs


@pytest.mark.parametrize("step_s", [0.3, 1.0, 0.02])
def test_a_time_only_run_keeps_its_lr_continuous_across_the_estimate(step_s):
    # The default run: 8 minutes, --warmup-steps 1000. Before the fix the lr jumped at the estimate
    # (step 10) from 0.01 to 0.14 of the peak at 0.3 s/step and to 0.46 at 1 s/step.
    length = RunLength(None, max_time_s=8 * 60, warmup_steps=1000)
    lrs = _simulate(length, step_s, 0, 8 * 60)
    warmup = length.warmup
    assert warmup == min(1000, max(20, round(0.05 * length.total)))
    assert lrs[9] == pytest.approx(10 / 20)  # until the estimate: the slope of a 20-step warmup
    # The lr rises to the peak at the end of the warmup, then never rises again; no update moves it by
    # more than a 20-step warmup does, and its growth rate never speeds up: the estimate (after step 10)
    # can only slow the climb. It used to multiply the lr by 14 (0.3 s/step) or 46 (1 s/step) there.
    assert all(b > a for a, b in zip(lrs[: warmup - 1], lrs[1:warmup])) and lrs[warmup - 1] == 1.0
    assert all(b <= a for a, b in zip(lrs[warmup - 1 :], lrs[warmup:]))
    assert max(abs(b - a) for a, b in zip(lrs, lrs[1:])) <= 1 / 20 + 1e-12
    growth = [b / a for a, b in zip(lrs[:warmup], lrs[1:warmup])]
    assert all(g2 <= g1 + 1e-12 for g1, g2 in zip(growth, growth[1:])) and growth[9] <= 1.1


@pytest.mark.parametrize("at", [15, 60, 400])  # during the ramp, between two estimates, after the last
def test_a_time_only_run_resumed_from_a_checkpoint_follows_the_same_lrs(at):
    length = RunLength(None, max_time_s=8 * 60, warmup_steps=1000)
    lrs = _simulate(length, 0.3, 0, 8 * 60)
    before = RunLength(None, max_time_s=8 * 60, warmup_steps=1000)
    _simulate(before, 0.3, 0, at * 0.3)
    resumed = RunLength(None, max_time_s=8 * 60, warmup_steps=1000)
    resumed.restore(before.total, before.warmup, step=at)  # what the checkpoint at `at` carries
    assert _simulate(resumed, 0.3, at, 8 * 60) == lrs[at:]


# ---------------------------------------------------------------------------- progressive sequence length


def test_seq_len_schedule_parses_and_picks_the_stage_by_fraction_of_the_run():
    stages = parse_seq_len_schedule("4:0.25, 8:0.5", 16)
    assert stages == [(0.25, 4), (0.5, 8)]
    assert [seq_len_at(stages, s, 100, 16) for s in (0, 24, 25, 49, 50, 99)] == [4, 4, 8, 8, 16, 16]
    assert seq_len_at(stages, 0, None, 16) == 4  # a time-only run before its length is estimated
    assert seq_len_at([], 5, 100, 16) == 16


@pytest.mark.parametrize("bad", ["3:0.2", "16:0.2", "8:0.5,4:0.7", "4:0.5,8:0.4", "4:1.0", "4", "x:0.1"])
def test_bad_seq_len_schedules_are_user_errors(bad):
    with pytest.raises(QingLMError, match="seq-len-schedule"):
        parse_seq_len_schedule(bad, 16)
