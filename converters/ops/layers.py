"""Weighted and normalisation layers: Conv -> nn.Conv{1,2,3}d, Gemm / MatMul(+Add) -> nn.Linear,
BatchNormalization -> nn.BatchNorm*d, LRN -> LocalResponseNorm, Dropout -> nn.Dropout.

Weights become trainable nn.Parameters. Gemm's alpha/beta are folded into the weight and bias.
Conv padding torch cannot express (asymmetric, or auto_pad SAME with unknown input size) becomes a
separate padding node in front of a plain nn.Conv*d (Converted.pre), so passes always see standard convs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .pooling import same_pads
from .registry import Converted, register_converter, register_emitter, scalar
from .shape import Pad, onnx_to_torch_pads

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _param(value: np.ndarray) -> nn.Parameter:
    """A Parameter owning its memory; arrays the converter just created are used without another copy."""
    value = np.asarray(value)
    if not (value.flags.writeable and value.flags.c_contiguous and value.flags.owndata):
        value = np.array(value, order="C", copy=True)
    return nn.Parameter(torch.from_numpy(value))


# --------------------------------------------------------------------------- Conv
class SamePad(nn.Module):
    """auto_pad SAME_UPPER / SAME_LOWER zero padding, computed from the input size at run time."""

    def __init__(self, mode: str, kernel: list[int], strides: list[int], dilations: list[int]):
        super().__init__()
        self.mode, self.kernel, self.strides, self.dilations = mode, kernel, strides, dilations

    def pads(self, sizes) -> list[int]:
        return same_pads(sizes, self.kernel, self.strides, self.dilations, self.mode)

    def forward(self, x):
        return F.pad(x, onnx_to_torch_pads(self.pads(list(x.shape[-len(self.kernel):]))))

    def extra_repr(self):
        return f"{self.mode}, kernel={self.kernel}, strides={self.strides}, dilations={self.dilations}"


@register_emitter(SamePad)
def emit_same_pad(ctx, name, m, inputs, outputs):
    shape = ctx.shape(inputs[0])
    n = len(m.kernel)
    if shape is None or not all(isinstance(v, int) for v in shape[-n:]):
        raise ctx.error(f"{name!r}: SAME padding needs the input's spatial size")
    spatial = m.pads(shape[-n:])
    pads = [0, 0] + spatial[:n] + [0, 0] + spatial[n:]
    ctx.add_node("Pad", [inputs[0], ctx.add_initializer(f"{name}_pads", np.array(pads, np.int64))], outputs, name=name)


@register_converter("Conv")
def convert_conv(node, ctx):
    weight = ctx.const(node.input(1))
    if weight is None:
        raise node.error("the weight must be a constant (initializer)")
    n = weight.ndim - 2
    if n not in _CONV:
        raise node.error(f"{n}-D convolution is not supported")
    bias = ctx.const(node.input(2)) if node.input(2) else None
    if node.input(2) and bias is None:
        raise node.error("the bias must be a constant (initializer)")
    kernel = [int(k) for k in node.attrs.get("kernel_shape", weight.shape[2:])]
    if kernel != list(weight.shape[2:]):
        raise node.error(f"kernel_shape {kernel} does not match the weight shape {list(weight.shape)}")
    strides = [int(v) for v in node.attrs.get("strides", [1] * n)]
    dilations = [int(v) for v in node.attrs.get("dilations", [1] * n)]
    group = int(node.attrs.get("group", 1))
    auto_pad = node.attrs.get("auto_pad", "NOTSET") or "NOTSET"
    pads = [int(v) for v in node.attrs.get("pads", [0] * 2 * n)]
    pre = None
    if auto_pad == "VALID":
        pads = [0] * 2 * n
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = ctx.shape(node.inputs[0])
        if shape is not None and all(isinstance(v, int) for v in shape[-n:]):
            pads = same_pads(shape[-n:], kernel, strides, dilations, auto_pad)
        else:
            pre, pads = SamePad(auto_pad, kernel, strides, dilations), [0] * 2 * n
    elif auto_pad != "NOTSET":
        raise node.error(f"unknown auto_pad {auto_pad!r}")
    padding = pads[:n]
    if pads[:n] != pads[n:]:
        pre, padding = Pad([0, 0] + pads[:n] + [0, 0] + pads[n:]), [0] * n
    conv = _CONV[n](weight.shape[1] * group, weight.shape[0], kernel, stride=strides, padding=padding,
                    dilation=dilations, groups=group, bias=bias is not None)
    conv.weight = _param(weight)
    if bias is not None:
        conv.bias = _param(bias)
    hints = [ctx.origin(node.input(1))] + ([ctx.origin(node.input(2))] if node.input(2) else [])
    return Converted(conv, [node.inputs[0]], hints, pre)


def conv_attrs(ctx, name: str, m) -> dict:
    """ONNX Conv attributes of a torch conv layer (zero padding: explicit, "same" or "valid")."""
    mode = getattr(m, "padding_mode", "zeros")  # the toolchain's factored / hashed convs pad with zeros only
    if mode != "zeros":
        raise ctx.error(f"conv {name!r}: padding_mode {mode!r} is not exportable")
    n = len(m.kernel_size)
    attrs = {"kernel_shape": list(m.kernel_size), "strides": list(m.stride), "dilations": list(m.dilation),
             "group": m.groups}
    if m.padding == "same":
        attrs["auto_pad"] = "SAME_UPPER"
    elif m.padding == "valid":
        attrs["pads"] = [0] * 2 * n
    else:
        attrs["pads"] = list(m.padding) * 2
    return attrs


def write_conv(ctx, name: str, x: str, weight: np.ndarray | str, bias: np.ndarray | None, out: str,
               attrs: dict) -> None:
    """out = Conv(x, W) (+ bias). `weight` is an array, stored as the initializer `{name}.weight`,
    or the name of a value the graph computes; `bias` an array or None."""
    w = ctx.add_initializer(f"{name}.weight", weight) if isinstance(weight, np.ndarray) else weight
    b = [ctx.add_initializer(f"{name}.bias", bias)] if bias is not None else []
    ctx.add_node("Conv", [x, w, *b], [out], name=name, **attrs)


def write_fc(ctx, name: str, x: str, rank: int | None, weight: np.ndarray | str, bias: np.ndarray | None, out: str,
             node_name: str | None = None, weight_label: str = "weight") -> None:
    """out = x @ W^T (+ bias), W [out, in]: Gemm(transB=1) when x has rank 2, else MatMul (+ Add).

    `weight` is an array, stored as the initializer `{name}.{weight_label}` (pre-transposed for
    MatMul), or the name of a value the graph computes (then transposed by a Transpose node for
    MatMul); `bias` an array or None. `rank` is x's rank (None: unknown).
    """
    node_name = node_name or name
    computed = not isinstance(weight, np.ndarray)
    if rank == 2:
        w = weight if computed else ctx.add_initializer(f"{name}.{weight_label}", weight)
        b = [ctx.add_initializer(f"{name}.bias", bias)] if bias is not None else []
        ctx.add_node("Gemm", [x, w, *b], [out], name=node_name, transB=1)
        return
    if computed:
        wt = ctx.fresh(f"{name}.{weight_label}.T")
        ctx.add_node("Transpose", [weight], [wt], name=f"{node_name}_transpose", perm=[1, 0])
    else:
        wt = ctx.add_initializer(f"{name}.{weight_label}.T", np.ascontiguousarray(weight.T))
    if bias is None:
        ctx.add_node("MatMul", [x, wt], [out], name=node_name)
        return
    mm = ctx.fresh(f"{node_name}_matmul")
    ctx.add_node("MatMul", [x, wt], [mm], name=node_name)
    ctx.add_node("Add", [mm, ctx.add_initializer(f"{name}.bias", bias)], [out], name=f"{node_name}_bias")


def _array(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().numpy()


@register_emitter(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def emit_conv(ctx, name, m, inputs, outputs):
    write_conv(ctx, name, inputs[0], _array(m.weight), _array(m.bias), outputs[0], conv_attrs(ctx, name, m))


# --------------------------------------------------------------------------- Gemm / MatMul
class GemmOp(nn.Module):
    """Gemm that is not a Linear layer (computed B, transA, or a 2-D C): alpha * A' @ B' + beta * C."""

    def __init__(self, alpha=1.0, beta=1.0, trans_a=False, trans_b=False):
        super().__init__()
        self.alpha, self.beta, self.trans_a, self.trans_b = alpha, beta, trans_a, trans_b

    def forward(self, a, b, c=None):
        a = a.t() if self.trans_a else a
        b = b.t() if self.trans_b else b
        y = self.alpha * (a @ b)
        return y if c is None else y + self.beta * c

    def extra_repr(self):
        return f"alpha={self.alpha}, beta={self.beta}, transA={self.trans_a}, transB={self.trans_b}"


@register_emitter(GemmOp)
def emit_gemm_op(ctx, name, m, inputs, outputs):
    ctx.add_node("Gemm", inputs, outputs, name=name, alpha=float(m.alpha), beta=float(m.beta),
                 transA=int(m.trans_a), transB=int(m.trans_b))


def _linear(weight_out_in: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    out_f, in_f = weight_out_in.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None)
    lin.weight = _param(weight_out_in)
    if bias is not None:
        lin.bias = _param(bias)
    return lin


@register_converter("Gemm")
def convert_gemm(node, ctx):
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))
    b = ctx.const(node.input(1))
    c_name = node.input(2)
    c = ctx.const(c_name) if c_name else None
    if b is not None and b.ndim == 2 and not trans_a and (not c_name or c is not None):
        weight = b if trans_b else b.T  # [out, in]
        if alpha != 1.0:
            weight = weight * np.asarray(alpha, dtype=weight.dtype)
        out_f = weight.shape[0]
        bias = None
        if c is not None:
            c = np.asarray(c)
            if c.size == 1 or (c.ndim >= 1 and c.shape[-1] == out_f and c.size == out_f):
                bias = (np.broadcast_to(c.reshape(-1), (out_f,)) * beta).astype(weight.dtype)
        if c is None or bias is not None:
            hints = [ctx.origin(node.input(1))] + ([ctx.origin(c_name)] if c_name else [])
            return Converted(_linear(weight, bias), [node.inputs[0]], hints)
    return GemmOp(alpha, beta, trans_a, trans_b)


class MatMulOp(nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b)


@register_emitter(MatMulOp)
def emit_matmul_op(ctx, name, m, inputs, outputs):
    ctx.add_node("MatMul", inputs, outputs, name=name)


@register_converter("MatMul")
def convert_matmul(node, ctx):
    """MatMul by a constant 2-D matrix -> nn.Linear. The importer passes a following Add of a constant
    bias (x @ W + b, the exporters' Linear on N-D input) as a third input."""
    w = ctx.const(node.input(1))
    if w is None or w.ndim != 2:
        if len(node.inputs) > 2:
            raise node.error("internal: bias fused into a MatMul without a constant 2-D weight")
        return MatMulOp()
    bias = ctx.const(node.input(2)) if node.input(2) else None
    if bias is not None:
        bias = np.asarray(bias).reshape(-1)
    hints = [ctx.origin(node.input(1))] + ([ctx.origin(node.input(2))] if node.input(2) else [])
    return Converted(_linear(w.T, bias), [node.inputs[0]], hints)


@register_emitter(nn.Linear)
def emit_linear(ctx, name, m, inputs, outputs):
    write_fc(ctx, name, inputs[0], ctx.rank(inputs[0]), _array(m.weight), _array(m.bias), outputs[0])


# --------------------------------------------------------------------------- BatchNormalization
_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@register_converter("BatchNormalization")
def convert_batchnorm(node, ctx):
    node.single_output()
    if node.opset < 9 and not int(node.attrs.get("spatial", 1)):
        raise node.error("spatial=0 is not supported")
    values = [ctx.const(node.input(i)) for i in range(1, 5)]
    if any(v is None for v in values):
        raise node.error("scale, B, mean and var must be constants")
    scale, b, mean, var = (np.asarray(v).reshape(-1) for v in values)
    shape = ctx.shape(node.inputs[0])
    cls = _BN.get(len(shape) if shape is not None else 4, nn.BatchNorm2d)
    momentum = float(node.attrs.get("momentum", 0.9))
    bn = cls(scale.shape[0], eps=float(node.attrs.get("epsilon", 1e-5)), momentum=1.0 - momentum)
    bn.weight = _param(scale)
    bn.bias = _param(b)
    bn.running_mean.copy_(torch.from_numpy(mean.astype(np.float32)))
    bn.running_var.copy_(torch.from_numpy(var.astype(np.float32)))
    return Converted(bn, [node.inputs[0]], [ctx.origin(node.input(1))])


@register_emitter(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def emit_batchnorm(ctx, name, m, inputs, outputs):
    if m.running_mean is None:
        raise ctx.error(f"BatchNorm {name!r} without running statistics is not exportable")
    c = m.num_features
    scale = m.weight.detach().cpu().numpy() if m.affine else np.ones(c, np.float32)
    bias = m.bias.detach().cpu().numpy() if m.affine else np.zeros(c, np.float32)
    args = [inputs[0], ctx.add_initializer(f"{name}.weight", scale), ctx.add_initializer(f"{name}.bias", bias),
            ctx.add_initializer(f"{name}.running_mean", m.running_mean.cpu().numpy()),
            ctx.add_initializer(f"{name}.running_var", m.running_var.cpu().numpy())]
    momentum = 1.0 - (m.momentum if m.momentum is not None else 0.1)
    ctx.add_node("BatchNormalization", args, outputs, name=name, epsilon=float(m.eps), momentum=float(momentum))


# --------------------------------------------------------------------------- LRN
class LocalResponseNorm(nn.LocalResponseNorm):
    """ONNX LRN: y = x / (bias + alpha / size * sum of x^2 over channels [c - floor((size-1)/2), c + ceil((size-1)/2)])^beta.

    torch's nn.LocalResponseNorm is the same formula, but centres even-sized windows one channel
    earlier; this subclass uses ONNX's window for every size (identical to torch's for odd sizes).
    """

    def forward(self, x):
        if self.size % 2 == 1:
            return super().forward(x)
        n, c = x.shape[0], x.shape[1]
        sq = (x * x).reshape(n, 1, c, -1)
        sq = F.pad(sq, (0, 0, (self.size - 1) // 2, self.size // 2))
        avg = F.avg_pool2d(sq, (self.size, 1), stride=1).reshape(x.shape)
        return x / (self.k + self.alpha * avg) ** self.beta


@register_converter("LRN")
def convert_lrn(node, ctx):
    return LocalResponseNorm(int(node.attrs["size"]), alpha=float(node.attrs.get("alpha", 1e-4)),
                             beta=float(node.attrs.get("beta", 0.75)), k=float(node.attrs.get("bias", 1.0)))


@register_emitter(nn.LocalResponseNorm)
def emit_lrn(ctx, name, m, inputs, outputs):
    if m.size % 2 == 0 and not isinstance(m, LocalResponseNorm):
        raise ctx.error(f"torch LocalResponseNorm {name!r} with even size {m.size} has no ONNX LRN equivalent")
    ctx.add_node("LRN", inputs, outputs, name=name, size=int(m.size), alpha=float(m.alpha), beta=float(m.beta),
                 bias=float(m.k))


# --------------------------------------------------------------------------- Dropout
@register_converter("Dropout")
def convert_dropout(node, ctx):
    node.single_output()
    if node.opset < 12:
        return Converted(nn.Dropout(float(node.attrs.get("ratio", 0.5))), [node.inputs[0]])
    ratio = 0.5
    if node.input(1):
        value = ctx.const(node.input(1))
        if value is None:
            raise node.error("the ratio must be a constant")
        ratio = float(scalar(value))
    return Converted(nn.Dropout(ratio), [node.inputs[0]])


@register_emitter(nn.Dropout)
def emit_dropout(ctx, name, m, inputs, outputs):
    dtype = ctx.dtype(inputs[0]) or np.float32
    ratio = ctx.add_initializer(f"{name}_ratio", np.array(m.p, dtype=dtype))
    ctx.add_node("Dropout", [inputs[0], ratio], outputs, name=name)

