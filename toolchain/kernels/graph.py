"""Graph-level swaps of the fast form: standard ONNX ops that the custom-op library runs faster than
stock onnxruntime, with the same attributes and formula. Today one: LRN (onnxruntime's CPU LRN takes
about half of a batch-1 AlexNet's time; docs/kernels.md).

`to_fast_ops(model)` moves those nodes into the library's domain (in place); a fast-form file read back
(`toolchain.load`) turns them into the standard layers again.
"""
from __future__ import annotations

import onnx

from converters.ops.layers import convert_lrn
from converters.ops.registry import register_converter

from . import DOMAIN, OPSET_VERSION

FAST_OPS = ("LRN",)


def to_fast_ops(model: onnx.ModelProto) -> int:
    """Rewrite the main graph's FAST_OPS nodes to DOMAIN; returns how many were rewritten."""
    count = 0
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in FAST_OPS:
            node.domain = DOMAIN
            count += 1
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=OPSET_VERSION)
    return count


register_converter("LRN", opsets=[OPSET_VERSION], domain=DOMAIN)(convert_lrn)
