"""Element-wise ops and activations: Add/Sub/Mul/Div/Pow/Mod and comparisons, Where, Max/Min/Sum/Mean,
unary math, Relu/Sigmoid/Tanh/LeakyRelu/PRelu/Elu, Clip, Softmax/LogSoftmax."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from .registry import Converted, register_converter, register_emitter, register_plain_op, scalar


def _div(a, b):
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _pow(a, b):
    out = torch.pow(a, b)
    return out if out.dtype == a.dtype else out.to(a.dtype)  # ONNX: result has the base's type


_BINARY = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}
_VARIADIC = {"Max": torch.maximum, "Min": torch.minimum, "Sum": torch.add, "Mean": torch.add}


class Binary(nn.Module):
    """A two-input element-wise ONNX op with numpy broadcasting. `legacy_axis` reproduces opset < 7
    broadcasting (broadcast=1, axis=k): the second input is aligned with the first starting at dim k."""

    def __init__(self, op: str, legacy_axis: int | None = None):
        super().__init__()
        self.op, self.legacy_axis = op, legacy_axis

    def forward(self, a, b):
        if self.legacy_axis is not None:
            axis = self.legacy_axis % a.dim()
            b = b.reshape(tuple(b.shape) + (1,) * (a.dim() - axis - b.dim()))
        return _BINARY[self.op](a, b)

    def extra_repr(self):
        return self.op if self.legacy_axis is None else f"{self.op}, legacy_axis={self.legacy_axis}"


def _convert_binary(node, ctx):
    axis = None
    if node.opset < 7 and node.attrs.get("broadcast", 0) and "axis" in node.attrs:
        axis = int(node.attrs["axis"])
    return Binary(node.op_type, axis)


for _op in _BINARY:
    register_converter(_op)(_convert_binary)


@register_emitter(Binary)
def emit_binary(ctx, name, m, inputs, outputs):
    a, b = inputs
    if m.legacy_axis is not None:
        ra, rb = ctx.rank(a), ctx.rank(b)
        if ra is None or rb is None:
            raise ctx.error(f"{m.op} {name!r}: old-style broadcasting needs known input ranks")
        extra = ra - m.legacy_axis % ra - rb
        if extra > 0:
            aligned = ctx.fresh(f"{name}_aligned")
            axes = ctx.add_initializer(f"{name}_axes", np.arange(rb, rb + extra, dtype=np.int64))
            ctx.add_node("Unsqueeze", [b, axes], [aligned])
            b = aligned
    ctx.add_node(m.op, [a, b], outputs, name=name)


class Mod(nn.Module):
    """ONNX Mod: fmod=0 takes the divisor's sign (integers only, like Python's %), fmod=1 the dividend's (C fmod)."""

    def __init__(self, fmod: bool = False):
        super().__init__()
        self.fmod = fmod

    def forward(self, a, b):
        return torch.fmod(a, b) if self.fmod else torch.remainder(a, b)

    def extra_repr(self):
        return f"fmod={int(self.fmod)}"


@register_converter("Mod")
def convert_mod(node, ctx):
    return Mod(bool(node.attrs.get("fmod", 0)))


@register_emitter(Mod)
def emit_mod(ctx, name, m, inputs, outputs):
    ctx.add_node("Mod", inputs, outputs, name=name, fmod=int(m.fmod))


class Variadic(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = _VARIADIC[self.op](out, x)
        return out / len(xs) if self.op == "Mean" else out

    def extra_repr(self):
        return self.op


for _op in _VARIADIC:
    register_converter(_op)(lambda node, ctx: Variadic(node.op_type))


@register_emitter(Variadic)
def emit_variadic(ctx, name, m, inputs, outputs):
    ctx.add_node(m.op, inputs, outputs, name=name)


class Where(nn.Module):
    def forward(self, cond, x, y):
        return torch.where(cond, x, y)


register_plain_op("Where", Where)


# --------------------------------------------------------------------------- unary
_UNARY = {
    "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Erf": torch.erf,
    "Not": torch.logical_not, "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos,
}


class Unary(nn.Module):
    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, x):
        return _UNARY[self.op](x)

    def extra_repr(self):
        return self.op


for _op in _UNARY:
    register_converter(_op)(lambda node, ctx: Unary(node.op_type))


@register_emitter(Unary)
def emit_unary(ctx, name, m, inputs, outputs):
    ctx.add_node(m.op, inputs, outputs, name=name)


register_plain_op("Relu", nn.ReLU)
class PRelu(nn.Module):
    """ONNX PRelu: y = x if x >= 0 else slope * x, slope broadcast to x (a constant input)."""

    def forward(self, x, slope):
        return torch.where(x >= 0, x, x * slope)


register_plain_op("PRelu", PRelu)
register_plain_op("Sigmoid", nn.Sigmoid)
register_plain_op("Tanh", nn.Tanh)
register_converter("LeakyRelu")(lambda node, ctx: nn.LeakyReLU(float(node.attrs.get("alpha", 0.01))))
register_converter("Elu")(lambda node, ctx: nn.ELU(float(node.attrs.get("alpha", 1.0))))


@register_emitter(nn.LeakyReLU)
def emit_leaky_relu(ctx, name, m, inputs, outputs):
    ctx.add_node("LeakyRelu", inputs, outputs, name=name, alpha=float(m.negative_slope))


@register_emitter(nn.ELU)
def emit_elu(ctx, name, m, inputs, outputs):
    ctx.add_node("Elu", inputs, outputs, name=name, alpha=float(m.alpha))


# --------------------------------------------------------------------------- Clip
class Clip(nn.Module):
    """Clamp to [min, max]; bounds are stored floats (old attribute form or constant inputs) or forward args."""

    def __init__(self, min: float | None = None, max: float | None = None):
        super().__init__()
        self.min, self.max = min, max

    def forward(self, x, min=None, max=None):
        lo = self.min if min is None else min
        hi = self.max if max is None else max
        return torch.clamp(x, lo, hi)

    def extra_repr(self):
        return f"min={self.min}, max={self.max}"


@register_converter("Clip")
def convert_clip(node, ctx):
    if node.opset < 11:
        return Converted(Clip(node.attrs.get("min"), node.attrs.get("max")), [node.inputs[0]])
    bounds, names = [], [node.inputs[0]]
    for i in (1, 2):
        name = node.input(i)
        value = ctx.const(name) if name else None
        if name and value is None:
            bounds.append(None)
            names += [""] * (i - len(names)) + [name]
        else:
            bounds.append(scalar(value) if value is not None else None)
    return Converted(Clip(*bounds), names)


@register_emitter(Clip)
def emit_clip(ctx, name, m, inputs, outputs):
    args = [inputs[0]]
    dtype = ctx.dtype(inputs[0]) or np.float32
    for i, bound in ((1, m.min), (2, m.max)):
        if i < len(inputs) and inputs[i]:
            args.append(inputs[i])
        elif bound is not None:
            args.append(ctx.add_initializer(f"{name}_{'min' if i == 1 else 'max'}", np.array(bound, dtype=dtype)))
        else:
            args.append("")
    while args[-1] == "":
        args.pop()
    ctx.add_node("Clip", args, outputs, name=name)


# --------------------------------------------------------------------------- Softmax
class Softmax(nn.Module):
    """Softmax / LogSoftmax. `legacy` (opset < 13): the input is viewed as 2-D [prod(d[:axis]), prod(d[axis:])]
    and normalised over the second dimension; from opset 13 it is normalised along `axis` only."""

    def __init__(self, axis: int, legacy: bool = False, log: bool = False):
        super().__init__()
        self.axis, self.legacy, self.log = axis, legacy, log

    def forward(self, x):
        fn = torch.log_softmax if self.log else torch.softmax
        if not self.legacy:
            return fn(x, dim=self.axis)
        axis = self.axis % x.dim() if x.dim() else 0
        flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
        return fn(flat, dim=1).reshape(x.shape)

    def extra_repr(self):
        return f"axis={self.axis}, legacy={self.legacy}, log={self.log}"


def _convert_softmax(node, ctx):
    legacy = node.opset < 13
    return Softmax(int(node.attrs.get("axis", 1 if legacy else -1)), legacy, node.op_type == "LogSoftmax")


register_converter("Softmax")(_convert_softmax)
register_converter("LogSoftmax")(_convert_softmax)


@register_emitter(Softmax)
def emit_softmax(ctx, name, m, inputs, outputs):
    op = "LogSoftmax" if m.log else "Softmax"
    rank = ctx.rank(inputs[0])
    if not m.legacy or (rank is not None and m.axis % rank == rank - 1):
        ctx.add_node(op, inputs, outputs, name=name, axis=-1 if m.legacy else m.axis)
        return
    flat, soft, shape = ctx.fresh(f"{name}_2d"), ctx.fresh(f"{name}_soft"), ctx.fresh(f"{name}_shape")
    ctx.add_node("Flatten", inputs, [flat], axis=m.axis)
    ctx.add_node(op, [flat], [soft], name=name, axis=1)
    ctx.add_node("Shape", inputs, [shape])
    ctx.add_node("Reshape", [soft, shape], outputs)


@register_emitter(nn.Softmax, nn.LogSoftmax)
def emit_torch_softmax(ctx, name, m, inputs, outputs):
    ctx.add_node("LogSoftmax" if isinstance(m, nn.LogSoftmax) else "Softmax", inputs, outputs, name=name,
                 axis=m.dim if m.dim is not None else 1)
