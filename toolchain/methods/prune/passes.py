"""Magnitude pruning with retraining (Han et al. 2015, "Learning both Weights and Connections").

Per round and layer: threshold = quality x std of the layer's surviving weights (or, with a
target `density`, the magnitude that keeps that fraction, reached over the rounds by a cubic
schedule when schedule = "gradual"). Masks only ever lose entries. Before retraining, the dropout
after each pruned layer is scaled as D_r = D_o * sqrt(C_r / C_o) (C = the layer's connections).
After the last round, neurons / channels left with no inputs or no outputs are removed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import _Masked, masked_from_dense
from ..base import CompressionPass, frozen_copy, register_pass
from ...options import option
from .surgery import remove_dead_units
from ...train import TrainHooks


@dataclass
class PruneOptions:
    rounds: int = option(1, "[1, 1000]")  # prune + retrain rounds
    schedule: str = option("iterative", choices=("iterative", "gradual"))  # "iterative": same rule every round; "gradual": cubic ramp to `density`
    adjust_dropout: bool = True  # rescale dropout after each pruned layer: D_r = D_o * sqrt(C_r / C_o)
    remove_dead_neurons: bool = True  # after the last round, cut out units with no inputs or no outputs
    teacher: bool = False  # keep the network as it entered the stage as the dark-knowledge teacher (used when [stage.retrain] sets distill_temperature)

    def __post_init__(self):
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, not {self.rounds}")
        if self.schedule not in ("iterative", "gradual"):
            raise ValueError(f"schedule must be 'iterative' or 'gradual', not {self.schedule!r}")


@dataclass
class PruneLayerOptions:
    quality: float | None = option(None, "[0, 100]")  # threshold = quality * std(weights); exclusive with density
    density: float | None = option(None, "(0, 1]")  # target fraction of weights kept; exclusive with quality
    EXCLUSIVE = (("quality", "density"),)

    def __post_init__(self):
        if self.density is not None and not (0 < self.density <= 1):
            raise ValueError(f"density must be in (0, 1], not {self.density}")
        if self.quality is not None and self.quality < 0:
            raise ValueError(f"quality must be >= 0, not {self.quality}")
        if (self.quality is None) == (self.density is None):
            raise ValueError("give exactly one of quality or density")


def quality_threshold(weight: torch.Tensor, mask: torch.Tensor, quality: float) -> float:
    """Han et al.'s rule: quality x standard deviation of the layer's (surviving) weights."""
    alive = weight[mask.bool()]
    return quality * float(alive.std()) if alive.numel() > 1 else 0.0


def density_keep(weight: torch.Tensor, mask: torch.Tensor, density: float) -> torch.Tensor:
    """Mask keeping the round(density * numel) largest-magnitude surviving weights."""
    k = max(1, round(density * weight.numel()))
    mag = (weight.abs() * mask).flatten()
    keep = torch.zeros_like(mag, dtype=torch.bool)
    keep[torch.topk(mag, k, sorted=False).indices] = True
    return keep.view_as(weight) & mask.bool()


def cubic_density(target: float, round_index: int, rounds: int) -> float:
    """Zhu & Gupta (2017) gradual schedule: density after round r of R."""
    t = (round_index + 1) / rounds
    return target + (1 - target) * (1 - t) ** 3


@register_pass("prune")
class PrunePass(CompressionPass):
    Options = PruneOptions
    LayerOptions = PruneLayerOptions

    def __init__(self, options, layer_options):
        super().__init__(options, layer_options)
        self.original_connections: dict[str, int] = {}
        self.original_dropout: dict[str, float] = {}
        self.removed: dict[str, int] = {}
        self.teacher: nn.Module | None = None

    def apply(self, net: nn.Module, round_index: int) -> None:
        if self.options.teacher and self.teacher is None:
            self.teacher = frozen_copy(net)  # before this stage prunes anything
        layers = net.layers()
        for name, lo in self.layer_options.items():
            layer = layers[name]
            if not isinstance(layer, _Masked):
                layer = masked_from_dense(layer)
                net.replace_layer(name, layer)
            self.original_connections.setdefault(name, layer.weight.numel())
            with torch.no_grad():
                if lo.density is not None:
                    d = lo.density
                    if self.options.schedule == "gradual":
                        d = cubic_density(lo.density, round_index, self.rounds)
                    keep = density_keep(layer.weight, layer.mask, d)
                else:
                    keep = layer.weight.abs() > quality_threshold(layer.weight, layer.mask, lo.quality)
                layer.prune_(keep)
            if self.options.adjust_dropout:
                self._adjust_dropout(net, name, layer.nnz())

    def _adjust_dropout(self, net, name: str, connections: int) -> None:
        """D_r = D_o * sqrt(C_r / C_o) for the dropout applied to this layer's output."""
        for i, drop in enumerate(net.dropouts_after(name)):
            key = f"{name}/{i}"
            p0 = self.original_dropout.setdefault(key, drop.p)
            drop.p = p0 * math.sqrt(connections / self.original_connections[name])

    def hooks(self, net: nn.Module) -> TrainHooks:
        return TrainHooks(teacher=self.teacher)

    def finish(self, net: nn.Module) -> None:
        # A user's own module keeps its shapes: its forward may hard-code them (x.view(-1, 800)), so
        # its dead units stay (masked to zero) rather than be cut out of layers it computes with.
        if self.options.remove_dead_neurons and getattr(net, "source_module", None) is None:
            self.removed = remove_dead_units(net)

    def summary(self, net: nn.Module) -> list[str]:
        layers = net.layers()
        lines = [f"{n}: {layers[n].density():.2%} of its remaining weights kept" for n in self.layer_options
                 if n in layers and hasattr(layers[n], "density")]
        lines += [f"{n}: removed {k} dead neurons/channels" for n, k in self.removed.items() if k]
        return lines
