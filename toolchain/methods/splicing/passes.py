"""The `splicing` pass: Dynamic Network Surgery (Guo et al. 2016) — pruning with splicing.

apply: selected layers become SplicedLinear / SplicedConv2d; per layer the thresholds are set from its
trained weights as in the authors' Caffe code: t = mean|W| + crate * std|W|, a = (1 - margin) t,
b = (1 + margin) t. During retraining the masks are recomputed after an SGD step with probability
(1 + gamma * iter)^(-power) (frequent at first, rarer later); all weights keep updating. finish: the
masks are frozen into prune's masked layers (so the sparse ONNX forms apply) and dead units removed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...options import option
from ..base import TIES_WEIGHTS, CompressionPass, register_pass
from ...train import TrainHooks
from ..prune.surgery import remove_dead_units
from .layers import _Spliced, spliced_from_layer, to_masked


@dataclass
class SplicingOptions:
    margin: float = option(0.1, "[0, 1)")  # a = (1 - margin) t, b = (1 + margin) t
    gamma: float = option(1e-4, "[0, inf]")  # mask update probability (1 + gamma * iter)^(-power)
    power: float = option(1.0, "[0, inf]")
    remove_dead_neurons: bool = True

    def __post_init__(self):
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be in [0, 1), not {self.margin}")
        if self.gamma < 0 or self.power < 0:
            raise ValueError("gamma and power must be >= 0")


@dataclass
class SplicingLayerOptions:
    crate: float = option(1.0, "[-10, 100]")  # t = mean|W| + crate * std|W|  (higher: sparser)

    def __post_init__(self):
        if self.crate < -1:
            raise ValueError(f"crate must be >= -1, not {self.crate}")


def splice_thresholds(weight: torch.Tensor, mask: torch.Tensor, crate: float, margin: float) -> tuple[float, float]:
    alive = weight.detach().abs()[mask.bool()]
    if alive.numel() < 2:
        return 0.0, 0.0
    t = max(0.0, float(alive.mean() + crate * alive.std()))
    return (1 - margin) * t, (1 + margin) * t


@register_pass("splicing")
class SplicingPass(CompressionPass):
    Options = SplicingOptions
    LayerOptions = SplicingLayerOptions
    # Splicing moves every weight freely: it cannot follow a method that ties or factors weights.
    cannot_follow = TIES_WEIGHTS

    def __init__(self, options, layer_options):
        super().__init__(options, layer_options)
        self.iter = 0
        self.kept: dict[str, tuple[int, int]] = {}
        self.removed: dict[str, int] = {}

    def apply(self, net: nn.Module, round_index: int) -> None:
        layers = net.layers()
        for name, lo in self.layer_options.items():
            layer = spliced_from_layer(layers[name])
            layer.set_thresholds(*splice_thresholds(layer.weight, layer.mask, lo.crate, self.options.margin))
            layer.splice_()
            net.replace_layer(name, layer)

    def hooks(self, net: nn.Module) -> TrainHooks:
        spliced = [m for m in net.layers().values() if isinstance(m, _Spliced)]
        gen = torch.Generator().manual_seed(int(torch.initial_seed()) % (2**31))

        def after_step(model):
            p = (1 + self.options.gamma * self.iter) ** -self.options.power
            self.iter += 1
            if float(torch.rand((), generator=gen)) < p:
                for m in spliced:
                    m.splice_()

        return TrainHooks(after_step=after_step)

    def finish(self, net: nn.Module) -> None:
        for name in self.layer_options:
            layer = net.layers().get(name)
            if isinstance(layer, _Spliced):
                layer.splice_()
                self.kept[name] = (layer.nnz(), layer.weight.numel())
                net.replace_layer(name, to_masked(layer))
        if self.options.remove_dead_neurons and getattr(net, "source_module", None) is None:
            self.removed = remove_dead_units(net)

    def summary(self, net: nn.Module) -> list[str]:
        lines = [f"{n}: {k}/{t} weights kept ({k / t:.2%}) after splicing" for n, (k, t) in self.kept.items()]
        lines += [f"{n}: removed {k} dead neurons/channels" for n, k in self.removed.items() if k]
        return lines
