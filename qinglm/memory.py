"""Refusing a model, or a batch, larger than memory in one line, before (or while) allocating it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qinglm.config import ModelConfig
from qinglm.errors import QingLMError
from qinglm.limits import check_bytes
from qinglm.limits import memory_bytes as _memory_bytes  # a name tests replace
from qinglm.model.transformer import Transformer


def logits_bytes(cfg: ModelConfig, rows: int, tokens: int) -> int:
    """Return the bytes of the float32 logits a training loss takes over rows x tokens positions: a lower
    bound of a micro-batch's memory (its activations and gradients come on top)."""
    return rows * tokens * cfg.vocab_size * 4


def kv_cache_bytes(cfg: ModelConfig, rows: int, slots: int, element_size: int = 2) -> int:
    """Return the bytes of a decode's KV cache for rows x slots positions (qinglm.model.transformer.KVCache)."""
    n_kv_heads = cfg.n_kv_heads or cfg.n_heads
    return 2 * cfg.n_layers * rows * n_kv_heads * slots * (cfg.d_model // cfg.n_heads) * element_size


def check_fits(cfg: ModelConfig, batch_bytes: int = 0, batch: str = "") -> str:
    """Return a description of the model's size; raise QingLMError when it, plus batch_bytes (what the
    sizes of a batch, described by batch, need at least), is larger than this machine's memory.

    The size is measured on the meta device (no memory), so a config with an absurd vocab_size or
    max_seq_len, or a batch of absurd size, is refused in one line instead of failing (or being killed)
    while allocating.
    """
    with torch.device("meta"):
        shape = Transformer(cfg)
    need = sum(t.numel() * t.element_size() for t in (*shape.parameters(), *shape.buffers()))
    c = shape.cfg
    size = (
        f"a model of {shape.param_counts()['total']:,} parameters (vocab_size {c.vocab_size:,}, "
        f"d_model {c.d_model:,}, n_layers {c.n_layers:,}, max_seq_len {c.max_seq_len:,}) "
        f"needs {need / 2**30:,.1f} GiB"
    )
    ram = _memory_bytes()
    if ram is not None and need > ram:
        raise QingLMError(f"{size}, more than this machine's {ram / 2**30:.1f} GiB; check the config")
    check_bytes(need + batch_bytes, f"{batch} (with the model)", ram)
    return size


@contextlib.contextmanager
def allocating(cfg: ModelConfig) -> Iterator[None]:
    """Return a context for building the model of cfg: a model larger than memory is refused before, and a
    failed allocation inside is raised as QingLMError."""
    size = check_fits(cfg)
    try:
        yield
    except (RuntimeError, MemoryError) as e:  # torch: "can't allocate memory", "CUDA out of memory"
        if isinstance(e, MemoryError) or "allocate" in str(e):
            raise QingLMError(f"{size}, and allocating it failed; check the config") from None
        raise
