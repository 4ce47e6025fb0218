"""HashedNets (Chen et al. 2015): hashed layer types, the `hashed` pass, the equal-budget baselines of
the paper's comparison (`random_edges`, small dense nets), ONNX emitters and the import restorer."""
from . import baselines, onnx  # noqa: F401  (registers the baseline pass, the emitters and the restorer)
from .baselines import equivalent_width, hashed_mlp, mlp, mlp_weights, random_keep_mask
from .layers import HashedConv2d, HashedLinear, hashed_from_dense
from .passes import HashedLayerOptions, HashedOptions, HashedPass

__all__ = ["HashedLinear", "HashedConv2d", "hashed_from_dense", "HashedPass", "HashedOptions", "HashedLayerOptions",
           "mlp", "hashed_mlp", "mlp_weights", "equivalent_width", "random_keep_mask"]
