"""Export of factored layers (toolchain.layers.lowrank) as plain ONNX: no custom op.

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

from toolchain.layers.lowrank import LowRankConv2d, LowRankLinear

from .ops.registry import register_emitter


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


def _fc(ctx, name: str, x: str, rank: int | None, weight_out_in: np.ndarray, bias: np.ndarray | None, out: str,
        node_name: str, weight_label: str) -> None:
    """out = x @ W^T (+ bias) as Gemm (x of rank 2) or MatMul (+ Add)."""
    if rank == 2:
        args = [x, ctx.add_initializer(f"{name}.{weight_label}", weight_out_in)]
        if bias is not None:
            args.append(ctx.add_initializer(f"{name}.bias", bias))
        ctx.add_node("Gemm", args, [out], name=node_name, transB=1)
        return
    wt = ctx.add_initializer(f"{name}.{weight_label}.T", np.ascontiguousarray(weight_out_in.T))
    if bias is None:
        ctx.add_node("MatMul", [x, wt], [out], name=node_name)
        return
    mm = ctx.fresh(f"{node_name}_matmul")
    ctx.add_node("MatMul", [x, wt], [mm], name=node_name)
    ctx.add_node("Add", [mm, ctx.add_initializer(f"{name}.bias", bias)], [out], name=f"{node_name}_bias")


@register_emitter(LowRankLinear)
def emit_lowrank_linear(ctx, name, m, inputs, outputs):
    bias = _np(m.bias) if m.bias is not None else None
    rank = ctx.rank(inputs[0])  # the projected value has the input's rank
    if not m.factored_is_cheaper():
        _fc(ctx, name, inputs[0], rank, _np(m.dense_weight()), bias, outputs[0], name, "weight")
        return
    basis = _np(m.basis)
    hidden = ctx.fresh(f"{name}.projected")
    select = selection_indices(basis)
    if select is not None:
        ctx.add_node("Gather", [inputs[0], ctx.add_initializer(f"{name}.selected_inputs", select)], [hidden],
                     name=f"{name}_select", axis=(rank - 1) if rank else -1)
    else:
        _fc(ctx, name, inputs[0], rank, basis, None, hidden, f"{name}_basis", "basis.weight")
    _fc(ctx, name, hidden, rank, _np(m.coef), bias, outputs[0], name, "coef.weight")


@register_emitter(LowRankConv2d)
def emit_lowrank_conv(ctx, name, m, inputs, outputs):
    attrs = {"strides": list(m.stride), "dilations": list(m.dilation), "pads": list(m.padding) * 2, "group": m.groups}
    bias = [ctx.add_initializer(f"{name}.bias", _np(m.bias))] if m.bias is not None else []
    if not m.factored_is_cheaper():
        w = ctx.add_initializer(f"{name}.weight", _np(m.dense_weight()))
        ctx.add_node("Conv", [inputs[0], w, *bias], outputs, name=name, kernel_shape=list(m.kernel_size), **attrs)
        return
    hidden = ctx.fresh(f"{name}.projected")
    ctx.add_node("Conv", [inputs[0], ctx.add_initializer(f"{name}.basis.weight", _np(m.basis))], [hidden],
                 name=f"{name}_basis", kernel_shape=list(m.kernel_size), **attrs)
    ctx.add_node("Conv", [hidden, ctx.add_initializer(f"{name}.coef.weight", _np(m.coef)), *bias], outputs, name=name,
                 kernel_shape=[1, 1], strides=[1, 1], dilations=[1, 1], pads=[0, 0, 0, 0], group=m.groups)
