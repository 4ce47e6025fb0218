"""The `structured` pass: filter / neuron pruning by L1 norm (Li et al. 2017, "Pruning Filters for
Efficient ConvNets"), applied to fully-connected neurons the same way.

apply: per selected layer, its output channels (conv filters) or neurons (fc rows) are ranked by the L1
norm of their weights and the lowest are removed together with their dependent inputs in the next
layer — through element-wise ops, max pooling, flatten and the bias — by the dead-unit surgery of
toolchain.methods.prune.surgery: a removed unit's weights and bias are zeroed (it outputs act(0) = 0
after ReLU, so nothing is folded) and the surgery slices it out of both layers. The kept channels'
outputs are bit-identical before retraining. The result is a plain smaller dense network: its export is
ordinary dense ONNX that stock onnxruntime runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...options import option
from ..base import TIES_WEIGHTS, CompressionPass, register_pass
from ...errors import RecipeError
from ..prune.surgery import remove_dead_units


@dataclass
class StructuredOptions:
    pass


@dataclass
class StructuredLayerOptions:
    keep: float | None = option(None, "(0, 1]")  # fraction of the layer's channels / neurons kept, in (0, 1]
    channels: int | None = option(None, "[1, inf]")  # or: how many are kept (>= 1)
    EXCLUSIVE = (("keep", "channels"),)

    def __post_init__(self):
        if (self.keep is None) == (self.channels is None):
            raise ValueError("give exactly one of keep (a fraction) or channels (a count)")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ValueError(f"keep must be in (0, 1] (a layer needs at least one channel), not {self.keep}")
        if self.channels is not None and self.channels < 1:
            raise ValueError(f"channels must be >= 1 (removing every channel of a layer cuts the network), "
                             f"not {self.channels}")


def l1_ranking(layer: nn.Module) -> torch.Tensor:
    """Output units ordered by the L1 norm of their weights, largest first."""
    w = getattr(layer, "masked_weight", layer.weight).detach()
    return torch.argsort(w.abs().reshape(w.shape[0], -1).sum(1), descending=True, stable=True)


def kept_count(units: int, lo: StructuredLayerOptions, name: str) -> int:
    k = lo.channels if lo.channels is not None else int(round(lo.keep * units))
    if k < 1:
        raise RecipeError(f"structured: layer {name!r} would keep none of its {units} channels (keep = {lo.keep})")
    if k > units:
        raise RecipeError(f"structured: layer {name!r} has {units} channels, cannot keep {k}")
    return k


@register_pass("structured")
class StructuredPass(CompressionPass):
    Options = StructuredOptions
    LayerOptions = StructuredLayerOptions
    cannot_follow = TIES_WEIGHTS

    def __init__(self, options, layer_options):
        super().__init__(options, layer_options)
        self.shapes: dict[str, tuple[int, int]] = {}

    def apply(self, net: nn.Module, round_index: int) -> None:
        if getattr(net, "source_module", None) is not None:
            raise RecipeError("structured: removing channels changes layer shapes, which a traced module's own "
                              "forward may hard-code; load the model from ONNX (toolchain.load) instead")
        layers = net.layers()
        plan = {}
        for name, lo in self.layer_options.items():
            layer = layers[name]
            units = layer.weight.shape[0]
            k = kept_count(units, lo, name)
            succ = net.next_layers(name)
            if k < units and (len(succ) != 1 or not isinstance(layers[succ[0]], (nn.Linear, nn.Conv2d))):
                raise RecipeError(f"structured: layer {name!r} feeds no single next layer (it is an output, or "
                                  "its output branches): its channels cannot be removed")
            plan[name] = (units, k)
        for name, (units, k) in plan.items():
            layer = net.layers()[name]
            drop = l1_ranking(layer)[k:]
            with torch.no_grad():
                layer.weight[drop] = 0
                if getattr(layer, "mask", None) is not None:
                    layer.mask[drop] = False
                if layer.bias is not None:
                    layer.bias[drop] = 0
        remove_dead_units(net)
        for name, (units, k) in plan.items():
            now = net.layers()[name].weight.shape[0]
            if now > k:
                raise RecipeError(f"structured: layer {name!r}: only {units - now} of {units - k} channels could be "
                                  "removed (the path to the next layer is not element-wise / pooling / flatten)")
            self.shapes[name] = (units, now)

    def summary(self, net: nn.Module) -> list[str]:
        return [f"{n}: {k} of {u} channels/neurons kept (L1 ranking)" for n, (u, k) in self.shapes.items()]
