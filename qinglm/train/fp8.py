"""FP8 training on Hopper-class GPUs (``--fp8``) through torchao's float8 training.

torchao swaps the chosen ``nn.Linear`` modules for ``Float8Linear``: the forward and both backward
matmuls run in float8 with dynamic per-tensor scales, while the weights, the optimizer state and so
the checkpoints and exports stay in their usual precision (same parameter names, same tensors).
Only the Linear layers inside the Transformer blocks are converted; the embedding, the (tied or
untied) output head, the MoE router and any matrix whose sides are not multiples of 16 (what the
float8 matmul needs) stay in bf16. Compile fuses the scaling and casting kernels, so use it with
``--compile`` (the CUDA default). With FSDP, convert before sharding (done here, before wrapping).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from qinglm.errors import QingLMError

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (sm_89) and Hopper (sm_90) or newer


def fp8_refusal(device: torch.device, dtype: str) -> str | None:
    """Return why --fp8 cannot run here (one line), or None when it can."""
    if device.type != "cuda":
        return f"--fp8 needs an NVIDIA GPU with float8 tensor cores (Ada/Hopper or newer); this run is on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"--fp8 needs compute capability 8.9 or newer (Ada/Hopper); {name} has {cap[0]}.{cap[1]}"
    if dtype != "bf16":
        return f"--fp8 runs the rest of the model in bf16; use --dtype bf16 (or auto), not {dtype}"
    return None


def fp8_filter(module: nn.Module, fqn: str) -> bool:
    """Return True for the Linear layers that become float8: block matrices with sides divisible by 16."""
    if not isinstance(module, nn.Linear) or not fqn.startswith("blocks."):
        return False
    if fqn.endswith(".router") or fqn.endswith(".gate"):  # tiny routing/gating matrices: not worth it
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_fp8(model: nn.Module) -> int:
    """Return the number of Linear layers converted in place to torchao's Float8Linear (tensorwise scaling)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise QingLMError("--fp8 needs torchao: pip install 'qinglm[fp8]' (or pip install torchao)") from None
    chosen = [name for name, m in model.named_modules() if fp8_filter(m, name)]
    if not chosen:
        raise QingLMError(
            "--fp8: no Linear layer of this model has sides divisible by 16; nothing to convert"
        )
    convert_to_float8_training(model, module_filter_fn=fp8_filter, config=Float8LinearConfig())
    for name in chosen:
        model.get_submodule(name).__class__ = _autocast_safe(type(model.get_submodule(name)))
    return len(chosen)


@functools.cache
def _autocast_safe(float8_linear: type) -> type:
    """Return a Float8Linear subclass that also runs eagerly under autocast (validation, sampling).

    Eagerly, autocast casts torch.mm's float8 operands back to bf16, which torchao's float8 tensor
    refuses ("attempting to run aten.to.dtype"); compiled, the same module works. So outside
    compilation the input is cast to the autocast dtype and autocast is switched off around the
    module: the float8 matmul then returns that dtype, as autocast would have.
    """

    class AutocastSafeFloat8Linear(float8_linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            kind = x.device.type
            if torch.compiler.is_compiling() or not torch.is_autocast_enabled(kind):
                return super().forward(x)
            with torch.autocast(kind, enabled=False):
                return super().forward(x.to(torch.get_autocast_dtype(kind)))

    return AutocastSafeFloat8Linear


def enable_fp8(model: nn.Module, device: torch.device, dtype: str, log=print) -> None:
    """Return nothing; convert model for float8 training, or raise QingLMError saying why it cannot."""
    why = fp8_refusal(device, dtype)
    if why:
        raise QingLMError(why)
    n = convert_to_fp8(model)
    log(f"fp8: {n} block Linear layers train with float8 matmuls (torchao); embeddings and head stay bf16")
