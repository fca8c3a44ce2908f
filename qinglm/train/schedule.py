"""Learning-rate schedules and the length of a run (known from steps/epochs, or estimated from a time budget)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from qinglm.errors import QingLMError

# After warmup, a schedule is a shape: the fraction of the way from the floor (min_ratio * peak) up
# to the peak, as a function of the update's position. Warmup and the floor are shared by all.


def _progress(step: int, start: int, total: int) -> float:
    """Return how far step is from start to total, clamped to [0, 1] (1 from total on)."""
    if step >= total:
        return 1.0
    return min(1.0, max(0.0, (step - start) / max(1, total - start)))


def cosine_shape(step: int, warmup: int, total: int, decay_fraction: float) -> float:
    """Cosine from peak down to the floor at total."""
    return 0.5 * (1.0 + math.cos(math.pi * _progress(step, warmup, total)))


def linear_shape(step: int, warmup: int, total: int, decay_fraction: float) -> float:
    """A straight line from peak down to the floor at total (LightweightLM)."""
    return 1.0 - _progress(step, warmup, total)


def wsd_shape(step: int, warmup: int, total: int, decay_fraction: float) -> float:
    """Stable at peak, then a straight line to the floor over the last decay_fraction of the run (MiniCPM)."""
    decay_start = max(warmup, total - max(1, round(decay_fraction * total)))
    return 1.0 - _progress(step, decay_start, total)


def constant_shape(step: int, warmup: int, total: int, decay_fraction: float) -> float:
    """Peak for good."""
    return 1.0


SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "cosine": cosine_shape,
    "linear": linear_shape,
    "wsd": wsd_shape,
    "constant": constant_shape,
}


def lr_at(
    step: int,
    *,
    peak: float,
    warmup: int,
    total: int,
    min_ratio: float,
    kind: str = "cosine",
    decay_fraction: float = 0.2,
    warmup_from: tuple[int, float] = (-1, 0.0),
) -> float:
    """Return the learning rate of 0-based update `step` under schedule `kind` (default: warmup + cosine).

    The warmup is a straight line from warmup_from = (step, fraction of peak) to the peak at step
    warmup - 1; the default (-1, 0) gives (step+1)/warmup: the first update already moves (lr 0 would
    waste a step). A time-only run starts its line where its first estimate found the lr.
    """
    if kind not in SCHEDULES:
        raise QingLMError(f"unknown lr schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    warmup = max(1, warmup)
    if step < warmup:
        start, ratio = warmup_from
        return peak * (ratio + (1.0 - ratio) * (step - start) / (warmup - 1 - start))
    floor, shape = peak * min_ratio, SCHEDULES[kind](step, warmup, total, decay_fraction)
    if shape in (0.0, 1.0):  # exactly the floor or the peak, with no rounding in between
        return peak if shape else floor
    return floor + (peak - floor) * shape


def effective_warmup(warmup_steps: int, total: int | None) -> int:
    """Return the warmup actually used: warmup_steps capped at 5% of a known run length (at least 1)."""
    if total is None:
        return max(1, warmup_steps)
    return max(1, min(warmup_steps, max(1, round(0.05 * total))))


def known_total(max_steps: int | None, num_epochs: float | None, steps_per_epoch: int) -> int | None:
    """Return the run length in optimizer steps from max_steps / num_epochs (the smaller), or None."""
    totals = []
    if max_steps is not None:
        totals.append(int(max_steps))
    if num_epochs is not None:
        totals.append(max(1, math.ceil(num_epochs * steps_per_epoch)))
    return min(totals) if totals else None


class RunLength:
    """The schedule's total steps: fixed when max_steps/num_epochs give it, else estimated from max_time.

    With both, the steps are a cap: the total is the smaller of the cap and the time estimate, and
    the warmup is the cap's from the start (so no warmup ramp change at the estimate).

    A time-only run estimates the total from the median measured step time at steps ESTIMATE_AT,
    then freezes it; the estimate is stored in checkpoints so a resumed run keeps the same schedule.
    Time spent in validation/checkpointing is not in the step time, so such runs end a little early
    on the cosine (the lr is then not quite at its floor) - harmless, and never past max_time.

    Until the first estimate the lr climbs as over a warmup of SHORTEST_WARMUP steps (or
    --warmup-steps if fewer), the shortest such a run ends up with; the estimate fixes the warmup
    (5% of the run, capped by --warmup-steps, at least SHORTEST_WARMUP) and the lr climbs on in a
    straight line from where it is to the peak. So the estimate can only slow the climb, never make
    the lr jump (it used to: 0.01 -> 0.14 of the peak). Later estimates only move the end of the run.
    """

    ESTIMATE_AT = (10, 20, 50, 100)
    SHORTEST_WARMUP = 2 * ESTIMATE_AT[0]

    def __init__(
        self,
        total: int | None,
        max_time_s: float | None,
        warmup_steps: int,
        kind: str = "cosine",
        decay_fraction: float = 0.2,
    ):
        self.kind, self.decay_fraction = kind, decay_fraction
        # cap: max_steps / num_epochs. With max_time as well, the time estimate may shorten the run
        # (the default main job: 8 passes or 8 minutes, whichever comes first).
        self.cap = total
        self.fixed = total is not None and max_time_s is None
        self.total = total
        self.max_time_s = max_time_s
        self.warmup_steps = warmup_steps
        self.warmup = effective_warmup(warmup_steps, total)
        self._step_times: list[float] = []
        self._last_estimate_done = False

    def restore(self, total_steps_est: int | None, warmup_eff: int | None, step: int) -> None:
        """Return nothing; take the estimate of a checkpoint (time-only runs); fixed lengths follow the current config."""
        if self.fixed or total_steps_est is None:
            return
        if self.cap is not None:  # the warmup came from the cap at the start and stays
            self.total = min(self.cap, int(total_steps_est))
            self._last_estimate_done = step >= self.ESTIMATE_AT[-1]
            return
        self.total = int(total_steps_est)
        self.warmup = int(warmup_eff) if warmup_eff else self._estimated_warmup()
        self._last_estimate_done = step >= self.ESTIMATE_AT[-1]

    def observe(self, step: int, step_time_s: float, elapsed_s: float) -> bool:
        """Return True if the estimate changed, after recording the time of the step that made `step` updates."""
        if self.fixed or self.max_time_s is None or self._last_estimate_done:
            return False
        self._step_times.append(step_time_s)
        if step not in self.ESTIMATE_AT:
            return False
        # The first step of a process pays for allocation/compilation; leave it out when we can.
        times = self._step_times[1:] or self._step_times
        per_step = max(statistics.median(times), 1e-6)
        remaining = max(0.0, self.max_time_s - elapsed_s)
        first = self.total is None
        self.total = step + max(1, int(remaining / per_step))
        if self.cap is not None:
            self.total = min(self.cap, self.total)
        elif first:
            self.warmup = self._estimated_warmup()
        self._last_estimate_done = step >= self.ESTIMATE_AT[-1]
        return True

    def _early_warmup(self) -> int:
        """Return the warmup a time-only run climbs at until its first estimate."""
        return max(1, min(self.warmup_steps, self.SHORTEST_WARMUP))

    def _ramp_start(self) -> tuple[int, float]:
        """Return (step, fraction of peak) of the last update before a time-only run's first estimate."""
        start = self.ESTIMATE_AT[0] - 1
        return start, min(1.0, (start + 1) / self._early_warmup())

    def _estimated_warmup(self) -> int:
        """Return the warmup of a time-only run once its total is estimated (see the class docstring)."""
        return max(effective_warmup(self.warmup_steps, self.total), self._early_warmup())

    def lr(self, step: int, peak: float, min_ratio: float) -> float:
        """Return the lr of 0-based update `step`; before a time-only run's first estimate, plain warmup."""
        start, ratio = (-1, 0.0) if self.cap is not None else self._ramp_start()
        if self.total is None or step <= start:  # a time-only run before its first estimate
            return peak * min(1.0, (step + 1) / self._early_warmup())
        return lr_at(
            step,
            peak=peak,
            warmup=self.warmup,
            total=self.total,
            min_ratio=min_ratio,
            kind=self.kind,
            decay_fraction=self.decay_fraction,
            warmup_from=(start, ratio),
        )


# ---------------------------------------------------------------------------- progressive sequence length


def parse_seq_len_schedule(spec: str, seq_len: int) -> list[tuple[float, int]]:
    """Return [(until_fraction, length), ...] from "64:0.2,128:0.5" (then seq_len for the rest).

    Each stage trains on `length`-token rows until that fraction of the run; a length must divide
    seq_len and grow from stage to stage, and the fractions must increase within (0, 1).
    """
    stages: list[tuple[float, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            length_s, frac_s = part.split(":")
            length, frac = int(length_s), float(frac_s)
        except ValueError:
            raise QingLMError(
                f"bad --seq-len-schedule stage {part!r}: write LENGTH:FRACTION stages, e.g. 64:0.2,128:0.5"
            ) from None
        if length <= 0 or length >= seq_len or seq_len % length:
            raise QingLMError(
                f"--seq-len-schedule length {length} must be below and divide seq_len {seq_len}"
            )
        if not 0.0 < frac < 1.0 or (stages and (frac <= stages[-1][0] or length <= stages[-1][1])):
            raise QingLMError(
                f"--seq-len-schedule stage {part!r}: fractions must increase within (0, 1) and lengths grow"
            )
        stages.append((frac, length))
    return stages


def seq_len_at(stages: list[tuple[float, int]], step: int, total: int | None, seq_len: int) -> int:
    """Return the row length of 0-based update `step` (the first stage's until the run's length is known)."""
    if not stages:
        return seq_len
    if total is None:
        return stages[0][1]
    for frac, length in stages:
        if step < frac * total:
            return length
    return seq_len
