"""Factored (low-rank) layers: W ~= B @ A, with A [rank, fan_in] and B [out, rank].

Covers both truncated SVD (Denton et al. 2014 style: A and B trained) and Denil et al. 2013,
"Predicting Parameters in Deep Learning" (A a FIXED dictionary, a buffer that is never trained;
only B is learned). In Denil's notation W^T = U V with U = A^T (n_v x n_alpha) and V = B^T.

The forward is two products, x -> x A^T -> (x A^T) B^T + b (for a convolution: a kh x kw
convolution with `rank` filters per group, then a 1x1 convolution), unless that costs more
multiply-adds than the expanded weight B @ A, in which case the expanded weight is used.

Dictionary builders for Denil's method are here too: identity (random connections), random
orthonormal projections, and the kernel-ridge-regression dictionary
U = k_alpha^T (K_alpha + lambda I)^-1 with a squared-exponential kernel over the input layout;
the columnar variant builds one dictionary per disjoint random subset of the inputs.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from converters.ir import register_layer_type

log = logging.getLogger(__name__)

DICTIONARIES = ("identity", "random", "kernel")


class _LowRank(nn.Module):
    """Shared parts: `basis` (A, [groups*rank, fan_in...]) and `coef` (B) and the dense-equivalent weight."""

    rank: int
    groups: int
    fixed_basis: bool
    dictionary: str  # "learned" (SVD / trained factors) or the kind of fixed dictionary

    def _init_factors(self, basis: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor | None, fixed_basis: bool,
                      dictionary: str) -> None:
        self.fixed_basis, self.dictionary = bool(fixed_basis), dictionary
        if fixed_basis:
            self.register_buffer("basis", basis.detach().clone())
        else:
            self.basis = nn.Parameter(basis.detach().clone())
        self.coef = nn.Parameter(coef.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def stored_parameters(self) -> int:
        """Elements the exported layer stores (both factors and the bias)."""
        return self.basis.numel() + self.coef.numel() + (self.bias.numel() if self.bias is not None else 0)

    def learned_parameters(self) -> int:
        """Elements that training changes (Denil's 'parameters not predicted'); bias included."""
        n = self.coef.numel() + (self.bias.numel() if self.bias is not None else 0)
        return n if self.fixed_basis else n + self.basis.numel()

    def get_extra_state(self):
        return {"fixed_basis": self.fixed_basis, "dictionary": self.dictionary}

    def set_extra_state(self, state) -> None:
        self.dictionary = state["dictionary"]
        if bool(state["fixed_basis"]) != self.fixed_basis:
            raise ValueError("state and layer disagree on whether the basis is fixed")


@register_layer_type
class LowRankLinear(_LowRank):
    """y = (x A^T) B^T + b, the factored form of nn.Linear(in_features, out_features)."""

    def __init__(self, basis: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor | None = None,
                 fixed_basis: bool = False, dictionary: str = "learned"):
        super().__init__()
        rank, in_features = basis.shape
        out_features, rank_b = coef.shape
        if rank != rank_b:
            raise ValueError(f"factor shapes disagree: basis {tuple(basis.shape)}, coef {tuple(coef.shape)}")
        self.in_features, self.out_features, self.rank, self.groups = int(in_features), int(out_features), int(rank), 1
        self._init_factors(basis, coef, bias, fixed_basis, dictionary)

    def factored_is_cheaper(self) -> bool:
        return self.rank * (self.in_features + self.out_features) < self.in_features * self.out_features

    def dense_weight(self) -> torch.Tensor:
        return self.coef @ self.basis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factored_is_cheaper():
            return F.linear(F.linear(x, self.basis), self.coef, self.bias)
        return F.linear(x, self.dense_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"basis={'fixed ' + self.dictionary if self.fixed_basis else 'learned'}")


@register_layer_type
class LowRankConv2d(_LowRank):
    """A kh x kw convolution with `rank` filters per group (basis), then a 1x1 convolution (coef) + bias.

    basis: [groups * rank, in_channels / groups, kh, kw]; coef: [out_channels, rank, 1, 1].
    """

    def __init__(self, basis: torch.Tensor, coef: torch.Tensor, bias: torch.Tensor | None, in_channels: int,
                 stride=1, padding=0, dilation=1, groups: int = 1, fixed_basis: bool = False,
                 dictionary: str = "learned"):
        super().__init__()
        pair = nn.modules.utils._pair
        gr, cin_g, kh, kw = basis.shape
        out_channels, rank = coef.shape[:2]
        if gr != groups * rank or cin_g * groups != in_channels or tuple(coef.shape[2:]) != (1, 1):
            raise ValueError(f"factor shapes disagree: basis {tuple(basis.shape)}, coef {tuple(coef.shape)}, "
                             f"in_channels={in_channels}, groups={groups}")
        self.in_channels, self.out_channels, self.groups, self.rank = int(in_channels), int(out_channels), int(groups), int(rank)
        self.kernel_size, self.stride, self.padding, self.dilation = (kh, kw), pair(stride), pair(padding), pair(dilation)
        self._init_factors(basis, coef, bias, fixed_basis, dictionary)

    @property
    def fan_in(self) -> int:
        return self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1]

    def factored_is_cheaper(self) -> bool:
        per_pos_factored = self.groups * self.rank * self.fan_in + self.out_channels * self.rank
        return per_pos_factored < self.out_channels * self.fan_in

    def dense_weight(self) -> torch.Tensor:
        g, r, o = self.groups, self.rank, self.out_channels
        a = self.basis.reshape(g, r, self.fan_in)
        b = self.coef.reshape(g, o // g, r)
        return torch.bmm(b, a).reshape(o, self.in_channels // g, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.factored_is_cheaper():
            y = F.conv2d(x, self.basis, None, self.stride, self.padding, self.dilation, self.groups)
            return F.conv2d(y, self.coef, self.bias, groups=self.groups)
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, rank={self.rank}, "
                f"basis={'fixed ' + self.dictionary if self.fixed_basis else 'learned'}")


# ----- helpers on dense layers -------------------------------------------------------------------

def grouped_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight as [groups, out/groups, fan_in]."""
    w = layer.weight.detach()
    g = getattr(layer, "groups", 1)
    return w.reshape(g, w.shape[0] // g, -1)


def max_rank(layer: nn.Module) -> int:
    """The largest rank a factorisation of this layer can have: min(out/groups, fan_in)."""
    _, o, f = grouped_weight(layer).shape
    return min(o, f)


def fan_in(layer: nn.Module) -> int:
    return grouped_weight(layer).shape[2]


def rank_for_compression(layer: nn.Module, compression: float, fixed_basis: bool) -> int:
    """Rank so the stored (SVD: both factors) or learned (fixed dictionary: coef only) weights are
    about `compression` x the dense weight count. May be 0 when the budget is too small."""
    g, o, f = grouped_weight(layer).shape
    if fixed_basis:
        return int(math.floor(compression * f + 1e-9))  # coef is [o, r]: r / f of the o x f weights
    return int(math.floor(compression * o * f / (o + f) + 1e-9))


def rank_for_energy(layer: nn.Module, energy: float) -> int:
    """Smallest rank keeping `energy` of the squared singular values (the worst group decides)."""
    r = 1
    for w in grouped_weight(layer).double():
        s2 = torch.linalg.svdvals(w) ** 2
        frac = torch.cumsum(s2, 0) / s2.sum().clamp_min(1e-300)
        r = max(r, int(torch.searchsorted(frac, torch.tensor([energy], dtype=frac.dtype) - 1e-12).item()) + 1)
    return min(r, max_rank(layer))


def _build(layer: nn.Module, basis: torch.Tensor, coef: torch.Tensor, bias, fixed: bool, dictionary: str) -> _LowRank:
    """basis [g, r, fan_in], coef [g, o/g, r] -> LowRankLinear / LowRankConv2d matching `layer`."""
    g, r, _ = basis.shape
    if isinstance(layer, nn.Linear):
        new = LowRankLinear(basis[0], coef[0], bias, fixed, dictionary)
    else:
        cin_g = layer.in_channels // layer.groups
        new = LowRankConv2d(basis.reshape(g * r, cin_g, *layer.kernel_size), coef.reshape(-1, r, 1, 1), bias,
                            layer.in_channels, layer.stride, layer.padding, layer.dilation, layer.groups, fixed,
                            dictionary)
    new.train(layer.training)
    return new


def _check_layer(layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"cannot factor a convolution with padding={layer.padding!r}, padding_mode={layer.padding_mode!r}")
    elif not isinstance(layer, nn.Linear):
        raise TypeError(f"cannot factor a {type(layer).__name__}")


def svd_factorize(layer: nn.Module, rank: int) -> _LowRank:
    """Truncated SVD W ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T) per group; both factors trainable.

    At full rank the product reproduces the layer up to float rounding."""
    _check_layer(layer)
    if not 1 <= rank <= max_rank(layer):
        raise ValueError(f"rank must be in [1, {max_rank(layer)}], not {rank}")
    bases, coefs = _balanced_svd(grouped_weight(layer), rank)
    dt = layer.weight.dtype
    bias = layer.bias.detach() if layer.bias is not None else None
    return _build(layer, bases.to(dt), coefs.to(dt), bias, False, "learned")


def random_factors(layer: nn.Module, rank: int, gen: torch.Generator) -> _LowRank:
    """Both factors trainable, from scratch: the truncated SVD of a freshly drawn PyTorch-default
    weight U(-1/sqrt(fan_in), 1/sqrt(fan_in)), split evenly (sqrt of the singular values on each side)
    so neither factor dominates the gradient scale, and scaled so B @ A has that weight's variance;
    the bias is re-initialised too. (Independent Gaussian factors instead make fine-tuning at the
    dense learning rate diverge: the coefficient factor's spectral norm is ~3x the basis'.)"""
    _check_layer(layer)
    if not 1 <= rank <= max_rank(layer):
        raise ValueError(f"rank must be in [1, {max_rank(layer)}], not {rank}")
    g, o, f = grouped_weight(layer).shape
    fresh = (torch.rand(g, o, f, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(f)
    bases, coefs = _balanced_svd(fresh, rank)
    # rescale both factors so the product has the default weight variance 1 / (3 fan_in) again
    k = math.sqrt(1 / (3 * f) / float(torch.bmm(coefs, bases).var()))
    bases, coefs = bases * math.sqrt(k), coefs * math.sqrt(k)
    dt = layer.weight.dtype
    return _build(layer, bases.to(dt), coefs.to(dt), _fresh_bias(layer, gen), False, "learned")


def _balanced_svd(ws: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group w ~= (U_r sqrt(S_r)) (sqrt(S_r) V_r^T): (bases [g, r, f], coefs [g, o, r]) in float64."""
    bases, coefs = [], []
    for w in ws.double():
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        bases.append(root[:, None] * vh[:rank])
        coefs.append(u[:, :rank] * root[None, :])
    return torch.stack(bases), torch.stack(coefs)


def _fresh_bias(layer: nn.Module, gen: torch.Generator):
    if layer.bias is None:
        return None
    bound = 1 / math.sqrt(fan_in(layer))
    return (torch.rand(layer.bias.shape, generator=gen) * 2 - 1).mul(bound).to(layer.bias.dtype)


def dictionary_factorize(layer: nn.Module, dictionary: torch.Tensor, init: str, gen: torch.Generator,
                         kind: str) -> _LowRank:
    """Denil et al.: fixed basis A = `dictionary` [n_alpha, fan_in] (the same for every group), learned coef.

    init = "fit": coef = least-squares solution of coef @ A ~= W (bias kept);
    "random": coef random with the predicted weights at PyTorch's default variance, bias re-initialised.
    """
    _check_layer(layer)
    ws = grouped_weight(layer)
    g, o, f = ws.shape
    a = dictionary.to(torch.float64)
    if a.shape[1] != f:
        raise ValueError(f"dictionary has {a.shape[1]} inputs, the layer has fan-in {f}")
    if init == "fit":
        coef = torch.stack([torch.linalg.lstsq(a.T, w.double().T).solution.T for w in ws])
        bias = layer.bias.detach() if layer.bias is not None else None
    elif init == "random":
        col_norm2 = float((a**2).sum(0).mean())
        std = math.sqrt(1 / (3 * f) / max(col_norm2, 1e-12))
        coef = torch.randn(g, o, a.shape[0], generator=gen, dtype=torch.float64) * std
        bias = _fresh_bias(layer, gen)
    else:
        raise ValueError(f"init must be 'fit' or 'random', not {init!r}")
    dt = layer.weight.dtype
    basis = a.to(dt)[None].expand(g, -1, -1).contiguous()
    return _build(layer, basis, coef.to(dt), bias, True, kind)


# ----- Denil et al. dictionaries -----------------------------------------------------------------

def identity_dictionary(fan: int, atoms: int, gen: np.random.Generator, subset: np.ndarray | None = None) -> np.ndarray:
    """`atoms` random rows of the identity over `subset` (default all inputs): random connections."""
    idx = np.arange(fan) if subset is None else subset
    pick = np.sort(gen.choice(idx, size=atoms, replace=False))
    a = np.zeros((atoms, fan))
    a[np.arange(atoms), pick] = 1.0
    return a


def random_dictionary(fan: int, atoms: int, gen: np.random.Generator, subset: np.ndarray | None = None) -> np.ndarray:
    """`atoms` random orthonormal directions over `subset` of the inputs (QR of a Gaussian matrix)."""
    idx = np.arange(fan) if subset is None else subset
    q, _ = np.linalg.qr(gen.standard_normal((len(idx), atoms)))
    a = np.zeros((atoms, fan))
    a[:, idx] = q.T
    return a


def se_kernel(x: np.ndarray, y: np.ndarray, lengthscale: float, channel_x=None, channel_y=None) -> np.ndarray:
    """Squared-exponential kernel exp(-|x - y|^2 / (2 l^2)); zero across different channels if given."""
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * lengthscale**2))
    if channel_x is not None:
        k = k * (channel_x[:, None] == channel_y[None, :])
    return k


def kernel_dictionary(coords: np.ndarray, atoms: int, gen: np.random.Generator, lengthscale: float = 0.0,
                      ridge: float = 1e-2, channels: np.ndarray | None = None,
                      subset: np.ndarray | None = None) -> np.ndarray:
    """Kernel ridge regression dictionary: A = U^T = (K_alpha + ridge I)^-1 k_alpha.

    coords [fan, d]: each input's position; channels [fan] (optional): inputs in different channels
    are uncorrelated. Atoms (the alpha set) are random inputs of `subset`, spread evenly over channels.
    lengthscale 0 = automatic: the mean spacing of the atoms over one channel's grid.
    """
    fan = len(coords)
    idx = np.arange(fan) if subset is None else np.asarray(subset)
    ch = np.zeros(fan, dtype=np.int64) if channels is None else np.asarray(channels)
    # Spread atoms over channels (round robin over a random order within each channel).
    by_ch = {c: gen.permutation(idx[ch[idx] == c]) for c in np.unique(ch[idx])}
    order = sorted(by_ch)
    if atoms < len(order):
        log.warning("kernel dictionary: %d atoms for %d uncorrelated input channels; %d channels get no atom, "
                    "so their weights are predicted as 0 (use more atoms, or columns / another dictionary)",
                    atoms, len(order), len(order) - atoms)
    picks, pos = [], 0
    while len(picks) < atoms:
        c = order[pos % len(order)]
        k = pos // len(order)
        if k < len(by_ch[c]):
            picks.append(by_ch[c][k])
        pos += 1
    alpha = np.sort(np.array(picks, dtype=np.int64))
    if lengthscale <= 0:
        per_ch = max(1.0, atoms / len(order))
        extent = np.prod(np.ptp(coords[idx], axis=0) + 1.0)  # area (or volume) of one channel's inputs
        lengthscale = float(max((extent / per_ch) ** (1 / coords.shape[1]), 1e-6))
    k_aa = se_kernel(coords[alpha], coords[alpha], lengthscale, ch[alpha], ch[alpha])
    k_ax = se_kernel(coords[alpha], coords[idx], lengthscale, ch[alpha], ch[idx])
    a = np.zeros((atoms, fan))
    a[:, idx] = np.linalg.solve(k_aa + ridge * np.eye(atoms), k_ax)
    return a


def columnar(fan: int, atoms: int, columns: int, gen: np.random.Generator, make) -> np.ndarray:
    """Denil's columnar architecture: `columns` disjoint random input subsets, each with its own
    dictionary of ~atoms/columns atoms (make(n, subset) -> [n, fan], zero outside the subset).
    The blocks are stacked, so a coef row predicts each subset's weights from its own atoms."""
    if columns <= 1:
        return make(atoms, None)
    perm = gen.permutation(fan)
    subsets = np.array_split(perm, columns)
    sizes = [atoms // columns + (1 if i < atoms % columns else 0) for i in range(columns)]
    blocks = [make(n, np.sort(s)) for n, s in zip(sizes, subsets) if n > 0]
    return np.concatenate(blocks, axis=0)


def input_coords(layout: tuple[int, ...] | None, weight: torch.Tensor | None = None):
    """(coords [fan, d], channels [fan] or None) for a layer's fan-in.

    layout (H, W): a pixel grid; (C, H, W): channels of grids (channels uncorrelated);
    None: no spatial layout -- each input is placed at its trained outgoing weights (the column
    W[:, i], scaled to unit mean norm), so inputs that the trained layer uses alike are neighbours.
    """
    if layout is not None:
        if len(layout) == 2:
            h, w = layout
            yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            return np.stack([yy.ravel(), xx.ravel()], 1).astype(np.float64), None
        c, h, w = layout
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        coords = np.tile(np.stack([yy.ravel(), xx.ravel()], 1), (c, 1)).astype(np.float64)
        return coords, np.repeat(np.arange(c), h * w)
    if weight is None:
        raise ValueError("a layer without a spatial layout needs its trained weight for the kernel dictionary")
    cols = weight.detach().double().reshape(weight.shape[0], -1).T.numpy()  # [fan, out]
    cols = cols / max(float(np.linalg.norm(cols, axis=1).mean()), 1e-12)
    return cols, None


def orthonormal_rows(a: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the row space of `a` (same shape; zero columns stay zero)."""
    used = np.flatnonzero(np.abs(a).sum(0) > 0)
    _, s, vh = np.linalg.svd(a[:, used], full_matrices=False)
    if s[-1] <= 1e-10 * s[0]:
        raise ValueError("the dictionary's atoms are linearly dependent (use fewer atoms or a larger ridge)")
    out = np.zeros_like(a)
    out[:, used] = vh
    return out


def make_dictionary(kind: str, fan: int, atoms: int, gen: np.random.Generator, columns: int = 1,
                    layout: tuple[int, ...] | None = None, weight: torch.Tensor | None = None,
                    lengthscale: float = 0.0, ridge: float = 1e-2, whiten: bool = True) -> torch.Tensor:
    """A fixed Denil dictionary [atoms, fan] of kind identity / random / kernel (columnar if columns > 1).

    whiten (kernel only): replace each column's kernel dictionary by an orthonormal basis of its row
    space. The predicted weights span the same space (the kernel functions centred on the atoms), but
    fine-tuning the coefficients is well conditioned: the raw dictionary's singular values reach ~10,
    which multiplies SGD's step along those directions by ~100 and makes fine-tuning diverge."""
    if kind not in DICTIONARIES:
        raise ValueError(f"unknown dictionary {kind!r} ({', '.join(DICTIONARIES)})")
    if not 1 <= atoms <= fan:
        raise ValueError(f"dictionary size must be in [1, {fan}], not {atoms}")
    if not 1 <= columns <= atoms:
        raise ValueError(f"columns must be in [1, {atoms}] (the dictionary size), not {columns}")
    if kind == "identity":
        make = lambda n, s: identity_dictionary(fan, n, gen, s)  # noqa: E731
    elif kind == "random":
        make = lambda n, s: random_dictionary(fan, n, gen, s)  # noqa: E731
    else:
        coords, channels = input_coords(layout, weight)
        if len(coords) != fan:
            raise ValueError(f"layout {layout} has {len(coords)} inputs, the layer has fan-in {fan}")
        if layout is None and lengthscale <= 0:  # no grid: the median distance between inputs
            sample = coords[gen.choice(fan, size=min(fan, 500), replace=False)]
            d = np.sqrt(((sample[:, None] - sample[None]) ** 2).sum(-1))
            lengthscale = float(np.median(d[np.triu_indices(len(sample), 1)])) or 1.0
        def make(n, subset):
            a = kernel_dictionary(coords, n, gen, lengthscale, ridge, channels, subset)
            return orthonormal_rows(a) if whiten else a
    return torch.from_numpy(columnar(fan, atoms, columns, gen, make))
