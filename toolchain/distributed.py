"""Data-parallel helpers over torch.distributed (launch with torchrun; see docs/scaling.md).

One process per device: `init_from_env()` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and
joins the process group (NCCL on CUDA when GPUs are present, gloo on CPU otherwise). Without
those variables it does nothing, and every helper here degrades to the single-process case
(rank 0 of 1, collectives are no-ops), so the same code runs with or without torchrun.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ToolchainError

_device: torch.device | None = None


def init_from_env(backend: str | None = None, timeout_s: float = 1800) -> bool:
    """Join the process group torchrun describes; returns True when running distributed.

    A no-op returning False when the process was not launched by torchrun (no RANK / WORLD_SIZE).
    `backend` defaults to "nccl" when CUDA is available, else "gloo" (CPU).
    """
    global _device
    if dist.is_available() and dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available():
        raise ToolchainError("this torch build has no torch.distributed support")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ToolchainError(f"RANK/WORLD_SIZE are set but {' and '.join(missing)} are not; launch with torchrun")
    try:
        rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ToolchainError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if not (0 <= rank_ < world):
        raise ToolchainError(f"RANK {rank_} is outside WORLD_SIZE {world}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise ToolchainError(f"LOCAL_RANK {local} but this node has {n_gpu} GPU(s); "
                                 f"use --nproc-per-node {n_gpu} or fewer")
        torch.cuda.set_device(local)
        _device = torch.device("cuda", local)
    else:
        _device = torch.device("cpu")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """True on the process that writes checkpoints and outputs and prints progress (rank 0)."""
    return rank() == 0


def device() -> torch.device:
    """This process's training device: its GPU under NCCL, else the CPU."""
    if not is_distributed():
        return torch.device("cpu")
    if _device is not None:
        return _device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (if any)."""
    global _device
    if is_distributed():
        dist.destroy_process_group()
    _device = None


def shard_bounds(n: int, world: int | None = None, rank_: int | None = None) -> tuple[int, int]:
    """[lo, hi) of rank `rank_`'s contiguous share of n items; shares differ in size by at most one."""
    world = world_size() if world is None else world
    rank_ = rank() if rank_ is None else rank_
    return n * rank_ // world, n * (rank_ + 1) // world


def all_reduce_sum(values):
    """Sum numbers (a list or scalar) or a tensor over all ranks; returns the same kind it was given."""
    if isinstance(values, torch.Tensor):
        if not is_distributed():
            return values
        t = values.to(device())
        dist.all_reduce(t)
        return t.to(values.device)
    scalar = not isinstance(values, (list, tuple))
    t = torch.tensor([values] if scalar else list(values), dtype=torch.float64)
    if is_distributed():
        t = t.to(device())
        dist.all_reduce(t)
    out = [int(v) if isinstance(orig, int) else float(v)
           for v, orig in zip(t.cpu().tolist(), [values] if scalar else values)]
    return out[0] if scalar else out


def broadcast_module_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every buffer (pruning masks, hash indices, running statistics) from rank `src` to all ranks."""
    if is_distributed():
        for b in module.buffers():
            dist.broadcast(b.data, src)


def broadcast_module_state(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer from rank `src` to all ranks (shapes must already agree)."""
    if is_distributed():
        with torch.no_grad():
            for p in module.parameters():
                dist.broadcast(p.data, src)
        broadcast_module_buffers(module, src)


def state_fingerprint(module: nn.Module, values: bool = True) -> torch.Tensor:
    """A fixed-length float64 summary of a module's parameters and buffers (names, shapes, and values)."""
    fp = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for i, (name, t) in enumerate(module.state_dict().items()):
            head = [1.0, float(t.numel() * (i + 1)), float(sum(map(ord, name)) * (i + 1))]
            tail = [0.0, 0.0, 0.0]
            if values:
                v = t.detach().reshape(-1).to(torch.float64)
                w = (torch.arange(v.numel(), device=v.device) % 7 + 1).to(torch.float64)
                tail = [float(v.sum()), float((v * v).sum()), float((v * w).sum())]
            fp += torch.tensor(head + tail, dtype=torch.float64)
    return fp


def check_consistent(module: nn.Module, what: str = "model", values: bool = True) -> None:
    """Raise ToolchainError unless every rank holds the same parameters and buffers (masks included).

    values=False compares only the structure (tensor names and sizes).
    """
    if not is_distributed():
        return
    fp = state_fingerprint(module, values).to(device())
    hi, lo = fp.clone(), fp.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if not torch.equal(hi, lo):
        kind = "weights or masks" if values else "layer structure"
        raise ToolchainError(f"the {what} differs between processes ({kind} diverged across ranks)")


def sync_module_state(module: nn.Module, what: str = "model") -> None:
    """Check every rank has the same layers, then give all of them rank 0's weights and buffers."""
    if is_distributed():
        check_consistent(module, what, values=False)
        broadcast_module_state(module)


def wrap_ddp(model: nn.Module) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when running distributed, else `model` itself.

    DDP broadcasts rank 0's parameters and buffers on construction and averages gradients every
    step; buffers (masks) do not change while training, so they are not re-broadcast every forward.
    """
    if not is_distributed() or world_size() == 1:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = device()
    # torch >= 2.13 names the option forward_sync_buffers (buffers are still synced on construction).
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
               else "broadcast_buffers")
    return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, **{no_sync: False})
