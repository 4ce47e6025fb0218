"""Dynamic Network Surgery layers (Guo, Yao & Chen 2016, "Dynamic Network Surgery for Efficient DNNs").

A layer keeps every weight W and a 0/1 mask T; the forward uses W * T, but the gradient reaches every
entry of W as if T were all ones (straight-through, the paper's eq. 3-4), so pruned weights keep
updating. `splice_()` recomputes T from two thresholds a < b: T = 0 where |W| < a, T = 1 where |W| > b,
unchanged in between, so a pruned weight whose magnitude grows back above b is spliced back in.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Spliced:
    weight: nn.Parameter
    mask: torch.Tensor
    low: float
    high: float

    def _init_splice(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.low = self.high = 0.0

    @property
    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def _forward_weight(self) -> torch.Tensor:
        # value W * T; gradient 1 for every entry of W (pruned ones included)
        return self.weight * self.mask + (self.weight - self.weight.detach()) * ~self.mask

    @torch.no_grad()
    def set_thresholds(self, low: float, high: float) -> None:
        if not low <= high:
            raise ValueError(f"splicing needs a <= b, not a={low}, b={high}")
        self.low, self.high = float(low), float(high)

    @torch.no_grad()
    def splice_(self) -> None:
        mag = self.weight.abs()
        self.mask &= ~(mag < self.low)  # pruned
        self.mask |= mag > self.high  # spliced back

    def density(self) -> float:
        return float(self.mask.float().mean())

    def nnz(self) -> int:
        return int(self.mask.sum())


class SplicedLinear(_Spliced, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_splice()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._forward_weight(), self.bias)


class SplicedConv2d(_Spliced, nn.Conv2d):
    def __init__(self, *args, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_splice()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._forward_weight(), self.bias)


def spliced_from_layer(layer: nn.Module) -> nn.Module:
    """A splicing copy of an nn.Linear / nn.Conv2d (a masked layer's mask is its starting T)."""
    if isinstance(layer, _Spliced):
        return layer
    if isinstance(layer, nn.Linear):
        new = SplicedLinear(layer.in_features, layer.out_features, layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):
        new = SplicedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
    else:
        raise TypeError(f"splicing cannot act on a {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(layer.weight.detach())
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        mask = getattr(layer, "mask", None)
        new.mask.copy_(mask.bool() if mask is not None else torch.ones_like(new.mask))
    new.train(layer.training)
    return new


def to_masked(layer: nn.Module) -> nn.Module:
    """The fixed pruned layer (toolchain.methods.prune's masked layer) of a spliced one, for export."""
    from ..prune.layers import MaskedConv2d, MaskedLinear

    if isinstance(layer, nn.Linear):
        new = MaskedLinear(layer.in_features, layer.out_features, layer.bias is not None)
    else:
        new = MaskedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                           layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
    with torch.no_grad():
        new.weight.copy_(layer.weight.detach() * layer.mask)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        new.mask.copy_(layer.mask)
    new.train(layer.training)
    return new
