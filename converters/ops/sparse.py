"""Import of the toolchain's own fast-form sparse ops (domain ai.toolchain): SparseLinear and
SparseConv become pruned layers (mask = stored non-zeros), so a fast-form file can be retrained
or re-exported. Their emitters live in converters/export_sparse.py."""
from __future__ import annotations

import numpy as np
import torch

from toolchain.layers.masked import MaskedConv2d, MaskedLinear

from .registry import Converted, register_converter

DOMAIN = "ai.toolchain"


def _dense(node, ctx, n_cols: int) -> tuple[np.ndarray, np.ndarray | None]:
    arrays = [ctx.const(node.input(i)) for i in (1, 2, 3)]
    if any(a is None for a in arrays):
        raise node.error("values, col_idx and row_ptr must be initializers")
    values, col_idx, row_ptr = (np.asarray(a) for a in arrays)
    rows = len(row_ptr) - 1
    if rows < 0 or len(values) != len(col_idx) or row_ptr[0] != 0 or row_ptr[-1] != len(values) \
            or np.any(np.diff(row_ptr) < 0) or (len(col_idx) and col_idx.astype(np.int64).max() >= n_cols):
        raise node.error("inconsistent CSR arrays")
    w = np.zeros((rows, n_cols), np.float32)
    w[np.repeat(np.arange(rows), np.diff(row_ptr)), col_idx.astype(np.int64)] = values
    bias = ctx.const(node.input(4)) if node.input(4) else None
    return w, bias


def _fill(layer, w: np.ndarray, bias) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w).reshape(layer.weight.shape))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(np.array(bias, np.float32)))
        layer.prune_(layer.weight != 0)


@register_converter("SparseLinear", opsets=[1], domain=DOMAIN)
def convert_sparse_linear(node, ctx):
    k = int(node.attrs["in_features"])
    w, bias = _dense(node, ctx, k)
    layer = MaskedLinear(k, w.shape[0], bias is not None)
    _fill(layer, w, bias)
    return Converted(layer, [node.inputs[0]], name_hints=[node.name])


@register_converter("SparseConv", opsets=[1], domain=DOMAIN)
def convert_sparse_conv(node, ctx):
    a = node.attrs
    kh, kw = (int(v) for v in a["kernel_shape"])
    group = int(a.get("group", 1))
    if "in_channels" not in a:
        raise node.error("needs the in_channels attribute to be imported")
    cin = int(a["in_channels"])
    pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
    if pads[:2] != pads[2:]:
        raise node.error("asymmetric pads are not importable")
    w, bias = _dense(node, ctx, cin // group * kh * kw)
    layer = MaskedConv2d(cin, w.shape[0], (kh, kw), [int(s) for s in a.get("strides", [1, 1])], pads[:2],
                         [int(d) for d in a.get("dilations", [1, 1])], group, bias is not None)
    _fill(layer, w, bias)
    return Converted(layer, [node.inputs[0]], name_hints=[node.name])
