"""Lower-precision weights for inference: ``quantize(model, "int8")`` (CPU) or ``quantize(model, "bf16")``.

Every ``nn.Linear`` of the model (attention, MLP, the output head) becomes an ``Int8Linear``: its
weight is stored as int8 with one scale per output channel (symmetric, scale = max|row| / 127), and
the matmul runs in ``torch._weight_int8pack_mm`` with bf16 activations, which dequantizes inside the
kernel. The embedding table, norms and biases stay in fp32, so a tied head keeps an exact embedding.

Why this and not the alternatives (measured on the 2-core AVX512-BF16 CPU, 1 thread, with
benchmarks/inference.py; decode is memory-bound at small batch, so bytes per weight decide):
- ``torch.ao.quantization.quantize_dynamic`` is deprecated in current torch (to be replaced by
  torchao, an extra dependency); QingLM needs neither.
- ``_weight_int8pack_mm`` with fp32 activations has no fast CPU path (several times slower than an
  fp32 matmul); with bf16 activations it reads 1 byte per weight instead of 4 (fp32) or 2 (bf16).
- Dequantizing to fp32 on the fly before ``F.linear`` rebuilds the fp32 weight every call: slower
  than not quantizing at all.
- bf16 weights (``model.to(torch.bfloat16)``) halve the bytes: 1.0-1.5x fp32's decode speed.
- torchao 0.18's ``Int8WeightOnlyConfig`` (the issue-23 engine, batch 1, 128 greedy tokens, 2026-12-07): tiny
  531 tok/s eager / 1,053 compiled against 1,457 / 2,070 here (1 thread); small 70 / 178 against 489 / 720
  (1 thread) and 127 / 359 against 620 / 994 (2 threads). Its int4 weight-only has no CPU kernel in that
  version (plain needs the mslk package, plain_int32 refuses the CPU). So this module's kernel stays.
Measured: int8 decodes 2.1x (tiny) / 2.7x (small) faster than fp32 at batch 1 and 1.6x / 2.1x at
batch 8, and changes the val BPC of a trained tiny model from 5.7229 to 5.7234 (+0.0005; bf16
weights: -0.0001). Quantized models are for inference only (no gradients).

``"bf16"`` casts every weight to bfloat16 (any device). On a CPU with AMX (``amx_bf16`` in /proc/cpuinfo) a
bf16 GEMM of 8-32 rows runs on the tile unit: small's 30k x 256 head at 32 rows takes 1.7 ms against fp32's
5.9 ms with the caches cold (2.9 vs 7.9 ms at 8 rows), where the int8 kernel is no faster than fp32 (it wins at
1 row: 1.1 vs 2.0 ms). Through the engine (benchmarks/decode.py, greedy, 64 tokens, against the old engine in
fp32): compiled bf16 decodes small's batches of 8/32 2.3-3.1x the old engine (fp32 compiled: 1.6-1.9x) and
tiny's 1.6-3.3x; eager bf16 gains less, and on tiny at 8 rows nothing (its small ops pay for the casts). So:
int8 for one request at a time on a CPU, bf16 with --compile for batches (a server, evals) and on GPUs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qinglm.config import QUANTIZATIONS
from qinglm.errors import QingLMError

METHODS = QUANTIZATIONS


class Int8Linear(nn.Module):
    """A Linear layer with int8 weights and one bf16 scale per output channel; computes x @ W.T + b."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        # The CPU kernel reads the reduction dimension 16 at a time (other sizes crash it): pad with zeros.
        self.pad = -self.in_features % 16
        w = F.pad(w, (0, self.pad))  # (out_features, in_features + pad)
        exact = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out_features,)
        # The kernel dequantizes with a bf16 scale, so quantize with that same scale; rounded up where
        # bf16 rounds down, so the largest weight of a row still fits in 127 steps.
        scale = exact.to(torch.bfloat16)
        scale = torch.where(
            scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, 1e30)), scale
        )
        self.register_buffer(
            "qweight", torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        )
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (rows, in_features)
        x2 = F.pad(x2, (0, self.pad)) if self.pad else x2.contiguous()
        y = torch._weight_int8pack_mm(x2, self.qweight, self.scale)  # (rows, out_features), bf16
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize(model: nn.Module, method: str = "int8") -> nn.Module:
    """Return model with its Linear layers replaced in place by the method's layers ("none": unchanged).

    The model is put in eval mode; quantizing is for CPU inference and cannot be undone.
    """
    if method not in METHODS:
        raise QingLMError(f"unknown quantization {method!r}; choose one of {', '.join(METHODS)}")
    if method == "none":
        return model
    if method == "bf16":  # every weight, on any device; the engine's step runs in bf16 throughout
        return model.to(torch.bfloat16).eval()
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise QingLMError("int8 quantization is for CPU inference; load the model with --device cpu")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return model.eval()
