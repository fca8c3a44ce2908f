"""Batches of (input, target) token windows for training and evaluation, read from TokenShards.

Training windows are non-overlapping spans of seq_len + 1 tokens that never cross a shard boundary,
shuffled per epoch by a generator seeded with (seed, epoch): the order is a pure function of
(seed, epoch, position), which is what makes resuming exact without saving any RNG state.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from qinglm.data.shards import TokenShards
from qinglm.errors import QingLMError
from qinglm.model.transformer import IGNORE_INDEX
from qinglm.tokenizer import PAD_ID


def _check_sizes(batch_size: int, seq_len: int) -> None:
    """Return nothing; raise QingLMError unless both sizes are positive."""
    if batch_size < 1 or seq_len < 1:
        raise QingLMError(f"batch size and seq_len must be positive, got {batch_size} and {seq_len}")


class TrainBatches:
    """Yields (x, y) int64 tensors of shape (batch_size, seq_len) from a TokenShards, epoch by epoch; resumable exactly.

    The iterator never ends: epoch after epoch, each of `steps_per_epoch` micro-batches. The training
    loop decides when to stop. All ranks share one permutation of the windows per epoch, and every
    optimizer step takes the next batch_size x grad_accum x world_size of them (the global batch);
    micro-batch m of rank r is the (m * world_size + r)-th slice of batch_size windows in it. So a
    step trains on the same set of windows whatever the split into processes and micro-batches,
    ranks are disjoint, and all have the same number of micro-batches.
    """

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ):
        _check_sizes(batch_size, seq_len)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, max(1, grad_accum)
        # Window j of a shard covers tokens [j*seq_len, j*seq_len + seq_len + 1).
        per_shard = np.array([max(0, (len(s) - 1) // seq_len) for s in shards.shards], dtype=np.int64)
        self._first = np.concatenate([[0], np.cumsum(per_shard)])  # global id of each shard's window 0
        self.n_windows = int(self._first[-1])
        if self.n_windows < self.global_batch:
            raise QingLMError(
                f"batch larger than the data: {shards.split} has {self.n_windows} windows of {seq_len} tokens "
                f"but one step needs {self.global_batch}; lower --batch-size or --seq-len"
            )
        # Whole global batches only, so every epoch starts on a step boundary for any split of the batch.
        self.steps_per_epoch = (self.n_windows // self.global_batch) * self.grad_accum  # micro-batches
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)
        self.epoch = 0
        self.position = 0  # micro-batches served by this rank in the current epoch
        self._order_epoch: int | None = None
        self._order = np.empty(0, dtype=np.int64)

    @property
    def n_tokens(self) -> int:
        return self.shards.n_tokens

    @property
    def global_batch(self) -> int:
        """Return the windows one optimizer step takes over all ranks and micro-batches."""
        return self.batch_size * self.grad_accum * self.world_size

    def _epoch_order(self) -> np.ndarray:
        """Return every window id of the current epoch, in the order the global batches take them."""
        if self._order_epoch != self.epoch:
            self._order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def windows(self, window_ids: np.ndarray) -> np.ndarray:
        """Return the tokens of the given global windows as a (len(ids), seq_len + 1) int64 array."""
        shard_of = np.searchsorted(self._first, window_ids, side="right") - 1
        starts = (window_ids - self._first[shard_of]) * self.seq_len
        out = np.empty((len(window_ids), self.seq_len + 1), dtype=np.int64)
        # One fancy-indexing gather per shard present in the batch (usually one or two).
        for k in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == k)
            out[rows] = self.shards.shards[k][starts[rows, None] + self._offsets]
        return out

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
        start = (self.position * self.world_size + self.rank) * self.batch_size
        ids = self._epoch_order()[start : start + self.batch_size]
        tokens = self.windows(ids)
        self.position += 1
        # Slicing copies make x and y contiguous, so callers can .view(-1) them.
        return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(tokens[:, 1:].copy())

    def state_dict(self) -> dict:
        """Return the iterator's position: enough, with the same data and global batch, to resume exactly."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "windows_done": self.position * self.world_size * self.batch_size,  # over all ranks
            "seed": self.seed,
            "n_windows": self.n_windows,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Return nothing; continue with exactly the global batch that would have come next.

        The number of processes, micro-batches and rows per micro-batch may change, as long as
        their product (the global batch) does not.
        """
        for key in ("n_windows", "seq_len"):
            if state[key] != getattr(self, key):
                raise QingLMError(
                    f"cannot resume the data order: {key} was {state[key]}, now {getattr(self, key)}; "
                    "resume with the same data and --seq-len, or start a new run"
                )
        old_global = saved_global_batch(state)
        if old_global != self.global_batch:
            raise QingLMError(
                f"cannot resume the data order: the global batch (batch_size x grad_accum x processes) was "
                f"{old_global}, now {self.batch_size} x {self.grad_accum} x {self.world_size} = "
                f"{self.global_batch}; resume with --batch-size/--grad-accum giving {old_global}"
            )
        done = int(
            state.get("windows_done", state["position"] * state.get("world_size", 1) * state["batch_size"])
        )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = done // (self.world_size * self.batch_size)
        self._order_epoch = None


def saved_global_batch(state: dict) -> int:
    """Return the global batch (windows per optimizer step) of a TrainBatches.state_dict()."""
    return int(state["batch_size"]) * int(state.get("grad_accum", 1)) * int(state.get("world_size", 1))


def eval_batches(
    shards: TokenShards,
    batch_size: int,
    seq_len: int,
    *,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Return an iterator of padded (x, y) batches in which every token (but each shard's first) is a target once.

    Windows start at 0, seq_len, 2*seq_len, ... and overlap by one token, so the target of one
    window's last position is the input of the next window's first. The last window of a shard
    is shorter: x is padded with PAD_ID and y with IGNORE_INDEX. With max_tokens, only the first
    windows holding at least that many targets are used (a fixed subset for periodic validation).
    """
    _check_sizes(batch_size, seq_len)  # here, not in the generator, so bad sizes fail at the call
    return _eval_windows(shards, batch_size, seq_len, max_tokens)


def _eval_windows(
    shards: TokenShards, batch_size: int, seq_len: int, max_tokens: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Return the generator behind eval_batches."""
    budget = max_tokens if max_tokens is not None else float("inf")
    x = np.full((batch_size, seq_len), PAD_ID, dtype=np.int64)
    y = np.full((batch_size, seq_len), IGNORE_INDEX, dtype=np.int64)
    row = 0
    for shard in shards.shards:
        for start in range(0, len(shard) - 1, seq_len):
            if budget <= 0:
                break
            window = np.asarray(shard[start : start + seq_len + 1], dtype=np.int64)
            n = len(window) - 1
            x[row, :n] = window[:-1]
            y[row, :n] = window[1:]
            row += 1
            budget -= n
            if row == batch_size:
                yield torch.from_numpy(x.copy()), torch.from_numpy(y.copy())
                x.fill(PAD_ID)
                y.fill(IGNORE_INDEX)
                row = 0
    if row:
        yield torch.from_numpy(x[:row].copy()), torch.from_numpy(y[:row].copy())
