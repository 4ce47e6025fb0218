"""The compression driver: import -> passes (with retraining) -> export -> measure.

State after every round (the network, each pass's state, the position) is checkpointed
atomically, so `resume=True` continues from the last finished round. Each round's retraining is
seeded from (recipe seed, stage, round), so a resumed run ends exactly where an uninterrupted one does.

Under torchrun (toolchain.distributed.init_from_env()) every process runs the driver: passes are
applied identically on every rank, then rank 0's weights and masks are broadcast; retraining is
data-parallel; only rank 0 writes the checkpoint.

Devices: the network lives on the run device (`device=`, or the rank's GPU under torchrun) from the
start to the end of the run: retraining, evaluation, the cross-rank checks and broadcasts all run
there. A pass's apply()/finish() is host code (thresholds, SVD, numpy hash tables, layer surgery),
so it runs on the network moved to the CPU and the network goes back to the device right after
(milliseconds, a few times per run). Checkpoints are read to the CPU (`load_checkpoint`), so a run
checkpointed on a GPU resumes on a CPU and the other way round.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt_
from . import distributed as dist_
from .errors import DataError
from converters.fileio import atomic_path
from .recipe import Recipe
from .train import _param_device, _run_device, evaluate, train

log = logging.getLogger(__name__)


@dataclass
class CompressResult:
    net: torch.nn.Module
    error_before: float | None  # None when run without data (--no-retrain)
    error_after: float | None
    lines: list[str]


def pass_state(p, tensors: dict) -> dict:
    """A pass's mutable state (everything but its options) as plain data; networks (teachers) as records."""
    out = {}
    for k, v in vars(p).items():
        if k in ("options", "layer_options"):
            continue
        if isinstance(v, torch.nn.Module):
            out[k] = {"__network__": ckpt_.network_record(v, tensors)}
            continue
        enc = ckpt_._encode(v, tensors)
        if enc is ckpt_.KEEP:
            raise TypeError(f"{type(p).__name__}.{k} ({type(v).__name__}) cannot be checkpointed as plain data")
        out[k] = enc
    return out


def restore_pass_state(p, state: dict, tensors: dict, fresh_net) -> None:
    import copy

    for k, v in state.items():
        if isinstance(v, dict) and "__network__" in v:
            teacher = copy.deepcopy(fresh_net)
            ckpt_.restore_network(teacher, v["__network__"], tensors)
            setattr(p, k, teacher)
        else:
            setattr(p, k, ckpt_._decode(v, tensors))


def run_fingerprint(recipe: Recipe, model: torch.nn.Module, data) -> dict:
    """What a run is made from: the recipe text, the model's starting weights, the training data."""
    return {"recipe": ckpt_.text_digest(recipe.source or repr(recipe.stages)),
            "model": ckpt_.model_digest(model),
            "data": ckpt_.data_digest(data)}


def save_compress_checkpoint(path, net, model, passes, done, error_before, fingerprint) -> None:
    tensors: dict = {}
    state = {"format": ckpt_.FORMAT, "fingerprint": fingerprint, "done": list(done), "error_before": error_before,
             "net": ckpt_.network_record(net, tensors),
             "passes": [pass_state(p, tensors) for p in passes],
             "model": None if model is net else {k: v.detach().clone() for k, v in model.state_dict().items()},
             "tensors": tensors}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_compress_checkpoint(path, net, model, passes, fingerprint):
    """Restore net (and `model`), the passes' state; returns (done, error_before). Refuses a mismatch."""
    state = ckpt_.load_checkpoint(path)
    if state.get("format") != ckpt_.FORMAT:
        raise ckpt_.CheckpointError(f"checkpoint {path} is not a {ckpt_.FORMAT} file; delete it to start over")
    ckpt_.check_fingerprint(state.get("fingerprint"), fingerprint, path)
    try:
        tensors = state["tensors"]
        if len(state["passes"]) != len(passes):
            raise ckpt_.CheckpointError(f"checkpoint {path} has {len(state['passes'])} stages, the recipe {len(passes)}")
        import copy

        fresh = copy.deepcopy(net)
        ckpt_.restore_network(net, state["net"], tensors)
        for p, ps in zip(passes, state["passes"]):
            restore_pass_state(p, ps, tensors, fresh)
        if model is not net:
            model.load_state_dict(state["model"])
        return tuple(state["done"]), state["error_before"]
    except ckpt_.CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ckpt_.CheckpointError(f"checkpoint {path} does not fit this run ({first[:160]}); "
                                    f"delete it to start over") from None


def round_seed(seed: int, stage: int, rnd: int) -> int:
    return int(np.random.default_rng([seed, stage, rnd]).integers(2**31))


def load_training_data(recipe: Recipe, data_dir=None, input_shape=None, num_workers: int | None = None,
                       device=None, val_split: int | float | None = None):
    """(train_x, train_y, eval_x, eval_y): arrays for MNIST; for ImageNet, data sources with y = None.

    MNIST: training on the training set minus its validation split (default: the data package's 10k
    validation images; `val_split` images or a fraction of them for IDX folders), evaluation (and every
    choice made on it) on the validation split; the test set is left for one final measurement.

    ImageNet reads DIR/train and DIR/val (a folder per class, or train.txt / val.txt file lists);
    `input_shape` (e.g. [N, 3, 227, 227]) gives the crop size; a CUDA `device` pins the loaders' batches.
    """
    if recipe.dataset == "mnist":
        from .data import load_mnist

        return load_mnist(data_dir).holdout(val_split)
    from .data.imagenet import crop_size, open_imagenet

    if data_dir is None:
        raise DataError("ImageNet retraining needs --data DIR holding train/ and val/ (a folder per class; "
                        "see docs/scaling.md)")
    crop = crop_size(input_shape) if input_shape is not None else 227
    pin = None if device is None else torch.device(device).type == "cuda"
    train_src = open_imagenet(data_dir, crop, train=True, split="train", require_split=True, num_workers=num_workers,
                              pin_memory=pin)
    val_src = open_imagenet(data_dir, crop, train=False, split="val", require_split=True, num_workers=num_workers,
                            pin_memory=pin)
    return train_src, None, val_src, None


def compress_network(net, recipe: Recipe, data, checkpoint: str | Path | None = None, resume: bool = False,
                     progress: bool = True, teacher=None, model: torch.nn.Module | None = None,
                     make_optimizer=None, loss_fn=None, device=None) -> CompressResult:
    """Run every stage of `recipe` on the network `net` (modified in place).

    `model` is the module trained and evaluated, when `net` is the Network traced from it
    (converters.torch_import: they share their layers); by default `net` itself.
    `make_optimizer` / `loss_fn` replace the default SGD and cross-entropy (see toolchain.train.train).
    `device`: "cpu", "cuda", "cuda:N", "auto" or a torch.device (default: the rank's device under
    torchrun, else where the model is). The network is returned on the device it came on.
    """
    model = net if model is None else model
    from .accuracy import validate_for_data

    data = validate_for_data(net, data, recipe.dataset)  # samples shaped for the model, or a DataError now
    train_x, train_y, test_x, test_y = data if data is not None else (None,) * 4
    home, dev = _param_device(model), _run_device(model, device)
    # Resolve every stage's layers up front, so a bad layer name fails before any training.
    passes = [stage.make_pass(net) for stage in recipe.stages]
    done = (-1, -1)  # last finished (stage, round); round == rounds means finish() ran
    fingerprint = run_fingerprint(recipe, model, data) if checkpoint else None
    if resume and checkpoint and Path(checkpoint).exists():
        done, error_before = load_compress_checkpoint(checkpoint, net, model, passes, fingerprint)
        log.info("resuming after stage %d round %d", done[0] + 1, done[1] + 1)
        _to(dev, net, model)
    else:
        _to(dev, net, model)
        error_before = evaluate(model, test_x, test_y) if test_x is not None else None
    for si, (stage, p) in enumerate(zip(recipe.stages, passes)):
        for r in range(p.rounds + 1):  # the extra step is finish()
            if (si, r) <= done:
                continue
            if r < p.rounds:
                torch.manual_seed(round_seed(recipe.seed, si, r))
                _on_host(dev, net, model, p.apply, r)
                dist_.sync_module_state(net, f"network after {p.name} stage {si + 1} round {r + 1}")
                cfg = dataclasses.replace(stage.retrain_for(r, p.rounds), seed=round_seed(recipe.seed, si, r))
                if cfg.epochs > 0 and train_x is not None:
                    hooks = p.hooks(net)
                    if teacher is not None and hooks.teacher is None and cfg.distill_temperature > 0:
                        hooks.teacher = teacher
                    # a pass may bring its own optimiser (sparse_vd: Adam); the caller's comes first
                    opt_fn = make_optimizer or getattr(p, "optimizer_factory", lambda: None)()
                    train(model, train_x, train_y, cfg, hooks, device=dev,
                          desc=f"{p.name} stage {si + 1} round {r + 1}/{p.rounds}", progress=progress,
                          make_optimizer=opt_fn, loss_fn=loss_fn)
            else:
                _on_host(dev, net, model, p.finish)
            dist_.sync_module_state(net, f"network after {p.name} stage {si + 1} "
                                         f"{'finish' if r == p.rounds else f'round {r + 1}'}")
            if checkpoint and dist_.is_main():
                save_compress_checkpoint(checkpoint, net, model, passes, (si, r), error_before, fingerprint)
    error_after = evaluate(model, test_x, test_y) if test_x is not None else None
    _to(home, net, model)
    lines = [line for p in passes for line in p.summary(net)]
    return CompressResult(net, error_before, error_after, lines)


def _to(dev, net, model) -> None:
    net.to(dev)
    if model is not net:  # the user's module: its layers are net's, but it may hold more
        model.to(dev)


def _on_host(dev: torch.device, net, model, fn, *args) -> None:
    """Run a pass's host-side step `fn(net, *args)` with the network on the CPU, then put it back on `dev`
    (with any layer the step created)."""
    if dev.type != "cpu":
        _to("cpu", net, model)
    fn(net, *args)
    _to(dev, net, model)
