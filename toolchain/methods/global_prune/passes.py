"""The `global_prune` pass: global magnitude pruning with a gradual schedule (Zhu & Gupta 2017,
"To prune, or not to prune").

One target sparsity s_f for the whole network (the selected layers together). Over `rounds` rounds the
sparsity follows the cubic ramp s_t = s_f + (s_i - s_f)(1 - t/n)^3 (t = 1..n); at each round ONE
magnitude threshold across all selected layers keeps the (1 - s_t) largest weights of the network,
scored by |w| or, with normalize = "std", by |w| / std(layer's weights) (so layers of small weights
are not wiped out). Masks only lose entries; layers are prune's masked layers (same export), and dead
units are removed at the end.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...options import option
from ..base import TIES_WEIGHTS, CompressionPass, register_pass
from ..prune.layers import _Masked, masked_from_dense
from ..prune.surgery import remove_dead_units


@dataclass
class GlobalPruneOptions:
    sparsity: float = option(0.9, "(0, 1)")  # s_f: fraction of the selected weights set to zero at the end, in (0, 1)
    initial_sparsity: float = option(0.0, "[0, 1)")  # s_i
    rounds: int = option(1, "[1, 1000]")  # n
    normalize: str = option("none", choices=("none", "std"))  # "none": |w|; "std": |w| / std of the layer's surviving weights
    remove_dead_neurons: bool = True

    def __post_init__(self):
        if not 0 < self.sparsity < 1:
            raise ValueError(f"global sparsity must be in (0, 1), not {self.sparsity}")
        if not 0 <= self.initial_sparsity < 1 or self.initial_sparsity > self.sparsity:
            raise ValueError(f"initial_sparsity must be in [0, sparsity], not {self.initial_sparsity}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, not {self.rounds}")
        if self.normalize not in ("none", "std"):
            raise ValueError(f"normalize must be 'none' or 'std', not {self.normalize!r}")


@dataclass
class GlobalPruneLayerOptions:
    pass  # layers are selected by naming them (or [stage.layers.default]); the target is network-wide


def cubic_sparsity(final: float, initial: float, t: int, n: int) -> float:
    """Zhu & Gupta: s_t = s_f + (s_i - s_f)(1 - t/n)^3."""
    return final + (initial - final) * (1 - t / n) ** 3


def global_masks(layers: dict[str, nn.Module], sparsity: float, normalize: str = "none") -> dict[str, torch.Tensor]:
    """Keep-masks with ONE threshold over all layers: the round((1 - sparsity) * total) best-scored weights
    (already-pruned weights never come back)."""
    scores, masks = {}, {}
    for name, layer in layers.items():
        w = layer.weight.detach()
        mask = getattr(layer, "mask", torch.ones_like(w, dtype=torch.bool)).bool()
        s = w.abs()
        if normalize == "std":
            alive = w[mask]
            s = s / (float(alive.std()) if alive.numel() > 1 and float(alive.std()) > 0 else 1.0)
        scores[name] = torch.where(mask, s, torch.full_like(s, -1.0))
        masks[name] = mask
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(round((1 - sparsity) * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    out, i = {}, 0
    for name, s in scores.items():
        n = s.numel()
        out[name] = keep[i : i + n].view_as(s) & masks[name]
        i += n
    return out


@register_pass("global_prune")
class GlobalPrunePass(CompressionPass):
    Options = GlobalPruneOptions
    LayerOptions = GlobalPruneLayerOptions
    cannot_follow = TIES_WEIGHTS

    def __init__(self, options, layer_options):
        super().__init__(options, layer_options)
        self.removed: dict[str, int] = {}

    def apply(self, net: nn.Module, round_index: int) -> None:
        o = self.options
        layers = {}
        for name in self.layer_options:
            layer = net.layers()[name]
            if not isinstance(layer, _Masked):
                layer = masked_from_dense(layer)
                net.replace_layer(name, layer)
            layers[name] = layer
        s = cubic_sparsity(o.sparsity, o.initial_sparsity, round_index + 1, o.rounds)
        for name, keep in global_masks(layers, s, o.normalize).items():
            layers[name].prune_(keep)

    def finish(self, net: nn.Module) -> None:
        if self.options.remove_dead_neurons and getattr(net, "source_module", None) is None:
            self.removed = remove_dead_units(net)

    def summary(self, net: nn.Module) -> list[str]:
        layers = net.layers()
        lines = [f"{n}: {layers[n].density():.2%} of its remaining weights kept (global threshold)"
                 for n in self.layer_options if n in layers and hasattr(layers[n], "density")]
        lines += [f"{n}: removed {k} dead neurons/channels" for n, k in self.removed.items() if k]
        return lines
