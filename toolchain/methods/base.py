"""The base of every compression method: CompressionPass and the pass registry (see toolchain.methods)."""
from __future__ import annotations

import copy
import dataclasses
from typing import ClassVar

import torch.nn as nn

from converters.registry import Registry

from ..errors import RecipeError
from ..train import TrainHooks

PASSES: Registry[type["CompressionPass"]] = Registry("compression pass")

# Passes that tie weights together (a shared codebook, hash buckets, low-rank factors): a pass that
# moves or prunes individual weights lists them in its `cannot_follow` (checked when a recipe is read).
TIES_WEIGHTS = ("hashed", "lowrank", "quantize")

# method name -> fn(net, form) -> (export options for its emitters, finish(model) or None): how a method
# shapes a whole-network export (e.g. weight sharing decodes several layers from one stream).
EXPORT_HOOKS: Registry = Registry("export hook")


def register_pass(name: str):
    """Class decorator: register a CompressionPass subclass under the recipe name `name` (once)."""

    def deco(cls):
        cls.name = name
        return PASSES.add(name, cls)

    return deco


def get_pass(name: str) -> type["CompressionPass"]:
    if name not in PASSES:
        raise RecipeError(f"unknown pass {name!r}; available: {', '.join(available_passes())}")
    return PASSES[name]


def available_passes() -> list[str]:
    return sorted(PASSES)


@dataclasses.dataclass
class NoOptions:
    pass


class CompressionPass:
    """Base class. Subclasses set Options/LayerOptions and implement `apply`."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    LayerOptions: ClassVar[type] = NoOptions
    # Which layer kinds a pass can handle: nn.Linear and/or nn.Conv2d subclasses.
    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)

    def __init__(self, options, layer_options: dict[str, object]):
        self.options = options
        self.layer_options = layer_options  # layer name -> LayerOptions ("default" already expanded)

    @property
    def rounds(self) -> int:
        return int(getattr(self.options, "rounds", 1))

    def apply(self, net: nn.Module, round_index: int) -> None:
        """Compress `net` in place for round `round_index` (0-based)."""
        raise NotImplementedError

    def hooks(self, net: nn.Module) -> TrainHooks:
        """Hooks for retraining after a round (regulariser, after-step projection, teacher)."""
        return TrainHooks()

    def finish(self, net: nn.Module) -> None:
        """Called once after the last round's retraining (e.g. to remove dead neurons)."""

    def summary(self, net: nn.Module) -> list[str]:
        """Short lines describing what the pass did, for the run log."""
        return []


def frozen_copy(net: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off (a distillation teacher)."""
    teacher = copy.deepcopy(net).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def densify(net: nn.Module) -> nn.Module:
    """A copy of `net` whose compressed layers that hold a dense weight (`masked_weight`: pruned,
    weight-sharing, int8 layers) are plain nn.Linear / nn.Conv2d with that weight, zeros kept: the
    `dense` export form, whose weights are plain initializers for tools such as onnxruntime's
    quantize_dynamic / quantize_static. Layers without a dense weight (hashed, low-rank) stay as they are."""
    import torch

    out = copy.deepcopy(net)
    for name, layer in list(out.layers().items()):
        w = getattr(layer, "masked_weight", None)
        if w is None or type(layer) in (nn.Linear, nn.Conv2d):
            continue
        if hasattr(layer, "in_features"):
            new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
        else:
            new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, layer.groups, layer.bias is not None)
        with torch.no_grad():
            new.weight.copy_(w.detach())
            if layer.bias is not None:
                new.bias.copy_(getattr(layer, "effective_bias", layer.bias).detach())
        out.replace_layer(name, new)
    return out
