"""HashedNets layers (Chen et al. 2015, "Compressing Neural Networks with the Hashing Trick").

A hashed layer stores K real weights w and computes with a virtual weight matrix
V[n] = xi(n) * w[h(n)], where n is the flat index of the virtual weight (row-major over the dense
weight shape), h a hash into K buckets and xi a second hash into {-1, +1}. Nothing but w, the bias
and the integer seed is saved: the buckets are recomputed from the seed (and cached in a
non-persistent buffer at run time).

The hashes are degree-3 polynomials over the prime field P = 2**31 - 1 (Carter & Wegman's
polynomial family, 4-wise independent over the choice of coefficients):

    g_j(n) = ((c_j0 * n + c_j1) * n + c_j2) * n + c_j3   (mod P, each step reduced mod P)
    h(n) = g_0(n) mod K,     xi(n) = 1 - 2 * (g_1(n) mod 2)

with coefficients in [1, P) derived from the layer seed by murmur3's fmix32. Every intermediate
is below 2**62, so int64 arithmetic computes it exactly in numpy, torch and ONNX (Mul / Add / Mod
on int64, any opset >= 13; ONNX gets XOR only at opset 18, which is why no xor-shift mixer is
used), on every machine, with no RNG and no Python `hash()`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from converters.ir import register_layer_type

MASK32 = 0xFFFFFFFF
PRIME = 2**31 - 1
DEGREE = 3
MAX_VIRTUAL = PRIME  # flat indices must stay below P (distinct indices, distinct field elements)


def fmix32(x: np.ndarray) -> np.ndarray:
    """murmur3's 32-bit finaliser on a uint32 array (multiplications wrap modulo 2**32)."""
    x = np.asarray(x, dtype=np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    return x


def hash_coefficients(seed: int, which: int) -> list[int]:
    """The DEGREE + 1 coefficients (in [1, P)) of hash `which` (0: bucket, 1: sign) for a layer seed."""
    keys = np.arange(DEGREE + 1, dtype=np.uint32) + np.uint32(1 + 16 * which)
    mixed = fmix32(fmix32(keys) ^ np.uint32(int(seed) & MASK32))
    return [int(v) % (PRIME - 1) + 1 for v in mixed]


def poly_hash(n: np.ndarray, coefficients: list[int]) -> np.ndarray:
    """g(n) mod P by Horner's rule in int64 (n < P, so every product stays below 2**62)."""
    n = np.asarray(n, dtype=np.int64)
    h = np.full(n.shape, coefficients[0], dtype=np.int64)
    for c in coefficients[1:]:
        h = (h * n + c) % PRIME
    return h


def _check_count(count: int) -> None:
    if count > MAX_VIRTUAL:
        raise ValueError(f"a hashed layer can have at most {MAX_VIRTUAL:,} virtual weights, not {count:,}")


def hash_buckets(seed: int, count: int, buckets: int) -> np.ndarray:
    """Bucket index (int64, in [0, buckets)) of virtual weights 0 .. count-1."""
    _check_count(count)
    return poly_hash(np.arange(count, dtype=np.int64), hash_coefficients(seed, 0)) % buckets


def hash_signs(seed: int, count: int) -> np.ndarray:
    """Sign (+1 / -1, int8) of virtual weights 0 .. count-1."""
    _check_count(count)
    parity = poly_hash(np.arange(count, dtype=np.int64), hash_coefficients(seed, 1)) % 2
    return (1 - 2 * parity).astype(np.int8)


class _Hashed(nn.Module):
    """Shared parts of HashedLinear / HashedConv2d: K real weights + seed -> virtual weight."""

    weight_shape: tuple[int, ...]

    def _init_hashed(self, weight_shape, buckets: int, seed: int, bias_size: int | None, use_sign: bool) -> None:
        self.weight_shape = tuple(int(s) for s in weight_shape)
        virtual = math.prod(self.weight_shape)
        if not 1 <= buckets <= virtual:
            raise ValueError(f"buckets must be in [1, {virtual}] (the virtual weight count), not {buckets}")
        self.buckets = int(buckets)
        self.seed = int(seed) & MASK32
        self.use_sign = bool(use_sign)
        self.weight = nn.Parameter(torch.empty(self.buckets))
        self.bias = nn.Parameter(torch.empty(bias_size)) if bias_size else None
        self._index: torch.Tensor | None = None  # run-time cache, never saved
        self._sign: torch.Tensor | None = None
        self.reset_parameters()

    @property
    def virtual_count(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def fan_in(self) -> int:
        return math.prod(self.weight_shape[1:])

    def reset_parameters(self) -> None:
        """PyTorch's default layer init on the real weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        bound = 1 / math.sqrt(self.fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def hash_tables(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(bucket index [N] int64, sign [N] float or None), recomputed from the seed once per process."""
        dev = self.weight.device
        if self._index is None or self._index.device != dev:
            self._index = torch.from_numpy(hash_buckets(self.seed, self.virtual_count, self.buckets)).to(dev)
            self._sign = (torch.from_numpy(hash_signs(self.seed, self.virtual_count)).to(dev, self.weight.dtype)
                          if self.use_sign else None)
        return self._index, self._sign

    def virtual_weight(self) -> torch.Tensor:
        """The dense weight this layer computes with (differentiable w.r.t. the real weights)."""
        index, sign = self.hash_tables()
        v = self.weight.index_select(0, index)
        if sign is not None:
            v = v * sign.to(v.dtype)
        return v.view(self.weight_shape)

    @torch.no_grad()
    def load_dense(self, weight: torch.Tensor) -> None:
        """Set each real weight to the mean of xi * W over its bucket (the least-squares fit to W)."""
        index, sign = self.hash_tables()
        w = weight.detach().reshape(-1).to(self.weight.dtype)
        if sign is not None:
            w = w * sign
        total = torch.zeros(self.buckets, dtype=w.dtype, device=w.device).index_add_(0, index, w)
        count = torch.bincount(index, minlength=self.buckets).to(w.dtype)
        self.weight.copy_(total / count.clamp_min(1))

    def stored_parameters(self) -> int:
        return self.buckets + (self.bias.numel() if self.bias is not None else 0)

    def compression(self) -> float:
        """Real / virtual weights (K / N)."""
        return self.buckets / self.virtual_count

    # The seed and bucket count are part of the state (so a loaded state_dict rebuilds the same layer).
    def get_extra_state(self):
        return {"seed": self.seed, "buckets": self.buckets, "use_sign": self.use_sign}

    def set_extra_state(self, state) -> None:
        if int(state["buckets"]) != self.buckets:
            raise ValueError(f"state has {state['buckets']} buckets, layer has {self.buckets}")
        self.seed, self.use_sign = int(state["seed"]), bool(state["use_sign"])
        self._index = self._sign = None

    def __getstate__(self):  # pickling (checkpoints) drops the cached tables
        state = self.__dict__.copy()
        state["_index"] = state["_sign"] = None
        return state

    def _apply(self, fn, recurse=True):  # .to()/.double(): rebuild the cache on the new device/dtype
        self._index = self._sign = None
        return super()._apply(fn, recurse)


@register_layer_type
class HashedLinear(_Hashed):
    """A fully connected layer with `buckets` real weights shared by out x in virtual connections."""

    def __init__(self, in_features: int, out_features: int, buckets: int, seed: int = 0, bias: bool = True,
                 use_sign: bool = True):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_hashed((out_features, in_features), buckets, seed, out_features if bias else None, use_sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.virtual_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, buckets={self.buckets}, "
                f"seed={self.seed}, bias={self.bias is not None}")


@register_layer_type
class HashedConv2d(_Hashed):
    """A convolution whose out x in/groups x kh x kw virtual filter weights share `buckets` real weights."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, buckets: int, seed: int = 0,
                 stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True, use_sign: bool = True):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride, self.padding, self.dilation = (pair(kernel_size), pair(stride),
                                                                      pair(padding), pair(dilation))
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels ({in_channels}, {out_channels}) must be divisible by groups={groups}")
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_hashed(shape, buckets, seed, out_channels if bias else None, use_sign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.virtual_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, buckets={self.buckets}, seed={self.seed}")


def buckets_for(layer: nn.Module, compression: float) -> int:
    """K = round(compression x virtual weights) (at least 1) for a dense or hashed layer."""
    return max(1, round(compression * dense_weight_count(layer)))


def dense_weight_count(layer: nn.Module) -> int:
    if isinstance(layer, _Hashed):
        return layer.virtual_count
    return int(layer.weight.numel())


def hashed_from_dense(layer: nn.Module, buckets: int, seed: int, init: str = "random", use_sign: bool = True) -> _Hashed:
    """A hashed copy of an nn.Linear / nn.Conv2d with `buckets` real weights.

    init = "random": PyTorch's default init (train from scratch, as in the paper);
    "dense": real weights = bucket means of xi * W, bias copied.
    """
    if isinstance(layer, nn.Linear):
        new = HashedLinear(layer.in_features, layer.out_features, buckets, seed, layer.bias is not None, use_sign)
    elif isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"cannot hash a convolution with padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
        new = HashedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, buckets, seed, layer.stride,
                           layer.padding, layer.dilation, layer.groups, layer.bias is not None, use_sign)
    else:
        raise TypeError(f"cannot hash a {type(layer).__name__}")
    new = new.to(layer.weight.device, layer.weight.dtype)
    if init == "dense":
        new.load_dense(layer.weight)
        if layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
    elif init != "random":
        raise ValueError(f"init must be 'random' or 'dense', not {init!r}")
    new.train(layer.training)
    return new
