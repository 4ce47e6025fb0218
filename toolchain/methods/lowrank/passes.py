"""Low-rank factorisation W ~= B @ A of fully connected and convolution layers.

method = "svd": truncated SVD of the trained layer (rank set directly, by a target `compression` =
stored factor weights / dense weights, or by retained spectral `energy`); both factors are then
fine-tuned by the driver's retraining.

method = "denil": Denil et al. 2013, "Predicting Parameters in Deep Learning". A is a FIXED
dictionary (a buffer, never trained) of n_alpha atoms over the layer's inputs and only B is learned;
`compression` is then the fraction of weights learned (1 - the fraction predicted), n_alpha =
compression x fan-in. Dictionaries:
  identity  n_alpha random columns of the identity (random connections: B holds the weights of a
            random subset of inputs, the rest are predicted as zero);
  random    n_alpha random orthonormal directions;
  kernel    kernel ridge regression from n_alpha random input positions, A = (K_alpha + ridge I)^-1 k_alpha,
            (by default whitened: an orthonormal basis of the same span, see make_dictionary), with a
            squared-exponential kernel on the input layout: the pixel grid for a first fc layer
            (784 -> 28 x 28), the (channel, y, x) block of a conv layer's fan-in or of an fc layer fed
            by a flattened feature map (channels uncorrelated). An fc layer with no spatial layout
            (fed by another fc layer) places each input at its trained outgoing weight vector, so the
            kernel links inputs the dense layer uses alike.
`columns = k` splits the inputs into k disjoint random subsets with a dictionary each (columnar).
`init = "fit"` starts B at the least-squares fit to the trained weight; "random" from scratch.
With `teacher = true` the network as it entered the stage is the dark-knowledge teacher of the
fine-tuning (used when [stage.retrain] sets distill_temperature > 0).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ...errors import RecipeError
from ...train import TrainHooks
from .layers import (DICTIONARIES, _LowRank, dictionary_factorize, fan_in, make_dictionary, max_rank,
                              random_factors, rank_for_compression, rank_for_energy, svd_factorize)
from ..base import CompressionPass, frozen_copy, register_pass
from ...options import option

METHODS = ("svd", "denil")


@dataclass
class LowRankOptions:
    seed: int = option(0, "[0, 2^32)")  # dictionary atoms, column subsets and random inits
    teacher: bool = False  # keep the incoming network as the distillation teacher for fine-tuning


@dataclass
class LowRankLayerOptions:
    method: str = option("svd", choices=METHODS)  # "svd" (truncated SVD) or "denil" (fixed dictionary, learned coefficients)
    rank: int | None = option(None, "[1, 2^31)")  # SVD: the rank; denil: the dictionary size n_alpha
    compression: float | None = option(None, "(0, 1]")  # svd: stored weights / dense; denil: learned / dense
    energy: float | None = option(None, "(0, 1]")  # svd only: keep this fraction of the squared singular values
    dictionary: str | None = option(None, choices=DICTIONARIES)  # denil only: identity | random | kernel (default kernel)
    columns: int = option(1, "[1, 2^31)")  # denil only: columnar dictionaries over disjoint input subsets
    init: str = option("fit", choices=("fit", "random"))  # "fit" (from the trained layer) or "random" (from scratch)
    lengthscale: float = option(0.0, "[0, inf)")  # kernel dictionary: SE length scale (input units); 0 = automatic
    ridge: float = option(0.01, "(0, inf)")  # kernel dictionary: the lambda of (K + lambda I)^-1
    layout: str | list = "auto"  # kernel dictionary: "auto", "none", or [H, W] / [C, H, W] of the inputs
    whiten: bool = True  # kernel dictionary: orthonormal basis of its span (well-conditioned fine-tuning)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r} ({', '.join(METHODS)})")
        given = [k for k in ("rank", "compression", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of rank, compression or energy")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank must be a positive integer, not {self.rank!r}")
        if self.compression is not None and not (0 < self.compression <= 1):
            raise ValueError(f"compression must be in (0, 1], not {self.compression}")
        if self.energy is not None:
            if self.method != "svd":
                raise ValueError("energy selects an SVD rank; use rank or compression with method = 'denil'")
            if not (0 < self.energy <= 1):
                raise ValueError(f"energy must be in (0, 1], not {self.energy}")
        if self.method == "svd":
            for key, default in (("dictionary", None), ("columns", 1), ("lengthscale", 0.0), ("ridge", 0.01),
                                 ("layout", "auto"), ("whiten", True)):
                if getattr(self, key) != default:
                    raise ValueError(f"{key} applies to method = 'denil' only")
        else:
            self.dictionary = self.dictionary or "kernel"
            if self.dictionary not in DICTIONARIES:
                raise ValueError(f"unknown dictionary {self.dictionary!r} ({', '.join(DICTIONARIES)})")
        if not isinstance(self.columns, int) or self.columns < 1:
            raise ValueError(f"columns must be a positive integer, not {self.columns!r}")
        if self.init not in ("fit", "random"):
            raise ValueError(f"init must be 'fit' or 'random', not {self.init!r}")
        if self.lengthscale < 0:
            raise ValueError(f"lengthscale must be >= 0, not {self.lengthscale}")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0, not {self.ridge}")
        self.layout = parse_layout(self.layout)


def parse_layout(layout):
    """'auto' | 'none' | [H, W] | [C, H, W] (also 'HxW' / 'CxHxW') -> 'auto', None or a tuple."""
    if layout == "auto":
        return "auto"
    if layout in ("none", None):
        return None
    if isinstance(layout, str):
        try:
            layout = [int(p) for p in layout.lower().split("x")]
        except ValueError:
            raise ValueError(f"layout must be 'auto', 'none', [H, W] or [C, H, W], not {layout!r}") from None
    if isinstance(layout, tuple) and len(layout) in (2, 3):
        return layout
    if not isinstance(layout, list) or len(layout) not in (2, 3) or not all(isinstance(d, int) and d > 0 for d in layout):
        raise ValueError(f"layout must be 'auto', 'none', [H, W] or [C, H, W], not {layout!r}")
    return tuple(layout)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed from the pass seed and the layer name (stable across processes: crc32)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) & 0xFFFFFFFF


def input_layouts(net: nn.Module, names) -> dict[str, tuple[int, ...] | None]:
    """The spatial layout of each named layer's inputs (fan-in): (C/groups, kh, kw) for a conv;
    for an fc layer the [C, H, W] of the feature map it reads through Flatten / Reshape (or the graph
    input), as (H, W) when C == 1; None when its input comes from another fc layer."""
    layers = net.layers()
    out: dict[str, tuple[int, ...] | None] = {}
    need_run = []
    for name in names:
        layer = layers[name]
        if isinstance(layer, nn.Conv2d):
            c = layer.in_channels // layer.groups
            out[name] = (c, *layer.kernel_size) if c > 1 else tuple(layer.kernel_size)
        else:
            need_run.append(name)
    if not need_run:
        return out
    shapes = _value_shapes(net)
    for name in need_run:
        out[name] = None
        value = net.node(name).inputs[0]
        for _ in range(len(net.nodes)):
            shape = shapes.get(value)
            if shape is not None and len(shape) >= 3 and int(np.prod(shape[1:])) == fan_in(layers[name]):
                c, h, w = (1, *shape[-2:]) if len(shape) == 3 else shape[-3:]
                if c * h * w == fan_in(layers[name]):
                    out[name] = (c, h, w) if c > 1 else (h, w)
                    break
            node = net.producer(value)
            if node is None or node.name in layers:
                break
            inputs = [v for v in node.inputs if v and not net.is_constant(v)]
            if len(inputs) != 1:
                break
            value = inputs[0]
    return out


def _value_shapes(net) -> dict[str, tuple[int, ...]]:
    """Shapes of every value of the graph at batch 1 (one forward pass on zeros)."""
    feeds = []
    for n in net.input_names:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in net.input_shapes[n]]
        feeds.append(torch.zeros(shape, dtype=net.input_dtypes.get(n, torch.float32)))
    was = net.training
    net.eval()
    with torch.no_grad():
        env = net.run(*feeds)
    net.train(was)
    return {k: tuple(v.shape) for k, v in env.items() if isinstance(v, torch.Tensor)}


@register_pass("lowrank")
class LowRankPass(CompressionPass):
    Options = LowRankOptions
    LayerOptions = LowRankLayerOptions

    def __init__(self, options, layer_options):
        super().__init__(options, layer_options)
        self.ranks: dict[str, int] = {}
        self.dense_weights: dict[str, int] = {}
        self.teacher: nn.Module | None = None

    def _rank(self, name: str, layer: nn.Module, lo: LowRankLayerOptions) -> int:
        fixed = lo.method == "denil"
        limit = fan_in(layer) if fixed else max_rank(layer)
        what = "dictionary size" if fixed else "rank"
        if lo.rank is not None:
            r = lo.rank
        elif lo.energy is not None:
            r = rank_for_energy(layer, lo.energy)
        else:
            r = rank_for_compression(layer, lo.compression, fixed)
            if r < 1:
                raise RecipeError(f"lowrank: layer {name!r}: compression {lo.compression} leaves a {what} of 0 "
                                  f"({what} 1 needs compression >= {self._min_compression(layer, fixed):.3g})")
        if r > limit:
            raise RecipeError(f"lowrank: layer {name!r}: {what} {r} is larger than the layer allows ({limit} for a "
                              f"{'x'.join(map(str, layer.weight.shape))} weight)")
        if lo.method == "denil" and lo.columns > r:
            raise RecipeError(f"lowrank: layer {name!r}: columns = {lo.columns} needs a dictionary of at least that "
                              f"many atoms (it has {r})")
        return r

    @staticmethod
    def _min_compression(layer, fixed: bool) -> float:
        from .layers import grouped_weight

        _, o, f = grouped_weight(layer).shape
        return 1 / f if fixed else (o + f) / (o * f)

    def check(self, net: nn.Module) -> None:
        """Raise RecipeError for ranks / dictionary sizes the layers cannot take (before any change)."""
        layers = net.layers()
        for name, lo in self.layer_options.items():
            layer = layers[name]
            if isinstance(layer, _LowRank):
                continue
            if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
                raise RecipeError(f"lowrank: layer {name!r}: padding_mode {layer.padding_mode!r} is not supported")
            self._rank(name, layer, lo)

    def apply(self, net: nn.Module, round_index: int) -> None:
        self.check(net)
        if self.options.teacher and self.teacher is None:
            self.teacher = frozen_copy(net)
        layers = net.layers()
        todo = {n: lo for n, lo in self.layer_options.items() if not isinstance(layers[n], _LowRank)}
        kernel_auto = [n for n, lo in todo.items() if lo.method == "denil" and lo.dictionary == "kernel" and lo.layout == "auto"]
        layouts = input_layouts(net, kernel_auto) if kernel_auto else {}
        replacements = {}
        for name, lo in todo.items():
            layer = layers[name]
            r = self._rank(name, layer, lo)
            seed = layer_seed(self.options.seed, name)
            gen = torch.Generator().manual_seed(seed)
            if lo.method == "svd":
                new = svd_factorize(layer, r) if lo.init == "fit" else random_factors(layer, r, gen)
            else:
                layout = layouts.get(name) if lo.layout == "auto" else lo.layout
                try:
                    dictionary = make_dictionary(lo.dictionary, fan_in(layer), r, np.random.default_rng(seed),
                                                 lo.columns, layout, layer.weight, lo.lengthscale, lo.ridge,
                                                 lo.whiten)
                except ValueError as e:
                    raise RecipeError(f"lowrank: layer {name!r}: {e}") from None
                new = dictionary_factorize(layer, dictionary, lo.init, gen, lo.dictionary)
            replacements[name] = new, r, int(layer.weight.numel())
        for name, (new, r, dense) in replacements.items():  # only once every layer is built
            self.ranks[name] = r
            self.dense_weights[name] = dense
            net.replace_layer(name, new)

    def hooks(self, net: nn.Module) -> TrainHooks:
        return TrainHooks(teacher=self.teacher)

    def summary(self, net: nn.Module) -> list[str]:
        layers = net.layers()
        lines = []
        for name, r in self.ranks.items():
            layer = layers[name]
            dense = self.dense_weights[name]
            w_stored = layer.basis.numel() + layer.coef.numel()
            if layer.fixed_basis:
                lines.append(f"{name}: {layer.dictionary} dictionary of {r} atoms; learned {layer.coef.numel():,} "
                             f"of {dense:,} weights ({100 * (1 - layer.coef.numel() / dense):.1f}% predicted), "
                             f"stored {w_stored:,}")
            else:
                lines.append(f"{name}: rank {r}; stored {w_stored:,} of {dense:,} weights "
                             f"({dense / w_stored:.1f}x fewer)")
        return lines
