"""The `quantize` pass: Deep Compression's trained weight sharing, or linear int8.

Composes after pruning in one recipe (stage 1 `prune`, stage 2 `quantize`): a pruned layer's mask
is kept (its pruned weights stay zero); a plain layer's zeros count as pruned, so a pruned ONNX file
imported as dense-with-zeros layers quantizes the same way.

    [[stage]]
    pass = "quantize"
    [stage.layers.default]
    method = "share"      # "share" (k-means codebook, retrained) or "int8" (per-channel symmetric)
    bits = 5              # 2**bits shared values, 1..8 (share only)
    init = "linear"       # "linear" (default), "density" or "random" centroid initialisation
    index_bits = 0        # width of the relative index fields in the compact file (1..8; 0: smallest file)
    bias_bits = 32        # 16: biases stored as float16
    [stage.retrain]       # retraining of the shared values (the codebooks and biases)
    epochs = 2

Checked before any training: bits outside 1..8, more shared values than a layer's remaining
weights, layers that are already hashed / low-rank (no codebook over their weights here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ...errors import RecipeError
from ...options import option
from ...train import TrainHooks
from ..base import CompressionPass, register_pass

from .kmeans import INITS
from .layers import MAX_BITS, MIN_BITS, _Int8, _Shared, dense_mask, int8_from_dense, shared_from_dense

METHODS = ("share", "int8")


@dataclass
class QuantizeOptions:
    seed: int = option(0, "[0, 2^32)")  # for init = "random"
    iterations: int = option(100, "[0, 100000]")  # Lloyd iterations (at most)

    def __post_init__(self):
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {self.seed!r}")
        if not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be a non-negative integer, not {self.iterations!r}")


@dataclass
class QuantizeLayerOptions:
    method: str = option("share", choices=METHODS)  # "share": trained weight sharing (k-means codebook); "int8": linear int8
    bits: int = option(5, f"[{MIN_BITS}, {MAX_BITS}]")  # share: 2^bits shared values per layer
    init: str = option("linear", choices=INITS)  # share: codebook initialisation
    index_bits: int = option(0, "[0, 8]")  # relative-index width in the file, 1..8; 0: the width giving the smallest file
    bias_bits: int = option(32, choices=(16, 32))  # 16: store the bias as float16 (share only; training sees the rounded bias)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, not {self.bits!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, not {self.init!r}")
        if not isinstance(self.index_bits, int) or isinstance(self.index_bits, bool) or not 0 <= self.index_bits <= 8:
            raise ValueError(f"index_bits must be an integer in 1..8 (0: automatic), not {self.index_bits!r}")
        if self.bias_bits not in (16, 32):
            raise ValueError(f"bias_bits must be 16 or 32, not {self.bias_bits!r}")


def _compressed_kinds() -> tuple[type, ...]:
    """Layer types of other methods that store no dense weight to share values over."""
    from ..hashed.layers import _Hashed
    from ..lowrank import layers as lowrank

    return (_Hashed,) + tuple(c for c in vars(lowrank).values() if isinstance(c, type) and issubclass(c, nn.Module)
                              and c.__module__ == lowrank.__name__ and not issubclass(c, (nn.Linear, nn.Conv2d)))


@register_pass("quantize")
class QuantizePass(CompressionPass):
    Options = QuantizeOptions
    LayerOptions = QuantizeLayerOptions
    layer_types = (nn.Linear, nn.Conv2d, _Shared, _Int8) + _compressed_kinds()

    def __init__(self, options, layer_options):
        super().__init__(options, layer_options)
        self.before: dict[str, tuple[int, int]] = {}  # layer -> (weights, remaining)

    def check(self, net: nn.Module) -> None:
        layers = net.layers()
        other = _compressed_kinds()
        for name, lo in self.layer_options.items():
            layer = layers[name]
            if isinstance(layer, (_Shared, _Int8)):
                continue
            if other and isinstance(layer, other):
                raise RecipeError(f"quantize: layer {name!r} is a {type(layer).__name__}: its weights are "
                                  "generated (hashed / low-rank), there is no weight matrix to share values over")
            if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
                raise RecipeError(f"quantize: layer {name!r}: padding_mode {layer.padding_mode!r} is not supported")
            if lo.method == "share":
                remaining = int(dense_mask(layer).sum())
                if remaining < (1 << lo.bits):
                    raise RecipeError(f"quantize: layer {name!r}: {1 << lo.bits} shared values ({lo.bits} bits) "
                                      f"for only {remaining} remaining weights")

    def apply(self, net: nn.Module, round_index: int) -> None:
        self.check(net)
        layers = net.layers()
        for name, lo in self.layer_options.items():
            layer = layers[name]
            if isinstance(layer, (_Shared, _Int8)):
                continue
            self.before[name] = (int(layer.weight.numel()), int(dense_mask(layer).sum()))
            if lo.method == "share":
                new = shared_from_dense(layer, lo.bits, lo.init, self.options.seed, self.options.iterations)
            else:
                new = int8_from_dense(layer)
            if isinstance(new, _Shared):
                new.index_bits = lo.index_bits or None
                new.bias_bits = lo.bias_bits
            net.replace_layer(name, new)

    def hooks(self, net: nn.Module):
        return TrainHooks()

    def summary(self, net: nn.Module) -> list[str]:
        layers = net.layers()
        out = []
        for n, (total, remaining) in self.before.items():
            m = layers[n]
            what = f"{1 << m.bits} shared values ({m.bits} bits)" if isinstance(m, _Shared) else "int8 per channel"
            out.append(f"{n}: {what} over {remaining:,} of {total:,} weights")
        return out
