"""Device and precision choices shared by training, evaluation and generation."""

from __future__ import annotations

import contextlib

import torch

from qinglm.errors import QingLMError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for 'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps'."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QingLMError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise QingLMError("--device mps was asked for but MPS is not available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise QingLMError(f"unknown device {name!r}; use auto, cpu, cuda or mps") from None


def resolve_dtype(name: str, device: torch.device) -> str:
    """Return the compute precision for 'auto': bf16 on CUDA GPUs that support it, fp32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if name not in DTYPES:
        raise QingLMError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    if name == "fp16" and device.type == "cpu":
        raise QingLMError("fp16 is not supported on the CPU; use --dtype bf16 or fp32")
    return name


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Return the mixed-precision context for dtype (a no-op for fp32); weights stay fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])
