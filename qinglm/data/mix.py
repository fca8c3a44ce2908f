"""Training on a weighted mixture of sources: `--data pd1998:0.7 reviews.jsonl:0.3`.

A spec ending in `:WEIGHT` (a positive number, and the whole spec not an existing path) is one source
of a mixture; either every spec has a weight or none. Weights are normalised to sum to 1. Each source
is prepared into its own train split (`train-mix0`, `train-mix1`, ...); validation uses the combined
`val` split of all sources.

Every optimizer step's global batch of G rows is allotted to the sources in proportion to their
weights by a deficit rule (row g goes to the source furthest behind its share w_i * (g + 1)), so at
any step each source's count of rows is within one row of its exact share; the rows are then placed
in a random order within the step (seeded by (seed, step)). Each source walks its own windows in an
order shuffled per pass of that source (seeded by (seed, source, pass)). All of it is a pure function
of (seed, step, rows taken per source), which is what makes resuming exact and keeps DDP ranks in
agreement without any communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qinglm.data.loader import TrainBatches, saved_global_batch
from qinglm.data.shards import TokenShards
from qinglm.errors import QingLMError


@dataclass(frozen=True)
class Mixture:
    """The sources of a mixture with their normalised weights."""

    sources: list[str]
    weights: list[float]

    @property
    def splits(self) -> list[str]:
        """Return the train split of each source, in order."""
        return [mix_split(i) for i in range(len(self.sources))]


def mix_split(i: int) -> str:
    """Return the name of the train split of source i of a mixture."""
    return f"train-mix{i}"


def _weight_of(spec: str) -> tuple[str, float] | None:
    """Return (source, weight) if spec ends in `:WEIGHT` and is not itself a path, else None."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or os.path.exists(spec):
        return None
    try:
        weight = float(tail)
    except ValueError:
        return None
    if not np.isfinite(weight) or weight <= 0:
        raise QingLMError(f"the weight of {head!r} in --data {spec} must be a positive number")
    return head, weight


def parse_mixture(specs: list[str]) -> Mixture | None:
    """Return the mixture the --data specs describe, or None when no spec has a weight."""
    parsed = [_weight_of(s) for s in specs]
    if all(p is None for p in parsed):
        return None
    missing = [s for s, p in zip(specs, parsed) if p is None]
    if missing:
        raise QingLMError(
            f"--data mixes weighted and unweighted sources ({', '.join(missing)}); give every source "
            "a weight, e.g. --data pd1998:0.7 reviews.jsonl:0.3"
        )
    sources = [p[0] for p in parsed if p]
    if len(set(sources)) < len(sources):
        raise QingLMError(f"--data names a source twice in the mixture: {' '.join(specs)}")
    for s in sources:
        if (Path(s) / "index.json").is_file():
            raise QingLMError(f"mixture sources are corpora or text files, not prepared data ({s})")
    total = sum(p[1] for p in parsed if p)
    return Mixture(sources, [p[1] / total for p in parsed if p])


def source_specs(specs: list[str]) -> list[str]:
    """Return the --data specs without their mixture weights."""
    mix = parse_mixture(specs)
    return mix.sources if mix else list(specs)


def train_shards(data_dir: str | Path, specs: list[str]) -> list[TokenShards]:
    """Return the train split(s) of a prepared directory: one per source of a mixture, else one."""
    mix = parse_mixture(specs)
    return [TokenShards(data_dir, split) for split in (mix.splits if mix else ["train"])]


def mixture_record(specs: list[str], data_dir: str | Path) -> dict:
    """Return {"mixture": [each source's spec, weight, split, tokens]} for a run's config, or {}."""
    mix = parse_mixture(specs)
    if mix is None:
        return {}
    return {
        "mixture": [
            {
                "source": s,
                "weight": round(w, 6),
                "split": split,
                "tokens": TokenShards(data_dir, split).n_tokens,
            }
            for s, w, split in zip(mix.sources, mix.weights, mix.splits)
        ]
    }


def mixture_lines(mix: Mixture, taken: list[int], seq_len: int) -> list[str]:
    """Return the report's lines: tokens trained from each source (rows taken x seq_len), share vs weight."""
    total = max(1, sum(taken))
    return [
        f"  {source}: {n * seq_len:,} tokens trained, {n / total:.1%} (weight {weight:.1%})"
        for source, weight, n in zip(mix.sources, mix.weights, taken)
    ]


class MixedBatches:
    """Yields (x, y) batches whose rows come from several TokenShards by weight; resumable exactly.

    Same contract as TrainBatches (global batch, rank slicing, state_dict), with the sources' windows
    in place of one permutation. An "epoch" here is as many windows as all sources hold together.
    """

    def __init__(
        self,
        sources: list[TokenShards],
        weights: list[float],
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ):
        if len(sources) != len(weights) or not sources:
            raise ValueError("one weight per source, and at least one source")
        # A one-row TrainBatches per source is its table of windows (and checks the sizes and rank).
        self.tables = [TrainBatches(s, 1, seq_len) for s in sources]
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.weights = np.asarray(weights, dtype=np.float64)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.grad_accum = rank, world_size, max(1, grad_accum)
        self.n_windows = [t.n_windows for t in self.tables]
        self.n_tokens = sum(s.n_tokens for s in sources)
        self.steps_per_epoch = max(1, sum(self.n_windows) // self.global_batch) * self.grad_accum
        self.step = 0  # optimizer steps whose rows were all served
        self.micro = 0  # micro-batches this rank served in the current step
        self.taken = np.zeros(len(sources), dtype=np.int64)  # rows of each source before this step
        self._plan_step: int | None = None
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        """Return the rows one optimizer step takes over all ranks and micro-batches."""
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def epoch(self) -> int:
        return (self.step * self.grad_accum + self.micro) // self.steps_per_epoch

    @property
    def position(self) -> int:
        return (self.step * self.grad_accum + self.micro) % self.steps_per_epoch

    def tokens_per_source(self) -> list[int]:
        """Return the tokens trained from each source in the steps done (all ranks)."""
        return [int(n) * self.seq_len for n in self.taken]

    def _plan(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (source of each row, its index among its source's rows, rows per source) of this step."""
        if self._plan_step != self.step:
            g = self.global_batch
            counts, done = np.zeros(len(self.weights), dtype=np.int64), self.taken.copy()
            first = int(done.sum())
            alloc = np.empty(g, dtype=np.int64)
            for j in range(g):  # the source furthest behind its share takes the row
                i = int(np.argmax(self.weights * (first + j + 1) - done))
                alloc[j], done[i], counts[i] = i, done[i] + 1, counts[i] + 1
            rows = alloc[np.random.default_rng((self.seed, 0, self.step)).permutation(g)]
            within = np.empty(g, dtype=np.int64)
            for i in range(len(self.weights)):
                at = np.flatnonzero(rows == i)
                within[at] = np.arange(len(at))
            self._plan_cache = (rows, within, counts)
            self._plan_step = self.step
        return self._plan_cache

    def _order(self, i: int, rnd: int) -> np.ndarray:
        """Return source i's window ids in the order of its pass `rnd`."""
        key = (i, rnd)
        if key not in self._orders:
            for old in [k for k in self._orders if k[0] == i and k[1] < rnd - 1]:
                del self._orders[old]  # keep at most two passes of a source in memory
            self._orders[key] = np.random.default_rng((self.seed, 1 + i, rnd)).permutation(self.n_windows[i])
        return self._orders[key]

    def __iter__(self) -> MixedBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.micro == self.grad_accum:
            self.taken += self._plan()[2]
            self.step, self.micro = self.step + 1, 0
        rows, within, _ = self._plan()
        start = (self.micro * self.world_size + self.rank) * self.batch_size
        src, pos = rows[start : start + self.batch_size], within[start : start + self.batch_size]
        tokens = np.empty((len(src), self.seq_len + 1), dtype=np.int64)
        for i in np.unique(src):
            at = np.flatnonzero(src == i)
            p = self.taken[i] + pos[at]  # position in source i's endless walk
            n = self.n_windows[i]
            ids = np.array([self._order(int(i), int(q // n))[q % n] for q in p], dtype=np.int64)
            tokens[at] = self.tables[i].windows(ids)
        self.micro += 1
        return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy())

    def state_dict(self) -> dict:
        """Return the position: enough, with the same sources and global batch, to resume exactly."""
        step, taken = self.step, self.taken
        if self.micro == self.grad_accum:  # the step is complete: save it as done
            step, taken = step + 1, taken + self._plan()[2]
        return {
            "mixture_step": step,
            "mixture_taken": [int(n) for n in taken],
            "micro_rows_done": (self.micro % self.grad_accum) * self.world_size * self.batch_size,
            "weights": [float(w) for w in self.weights],
            "n_windows": list(self.n_windows),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Return nothing; continue with exactly the rows that would have come next."""
        if "mixture_step" not in state:
            raise QingLMError("cannot resume: the checkpoint was not trained on a mixture; keep its --data")
        same = {
            "weights": _same(state["weights"], self.weights),
            "n_windows": state["n_windows"] == self.n_windows,
            "seq_len": state["seq_len"] == self.seq_len,
        }
        for key in (k for k, ok in same.items() if not ok):
            raise QingLMError(
                f"cannot resume the mixture: its {key} changed; resume with the same --data and "
                "--seq-len, or start a new run"
            )
        if saved_global_batch(state) != self.global_batch:
            raise QingLMError(
                f"cannot resume the mixture: the global batch was {saved_global_batch(state)}, now "
                f"{self.global_batch}; keep batch_size x grad_accum x processes"
            )
        self.seed, self.step = int(state["seed"]), int(state["mixture_step"])
        self.taken = np.asarray(state["mixture_taken"], dtype=np.int64)
        self.micro = int(state["micro_rows_done"]) // (self.world_size * self.batch_size)
        self._plan_step = None


def _same(a: list[float], b: np.ndarray) -> bool:
    return len(a) == len(b) and bool(np.allclose(a, b, rtol=0, atol=1e-12))
