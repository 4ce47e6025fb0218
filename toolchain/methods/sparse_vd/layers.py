"""Sparse variational dropout layers (Molchanov, Ashukha & Vetrov 2017, "Variational Dropout Sparsifies
Deep Neural Networks").

Each weight w_ij ~ N(theta_ij, sigma_ij^2) with its own log sigma^2 (additive-noise reparameterisation:
the variance is a parameter of its own, not alpha * theta^2, so the gradients of theta stay low-variance);
log alpha = log sigma^2 - log theta^2. Training samples the pre-activations, not the weights (local
reparameterisation): b ~ N(x theta^T, x^2 sigma^2^T) for fc, the same with convolutions for conv.
Evaluation uses theta with every weight whose log alpha exceeds the threshold set to zero, which is
what the exported (masked) layer computes. A fixed 0/1 `mask` keeps weights pruned before (e.g. when
starting from a pruned model) at zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# The paper's approximation of -KL(q(w|theta, alpha) || log-uniform prior), eq. 14.
K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_CLAMP = 10.0
EPS = 1e-8


def kl_approx(log_alpha: torch.Tensor) -> torch.Tensor:
    """KL(q || prior) per weight, up to a constant: -(k1 sigmoid(k2 + k3 log a) - 0.5 log(1 + 1/a) - k1)."""
    neg_kl = K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1
    return -neg_kl


class _SVD:
    weight: nn.Parameter
    log_sigma2: nn.Parameter
    mask: torch.Tensor
    threshold: float

    def _init_svd(self, threshold: float, init_log_sigma2: float) -> None:
        self.log_sigma2 = nn.Parameter(torch.full_like(self.weight, init_log_sigma2))
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.bool))
        self.threshold = float(threshold)

    @property
    def log_alpha(self) -> torch.Tensor:
        la = self.log_sigma2 - torch.log(self.weight ** 2 + EPS)
        return torch.clamp(la, -LOG_ALPHA_CLAMP, LOG_ALPHA_CLAMP)

    def keep(self) -> torch.Tensor:
        """The weights that survive: log alpha below the threshold (and not pruned before)."""
        return (self.log_alpha.detach() < self.threshold) & self.mask

    @property
    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.keep()

    def kl(self) -> torch.Tensor:
        return (kl_approx(self.log_alpha) * self.mask).sum()

    def nnz(self) -> int:
        return int(self.keep().sum())

    def density(self) -> float:
        return float(self.keep().float().mean())

    def _stochastic(self, x, op) -> torch.Tensor:
        mu = op(x, self.weight * self.mask, self.bias)
        var = op(x * x, torch.exp(self.log_sigma2) * self.mask, None)
        return mu + torch.sqrt(var + EPS) * torch.randn_like(mu)


class SVDLinear(_SVD, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 3.0,
                 init_log_sigma2: float = -10.0):
        nn.Linear.__init__(self, in_features, out_features, bias)
        self._init_svd(threshold, init_log_sigma2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._stochastic(x, F.linear)
        return F.linear(x, self.masked_weight, self.bias)


class SVDConv2d(_SVD, nn.Conv2d):
    def __init__(self, *args, threshold: float = 3.0, init_log_sigma2: float = -10.0, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_svd(threshold, init_log_sigma2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._stochastic(x, self._conv_forward)
        return self._conv_forward(x, self.masked_weight, self.bias)


def svd_from_layer(layer: nn.Module, threshold: float, init_log_sigma2: float) -> nn.Module:
    """A sparse-VD copy of an nn.Linear / nn.Conv2d (or a masked one: its mask is kept fixed)."""
    if isinstance(layer, _SVD):
        return layer
    if isinstance(layer, nn.Linear):
        new = SVDLinear(layer.in_features, layer.out_features, layer.bias is not None, threshold, init_log_sigma2)
    elif isinstance(layer, nn.Conv2d):
        new = SVDConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                        layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                        threshold=threshold, init_log_sigma2=init_log_sigma2)
    else:
        raise TypeError(f"sparse variational dropout cannot act on a {type(layer).__name__}")
    with torch.no_grad():
        new.weight.copy_(getattr(layer, "masked_weight", layer.weight).detach())
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        # weights pruned before stay pruned: a masked layer's mask, or the zeros of a pruned file
        mask = getattr(layer, "mask", None)
        new.mask.copy_(mask.bool() if mask is not None else layer.weight.detach() != 0)
    new.train(layer.training)
    return new


def to_masked(layer: nn.Module) -> nn.Module:
    """The deterministic pruned layer (toolchain.methods.prune's masked layer): theta where log alpha is
    under the threshold, zero elsewhere; it exports with the sparse ONNX forms."""
    from ..prune.layers import MaskedConv2d, MaskedLinear

    if isinstance(layer, nn.Linear):
        new = MaskedLinear(layer.in_features, layer.out_features, layer.bias is not None)
    else:
        new = MaskedConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                           layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
    keep = layer.keep()
    with torch.no_grad():
        new.weight.copy_(layer.weight.detach() * keep)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach())
        new.mask.copy_(keep)
    new.train(layer.training)
    return new
