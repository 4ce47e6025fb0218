"""Sparse variational dropout (Molchanov et al. 2017): per-weight noise variances learned with the
ELBO; weights with log alpha > 3 are pruned, and the result exports as a pruned (masked) layer."""
from .layers import SVDConv2d, SVDLinear, kl_approx, svd_from_layer, to_masked
from .passes import SparseVDLayerOptions, SparseVDOptions, SparseVDPass

__all__ = ["SVDLinear", "SVDConv2d", "kl_approx", "svd_from_layer", "to_masked", "SparseVDPass", "SparseVDOptions",
           "SparseVDLayerOptions"]
