"""Pruning with splicing — Dynamic Network Surgery (Guo et al. 2016): masks recomputed during training
from two thresholds a < b, pruned weights keep updating and come back above b; exports as pruned layers."""
from .layers import SplicedConv2d, SplicedLinear, spliced_from_layer, to_masked
from .passes import SplicingLayerOptions, SplicingOptions, SplicingPass, splice_thresholds

__all__ = ["SplicedLinear", "SplicedConv2d", "spliced_from_layer", "to_masked", "SplicingPass", "SplicingOptions",
           "SplicingLayerOptions", "splice_thresholds"]
