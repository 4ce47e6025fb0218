"""Compressed layer types that passes swap in for nn.Linear / nn.Conv2d (same call signature).

Each has an emitter in converters/export_*.py that writes its compact ONNX form.
"""
from .masked import MaskedConv2d, MaskedLinear, masked_from_dense

__all__ = ["MaskedLinear", "MaskedConv2d", "masked_from_dense"]
