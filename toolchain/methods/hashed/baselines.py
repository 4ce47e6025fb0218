"""Baselines at a given stored-parameter budget (HashedNets' comparisons, Chen et al. 2015, Sec. 6).

* Random edge removal (RER): pass "random_edges", a fixed random mask keeping round(density x N)
  connections per layer (toolchain.methods.prune.layers), optionally re-initialised to train from scratch.
* Low-rank decomposition (LRD): the "lowrank" pass (toolchain.methods.lowrank.passes).
* An equivalent-size dense network (NN): `equivalent_width` gives the hidden width whose weight count
  matches the budget; `mlp` builds it. `hashed_mlp` builds a HashedNet MLP (also for the paper's
  virtual-size expansion: a wider hidden layer with the same K real weights).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .layers import HashedLinear
from ..prune.layers import _Masked, masked_from_dense
from ..base import CompressionPass, register_pass
from ...options import option
from ..lowrank.passes import layer_seed


@dataclass
class RandomEdgesOptions:
    seed: int = option(0, "[0, 2^32)")  # which connections are kept


@dataclass
class RandomEdgesLayerOptions:
    density: float = option(0.125, "(0, 1]")  # fraction of connections kept
    init: str = option("keep", choices=("keep", "random"))  # "keep": surviving trained weights; "random": re-initialise (train from scratch)

    def __post_init__(self):
        if not (0 < self.density <= 1):
            raise ValueError(f"density must be in (0, 1], not {self.density}")
        if self.init not in ("keep", "random"):
            raise ValueError(f"init must be 'keep' or 'random', not {self.init!r}")


def random_keep_mask(shape, density: float, seed: int) -> torch.Tensor:
    """A 0/1 mask with exactly max(1, round(density x numel)) ones at random (numpy PCG64) positions."""
    n = math.prod(shape)
    k = max(1, round(density * n))
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return torch.from_numpy(mask.reshape(shape))


@register_pass("random_edges")
class RandomEdgesPass(CompressionPass):
    Options = RandomEdgesOptions
    LayerOptions = RandomEdgesLayerOptions

    def apply(self, net: nn.Module, round_index: int) -> None:
        layers = net.layers()
        for name, lo in self.layer_options.items():
            layer = layers[name]
            seed = layer_seed(self.options.seed, name)
            if not isinstance(layer, _Masked):
                layer = masked_from_dense(layer)
                net.replace_layer(name, layer)
            if lo.init == "random":
                torch.manual_seed(seed)
                layer.reset_parameters()
            layer.prune_(random_keep_mask(tuple(layer.weight.shape), lo.density, seed))

    def summary(self, net: nn.Module) -> list[str]:
        layers = net.layers()
        return [f"{n}: random mask keeps {layers[n].nnz():,} of {layers[n].weight.numel():,} connections"
                for n in self.layer_options]


# ----- networks for the comparisons --------------------------------------------------------------

def mlp_weights(widths: list[int]) -> int:
    """Weights (no biases) of a fully connected net with layer widths [in, h1, ..., out]."""
    return sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def equivalent_width(n_in: int, n_out: int, hidden_layers: int, budget: int) -> int:
    """The largest hidden width h with mlp_weights([n_in] + [h] * hidden_layers + [n_out]) <= budget."""
    if hidden_layers < 1:
        raise ValueError("need at least one hidden layer")
    a, b = hidden_layers - 1, n_in + n_out  # a h^2 + b h <= budget
    h = budget / b if a == 0 else (-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)
    h = max(1, int(h))
    while mlp_weights([n_in] + [h + 1] * hidden_layers + [n_out]) <= budget:
        h += 1
    while h > 1 and mlp_weights([n_in] + [h] * hidden_layers + [n_out]) > budget:
        h -= 1
    return h


def mlp(widths: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Flatten -> (Linear -> ReLU [-> Dropout]) x hidden -> Linear; layer names fc1, fc2, ..."""
    mods: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), 1):
        mods[f"fc{i}"] = nn.Linear(a, b)
        if i < len(widths) - 1:
            mods[f"relu{i}"] = nn.ReLU()
            if dropout:
                mods[f"drop{i}"] = nn.Dropout(dropout)
    return nn.Sequential(mods)


def hashed_mlp(widths: list[int], compression: float, seed: int = 0, dropout: float = 0.0,
               base_widths: list[int] | None = None) -> nn.Sequential:
    """An MLP of HashedLinear layers, K_l = round(compression x weights of layer l of `base_widths`).

    With base_widths = widths this is a HashedNet at that compression; with wider `widths` it is the
    paper's virtual-size expansion (same real weights, more virtual connections and hidden units)."""
    base = base_widths or widths
    if len(base) != len(widths):
        raise ValueError("base_widths must have as many layers as widths")
    net = mlp(widths, dropout)
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]), 1):
        k = max(1, round(compression * base[i - 1] * base[i]))
        k = min(k, a * b)
        net[list(net._modules).index(f"fc{i}")] = HashedLinear(a, b, k, layer_seed(seed, f"fc{i}"))
    return net
