"""Compressed layer types that passes swap in for nn.Linear / nn.Conv2d (same call signature).

Each has an emitter in converters/export_*.py that writes its compact ONNX form.
"""
from .masked import MaskedConv2d, MaskedLinear, masked_from_dense

__all__ = ["MaskedLinear", "MaskedConv2d", "masked_from_dense"]
from .hashed import HashedConv2d, HashedLinear, hashed_from_dense
from .lowrank import LowRankConv2d, LowRankLinear, dictionary_factorize, make_dictionary, svd_factorize

__all__ += ["HashedLinear", "HashedConv2d", "hashed_from_dense", "LowRankLinear", "LowRankConv2d", "svd_factorize",
            "dictionary_factorize", "make_dictionary"]
