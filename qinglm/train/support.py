"""Which training set-ups run: the one table of refused combinations, checked before any process starts.

A set-up is a stage with a parallel mode, LoRA or not, a device, a dtype, compile on or off and an
optimizer. Every combination not refused by a line of REFUSED is supported: the engine runs it, and
tests/test_support.py walks the whole product (running one of each code path on two processes). Add a
line here, not a check in a stage, when a combination cannot work; remove it when it can.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from qinglm.errors import QingLMError
from qinglm.run_dir import KINDS
from qinglm.train import config

STAGES = tuple(k for k in KINDS if k not in ("import", "merge"))  # the kinds of run that training writes
PARALLEL = ("single", "ddp", "fsdp")  # single: one process; ddp, fsdp: several under torchrun
DEVICES = tuple(d for d in config.DEVICES if d != "auto")
DTYPES = tuple(d for d in config.DTYPES if d != "auto")
OPTIMIZERS = tuple(config.OPTIMIZERS)
LORA_STAGES = ("sft", "dpo")  # the stages whose config has --lora


@dataclass(frozen=True)
class Setup:
    """One combination, every choice resolved (no "auto")."""

    stage: str
    parallel: str
    lora: bool
    device: str
    dtype: str
    compile: bool
    optimizer: str = "adamw"

    def __str__(self) -> str:
        lora = " + LoRA" if self.lora else ""
        return (
            f"{self.stage}{lora}, {self.parallel}, {self.device} {self.dtype}, "
            f"compile {'on' if self.compile else 'off'}, {self.optimizer}"
        )


# (refused when, the one line saying why and what to do instead); the first matching line is given.
REFUSED: tuple[tuple[Callable[[Setup], bool], str], ...] = (
    (lambda s: s.lora and s.stage not in LORA_STAGES, "LoRA trains in sft and dpo only"),
    (
        lambda s: s.device == "mps" and s.parallel != "single",
        "multi-process training runs on CUDA (NCCL) or the CPU (gloo), not mps; drop --nproc",
    ),
    (
        lambda s: s.device == "cpu" and s.dtype == "fp16",
        "fp16 is not supported on the CPU; use --dtype bf16 or fp32",
    ),
    (
        lambda s: s.stage == "grpo" and s.parallel == "fsdp",
        "grpo samples replies with the whole model on each process; use --parallel ddp",
    ),
    (
        lambda s: s.parallel == "fsdp" and s.optimizer != "adamw",
        "--parallel fsdp works with --optimizer adamw; use --parallel ddp for Muon",
    ),
)


def refusal(s: Setup) -> str | None:
    """Return why set-up s is not supported (one line), or None when it is."""
    return next((why for refused, why in REFUSED if refused(s)), None)


def every_setup() -> Iterator[Setup]:
    """Yield every combination of the table's dimensions."""
    for combo in itertools.product(
        STAGES, PARALLEL, (False, True), DEVICES, DTYPES, (False, True), OPTIMIZERS
    ):
        yield Setup(*combo)


def setup_of(stage: str, cfg: Any) -> Setup:
    """Return the set-up a run of stage with config cfg (an EngineConfig) will have, "auto" resolved here
    as the engine resolves it; the processes are --nproc's, or torchrun's WORLD_SIZE inside a worker."""
    from qinglm.device import resolve_compile, resolve_device, resolve_dtype
    from qinglm.train.distributed import env_world_size

    device = resolve_device(cfg.device)  # one line when the device is missing
    dtype = resolve_dtype("auto", device) if cfg.dtype == "auto" else cfg.dtype  # the table refuses
    processes = max(cfg.nproc, env_world_size())
    parallel = "single" if processes <= 1 else ("fsdp" if cfg.parallel == "fsdp" else "ddp")
    return Setup(
        stage,
        parallel,
        bool(getattr(cfg, "lora", False)),
        device.type,
        dtype,
        resolve_compile(cfg.compile, device),
        cfg.optimizer,
    )


def check_supported(stage: str, cfg: Any) -> None:
    """Return nothing when the run of stage with cfg is a supported set-up; else raise QingLMError (one line)."""
    s = setup_of(stage, cfg)
    why = refusal(s)
    if why is not None:
        raise QingLMError(f"{why} (not supported: {s})")
