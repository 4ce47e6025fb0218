"""SGD training and retraining loop shared by every pass (Caffe-like solver settings).

One loop serves dense training and compressed retraining: passes hook in through
`regularizer(model) -> loss term` and `after_step(model)` (e.g. re-applying pruning masks).
Checkpoints are written atomically after each epoch and hold model, optimiser, epoch and RNG
state, so a resumed run ends with the same weights as an uninterrupted one.

Training data is either arrays (x, y) or a data source (an object with `__len__` and
`load(batches, seed, epoch)`, e.g. toolchain.data.imagenet.ImageFolderSource) passed as x with y=None.
Under torchrun (after toolchain.distributed.init_from_env()) the same loop runs data-parallel:
`batch_size` is the global batch, each rank loads its contiguous share of every global batch of the
seeded per-epoch permutation, DistributedDataParallel averages the gradients (the loss is scaled so
the update equals the single-process one), only rank 0 writes checkpoints and shows progress, and
the step counter is in global batches, so a checkpoint resumes on any number of processes.

Device and precision: `train(..., device=)` trains on that device ("cpu", "cuda", "cuda:N", "auto";
default: the rank's device under torchrun, else where the model is); checkpoints are read to the CPU
first, so one written on a GPU resumes on a CPU and the other way round. `precision = "bf16"` runs
the forward and loss under torch.autocast (bfloat16 on CUDA and on CPU): only the matmuls and
convolutions compute in bf16; weights, gradients, optimiser state, masks, hash indices and
dictionaries stay exact (fp32 / bool / int64), and no loss scaling is needed for bf16.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as dist_
from .errors import DataError, ToolchainError, TrainingDiverged
from converters.fileio import atomic_path


PRECISIONS = ("fp32", "bf16")


@dataclass
class TrainConfig:
    epochs: float = 10  # may be fractional (e.g. 0.5 epoch of retraining)
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4  # L2, applied by the optimiser
    l1: float = 0.0  # L1 penalty coefficient, added to the loss
    lr_policy: str = "cosine"  # "cosine", "step" (x0.1 at 50%, 75%), "fixed", "inv" (Caffe's)
    augment_shift: int = 0  # random translation of up to this many pixels
    seed: int = 0
    distill_temperature: float = 0.0  # >0: train on a teacher's soft targets too
    distill_weight: float = 0.0  # weight of the soft-target loss (1 - weight on the hard labels)
    clip_grad_norm: float = 0.0  # >0: rescale the gradient to at most this L2 norm (Caffe's clip_gradients)
    precision: str = "fp32"  # "fp32", or "bf16": forward + loss under torch.autocast(bfloat16)

    def __post_init__(self):
        if self.lr_policy not in ("cosine", "step", "fixed", "inv"):
            raise ValueError(f"unknown lr_policy {self.lr_policy!r}")
        if self.clip_grad_norm < 0:
            raise ValueError(f"clip_grad_norm must be >= 0 (0 = off), not {self.clip_grad_norm}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, not {self.precision!r}")


@dataclass
class TrainHooks:
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None
    after_step: Callable[[nn.Module], None] | None = None
    teacher: nn.Module | None = None
    extra_state: dict = field(default_factory=dict)


def lr_at(cfg: TrainConfig, progress: float, it: int) -> float:
    if cfg.lr_policy == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.lr_policy == "step":
        return cfg.lr * (0.1 ** (int(progress >= 0.5) + int(progress >= 0.75)))
    if cfg.lr_policy == "inv":  # Caffe: base_lr * (1 + gamma * iter) ^ (-power)
        return cfg.lr * (1 + 1e-4 * it) ** -0.75
    return cfg.lr


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator, n_total: int | None = None,
                 offset: int = 0) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (zero fill).

    Shifts are drawn for a batch of `n_total` images (default len(x)) of which x holds those from
    `offset` on, so each rank's share of a global batch gets the shifts a single process would draw.
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    n_total = n if n_total is None else n_total
    pad = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n_total,), generator=gen)[offset : offset + n]
    dy = torch.randint(0, 2 * max_shift + 1, (n_total,), generator=gen)[offset : offset + n]
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [n, h]
    cols = (dx[:, None] + torch.arange(w)[None, :])  # [n, w]
    idx_n = torch.arange(n)[:, None, None]
    return pad[idx_n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class ArraySource:
    """Training or test data held in memory: x [N, ...] float32, y [N] int64 (MNIST)."""

    def __init__(self, x: np.ndarray, y: np.ndarray):
        if len(x) != len(y):
            raise DataError(f"{len(x)} samples but {len(y)} labels")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def load(self, batches, seed: int = 0, epoch: int = 0):
        """Yield (x, y) tensors for each array of sample indices in `batches`."""
        for idx in batches:
            yield torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


def as_source(x, y=None):
    """Arrays (x, y) as an ArraySource; a data source (with `load` and `__len__`) passed as x as is."""
    if y is None:
        if hasattr(x, "load") and hasattr(x, "__len__"):
            return x
        raise TypeError("pass arrays x and y, or a data source (with load() and __len__) as x and y=None")
    return ArraySource(x, y)


def _param_device(module: nn.Module) -> torch.device:
    return next(module.parameters(), torch.empty(0)).device


def _run_device(model: nn.Module, device=None) -> torch.device:
    """Where to compute: `device` if given (see distributed.resolve_device), else this rank's device under
    torchrun, else wherever the model already is."""
    if device is not None:
        resolved = isinstance(device, torch.device) and (device.type == "cpu" or device.index is not None)
        dev = device if resolved else dist_.resolve_device(device)
        if dist_.is_distributed() and dev != dist_.device():
            raise ToolchainError(f"device {dev} is not this process's device {dist_.device()} (set by init_from_env)")
        return dev
    return dist_.device() if dist_.is_distributed() else _param_device(model)


def autocast(cfg: TrainConfig, dev: torch.device):
    """The autocast context of `cfg.precision` on `dev` (a disabled one for fp32)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def load_checkpoint(path) -> dict:
    """A checkpoint read with every tensor on the CPU, wherever it was written (CPU or any GPU); callers
    move what they need to their device (load_state_dict copies across devices). Tensors and plain data only
    (torch.load(weights_only=True): nothing is unpickled); a corrupt file is one CheckpointError."""
    from .checkpoint import load_checkpoint as load_safely

    return load_safely(path, "training checkpoint")


@torch.no_grad()
def evaluate(model: nn.Module, x, y: np.ndarray | None = None, batch_size: int = 1000, progress: bool = False,
             device=None) -> float:
    """Top-1 error (fraction) of a PyTorch model on arrays (x, y) or a data source (x, y=None).

    Distributed: each rank scores its contiguous share of the samples and the counts are summed.
    """
    source = as_source(x, y)
    n = len(source)
    if n == 0:
        raise DataError("no samples to evaluate on")
    lo, hi = dist_.shard_bounds(n)
    batches = [np.arange(i, min(i + batch_size, hi)) for i in range(lo, hi, batch_size)]
    was_training, home, dev = model.training, _param_device(model), _run_device(model, device)
    model.eval().to(dev)
    wrong = 0
    try:
        for xb, yb in tqdm(source.load(batches), total=len(batches), desc="eval", leave=False,
                           disable=not (progress and dist_.is_main())):
            out = model(xb.to(dev, non_blocking=True))
            wrong += int((out.argmax(1).cpu() != yb).sum())
    finally:
        model.train(was_training).to(home)
    return dist_.all_reduce_sum(wrong) / n


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def _rank_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.default_rng([seed, rank, step]).integers(2**31))


def _batch_loss(net, xb, yb, n_global: int, world: int, cfg: TrainConfig, hooks: TrainHooks, loss_fn=None) -> torch.Tensor:
    """This rank's share of the loss of one global batch of `n_global` samples.

    Per-sample losses are summed and divided by the global batch, times `world` because DDP
    averages gradients over ranks: the update is the one a single process would make on the whole
    batch, however unevenly the batch is split.
    """
    out = net(xb).float()  # under bf16 autocast the logits are bf16: the loss is taken in fp32
    loss = F.cross_entropy(out, yb, reduction="sum") if loss_fn is None else loss_fn(out, yb) * len(yb)
    if hooks.teacher is not None and cfg.distill_temperature > 0:
        t = cfg.distill_temperature
        with torch.no_grad():
            soft = F.softmax(hooks.teacher(xb).float() / t, dim=1)
        kd = F.kl_div(F.log_softmax(out / t, dim=1), soft, reduction="sum")
        loss = (1 - cfg.distill_weight) * loss + cfg.distill_weight * kd * t**2
    return loss / n_global * world


def train(
    model: nn.Module,
    train_x,
    train_y: np.ndarray | None,
    cfg: TrainConfig,
    hooks: TrainHooks | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    desc: str = "train",
    progress: bool = True,
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device=None,
) -> nn.Module:
    """Train `model` in place with SGD; returns it. Resumes from `checkpoint` if asked and present.

    `train_x, train_y` are arrays, or `train_x` is a data source and `train_y` None. The model is
    trained on `device` (default: this rank's device under torchrun, else where it is) and returned
    where it was; pass the model already on its device to keep it there between calls.
    `make_optimizer(params)` replaces the Caffe-style SGD (cfg's lr schedule then scales the learning
    rates it was made with); `loss_fn(output, labels)`, a batch mean, replaces the cross-entropy.
    """
    hooks = hooks or TrainHooks()
    source = as_source(train_x, train_y)
    world, rank = dist_.world_size(), dist_.rank()
    if cfg.batch_size < world:
        raise ToolchainError(f"batch_size {cfg.batch_size} is smaller than the {world} processes it is split over")
    home, dev = _param_device(model), _run_device(model, device)
    model.to(dev)
    teacher_home = None
    if hooks.teacher is not None:
        teacher_home = _param_device(hooks.teacher)
        hooks.teacher.to(dev).eval()
    torch.manual_seed(cfg.seed if rank == 0 else _rank_seed(cfg.seed, rank, 0))  # dropout differs per rank
    params = [p for p in model.parameters() if p.requires_grad]
    if make_optimizer is None:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = make_optimizer(params)
    base_lrs = [grp["lr"] for grp in opt.param_groups]
    n = len(source)
    if n == 0:
        raise DataError("no training samples")
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    step = 0
    aug_gen = torch.Generator().manual_seed(cfg.seed)
    if resume and checkpoint and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]  # in global batches: independent of the number of processes
        aug_gen.set_state(state["aug_gen"])
        torch.set_rng_state(state["torch_rng"])
        if rank > 0:
            torch.manual_seed(_rank_seed(cfg.seed, rank, step))
        if dev.type == "cuda":
            torch.cuda.manual_seed(_rank_seed(cfg.seed, rank, step))
    net = dist_.wrap_ddp(model)  # the DDP wrapper (rank 0's weights broadcast) or the model itself

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="it", disable=not (progress and dist_.is_main()),
               dynamic_ncols=True)
    while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        order = _epoch_order(n, cfg.seed, epoch)
        end = min(steps_per_epoch, pos + total_steps - step)
        global_batches = [order[b * cfg.batch_size : (b + 1) * cfg.batch_size] for b in range(pos, end)]
        shares = [g[slice(*dist_.shard_bounds(len(g), world, rank))] for g in global_batches]
        for g, (xb, yb) in zip(global_batches, source.load(shares, cfg.seed, epoch)):
            if cfg.augment_shift:
                lo, _ = dist_.shard_bounds(len(g), world, rank)
                xb = random_shift(xb, cfg.augment_shift, aug_gen, n_total=len(g), offset=lo)
            xb, yb = xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)
            scale = lr_at(cfg, step / total_steps, step) / cfg.lr if cfg.lr else 1.0
            for grp, base in zip(opt.param_groups, base_lrs):
                grp["lr"] = base * scale
            with autocast(cfg, dev):
                loss = _batch_loss(net, xb, yb, len(g), world, cfg, hooks, loss_fn)
            if cfg.l1:
                loss = loss + cfg.l1 * sum(p.abs().sum() for n_, p in model.named_parameters() if n_.endswith("weight"))
            if hooks.regularizer is not None:
                loss = loss + hooks.regularizer(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # The norm is taken after DDP's all-reduce, so every rank sees the same value and stops together.
            if cfg.clip_grad_norm:
                norm = nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            else:
                norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if not torch.isfinite(norm):
                bar.close()
                raise TrainingDiverged(
                    f"{desc}: training diverged at step {step + 1} of {total_steps} (gradient norm {float(norm)}, "
                    f"loss {float(loss.detach()):.4g}, lr {opt.param_groups[0]['lr']:.3g}); lower lr or set clip_grad_norm")
            opt.step()
            if hooks.after_step is not None:
                hooks.after_step(model)
            step += 1
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        dist_.broadcast_module_buffers(model)  # e.g. running statistics: rank 0's are the ones kept
        if checkpoint and dist_.is_main():
            save_checkpoint(checkpoint, model, opt, step, aug_gen, cfg)
    bar.close()
    model.to(home)
    if hooks.teacher is not None:
        hooks.teacher.to(teacher_home)
    return model


def save_checkpoint(path, model, opt, step, aug_gen, cfg) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "aug_gen": aug_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "config": asdict(cfg),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
