"""Magnitude pruning with retraining (Han et al. 2015): masked layers, the `prune` pass, dead-unit
surgery, the compact sparse ONNX forms (portable gap-coded weights, fast SparseLinear/SparseConv)."""
from . import onnx  # noqa: F401  (registers the emitters, the fast-form converters and the mask restorer)
from .layers import MaskedConv2d, MaskedLinear, masked_from_dense
from .passes import PruneLayerOptions, PruneOptions, PrunePass

__all__ = ["MaskedLinear", "MaskedConv2d", "masked_from_dense", "PrunePass", "PruneOptions", "PruneLayerOptions"]
