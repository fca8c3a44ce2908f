"""The whole model on rank 0, for the work rank 0 does alone: --eval-tasks, held-out generation, the
weights of best/ and adapter/.

Under FSDP a forward of the sharded model is collective: rank 0 alone running it waits for shards that
the other ranks, waiting elsewhere, never send. So the ranks first gather the full weights together,
and rank 0 puts them into an unsharded copy of the model's structure (a skeleton taken before
sharding, its parameters on the meta device: no memory); it can then run any forward it likes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from qinglm.train import distributed


def skeleton(model: nn.Module) -> nn.Module:
    """Return a copy of model whose parameters are on the meta device (shared ones stay shared);
    its buffers are copied (RoPE tables: not part of the state dict)."""
    memo = {
        id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for p in model.parameters()
    }
    return copy.deepcopy(model, memo)


def materialize(skel: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """Return a copy of skeleton skel holding tensors (a state dict, each shared tensor under its first
    name) on device, in eval mode, frozen."""
    whole = copy.deepcopy(skel)
    new = {
        id(p): nn.Parameter(tensors[name].to(device), requires_grad=False)
        for name, p in whole.named_parameters()
    }
    for m in whole.modules():  # every name of a shared parameter (a tied head) gets the same new one
        for k, p in m._parameters.items():
            if p is not None:
                m._parameters[k] = new[id(p)]
    whole = whole.to(device)  # the buffers
    with torch.no_grad():
        for name, b in whole.named_buffers():
            if name in tensors:  # persistent buffers may have changed since the skeleton was taken
                b.copy_(tensors[name])
    return whole.eval()


def unsharded(
    model: nn.Module, skel: nn.Module | None, d: distributed.Dist, device: torch.device
) -> nn.Module | None:
    """Return the whole (unsharded) model on rank 0 and None on the others: the model itself unless it is
    sharded by FSDP, else a copy built from skel (see skeleton) and the gathered weights.

    Collective under FSDP: every rank must call it, at the same point.
    """
    if d.mode != "fsdp":
        return model if d.is_main else None
    tensors = distributed.full_model_tensors(model, d)
    if not d.is_main:
        return None
    assert skel is not None, "an FSDP run keeps the skeleton of its model on rank 0"
    return materialize(skel, tensors, device)
