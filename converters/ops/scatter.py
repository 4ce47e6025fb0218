"""CumSum and ScatterND: what the portable sparse form (toolchain/methods/prune/onnx.py) decodes its
weights with; constant inputs are folded at import, so pruned files import as dense-with-zeros layers."""
from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_converter, register_emitter


class CumSum(nn.Module):
    def __init__(self, exclusive: bool = False, reverse: bool = False):
        super().__init__()
        self.exclusive, self.reverse = exclusive, reverse

    def forward(self, x, axis):
        dim = int(axis.reshape(-1)[0]) % x.dim()
        y = x.flip(dim) if self.reverse else x
        out = torch.cumsum(y, dim).to(x.dtype)
        if self.exclusive:
            out = out - y
        return out.flip(dim) if self.reverse else out


@register_converter("CumSum")
def convert_cumsum(node, ctx):
    return CumSum(bool(node.attrs.get("exclusive", 0)), bool(node.attrs.get("reverse", 0)))


@register_emitter(CumSum)
def emit_cumsum(ctx, name, m, inputs, outputs):
    ctx.add_node("CumSum", inputs, outputs, name=name, exclusive=int(m.exclusive), reverse=int(m.reverse))


class ScatterND(nn.Module):
    """ONNX ScatterND with reduction "none": data[indices[i]] = updates[i]."""

    def forward(self, data, indices, updates):
        idx = indices.long()
        k = idx.shape[-1]
        flat_idx = idx.reshape(-1, k)
        out = data.clone()
        out[tuple(flat_idx[:, j] for j in range(k))] = updates.reshape(flat_idx.shape[0], *data.shape[k:])
        return out


@register_converter("ScatterND")
def convert_scatter_nd(node, ctx):
    if node.attrs.get("reduction", "none") not in ("none", b"none"):
        raise node.error("only reduction='none' is supported")
    return ScatterND()


@register_emitter(ScatterND)
def emit_scatter_nd(ctx, name, m, inputs, outputs):
    ctx.add_node("ScatterND", inputs, outputs, name=name)
