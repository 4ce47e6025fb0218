"""Quantized layers: trained weight sharing (Deep Compression §3) and linear int8.

SharedLinear / SharedConv2d hold a codebook of 2**bits shared values (nn.Parameter [K]), the
integer code of every weight (buffer) and the pruning mask (buffer):

    weight = codebook[codes] * mask

so autograd sums the gradients of all weights sharing a value into that value (the paper's
eq. 3) and pruned weights stay exactly zero. Int8Linear / Int8Conv2d hold per-output-channel
symmetric int8 weights (zero point 0, so pruned weights stay 0) and float scales:
weight = qweight * scale[:, None, ...]; only the bias trains.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from converters.ir import register_layer_type

from .kmeans import kmeans_1d

MIN_BITS, MAX_BITS = 1, 8


def dense_mask(layer: nn.Module) -> torch.Tensor:
    """The layer's surviving weights: its pruning mask if it has one, else its non-zero weights."""
    mask = getattr(layer, "mask", None)
    w = layer.weight.detach()
    if mask is not None:
        return mask.to(torch.bool) & (w != 0)
    return w != 0


class _Shared(nn.Module):
    weight_shape: tuple[int, ...]

    def _init_shared(self, weight_shape, bits: int, bias_size: int | None) -> None:
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in {MIN_BITS}..{MAX_BITS}, not {bits}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.bits = int(bits)
        self.codebook = nn.Parameter(torch.zeros(1 << self.bits))
        self.register_buffer("codes", torch.zeros(self.weight_shape, dtype=torch.long))
        self.register_buffer("mask", torch.zeros(self.weight_shape, dtype=torch.bool))
        self.bias = nn.Parameter(torch.zeros(bias_size)) if bias_size else None
        self.index_bits: int | None = None  # relative-index width in the compact file (None: the smallest file)
        self.bias_bits = 32  # 16: the bias is stored (and computed with) rounded to float16

    @property
    def effective_bias(self) -> torch.Tensor | None:
        """The bias as stored: rounded to float16 when bias_bits == 16 (straight-through gradient)."""
        if self.bias is None or self.bias_bits == 32:
            return self.bias
        return self.bias + (self.bias.half().to(self.bias.dtype) - self.bias).detach()

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (differentiable w.r.t. the codebook)."""
        return self.codebook[self.codes] * self.mask

    masked_weight = weight

    def nnz(self) -> int:
        return int(self.mask.sum())

    def density(self) -> float:
        return float(self.mask.float().mean())

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor, mask: torch.Tensor, init: str = "linear", seed: int = 0,
                   iterations: int = 100) -> None:
        """k-means over the surviving weights; codes of pruned weights are 0 (masked anyway)."""
        w = weight.detach().cpu().double().numpy()
        m = mask.detach().cpu().numpy().astype(bool)
        alive = w[m]
        k = 1 << self.bits
        if alive.size < k:
            raise ValueError(f"{k} shared values ({self.bits} bits) for only {alive.size} remaining weights")
        centroids, codes = kmeans_1d(alive, k, init, seed, iterations)
        full = np.zeros(w.shape, np.int64)
        full[m] = codes
        self.codebook.copy_(torch.from_numpy(centroids).to(self.codebook.dtype))
        self.codes.copy_(torch.from_numpy(full))
        self.mask.copy_(torch.from_numpy(m))

    def get_extra_state(self):
        return {"bits": self.bits, "index_bits": self.index_bits, "bias_bits": self.bias_bits}

    def set_extra_state(self, state) -> None:
        if int(state["bits"]) != self.bits:
            raise ValueError(f"state has {state['bits']} bits, layer has {self.bits}")
        self.index_bits, self.bias_bits = state.get("index_bits"), int(state.get("bias_bits", 32))


@register_layer_type
class SharedLinear(_Shared):
    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_shared((out_features, in_features), bits, out_features if bias else None)

    def forward(self, x):
        return F.linear(x, self.weight, self.effective_bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


@register_layer_type
class SharedConv2d(_Shared):
    def __init__(self, in_channels, out_channels, kernel_size, bits: int, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride),
                                                                      pair(padding), pair(dilation))
        self.padding_mode = "zeros"
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_shared(shape, bits, out_channels if bias else None)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.effective_bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bits={self.bits}")


class _Int8(nn.Module):
    def _init_int8(self, weight_shape, bias_size):
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.register_buffer("qweight", torch.zeros(self.weight_shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(self.weight_shape[0]))
        self.bias = nn.Parameter(torch.zeros(bias_size)) if bias_size else None

    @property
    def weight(self) -> torch.Tensor:
        s = self.scale.view(-1, *([1] * (len(self.weight_shape) - 1)))
        return self.qweight.to(s.dtype) * s

    masked_weight = weight

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Symmetric per-output-channel scales: scale = max |w| / 127, q = round(w / scale)."""
        w = weight.detach().float()
        amax = w.reshape(w.shape[0], -1).abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = torch.round(w / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-127, 127)
        self.qweight.copy_(q.to(torch.int8))
        self.scale.copy_(scale)

    def nnz(self) -> int:
        return int((self.qweight != 0).sum())


@register_layer_type
class Int8Linear(_Int8):
    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_int8((out_features, in_features), out_features if bias else None)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


@register_layer_type
class Int8Conv2d(_Int8):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride),
                                                                      pair(padding), pair(dilation))
        self.padding_mode = "zeros"
        self._init_int8((out_channels, in_channels // groups, *self.kernel_size), out_channels if bias else None)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _check_convertible(layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        raise ValueError(f"padding={layer.padding!r}, padding_mode={layer.padding_mode!r} is not supported")


def _copy_bias(new, layer):
    if layer.bias is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias.detach())


def shared_from_dense(layer: nn.Module, bits: int, init: str = "linear", seed: int = 0, iterations: int = 100):
    """A weight-sharing copy of a (pruned or plain) Linear / Conv2d: k-means over its surviving weights."""
    _check_convertible(layer)
    if isinstance(layer, nn.Linear):
        new = SharedLinear(layer.in_features, layer.out_features, bits, layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):
        new = SharedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, bits, layer.stride,
                           layer.padding, layer.dilation, layer.groups, layer.bias is not None)
    else:
        raise TypeError(f"cannot quantize a {type(layer).__name__}")
    w = getattr(layer, "masked_weight", layer.weight)
    new.load_dense(w, dense_mask(layer), init, seed, iterations)
    _copy_bias(new, layer)
    new.train(layer.training)
    return new.to(layer.weight.device)


def int8_from_dense(layer: nn.Module):
    _check_convertible(layer)
    if isinstance(layer, nn.Linear):
        new = Int8Linear(layer.in_features, layer.out_features, layer.bias is not None)
    elif isinstance(layer, nn.Conv2d):
        new = Int8Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, layer.bias is not None)
    else:
        raise TypeError(f"cannot quantize a {type(layer).__name__}")
    new.load_dense(getattr(layer, "masked_weight", layer.weight))
    _copy_bias(new, layer)
    new.train(layer.training)
    return new.to(layer.weight.device)


def is_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, (_Shared, _Int8))
