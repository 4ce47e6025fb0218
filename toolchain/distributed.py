"""Devices and data-parallel helpers over torch.distributed (launch with torchrun; see docs/scaling.md).

Where things run (issue 16):
  * `resolve_device("cpu" | "cuda" | "cuda:N" | "auto")` picks the one device a process trains on,
    and rejects what cannot work (no GPU, a GPU index the machine lacks, more torchrun processes on a
    node than GPUs) with a ToolchainError before any work. Under torchrun, "cuda" / "auto" mean
    cuda:LOCAL_RANK: one GPU per process.
  * The network, its masks / hash tables / factors, and the optimiser state live on that device
    for the whole run (toolchain.driver moves the network there once; a checkpoint is read to the
    CPU and moved there, so it resumes on either kind of device and any process count).
  * `init_from_env()` joins the process group torchrun describes with the backend for that device
    (`backend_for`): "gloo" for CPU processes; "cpu:gloo,cuda:nccl" for GPU processes, so every
    collective runs on the device its tensors live on: NCCL for the GPU-resident weights, buffers
    and gradients, gloo for host-side ones (barriers, object collectives, anything left on the CPU).

Without torchrun's variables `init_from_env()` does nothing, and every helper here degrades to the
single-process case (rank 0 of 1, collectives are no-ops), so the same code runs with or without torchrun.
"""
from __future__ import annotations

import os
import re
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ToolchainError

_device: torch.device | None = None

DEVICE_CHOICES = "cpu, cuda, cuda:N or auto"


def _torchrun_env() -> dict[str, int] | None:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE as integers, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        return {"rank": int(os.environ["RANK"]), "world": world, "local": int(os.environ.get("LOCAL_RANK", "0")),
                "local_world": int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))}
    except ValueError:
        raise ToolchainError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device this process trains on, from "cpu", "cuda", "cuda:N", "auto" (None = "auto").

    "auto" is the GPU when there is one, else the CPU. Under torchrun, "cuda" and "auto" (on a
    machine with GPUs) give cuda:LOCAL_RANK and need as many GPUs as processes on the node. Raises
    ToolchainError, without touching any GPU, for a malformed value, "cuda" without a GPU, an index
    the machine does not have, or more torchrun processes on a node than GPUs.
    """
    if spec is None:
        spec = "auto"
    text = str(spec).strip().lower()
    m = re.fullmatch(r"(cpu|cuda|auto)(?::(\d+))?", text)
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ToolchainError(f"device {str(spec)!r} is not one of {DEVICE_CHOICES}")
    kind, index = m.group(1), (int(m.group(2)) if m.group(2) is not None else None)
    if kind == "cpu":
        return torch.device("cpu")
    n_gpu = _gpu_count()
    if kind == "auto":
        if n_gpu == 0:
            return torch.device("cpu")
    elif n_gpu == 0:
        raise ToolchainError(f"device {text!r}: no CUDA GPU is available (torch.cuda.is_available() is False"
                             f"{'' if torch.version.cuda else '; this torch build has no CUDA'}); "
                             "use --device cpu or auto")
    env = _torchrun_env()
    if env is None:
        index = 0 if index is None else index
        if index >= n_gpu:
            raise ToolchainError(f"device {text!r}: this machine has {n_gpu} GPU(s) (cuda:0"
                                 f"{f' to cuda:{n_gpu - 1}' if n_gpu > 1 else ''})")
        return torch.device("cuda", index)
    if index is not None:
        raise ToolchainError(f"device {text!r}: under torchrun each process uses the GPU cuda:LOCAL_RANK; "
                             "pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if env["local_world"] > n_gpu or env["local"] >= n_gpu:
        raise ToolchainError(f"torchrun started {max(env['local_world'], env['local'] + 1)} processes on this node "
                             f"but it has {n_gpu} GPU(s); use --nproc-per-node {n_gpu} or fewer, "
                             "or --device cpu for CPU processes")
    return torch.device("cuda", env["local"])


def backend_for(devices) -> str:
    """The torch.distributed backend string for processes computing on `devices` (device kinds or names).

    CPU only: "gloo". Any GPU: "cpu:gloo,cuda:nccl", one process group with NCCL for CUDA tensors
    and gloo for CPU tensors, so a collective runs wherever its tensors are.
    """
    if isinstance(devices, (str, torch.device)):
        devices = [devices]
    kinds = {torch.device(d).type for d in devices}
    if not kinds:
        raise ValueError("no devices given")
    unknown = kinds - {"cpu", "cuda"}
    if unknown:
        raise ToolchainError(f"no distributed backend for device type {sorted(unknown)[0]!r} (cpu, cuda)")
    return "cpu:gloo,cuda:nccl" if "cuda" in kinds else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = 1800, device: str | torch.device | None = "auto") -> bool:
    """Join the process group torchrun describes; returns True when running distributed.

    A no-op returning False when the process was not launched by torchrun (no RANK / WORLD_SIZE).
    `device` ("auto", "cpu", "cuda", or one already resolved) sets this process's device (see
    resolve_device) and, unless `backend` is given, the backend (see backend_for).
    """
    global _device
    if dist.is_available() and dist.is_initialized():
        return True
    env = _torchrun_env()
    if env is None:
        return False
    if not dist.is_available():
        raise ToolchainError("this torch build has no torch.distributed support")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ToolchainError(f"RANK/WORLD_SIZE are set but {' and '.join(missing)} are not; launch with torchrun")
    if not (0 <= env["rank"] < env["world"]):
        raise ToolchainError(f"RANK {env['rank']} is outside WORLD_SIZE {env['world']}")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    backend = backend or backend_for([dev])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _device = dev
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
    """This process's training device under torchrun (set by init_from_env), else the CPU."""
    if not is_distributed():
        return torch.device("cpu")
    if _device is not None:
        return _device
    return torch.device("cuda", torch.cuda.current_device()) if "nccl" in dist.get_backend() else torch.device("cpu")


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
    """Sum numbers (a list or scalar) or a tensor over all ranks; returns the same kind it was given.

    A tensor is summed on the device it lives on (a new tensor; the argument is left as it was).
    """
    if isinstance(values, torch.Tensor):
        if not is_distributed():
            return values
        t = values.clone()
        dist.all_reduce(t)
        return t
    scalar = not isinstance(values, (list, tuple))
    t = torch.tensor([values] if scalar else list(values), dtype=torch.float64)
    if is_distributed():
        t = t.to(device())
        dist.all_reduce(t)
    out = [int(v) if isinstance(orig, int) else float(v)
           for v, orig in zip(t.cpu().tolist(), [values] if scalar else values)]
    return out[0] if scalar else out


def broadcast_module_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy every buffer (pruning masks, hash indices, running statistics) from rank `src` to all ranks.

    Each tensor is broadcast on the device it lives on (NCCL for GPU tensors, gloo for CPU ones).
    """
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
