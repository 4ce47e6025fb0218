"""The `sparse_vd` pass: sparse variational dropout (Molchanov et al. 2017), trained from a dense (or
pruned) model.

apply: every selected layer becomes an SVDLinear / SVDConv2d (theta = the trained weights,
log sigma^2 = init_log_sigma2). Retraining minimises  cross-entropy + beta(t) * KL / samples, the
paper's ELBO per training sample, with the KL weight beta annealed linearly from 0 to kl_weight over
`anneal_steps` SGD steps; by default with Adam (the paper's optimiser; the recipe's lr schedule scales
its learning rate `adam_lr`). finish: weights with log alpha > threshold are pruned and every layer
becomes a masked (pruned) layer, so the sparse ONNX forms of toolchain.methods.prune apply; then dead
neurons / channels are removed as the prune pass does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...options import option
from ..base import TIES_WEIGHTS, CompressionPass, register_pass
from ...train import TrainHooks
from ..prune.surgery import remove_dead_units
from .layers import _SVD, svd_from_layer, to_masked


@dataclass
class SparseVDOptions:
    threshold: float = option(3.0, "[-inf, inf]")  # prune where log alpha > threshold
    kl_weight: float = option(1.0, "[0, inf]")  # final beta of the KL term
    anneal_steps: int = option(0, "[0, inf]")  # linear warm-up of beta from 0 (0: full weight from the start)
    samples: int = option(50000, "[1, inf]")  # N of the ELBO: the KL enters the per-sample loss as KL / N
    init_log_sigma2: float = option(-10.0, "[-30, 10]")  # initial log sigma^2 of every weight
    optimizer: str = option("adam", choices=("adam", "sgd"))  # "adam" (the paper's) or "sgd" (the recipe's Caffe-style SGD)
    adam_lr: float = option(1e-3, "(0, inf]")
    remove_dead_neurons: bool = True

    def __post_init__(self):
        if self.kl_weight < 0 or self.anneal_steps < 0 or self.samples < 1:
            raise ValueError("kl_weight and anneal_steps must be >= 0, samples >= 1")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', not {self.optimizer!r}")
        if not self.adam_lr > 0:
            raise ValueError(f"adam_lr must be > 0, not {self.adam_lr}")


@dataclass
class SparseVDLayerOptions:
    threshold: float | None = option(None, "[-inf, inf]")  # this layer's log-alpha threshold (default: the pass's)


@register_pass("sparse_vd")
class SparseVDPass(CompressionPass):
    Options = SparseVDOptions
    LayerOptions = SparseVDLayerOptions
    cannot_follow = TIES_WEIGHTS

    def __init__(self, options, layer_options):
        super().__init__(options, layer_options)
        self.step = 0
        self.kept: dict[str, tuple[int, int]] = {}
        self.removed: dict[str, int] = {}

    def apply(self, net: nn.Module, round_index: int) -> None:
        layers = net.layers()
        for name, lo in self.layer_options.items():
            thr = self.options.threshold if lo.threshold is None else lo.threshold
            net.replace_layer(name, svd_from_layer(layers[name], thr, self.options.init_log_sigma2))

    def beta(self) -> float:
        o = self.options
        return o.kl_weight * (min(1.0, self.step / o.anneal_steps) if o.anneal_steps else 1.0)

    def hooks(self, net: nn.Module) -> TrainHooks:
        svd = [m for m in net.layers().values() if isinstance(m, _SVD)]

        def regularizer(model):
            b = self.beta()
            self.step += 1
            return b / self.options.samples * sum(m.kl() for m in svd)

        return TrainHooks(regularizer=regularizer)

    def optimizer_factory(self):
        """`fn(params) -> optimiser` the driver retrains this pass with (None: the recipe's SGD)."""
        if self.options.optimizer == "sgd":
            return None
        lr = self.options.adam_lr
        return lambda params: torch.optim.Adam(params, lr=lr)

    def finish(self, net: nn.Module) -> None:
        for name in self.layer_options:
            layer = net.layers().get(name)
            if isinstance(layer, _SVD):
                self.kept[name] = (layer.nnz(), layer.weight.numel())
                net.replace_layer(name, to_masked(layer))
        if self.options.remove_dead_neurons and getattr(net, "source_module", None) is None:
            self.removed = remove_dead_units(net)

    def summary(self, net: nn.Module) -> list[str]:
        lines = [f"{n}: {k}/{t} weights kept ({k / t:.2%}), log alpha <= threshold" for n, (k, t) in self.kept.items()]
        lines += [f"{n}: removed {k} dead neurons/channels" for n, k in self.removed.items() if k]
        return lines
