"""Shape and data-movement ops: Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Concat, Shape, Size,
Gather, Slice, Cast, ConstantOfShape, Expand, Identity, Pad, Reduce*.

Shape-like inputs (shape, axes, pads, starts...) that are constants are stored on the module as
Python lists, so the module does not depend on the opset that carried them; inputs that are only
known at run time are passed to forward as int64 tensors.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import (Converted, OnnxNode, ints, onnx_dtype, register_converter, register_emitter,
                       register_plain_op, torch_dtype)


def _ints_or_runtime(node: OnnxNode, ctx, index: int, attr: str | None = None):
    """(constant list | None, runtime input name | None) for a shape-like input (or attribute in old opsets)."""
    if attr is not None and attr in node.attrs:
        return [int(v) for v in node.attrs[attr]], None
    name = node.input(index)
    if not name:
        return None, None
    value = ctx.const(name)
    return (ints(value), None) if value is not None else (None, name)


def _list(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _i64(ctx, name: str, values) -> str:
    return ctx.add_initializer(name, np.asarray(values, dtype=np.int64))


# --------------------------------------------------------------------------- Reshape
class Reshape(nn.Module):
    """ONNX Reshape: 0 copies the input dimension (unless allowzero), -1 is inferred."""

    def __init__(self, shape: list[int] | None = None, allowzero: bool = False):
        super().__init__()
        self.shape = shape
        self.allowzero = allowzero

    def forward(self, x, shape=None):
        target = self.shape if shape is None else _list(shape)
        if not self.allowzero:
            target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
        return x.reshape(target)

    def extra_repr(self):
        return f"shape={self.shape}, allowzero={self.allowzero}"


@register_converter("Reshape")
def convert_reshape(node, ctx):
    shape, runtime = _ints_or_runtime(node, ctx, 1, "shape")
    module = Reshape(shape, bool(node.attrs.get("allowzero", 0)))
    return Converted(module, [node.inputs[0]] + ([runtime] if runtime else []))


@register_emitter(Reshape)
def emit_reshape(ctx, name, m, inputs, outputs):
    shape = inputs[1] if m.shape is None else _i64(ctx, f"{name}_shape", m.shape)
    allowzero = m.allowzero and (m.shape is None or 0 in m.shape)
    if allowzero and ctx.opset < 14:
        raise ctx.error(f"Reshape {name!r} needs allowzero, which requires opset >= 14")
    ctx.add_node("Reshape", [inputs[0], shape], outputs, name=name, allowzero=1 if allowzero else None)


# --------------------------------------------------------------------------- Flatten
class Flatten(nn.Module):
    """ONNX Flatten: always 2-D, [prod(dims[:axis]), prod(dims[axis:])]."""

    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = axis

    def forward(self, x):
        axis = self.axis + x.dim() if self.axis < 0 else self.axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))

    def extra_repr(self):
        return f"axis={self.axis}"


@register_converter("Flatten")
def convert_flatten(node, ctx):
    return Flatten(int(node.attrs.get("axis", 1)))


@register_emitter(Flatten)
def emit_flatten(ctx, name, m, inputs, outputs):
    ctx.add_node("Flatten", inputs, outputs, name=name, axis=m.axis)


@register_emitter(nn.Flatten)
def emit_torch_flatten(ctx, name, m, inputs, outputs):
    if m.start_dim == 1 and m.end_dim == -1:
        ctx.add_node("Flatten", inputs, outputs, name=name, axis=1)
        return
    rank = ctx.rank(inputs[0])
    if rank is None:
        raise ctx.error(f"nn.Flatten {name!r}: input rank unknown")
    start, end = m.start_dim % rank, m.end_dim % rank
    shape = [0] * start + [-1] + [0] * (rank - end - 1)
    ctx.add_node("Reshape", [inputs[0], _i64(ctx, f"{name}_shape", shape)], outputs, name=name)


# --------------------------------------------------------------------------- Transpose
class Transpose(nn.Module):
    def __init__(self, perm: list[int] | None = None):
        super().__init__()
        self.perm = perm

    def forward(self, x):
        perm = self.perm if self.perm is not None else list(range(x.dim() - 1, -1, -1))
        return x.permute(perm)

    def extra_repr(self):
        return f"perm={self.perm}"


@register_converter("Transpose")
def convert_transpose(node, ctx):
    perm = node.attrs.get("perm")
    return Transpose([int(p) for p in perm] if perm is not None else None)


@register_emitter(Transpose)
def emit_transpose(ctx, name, m, inputs, outputs):
    ctx.add_node("Transpose", inputs, outputs, name=name, perm=m.perm)


# --------------------------------------------------------------------------- Squeeze / Unsqueeze
class Squeeze(nn.Module):
    def __init__(self, axes: list[int] | None = None):
        super().__init__()
        self.axes = axes

    def forward(self, x, axes=None):
        axes = self.axes if axes is None else _list(axes)
        if axes is None:
            return x.squeeze()
        return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x

    def extra_repr(self):
        return f"axes={self.axes}"


class Unsqueeze(nn.Module):
    def __init__(self, axes: list[int] | None = None):
        super().__init__()
        self.axes = axes

    def forward(self, x, axes=None):
        axes = self.axes if axes is None else _list(axes)
        rank = x.dim() + len(axes)
        for a in sorted(a % rank for a in axes):
            x = x.unsqueeze(a)
        return x

    def extra_repr(self):
        return f"axes={self.axes}"


def _convert_squeeze_like(cls):
    def convert(node, ctx):
        axes, runtime = _ints_or_runtime(node, ctx, 1, "axes")
        return Converted(cls(axes), [node.inputs[0]] + ([runtime] if runtime else []))

    return convert


register_converter("Squeeze")(_convert_squeeze_like(Squeeze))
register_converter("Unsqueeze")(_convert_squeeze_like(Unsqueeze))


@register_emitter(Squeeze, Unsqueeze)
def emit_squeeze_like(ctx, name, m, inputs, outputs):
    op = type(m).__name__
    if m.axes is None and len(inputs) == 1:
        ctx.add_node(op, inputs, outputs, name=name)
    else:
        axes = inputs[1] if m.axes is None else _i64(ctx, f"{name}_axes", m.axes)
        ctx.add_node(op, [inputs[0], axes], outputs, name=name)


# --------------------------------------------------------------------------- Concat
class Concat(nn.Module):
    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, *xs):
        return torch.cat(xs, dim=self.axis)

    def extra_repr(self):
        return f"axis={self.axis}"


@register_converter("Concat")
def convert_concat(node, ctx):
    return Concat(int(node.attrs.get("axis", 1 if node.opset < 4 else 0)))


@register_emitter(Concat)
def emit_concat(ctx, name, m, inputs, outputs):
    ctx.add_node("Concat", inputs, outputs, name=name, axis=m.axis)


# --------------------------------------------------------------------------- Shape / Size
class Shape(nn.Module):
    def __init__(self, start: int = 0, end: int | None = None):
        super().__init__()
        self.start, self.end = start, end

    def forward(self, x):
        return torch.tensor(x.shape[self.start:self.end], dtype=torch.int64, device=x.device)

    def extra_repr(self):
        return f"start={self.start}, end={self.end}"


@register_converter("Shape")
def convert_shape(node, ctx):
    end = node.attrs.get("end")
    return Shape(int(node.attrs.get("start", 0)), int(end) if end is not None else None)


@register_emitter(Shape)
def emit_shape(ctx, name, m, inputs, outputs):
    if m.start == 0 and m.end is None:
        ctx.add_node("Shape", inputs, outputs, name=name)
    elif ctx.opset >= 15:
        ctx.add_node("Shape", inputs, outputs, name=name, start=m.start, end=m.end)
    else:
        full = ctx.fresh(f"{name}_full")
        ctx.add_node("Shape", inputs, [full], name=ctx.fresh(f"{name}_full"))
        end = m.end if m.end is not None else np.iinfo(np.int64).max
        ctx.add_node("Slice", [full, _i64(ctx, f"{name}_start", [m.start]), _i64(ctx, f"{name}_end", [end])], outputs, name=name)


class Range(nn.Module):
    """ONNX Range: start, start + delta, ... up to (not including) limit; scalar inputs."""

    def forward(self, start, limit, delta):
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)


register_plain_op("Range", Range)


class Size(nn.Module):
    def forward(self, x):
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


register_plain_op("Size", Size)


# --------------------------------------------------------------------------- Gather
class Gather(nn.Module):
    def __init__(self, axis: int = 0):
        super().__init__()
        self.axis = axis

    def forward(self, data, indices):
        axis = self.axis % data.dim()
        idx = indices.long()
        idx = torch.where(idx < 0, idx + data.shape[axis], idx)
        out = torch.index_select(data, axis, idx.reshape(-1))
        return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1:])

    def extra_repr(self):
        return f"axis={self.axis}"


@register_converter("Gather")
def convert_gather(node, ctx):
    return Gather(int(node.attrs.get("axis", 0)))


@register_emitter(Gather)
def emit_gather(ctx, name, m, inputs, outputs):
    ctx.add_node("Gather", inputs, outputs, name=name, axis=m.axis)


# --------------------------------------------------------------------------- Slice
class Slice(nn.Module):
    """ONNX Slice. Each of starts/ends/axes/steps is a stored list, or (listed in `runtime`) a forward argument."""

    KEYS = ("starts", "ends", "axes", "steps")

    def __init__(self, starts=None, ends=None, axes=None, steps=None, runtime: tuple[str, ...] = ()):
        super().__init__()
        self.starts, self.ends, self.axes, self.steps = starts, ends, axes, steps
        self.runtime = tuple(runtime)

    def forward(self, x, *args):
        p = {k: getattr(self, k) for k in self.KEYS}
        p.update({k: _list(v) for k, v in zip(self.runtime, args)})
        axes = p["axes"] if p["axes"] is not None else list(range(len(p["starts"])))
        steps = p["steps"] if p["steps"] is not None else [1] * len(axes)
        for start, end, axis, step in zip(p["starts"], p["ends"], axes, steps):
            axis %= x.dim()
            dim = x.shape[axis]
            start = start + dim if start < 0 else start
            end = end + dim if end < 0 else end
            if step > 0:
                start, end = min(max(start, 0), dim), min(max(end, 0), dim)
                x = x[(slice(None),) * axis + (slice(start, end, step),)]
            elif step < 0:
                start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
                index = torch.arange(start, end, step, device=x.device)
                x = torch.index_select(x, axis, index)
            else:
                raise ValueError("Slice step must not be 0")
        return x

    def extra_repr(self):
        return ", ".join(f"{k}={getattr(self, k)}" for k in self.KEYS if getattr(self, k) is not None)


@register_converter("Slice", opsets=range(1, 10))
def convert_slice_v1(node, ctx):
    return Slice([int(v) for v in node.attrs["starts"]], [int(v) for v in node.attrs["ends"]],
                 [int(v) for v in node.attrs["axes"]] if "axes" in node.attrs else None)


@register_converter("Slice", opsets=range(10, 1000))
def convert_slice(node, ctx):
    stored, runtime, names = {}, [], [node.inputs[0]]
    for i, key in enumerate(Slice.KEYS, start=1):
        value, name = _ints_or_runtime(node, ctx, i)
        stored[key] = value
        if name:
            runtime.append(key)
            names.append(name)
    return Converted(Slice(**stored, runtime=tuple(runtime)), names)


@register_emitter(Slice)
def emit_slice(ctx, name, m, inputs, outputs):
    runtime = dict(zip(m.runtime, inputs[1:]))
    args = [inputs[0]]
    for key in Slice.KEYS:
        if key in runtime:
            args.append(runtime[key])
        elif getattr(m, key) is not None:
            args.append(_i64(ctx, f"{name}_{key}", getattr(m, key)))
        else:
            args.append("")
    while args[-1] == "":
        args.pop()
    ctx.add_node("Slice", args, outputs, name=name)


# --------------------------------------------------------------------------- Cast
class Cast(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)

    def extra_repr(self):
        return f"dtype={self.dtype}"


@register_converter("Cast")
def convert_cast(node, ctx):
    to = node.attrs["to"]
    if isinstance(to, str):  # opset < 6 spelled the type as a string
        import onnx

        to = onnx.TensorProto.DataType.Value(to.upper())
    return Cast(torch_dtype(int(to)))


@register_emitter(Cast)
def emit_cast(ctx, name, m, inputs, outputs):
    ctx.add_node("Cast", inputs, outputs, name=name, to=onnx_dtype(m.dtype))


# --------------------------------------------------------------------------- ConstantOfShape / Expand
class ConstantOfShape(nn.Module):
    def __init__(self, value: float | int | bool = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.value, self.dtype = value, dtype

    def forward(self, shape):
        return torch.full(_list(shape), self.value, dtype=self.dtype, device=shape.device)

    def extra_repr(self):
        return f"value={self.value}, dtype={self.dtype}"


@register_converter("ConstantOfShape")
def convert_constant_of_shape(node, ctx):
    value = node.attrs.get("value")
    if value is None:
        return ConstantOfShape(0.0, torch.float32)
    t = torch.from_numpy(np.array(value))
    return ConstantOfShape(t.reshape(-1)[0].item(), t.dtype)


@register_emitter(ConstantOfShape)
def emit_constant_of_shape(ctx, name, m, inputs, outputs):
    value = torch.tensor([m.value], dtype=m.dtype).numpy()
    ctx.add_node("ConstantOfShape", inputs, outputs, name=name, value=ctx.tensor(value))


class Expand(nn.Module):
    """ONNX Expand: broadcast x against `shape` (numpy rules, either side may be 1)."""

    def __init__(self, shape: list[int] | None = None):
        super().__init__()
        self.shape = shape

    def forward(self, x, shape=None):
        target = self.shape if shape is None else _list(shape)
        return x.expand(torch.broadcast_shapes(x.shape, tuple(target)))

    def extra_repr(self):
        return f"shape={self.shape}"


@register_converter("Expand")
def convert_expand(node, ctx):
    shape, runtime = _ints_or_runtime(node, ctx, 1)
    return Converted(Expand(shape), [node.inputs[0]] + ([runtime] if runtime else []))


@register_emitter(Expand)
def emit_expand(ctx, name, m, inputs, outputs):
    shape = inputs[1] if m.shape is None else _i64(ctx, f"{name}_shape", m.shape)
    ctx.add_node("Expand", [inputs[0], shape], outputs, name=name)


# --------------------------------------------------------------------------- Identity
@register_converter("Identity")
def convert_identity(node, ctx):
    return nn.Identity()


@register_emitter(nn.Identity)
def emit_identity(ctx, name, m, inputs, outputs):
    ctx.add_node("Identity", inputs[:1], outputs, name=name)


# --------------------------------------------------------------------------- Pad
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


class Pad(nn.Module):
    """ONNX Pad. `pads` is ONNX order [x1_begin, x2_begin, ..., x1_end, x2_end, ...] over `axes`
    (default: all dimensions); negative pads crop."""

    def __init__(self, pads: list[int] | None = None, mode: str = "constant", value: float | None = None,
                 axes: list[int] | None = None):
        super().__init__()
        self.pads, self.mode, self.value, self.axes = pads, mode, value, axes

    def forward(self, x, pads=None, value=None):
        pads = self.pads if pads is None else _list(pads)
        rank = x.dim()
        axes = [a % rank for a in self.axes] if self.axes is not None else list(range(rank))
        per_dim = [(0, 0)] * rank
        for i, a in enumerate(axes):
            per_dim[a] = (pads[i], pads[i + len(axes)])
        torch_pads = [p for a in reversed(range(rank)) for p in per_dim[a]]
        torch_pads = _trim_pads(torch_pads)
        if not any(torch_pads):
            return x
        if self.mode == "constant":
            fill = self.value if value is None else value.reshape(-1)[0].item()
            return F.pad(x, torch_pads, mode="constant", value=fill or 0.0)
        return F.pad(x, torch_pads, mode=_PAD_MODES[self.mode])

    def extra_repr(self):
        return f"pads={self.pads}, mode={self.mode!r}, value={self.value}, axes={self.axes}"


def _trim_pads(torch_pads: list[int]) -> list[int]:
    """Drop trailing (outermost) zero pairs: torch's non-constant modes only pad the last few dims."""
    while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]
    return torch_pads


def onnx_to_torch_pads(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] (spatial dims) -> F.pad order (last dim first)."""
    n = len(pads) // 2
    out = []
    for i in reversed(range(n)):
        out += [pads[i], pads[i + n]]
    return out


@register_converter("Pad")
def convert_pad(node, ctx):
    mode = node.attrs.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise node.error(f"unsupported mode {mode!r}")
    if node.opset < 11:
        return Pad([int(p) for p in node.attrs.get("pads", node.attrs.get("paddings"))], mode,
                   float(node.attrs.get("value", 0.0)))
    pads, pads_rt = _ints_or_runtime(node, ctx, 1)
    names = [node.inputs[0]]
    if pads_rt:
        names.append(pads_rt)
    value = None
    if node.input(2):
        const = ctx.const(node.input(2))
        if const is None:
            if not pads_rt:
                names.append("")  # keep the runtime value in forward's `value` slot
            names.append(node.input(2))
        else:
            value = np.asarray(const).reshape(-1)[0].item()
    axes, axes_rt = _ints_or_runtime(node, ctx, 3)
    if axes_rt:
        raise node.error("a computed 'axes' input is not supported")
    return Converted(Pad(pads, mode, value, axes), names)


@register_emitter(Pad)
def emit_pad(ctx, name, m, inputs, outputs):
    rank = ctx.rank(inputs[0])
    pads, axes = m.pads, m.axes
    if axes is not None and pads is not None:
        if rank is None:
            raise ctx.error(f"Pad {name!r}: input rank unknown")
        n = len(axes)
        full = [0] * (2 * rank)
        for i, a in enumerate(axes):
            full[a % rank], full[a % rank + rank] = pads[i], pads[i + n]
        pads = full
    args = [inputs[0], inputs[1] if m.pads is None else _i64(ctx, f"{name}_pads", pads)]
    if len(inputs) > 2 and inputs[2]:
        args.append(inputs[2])
    elif m.value not in (None, 0, 0.0):
        dtype = ctx.dtype(inputs[0]) or np.float32
        args.append(ctx.add_initializer(f"{name}_value", np.array(m.value, dtype=dtype)))
    ctx.add_node("Pad", args, outputs, name=name, mode=m.mode)


# --------------------------------------------------------------------------- Reduce*
_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}
# opset from which axes is an input rather than an attribute
_REDUCE_AXES_INPUT = {"ReduceMean": 18, "ReduceSum": 13, "ReduceMax": 18, "ReduceMin": 18}


class Reduce(nn.Module):
    def __init__(self, op: str, axes: list[int] | None, keepdims: bool = True, noop_with_empty_axes: bool = False):
        super().__init__()
        self.op, self.axes, self.keepdims, self.noop = op, axes, keepdims, noop_with_empty_axes

    def forward(self, x, axes=None):
        axes = self.axes if axes is None else _list(axes)
        if not axes:
            if self.noop:
                return x
            axes = list(range(x.dim()))
        return _REDUCE[self.op](x, dim=tuple(axes), keepdim=self.keepdims)

    def extra_repr(self):
        return f"{self.op}, axes={self.axes}, keepdims={self.keepdims}"


def _convert_reduce(node, ctx):
    axes, runtime = _ints_or_runtime(node, ctx, 1, "axes")
    module = Reduce(node.op_type, axes, bool(node.attrs.get("keepdims", 1)), bool(node.attrs.get("noop_with_empty_axes", 0)))
    return Converted(module, [node.inputs[0]] + ([runtime] if runtime else []))


for _op in _REDUCE:
    register_converter(_op)(_convert_reduce)


@register_emitter(Reduce)
def emit_reduce(ctx, name, m, inputs, outputs):
    attrs = {"keepdims": int(m.keepdims)}
    if ctx.opset >= _REDUCE_AXES_INPUT[m.op]:
        args = list(inputs)
        if m.axes:
            args.append(_i64(ctx, f"{name}_axes", m.axes))
        if m.noop:
            attrs["noop_with_empty_axes"] = 1
    else:
        if len(inputs) > 1:
            raise ctx.error(f"{m.op} {name!r}: computed axes need opset >= {_REDUCE_AXES_INPUT[m.op]}")
        args = list(inputs)
        if m.axes:
            attrs["axes"] = m.axes
        elif m.noop:
            raise ctx.error(f"{m.op} {name!r}: noop_with_empty_axes needs opset >= {_REDUCE_AXES_INPUT[m.op]}")
    ctx.add_node(m.op, args, outputs, name=name, **attrs)
