"""Export of factored layers (toolchain.methods.lowrank.layers) as plain ONNX: no custom op.

LowRankLinear: Gemm(x, basis^T) -> Gemm(., coef^T) + bias (MatMul + Add for N-D inputs); an identity
(random-connections) dictionary becomes a Gather of the selected inputs, storing only their indices.
LowRankConv2d: Conv with the rank-r basis filters (kh x kw, same stride/padding/groups), then a 1x1
Conv with coef and the bias.
Initializers are `{name}.basis.weight` and `{name}.coef.weight`, so measure reports the two factors
as layers `{name}.basis` and `{name}.coef`. When the factors cost more multiply-adds than the dense
product (a rank near full), the layer is written as one dense Gemm / Conv of B @ A, which then also
stores fewer numbers.
"""
from __future__ import annotations

import numpy as np

from converters.ops.layers import conv_attrs, write_conv, write_fc
from converters.ops.registry import register_emitter

from .layers import LowRankConv2d, LowRankLinear


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def selection_indices(basis: np.ndarray) -> np.ndarray | None:
    """The selected input of each row when `basis` is rows of the identity, else None."""
    if basis.ndim != 2:
        return None
    idx = np.argmax(np.abs(basis), axis=1)
    expect = np.zeros_like(basis)
    expect[np.arange(len(idx)), idx] = 1.0
    return idx.astype(np.int64) if np.array_equal(basis, expect) else None


@register_emitter(LowRankLinear)
def emit_lowrank_linear(ctx, name, m, inputs, outputs):
    bias = _np(m.bias) if m.bias is not None else None
    rank = ctx.rank(inputs[0])  # the projected value has the input's rank
    if not m.factored_is_cheaper():
        write_fc(ctx, name, inputs[0], rank, _np(m.dense_weight()), bias, outputs[0])
        return
    basis = _np(m.basis)
    hidden = ctx.fresh(f"{name}.projected")
    select = selection_indices(basis)
    if select is not None:
        ctx.add_node("Gather", [inputs[0], ctx.add_initializer(f"{name}.selected_inputs", select)], [hidden],
                     name=f"{name}_select", axis=(rank - 1) if rank else -1)
    else:
        write_fc(ctx, name, inputs[0], rank, basis, None, hidden, node_name=f"{name}_basis", weight_label="basis.weight")
    write_fc(ctx, name, hidden, rank, _np(m.coef), bias, outputs[0], weight_label="coef.weight")


@register_emitter(LowRankConv2d)
def emit_lowrank_conv(ctx, name, m, inputs, outputs):
    attrs = conv_attrs(ctx, name, m)
    bias = _np(m.bias) if m.bias is not None else None
    if not m.factored_is_cheaper():
        write_conv(ctx, name, inputs[0], _np(m.dense_weight()), bias, outputs[0], attrs)
        return
    hidden = ctx.fresh(f"{name}.projected")
    ctx.add_node("Conv", [inputs[0], ctx.add_initializer(f"{name}.basis.weight", _np(m.basis))], [hidden],
                 name=f"{name}_basis", **attrs)
    b = [ctx.add_initializer(f"{name}.bias", bias)] if bias is not None else []
    ctx.add_node("Conv", [hidden, ctx.add_initializer(f"{name}.coef.weight", _np(m.coef)), *b], outputs, name=name,
                 kernel_shape=[1, 1], strides=[1, 1], dilations=[1, 1], pads=[0, 0, 0, 0], group=m.groups)
