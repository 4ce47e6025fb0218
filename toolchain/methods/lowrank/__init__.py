"""Low-rank factorisation: truncated SVD and Denil et al. 2013 parameter prediction (fixed dictionary,
only V learned): layer types, the `lowrank` pass, ONNX emitters."""
from . import onnx  # noqa: F401  (registers the emitters)
from .layers import (LowRankConv2d, LowRankLinear, dictionary_factorize, fan_in, make_dictionary, random_factors,
                     svd_factorize)
from .passes import LowRankLayerOptions, LowRankOptions, LowRankPass

__all__ = ["LowRankLinear", "LowRankConv2d", "svd_factorize", "dictionary_factorize", "make_dictionary", "fan_in", "random_factors",
           "LowRankPass", "LowRankOptions", "LowRankLayerOptions"]
