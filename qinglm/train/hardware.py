"""What this machine does for training, measured or estimated without a run: a shape's tokens per second (timed
as the run would train), the speed line through a few timed shapes, and a run's peak memory. Used by
qinglm.train.budget (`qinglm plan`, `qinglm train --budget`)."""

from __future__ import annotations

import time
from collections.abc import Callable

from qinglm.config import ModelConfig

# Sustained training FLOP/s assumed for --device cuda when no GPU is here to time: about a third of an
# A100's bf16 peak, what small models reach (they cannot fill the GPU).
ASSUMED_CUDA_FLOPS = 1e14
# A CPU run's resident memory beyond its tensors: the interpreter, torch, inductor and the prepared data (measured:
# 0.67-0.75 GB in three `qinglm train --budget` runs of dials 2-3, benchmarks/README.md "`qinglm plan` against the
# run it describes"; torch alone is 0.21 GiB).
CPU_PROCESS_BYTES = 700 * 2**20


def time_training_steps(
    cfg: ModelConfig, device: str, seconds: float, rows: int, seq_len: int = 256, compile: bool = False
) -> float:
    """Return tokens/s of training steps (forward, backward, AdamW) of a fresh cfg model on rows x seq_len
    tokens for about seconds, after one untimed step (which compiles); in the precision training would use,
    torch.compile'd when compile (compiling costs seconds; the measurement does not count them)."""
    import torch

    from qinglm.device import autocast, compiled, resolve_dtype

    dev = torch.device(device)
    dtype = resolve_dtype("auto", dev)
    torch.manual_seed(0)
    from qinglm.model.transformer import Transformer

    model = Transformer(cfg).to(dev)
    forward = compiled(model, compile, log=lambda _: None, what="timing")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (rows, seq_len), device=dev)

    def step() -> None:
        with autocast(dev, dtype):
            loss = forward(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        step()
        steps, t0 = 0, time.perf_counter()
        while steps == 0 or time.perf_counter() - t0 < seconds:
            step()
            steps += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return steps * x.numel() / (time.perf_counter() - t0)
    finally:
        if compile:  # each shape compiles Transformer.forward anew: keep its recompile count for the run
            torch._dynamo.reset()


def speed_line(flops_per_token: list[float], tokens_per_s: list[float]) -> Callable[[float], float]:
    """Return f(flops_per_token) -> tokens/s through measured points: seconds per token = c0 + c1 x FLOPs per
    token, fitted in least squares (c0, c1 >= 0: a larger model is never faster)."""
    import numpy as np

    f = np.asarray(flops_per_token, dtype=np.float64)
    spt = 1.0 / np.asarray(tokens_per_s, dtype=np.float64)
    if len(set(f.tolist())) < 2:
        c0, c1 = 0.0, float(spt.mean() / f.mean())
    else:
        c1, c0 = np.polyfit(f, spt, 1)
        if c1 <= 0:  # noise on a loaded machine: fall back to pure proportionality
            c0, c1 = 0.0, float((spt / f).mean())
        elif c0 < 0:
            c0, c1 = 0.0, float((spt @ f) / (f @ f))
    return lambda x: 1.0 / (c0 + c1 * float(x))


def training_memory_bytes(cfg: ModelConfig, rows: int, seq_len: int, device: str = "cpu") -> int:
    """Return an estimate of a training run's peak memory: fp32 weights, gradients and AdamW's two moments
    (16 bytes a parameter), the activations autograd keeps (Korthikanti et al. 2022: 34 bytes per d_model value
    a token per block at 16-bit, twice that in fp32; attention by SDPA without the T^2 scores), the logits with
    their softmax and gradient (3 x vocab float32 values a token), with dropout on a CPU its masks (a byte per
    kept-key flag, T per head a token, held twice at the end of the forward, and one per residual value:
    qinglm.model.dropout), and on a CPU the process itself (the run's peak is its resident memory: torch,
    the compiler, the data; CPU_PROCESS_BYTES)."""
    import torch

    from qinglm.device import resolve_dtype
    from qinglm.model.transformer import Transformer

    with torch.device("meta"):
        params = Transformer(cfg).param_counts()["total"]
    tokens = rows * seq_len
    half = device != "cpu" or resolve_dtype("auto", torch.device("cpu")) == "bf16"  # autocast's precision
    act = 34 if half else 68
    process = CPU_PROCESS_BYTES if device == "cpu" else 0
    masks = (
        cfg.n_layers * (2 * cfg.n_heads * seq_len + 2 * cfg.d_model) * tokens
        if cfg.dropout and device == "cpu"
        else 0
    )
    return (
        process
        + 16 * params
        + act * cfg.n_layers * cfg.d_model * tokens
        + 12 * cfg.vocab_size * tokens
        + masks
    )


def device_memory_bytes(device: str) -> int | None:
    """Return the memory a training run on device may use: the GPU's total memory for CUDA (None when no GPU is
    here), this machine's physical memory for a CPU (None where the OS does not say)."""
    import os

    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
