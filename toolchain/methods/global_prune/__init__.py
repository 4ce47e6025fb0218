"""Global magnitude pruning with the gradual cubic schedule (Zhu & Gupta 2017): one sparsity target and
one threshold across the network; prune's masked layers and sparse ONNX forms."""
from .passes import GlobalPruneLayerOptions, GlobalPruneOptions, GlobalPrunePass, cubic_sparsity, global_masks

__all__ = ["GlobalPrunePass", "GlobalPruneOptions", "GlobalPruneLayerOptions", "cubic_sparsity", "global_masks"]
