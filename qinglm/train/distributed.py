"""Multi-process training under torchrun: the process group, DDP / FSDP2 wrapping, and agreeing across ranks.

torchrun gives every process RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without
them (or with WORLD_SIZE 1) a Dist is "single" and every helper here is a no-op, so one training
loop serves one device and many. NCCL on CUDA, gloo on the CPU. Only rank 0 logs and writes files;
all ranks take part in the collectives (including gathering FSDP shards before rank 0 saves).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn as nn

from qinglm.errors import QingLMError
from qinglm.train.metrics import MetricsLogger

# Rank 0 may train a tokenizer and prepare the data while the others wait at a barrier.
GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass
class Dist:
    """Where this process stands among the training processes; mode is "single", "ddp" or "fsdp"."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    mode: str = "single"
    owns_group: bool = False  # this process created the process group, so it destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """Return WORLD_SIZE as set by torchrun, or 1 outside it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_available() -> bool:
    """Return True when this torch has FSDP2 (torch.distributed.fsdp.fully_shard)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def init(device: torch.device, parallel: str = "auto") -> Dist:
    """Return this process's Dist, joining (or reusing) the torchrun process group when WORLD_SIZE > 1."""
    world_size = env_world_size()
    if world_size <= 1:
        return Dist()
    if device.type not in ("cuda", "cpu"):
        raise QingLMError(f"multi-process training runs on CUDA (NCCL) or the CPU (gloo), not {device.type}")
    if parallel == "fsdp" and not fsdp_available():
        raise QingLMError(f"torch {torch.__version__} has no FSDP2 (fully_shard); use --parallel ddp")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not tdist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, timeout=GROUP_TIMEOUT)
    mode = "fsdp" if parallel == "fsdp" else "ddp"
    return Dist(rank, world_size, local_rank, mode, owns)


def teardown(d: Dist) -> None:
    """Return nothing; destroy the process group if this Dist created it."""
    if d.owns_group and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def group(d: Dist) -> Iterator[Dist]:
    """Return a context that tears the process group down at its end when d created it.

    On a normal exit the ranks first meet at a barrier, so none destroys its gloo/NCCL connections
    while another still uses them (gloo can abort the process then); after an error, no waiting.
    """
    try:
        yield d
        if d.owns_group and tdist.is_initialized():
            tdist.barrier()
            if d.rank == 0 and d.world_size > 1:
                # A rank returns from the barrier before the others have read its last message; if
                # rank 0 closed its connections at once, a peer still reading would abort (gloo,
                # SIGABRT, about 1 run in 10 here). The others leave first; rank 0 tears down after.
                time.sleep(0.5)
    finally:
        teardown(d)


def local_device(d: Dist, device: torch.device) -> torch.device:
    """Return the device of this rank: cuda:LOCAL_RANK for a CUDA run under torchrun, else device."""
    if d.enabled and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def wrap(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """Return the module to call for training: model itself, DDP(model), or model sharded in place by FSDP2.

    FSDP2 shards each block and then the rest (embeddings, final norm, head), so a block's weights
    are gathered only while it runs.
    """
    if d.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # A MoE layer may route no token to some expert in a micro-batch: its weights get no gradient.
        unused = getattr(model.cfg, "n_experts", 0) > 0
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)
    if d.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (d.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def grad_sync(wrapped: nn.Module, d: Dist, sync: bool) -> Iterator[None]:
    """Return a context in which forward + backward sync gradients across ranks only when sync is True.

    Micro-batches before the last of a step skip the all-reduce (DDP no_sync) or reduce-scatter
    (FSDP2 set_requires_gradient_sync); the last one syncs the accumulated gradients once.
    """
    if d.mode == "ddp" and not sync:
        with wrapped.no_sync():
            yield
        return
    if d.mode == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
    yield


def mean(d: Dist, value: torch.Tensor) -> torch.Tensor:
    """Return the mean of a tensor over all ranks (value itself on one process)."""
    if not d.enabled:
        return value
    out = value.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out / d.world_size


def agree_max(d: Dist, values: list[float], device: torch.device) -> list[float]:
    """Return the element-wise maximum of `values` over all ranks, so every rank takes the same decision."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return t.tolist()


def agree_sum(d: Dist, value: int, device: torch.device) -> int:
    """Return the sum of an integer over all ranks (value itself on one process)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return int(t.item())


def broadcast_object(d: Dist, obj: Any) -> Any:
    """Return rank 0's obj on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    """Return nothing once every rank has reached this point."""
    if d.enabled:
        tdist.barrier()


class SilentMetrics(MetricsLogger):
    """The metrics of ranks other than 0: records are built and returned but written nowhere."""

    def log(self, kind: str, **values: Any) -> dict[str, Any]:
        return {"kind": kind, **values}

    def truncate_after(self, step: int) -> None:
        pass


def metrics_for(d: Dist, run_dir: Any) -> MetricsLogger:
    """Return the metrics logger of this rank: the real one on rank 0, a silent one elsewhere."""
    return MetricsLogger(run_dir) if d.is_main else SilentMetrics(run_dir)


# ---------------------------------------------------------------------------- FSDP full states


def full_model_tensors(model: nn.Module, d: Dist) -> dict[str, torch.Tensor] | None:
    """Return the whole (unsharded) weights on CPU, each shared tensor once, on rank 0 of an FSDP run.

    Collective: every rank must call it. Other ranks get {}. Returns None when the model is not
    sharded, and the caller saves the module itself.
    """
    if d.mode != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied head is the embedding under a second name: keep the first name only, as save_model_file does.
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {
        n for n, _ in model.named_parameters()
    }
    return {k: v.contiguous() for k, v in full.items() if k not in aliases}


def _map_tensors(obj: Any, fn: Any) -> Any:
    """Return obj (nested dicts/lists of a state dict) with fn applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    return obj


def full_optimizer_state(optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """Return optimizer.state_dict() with every sharded tensor gathered whole onto the CPU.

    The result has the format of a single-process run, so a run can resume with any number of
    processes and either parallel mode. Collective under FSDP: every rank must call it.
    """
    sd = optimizer.state_dict()
    if d.mode != "fsdp":
        return sd
    from torch.distributed.tensor import DTensor

    return _map_tensors(sd, lambda t: t.full_tensor().cpu() if isinstance(t, DTensor) else t)


def shard_optimizer_state(sd: dict[str, Any], optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """Return a whole optimizer state dict with the tensors of sharded parameters cut into this rank's shards."""
    if d.mode != "fsdp":
        return sd
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for idx, entry in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape
            else v
            for k, v in entry.items()
        }
    return {**sd, "state": state}
