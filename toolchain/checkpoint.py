"""Checkpoints without pickle: tensors and plain data only, loaded with torch.load(weights_only=True).

A compression checkpoint must hold a network whose layers were swapped for compressed ones
(MaskedLinear, HashedConv2d, LowRankLinear ...), possibly resized (dead-unit removal), and the passes'
state (teacher networks included). Pickling those objects would make loading a checkpoint run
arbitrary code. Instead every module is written as a RECORD:

    {"class": "toolchain.methods.prune.layers.MaskedLinear",     # an allowed module path only
     "attrs": {"in_features": 784, "training": true, ...},        # plain values, tagged tuples/dtypes
     "params": {"weight": [true, "t0"]}, "buffers": {"mask": [true, "t1"]}, "children": {...}}

and its tensors go into one flat table {"t0": tensor, ...}. Restoring rebuilds each module from its
record: a module of the same class is updated in place (so a user's module bound to a traced
Network keeps sharing its layers); another class is created without running its constructor, from
an allowed package only (torch.nn, converters, toolchain). Attributes that cannot be written as
plain data (a function an op module calls) are kept from the freshly imported model, and are
an error if the class changed.

`fingerprint(...)` records what a run was made from (recipe text, start weights, data), so that a
resume with a different recipe, model or data is refused instead of silently mixing them.
"""
from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import ToolchainError

FORMAT = "toolchain-checkpoint/1"
ALLOWED_PREFIXES = ("torch.nn.", "converters.", "toolchain.")
_SKIP_ATTRS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
               "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_state_dict_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
               "_is_full_backward_hook", "_compiled_call_impl"}
KEEP = {"__keep__": True}


class CheckpointError(ToolchainError):
    """A checkpoint file is corrupt, from another format, or does not match the run being resumed."""


# ------------------------------------------------------------------ plain values
def _encode(value, tensors: dict):
    """A plain (torch.load weights_only-safe) form of `value`, or KEEP when it has none."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().clone()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": key}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, (tuple, list)):
        items = [_encode(v, tensors) for v in value]
        if any(i is KEEP for i in items):
            return KEEP
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, set):
        return _encode(tuple(sorted(value, key=repr)), tensors) if all(
            isinstance(v, (int, str)) for v in value) else KEEP
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _encode(v, tensors) for k, v in value.items()}
        return KEEP if any(i is KEEP for i in items.values()) else {"__dict__": items}
    return KEEP


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__dtype__" in value:
        dt = getattr(torch, value["__dtype__"], None)
        if not isinstance(dt, torch.dtype):
            raise CheckpointError(f"unknown dtype {value['__dtype__']!r}")
        return dt
    if "__size__" in value:
        return torch.Size(value["__size__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
    raise CheckpointError(f"unknown value record {sorted(value)}")


# ------------------------------------------------------------------ modules
def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _allowed_class(path: str) -> type:
    if not isinstance(path, str) or not path.startswith(ALLOWED_PREFIXES):
        raise CheckpointError(f"module class {path!r} is not one the toolchain creates")
    mod_name, _, qual = path.rpartition(".")
    # nested qualnames are not used by our modules; the class must be a module-level nn.Module subclass
    try:
        cls = getattr(importlib.import_module(mod_name), qual)
    except (ImportError, AttributeError):
        raise CheckpointError(f"module class {path!r} does not exist in this version") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{path!r} is not a module class")
    return cls


def module_record(module: nn.Module, tensors: dict) -> dict:
    """The record of `module` (see the module docstring); its tensors are added to `tensors`."""
    attrs = {k: _encode(v, tensors) for k, v in vars(module).items() if k not in _SKIP_ATTRS}
    params = {k: (None if p is None else [bool(p.requires_grad), _encode(p, tensors)["__tensor__"]])
              for k, p in module._parameters.items()}
    buffers = {k: (None if b is None else [k not in module._non_persistent_buffers_set,
                                           _encode(b, tensors)["__tensor__"]])
               for k, b in module._buffers.items()}
    children = {k: (None if c is None else module_record(c, tensors)) for k, c in module._modules.items()}
    return {"class": _class_path(type(module)), "attrs": attrs, "params": params, "buffers": buffers,
            "children": children}


def restore_module(record: dict, tensors: dict, existing: nn.Module | None) -> nn.Module:
    """The module of `record`: `existing` updated in place when it has the recorded class, else a new one."""
    try:
        cls = _allowed_class(record["class"])
        same = existing is not None and type(existing) is cls
        module = existing if same else cls.__new__(cls)
        if not same:
            nn.Module.__init__(module)
        for k, v in record["attrs"].items():
            if v == KEEP:
                if not same:
                    raise CheckpointError(f"a {cls.__name__} cannot be rebuilt from plain data (attribute {k!r})")
                continue
            object.__setattr__(module, k, _decode(v, tensors))
        for k in list(module._parameters):
            if k not in record["params"]:
                del module._parameters[k]
        for k, spec in record["params"].items():
            if spec is None:
                module._parameters[k] = None
            else:
                module._parameters[k] = nn.Parameter(tensors[spec[1]].clone(), requires_grad=bool(spec[0]))
        for k in list(module._buffers):
            if k not in record["buffers"]:
                del module._buffers[k]
        module._non_persistent_buffers_set = set()
        for k, spec in record["buffers"].items():
            module._buffers[k] = None if spec is None else tensors[spec[1]].clone()
            if spec is not None and not spec[0]:
                module._non_persistent_buffers_set.add(k)
        old_children = dict(module._modules) if same else {}
        module._modules = {}
        for k, child in record["children"].items():
            module._modules[k] = None if child is None else restore_module(child, tensors, old_children.get(k))
        return module
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(f"malformed module record ({type(e).__name__}: {e})") from None


def network_record(net: nn.Module, tensors: dict) -> dict:
    """Every node's module of a converters.ir.Network, its constants, and its node names."""
    return {"nodes": [n.name for n in net.nodes],
            "ops": {name: module_record(m, tensors) for name, m in net.ops.items()},
            "consts": module_record(net.consts, tensors),
            "training": bool(net.training)}


def restore_network(net: nn.Module, record: dict, tensors: dict) -> None:
    """Put the recorded modules into `net` (a freshly imported / traced Network of the same graph)."""
    names = [n.name for n in net.nodes]
    if record.get("nodes") != names:
        raise CheckpointError("the checkpoint was made from a different model graph (its nodes differ)")
    for name in names:
        old = net.ops[name]
        new = restore_module(record["ops"][name], tensors, old)
        if new is not old:
            net.replace_layer(name, new)
    restore_module(record["consts"], tensors, net.consts)
    net.train(bool(record.get("training", True)))


# ------------------------------------------------------------------ files
def load_checkpoint(path: str | Path, kind: str = "checkpoint") -> dict:
    """torch.load(weights_only=True) of a checkpoint; a corrupt, truncated or unsafe file is one CheckpointError."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{kind} {path}: no such file") from None
    except Exception as e:  # UnpicklingError for pickled objects, RuntimeError / EOFError for corrupt zips
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{kind} {path} cannot be loaded safely (corrupt, truncated, or an old pickled "
                              f"format: {first[:160]}); delete it to start over") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{kind} {path}: not a toolchain checkpoint")
    return state


# ------------------------------------------------------------------ what a run was made from
def tensor_digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d tensors too
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    return tensor_digest(sorted(model.state_dict().items()))


def data_digest(data) -> str | None:
    """Identity of training data: array shapes + a hash of a strided sample; a data source's repr/len."""
    if data is None:
        return None
    h = hashlib.sha256()
    for part in data:
        if part is None:
            h.update(b"none")
        elif isinstance(part, (np.ndarray, torch.Tensor)):
            a = np.asarray(part)
            h.update(str(a.dtype).encode() + str(a.shape).encode())
            flat = a.reshape(-1)
            step = max(1, flat.size // 65536)
            h.update(np.ascontiguousarray(flat[::step]).tobytes())
        else:  # a data source (ImageNet folder, a DataLoader's adapter): what identifies its samples
            h.update(type(part).__name__.encode() + str(len(part) if hasattr(part, "__len__") else "").encode())
            for attr in ("origin", "root", "path", "crop", "train", "resize"):
                h.update(f"{attr}={getattr(part, attr, None)!r};".encode())
            labels = getattr(part, "labels", None)
            if isinstance(labels, np.ndarray):
                h.update(np.ascontiguousarray(labels.reshape(-1)[:: max(1, labels.size // 65536)]).tobytes())
    return h.hexdigest()[:16]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_fingerprint(saved: dict | None, current: dict, path) -> None:
    """Refuse to resume from a checkpoint made from another recipe, model or data."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} records no origin (an older format); delete it to start over")
    what = {"recipe": "the recipe", "model": "the model's starting weights", "data": "the training data"}
    changed = [what.get(k, k) for k in current if saved.get(k) != current[k]]
    if changed:
        raise CheckpointError(f"cannot resume from {path}: {' and '.join(changed)} changed since it was written "
                              f"(delete the checkpoint to start over, or resume with the original inputs)")
