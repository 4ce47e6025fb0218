"""HashedNets (Chen et al. 2015): each layer's virtual weights share K real weights chosen by a hash.

Per layer: K = round(compression x virtual weights) (or `buckets` = K directly), a hash seed (default:
derived from the pass seed and the layer name), and the initialisation: "random" trains the real
weights from scratch as in the paper (the driver's retraining), "dense" starts them at the bucket
means of the trained layer. With `teacher = true` (default) the network as it entered this stage is
kept as the dark-knowledge teacher; distillation runs when the stage's [stage.retrain] sets
distill_temperature > 0 (and distill_weight, the weight of the soft-target loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ...errors import RecipeError
from .layers import MAX_VIRTUAL, _Hashed, buckets_for, dense_weight_count, hashed_from_dense
from ...train import TrainHooks
from ..base import CompressionPass, frozen_copy, register_pass
from ...options import option
from ..lowrank.passes import layer_seed


@dataclass
class HashedOptions:
    seed: int = option(0, "[0, 2^32)")  # per-layer hash seeds derive from this and the layer name
    teacher: bool = True  # keep the incoming network as the distillation teacher

    def __post_init__(self):
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {self.seed!r}")


@dataclass
class HashedLayerOptions:
    compression: float | None = option(None, "(0, 1]")  # K / virtual weights; exclusive with buckets
    buckets: int | None = option(None, "[1, 2^31)")  # K (real weights) directly; exclusive with compression
    init: str = option("random", choices=("random", "dense"))  # "random" (from scratch) or "dense" (bucket means of the trained weights)
    seed: int | None = option(None, "[0, 2^32)")  # this layer's hash seed (default: from the pass seed and layer name)
    sign: bool = True  # the sign hash xi (False: V = w[h(i, j)])

    def __post_init__(self):
        if (self.compression is None) == (self.buckets is None):
            raise ValueError("give exactly one of compression or buckets")
        if self.compression is not None and not (0 < self.compression <= 1):
            raise ValueError(f"compression must be in (0, 1], not {self.compression}")
        if self.buckets is not None and (not isinstance(self.buckets, int) or self.buckets < 1):
            raise ValueError(f"buckets must be a positive integer, not {self.buckets!r}")
        if self.init not in ("random", "dense"):
            raise ValueError(f"init must be 'random' or 'dense', not {self.init!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**32):
            raise ValueError(f"seed must be an integer in [0, 2**32), not {self.seed!r}")


@register_pass("hashed")
class HashedPass(CompressionPass):
    Options = HashedOptions
    LayerOptions = HashedLayerOptions

    def __init__(self, options, layer_options):
        super().__init__(options, layer_options)
        self.teacher: nn.Module | None = None
        self.virtual: dict[str, int] = {}

    def buckets(self, name: str, layer: nn.Module) -> int:
        lo = self.layer_options[name]
        virtual = dense_weight_count(layer)
        if virtual > MAX_VIRTUAL:
            raise RecipeError(f"hashed: layer {name!r} has {virtual:,} weights; at most {MAX_VIRTUAL:,} can be hashed")
        k = lo.buckets if lo.buckets is not None else buckets_for(layer, lo.compression)
        if k > virtual:
            raise RecipeError(f"hashed: layer {name!r}: buckets = {k:,} is more than its {virtual:,} virtual weights")
        return k

    def check(self, net: nn.Module) -> None:
        """Raise RecipeError for bucket counts the layers cannot take (before any change)."""
        layers = net.layers()
        for name in self.layer_options:
            if not isinstance(layers[name], _Hashed):
                if isinstance(layers[name], nn.Conv2d) and (layers[name].padding_mode != "zeros"
                                                            or isinstance(layers[name].padding, str)):
                    raise RecipeError(f"hashed: layer {name!r}: padding_mode {layers[name].padding_mode!r} is not supported")
                self.buckets(name, layers[name])

    def apply(self, net: nn.Module, round_index: int) -> None:
        self.check(net)
        if self.options.teacher and self.teacher is None:
            self.teacher = frozen_copy(net)
        layers = net.layers()
        for name, lo in self.layer_options.items():
            layer = layers[name]
            if isinstance(layer, _Hashed):
                continue
            seed = lo.seed if lo.seed is not None else layer_seed(self.options.seed, name)
            self.virtual[name] = dense_weight_count(layer)
            net.replace_layer(name, hashed_from_dense(layer, self.buckets(name, layer), seed, lo.init, lo.sign))

    def hooks(self, net: nn.Module) -> TrainHooks:
        return TrainHooks(teacher=self.teacher)

    def summary(self, net: nn.Module) -> list[str]:
        layers = net.layers()
        return [f"{n}: {layers[n].buckets:,} real weights for {v:,} virtual ({v / layers[n].buckets:.1f}x, "
                f"seed {layers[n].seed})" for n, v in self.virtual.items()]
