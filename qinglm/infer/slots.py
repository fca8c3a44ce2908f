"""The decode engine's KV cache: fixed rows x positions, per-row lengths, one static-shape step for all rows.

Rows 0..n-1 of the cache hold the n sequences being decoded, each from position 0 (no padding); a row
that finishes is filled by moving the last row into it (one row's keys/values, not the whole cache).
A decoding step feeds one token per row at its own position (``Transformer.forward(start=positions)``):
keys and values are written in place and attention masks everything past each row's length, so the
shapes of a step depend only on (rows, window), never on how far each row has got. Eager, the step runs
through qinglm.infer.step.DecodeStep (the same logits in fewer ops) when the model is one it handles. Compiled, the cache
is allocated once at its full size, rows are rounded up to powers of two and the window to 64, 256,
1024, ... (``bucket``): a bounded set of shapes (``Slots.n_graphs``), each compiled once. On a CPU the compiled
step is DecodeStep's (inductor's C++ wrapper, guards on the step's arguments only: FAST_OPTIONS); on CUDA the
model's forward under CUDA graphs.

Prompts are prefilled into a scratch cache of their own (right-padded, causal: a row never sees the
padding after it), in chunks so a long prompt does not hold up the rows decoding, and each finished
prompt's keys/values are copied into its row. Identical prompts are prefilled once (a GRPO group).

Memory is bounded by ``kv_tokens``: rows x positions of the cache never exceed it. Eager, the cache grows
(rows and positions by powers of two) as requests arrive, up to max_rows and the model's context;
compiled, it holds min(max_rows, kv_tokens // context) rows of the whole context from the start.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from qinglm.device import compiled
from qinglm.errors import QingLMError
from qinglm.infer.step import DecodeStep, tokens_logits
from qinglm.limits import check_bytes, memory_bytes
from qinglm.memory import kv_cache_bytes
from qinglm.model.kv_cache import KVCache
from qinglm.model.transformer import Transformer

MIN_BUCKET = 8  # positions are allocated in powers of two from 8
WINDOW = 64  # compiled, the attention window is 64, 256, 1024, ... positions (4x apart: few graphs)
# Static shapes: each (rows, window) bucket is its own graph; never one traced with symbolic sizes.
COMPILE_OPTIONS: dict = {"dynamic": False}


def _step_guards(entries: list) -> list[bool]:
    """Keep the guards on a step's arguments (shapes, dtypes, the window) and on global state (grad mode,
    deterministic algorithms, ...); drop those on the weights and the step's closures, which are this
    engine's own and fixed (evaluating them took ~50 us a token, tiny on 2 threads: benchmarks/README.md)."""
    return [e.name in ("", "tokens", "positions", "window") for e in entries]


# The compiled CPU step: inductor's C++ wrapper calls the kernels (no Python between them), few guards.
FAST_OPTIONS: dict = {"cpp_wrapper": True, "guard_filter_fn": _step_guards}


def decode_compile(flag: bool | None, device: torch.device | str) -> bool:
    """Return whether to compile the decoding step: as asked, or by default on CUDA only (on a CPU the
    compile warm-up costs more than short generations save: benchmarks/README.md)."""
    return flag if flag is not None else torch.device(device).type == "cuda"


def check_fits(prompt: int, max_new_tokens: int, max_len: int, kv_tokens: int) -> None:
    """Raise QingLMError when one request (prompt tokens, max_new_tokens) can never fit a cache of
    kv_tokens tokens, even alone; return None otherwise."""
    need = min(max(prompt, prompt + max_new_tokens - 1), max_len)
    if bucket(need, max_len, MIN_BUCKET) > kv_tokens:
        raise QingLMError(
            f"the request needs {need} KV-cache positions but the cache budget is {kv_tokens} tokens; "
            "shorten the prompt or max_tokens, or raise the KV-cache budget (--kv-cache-tokens)"
        )


def bucket(n: int, limit: int, smallest: int = 1, factor: int = 2) -> int:
    """Return the smallest of smallest * factor**i that is >= n, at most limit."""
    b = smallest
    while b < n:
        b *= factor
    return min(b, limit)


def _powers(smallest: int, limit: int, factor: int) -> list[int]:
    """Return every value bucket(n, limit, smallest, factor) can take."""
    return sorted({bucket(n, limit, smallest, factor) for n in range(1, limit + 1)})


class Slots:
    """The static KV cache of a decode engine and its decoding step (see the module doc)."""

    def __init__(
        self,
        model: Transformer,
        max_rows: int,
        kv_tokens: int,
        device: torch.device,
        compile: bool = False,
        log: Callable[[str], None] = print,
    ):
        self.model, self.max_rows, self.kv_tokens, self.device = model, max_rows, kv_tokens, device
        self.max_len = model.cfg.max_seq_len
        self.dtype = next(model.parameters()).dtype
        self.compile = compile
        self.cache = KVCache(model.cfg, 0, 1, device, self.dtype)
        self.rows = 0  # rows allocated; rows in use are 0..n-1 (the caller's count)
        if compile:  # one cache for good: its shape is part of every compiled graph
            positions = min(self.max_len, kv_tokens)
            self.reserve(min(max_rows, kv_tokens // positions), positions)
            self.max_rows = self.rows
            self.shapes = [
                (r, w) for r in _powers(1, self.rows, 2) for w in _powers(WINDOW, self.positions, 4)
            ]
            self.n_graphs = n_graphs = len(self.shapes)  # every (rows, window) bucket a step can take
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, n_graphs + 1)
        # The standard families decode through the fast step (eager, and compiled on CPUs); anything else
        # (and the compiled step on CUDA) through the model's own forward.
        self.fast = DecodeStep.of(model)
        options, step = dict(COMPILE_OPTIONS), _decode
        if compile and device.type == "cuda":  # CUDA graphs: one launch per step instead of one per kernel
            options.setdefault("mode", "reduce-overhead")
            torch._dynamo.mark_static_address(self.cache.k)  # updated in place: graphs may keep pointers
            torch._dynamo.mark_static_address(self.cache.v)
        elif compile and self.fast is not None:  # CPUs: the fast step's ops, fused, called from C++
            step = _fast_decode(self.fast, self.cache)
            options["options"] = {**options.get("options", {}), **FAST_OPTIONS}
        self._step = compiled(step, compile, log, "decoding", **options)

    def warm_up(self) -> int:
        """Compile every (rows, window) shape now, each on free rows (token 0 at position 0, which a row's
        prefill overwrites); return how many (0 eager). A server does this before its first request."""
        if not self.compile:
            return 0
        for rows, window in self.shapes:
            tokens, positions = (torch.zeros(rows, dtype=torch.long, device=self.device) for _ in range(2))
            self._step(self.model, tokens, positions, self.cache, window)  # two tensors: aliasing is guarded
        return len(self.shapes)

    @property
    def positions(self) -> int:
        """Return the positions each row of the cache holds."""
        return self.cache.max_len

    def fits(self, n_rows: int, length: int) -> bool:
        """Return whether n_rows rows, the longest needing length positions, fit the token budget."""
        if self.compile:
            return n_rows <= self.rows and length <= self.positions
        rows = bucket(n_rows, self.max_rows)
        return rows * bucket(max(length, self.positions), self.max_len, MIN_BUCKET) <= self.kv_tokens

    def reserve(self, n_rows: int, length: int) -> None:
        """Grow the cache (keeping rows 0..n_rows-1) to hold n_rows rows of length positions; returns None."""
        rows = max(self.rows, bucket(n_rows, self.max_rows))
        positions = max(self.positions, bucket(length, self.max_len, MIN_BUCKET))
        if rows * positions > self.kv_tokens:  # trade rows held for nobody for positions
            rows = bucket(n_rows, self.max_rows)
        if rows == self.rows and positions == self.positions:
            return
        old = self.cache
        self.cache = self._allocate(rows, positions, "decoding")
        keep = min(self.rows, rows, n_rows)
        self.cache.k[:, :keep, :, : old.max_len] = old.k[:, :keep]
        self.cache.v[:, :keep, :, : old.max_len] = old.v[:, :keep]
        self.rows = rows

    def _allocate(self, rows: int, positions: int, what: str) -> KVCache:
        """Return a new KVCache of rows x positions; QingLMError when it is larger than this machine's memory."""
        need = kv_cache_bytes(self.model.cfg, rows, positions, self.dtype.itemsize)
        check_bytes(need, f"{what} {rows:,} rows of up to {positions:,} tokens at once", memory_bytes())
        return KVCache(self.model.cfg, rows, positions, self.device, self.dtype)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first length positions of row src into row dst (filling a finished row); returns None."""
        self.cache.k[:, dst, :, :length] = self.cache.k[:, src, :, :length]
        self.cache.v[:, dst, :, :length] = self.cache.v[:, src, :, :length]

    def store(self, rows: list[int], scratch: KVCache, src: list[int], length: list[int]) -> None:
        """Copy prefilled keys/values: scratch row src[i]'s first length[i] positions into row rows[i]."""
        for dst, s, n in zip(rows, src, length):
            self.cache.k[:, dst, :, :n] = scratch.k[:, s, :, :n]
            self.cache.v[:, dst, :, :n] = scratch.v[:, s, :, :n]

    def decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, longest: int, aligned: bool = False
    ) -> torch.Tensor:
        """Return the logits (n, vocab) of one token per row 0..n-1 at its position; longest = max position + 1;
        aligned: every row is at the same position (eager, that step needs no mask).

        Compiled, rows and window are bucketed (the extra rows are free rows: what they compute is
        thrown away); eager, the step runs on exactly n rows and the window the rows need.
        """
        n = tokens.size(0)
        if not self.compile and self.fast is not None and not self.fast.hooked():
            return self.fast(tokens, positions, self.cache, longest)
        if not self.compile and aligned:  # every row at position longest-1: no mask, plain attention
            view = self.cache.first_rows(n)
            return self.model(tokens[:, None], cache=view, start=longest - 1, last_only=True)[:, -1]
        if not self.compile:
            return self._step(self.model, tokens, positions, self.cache, longest)
        rows = bucket(n, self.rows)
        window = bucket(longest, self.positions, WINDOW, 4)
        if rows > n:  # free rows decode token 0 at position 0 of their own row
            tokens = torch.cat([tokens, tokens.new_zeros(rows - n)])
            positions = torch.cat([positions, positions.new_zeros(rows - n)])
        step = _decode if self.fast is not None and self.fast.hooked() else self._step  # hooks run eagerly
        if step is self._step and self.fast is not None:
            self.fast.layout.refresh()  # the compiled step reads the weights' copies
        return step(self.model, tokens, positions, self.cache, window)[:n]

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Return the logits (n, T, vocab) of T tokens (n, T) per row 0..n-1 from its position (n,): a draft
        verified (qinglm.infer.speculate). Eager, through the fast step when the model has one."""
        window = int(positions.max()) + tokens.size(1)
        return tokens_logits(self.model, self.fast, tokens, positions, self.cache, window)

    def prefill(
        self, prompts: list[list[int]], scratch: KVCache | None, start: int, end: int
    ) -> tuple[KVCache, torch.Tensor]:
        """Run positions start..end-1 of right-padded prompts into scratch (made when None).

        Return (scratch, logits (len(prompts), vocab) at each prompt's last position, meaningful for
        the prompts that end in this chunk).
        """
        width = max(len(p) for p in prompts)
        if scratch is None:
            scratch = self._allocate(len(prompts), width, "prefilling")
        ids = torch.tensor(
            [p[start:end] + [0] * (end - start - len(p[start:end])) for p in prompts],
            dtype=torch.long,
            device=self.device,
        )
        last = torch.tensor([min(max(len(p) - 1 - start, 0), end - start - 1) for p in prompts])
        logits = self.model(ids, cache=scratch, start=start, last_only=last.to(self.device))
        return scratch, logits[:, -1]


def _decode(
    model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, window: int
) -> torch.Tensor:
    """Return the logits (B, vocab) of one decoding step: token b at positions[b] in row b of cache."""
    return model(tokens[:, None], cache=cache, start=positions, last_only=True, window=window)[:, -1]


_N_STEPS = itertools.count()


def _fast_decode(fast: DecodeStep, cache: KVCache) -> Callable:
    """Return _decode's function on fast's step, traced (it writes the cache itself, not views of it).

    The function has a code object of its own: dynamo keeps compiled graphs per code object, so this
    engine's graphs are checked only against its own calls (_step_guards skips the weights' guards).
    """
    fast.traced = True

    def decode(model, tokens: torch.Tensor, positions: torch.Tensor, cache, window: int) -> torch.Tensor:
        return fast._step(tokens, positions, cache, window)

    decode.__code__ = decode.__code__.replace(co_name=f"decode_{next(_N_STEPS)}")
    return decode
