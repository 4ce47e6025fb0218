"""Pruned layers: a dense weight times a fixed 0/1 mask.

The forward uses `weight * mask`, so the gradient of a pruned weight is zero and it can never
come back; `prune_(keep)` zeroes the weights too, so L2 decay and momentum leave them at zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Masked:
    mask: torch.Tensor
    weight: nn.Parameter

    def _init_mask(self) -> None:
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))

    @property
    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    @torch.no_grad()
    def prune_(self, keep: torch.Tensor) -> None:
        """Intersect the mask with `keep` (weights already pruned stay pruned) and zero pruned weights."""
        self.mask &= keep.to(torch.bool)
        self.weight.mul_(self.mask)

    def density(self) -> float:
        return float(self.mask.float().mean())

    def nnz(self) -> int:
        return int(self.mask.sum())


class MaskedLinear(_Masked, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight, self.bias)


class MaskedConv2d(_Masked, nn.Conv2d):
    def __init__(self, *args, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_mask()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight, self.bias)


def masked_from_dense(layer: nn.Module) -> nn.Module:
    """A masked copy (all-ones mask) of an nn.Linear / nn.Conv2d sharing nothing with it."""
    if isinstance(layer, _Masked):
        return layer
    if isinstance(layer, nn.Linear):
        new = MaskedLinear(layer.in_features, layer.out_features, layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):
        new = MaskedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                           layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
    else:
        raise TypeError(f"cannot prune a {type(layer).__name__}")
    new.load_state_dict(layer.state_dict(), strict=False)
    new.train(layer.training)
    return new
