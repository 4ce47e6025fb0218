"""Per-op converters (ONNX -> torch modules) and emitters (torch modules -> ONNX), by family.

Importing this package registers them all; see registry.py for the two registries' contracts.
"""
from . import elementwise, layers, pooling, scatter, shape  # noqa: F401  (registration side effects)
from .registry import (
    ALL_OPSETS,
    Converted,
    OnnxNode,
    find_converter,
    find_emitter,
    register_converter,
    register_emitter,
    supported_ops,
)

__all__ = [
    "ALL_OPSETS", "Converted", "OnnxNode", "find_converter", "find_emitter", "register_converter",
    "register_emitter", "supported_ops",
]
