"""Structured pruning (Li et al. 2017): whole filters / neurons ranked by L1 norm and removed with their
dependent inputs; exports as plain dense ONNX."""
from .passes import StructuredLayerOptions, StructuredOptions, StructuredPass, l1_ranking

__all__ = ["StructuredPass", "StructuredOptions", "StructuredLayerOptions", "l1_ranking"]
