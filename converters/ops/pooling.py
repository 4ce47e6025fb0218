"""MaxPool / AveragePool (1-3-D, explicit or auto pads, ceil_mode, count_include_pad) and
GlobalAveragePool / GlobalMaxPool, computed to match onnxruntime.

torch's pooling only takes symmetric padding of at most half the kernel and has its own ceil_mode
rule, so `Pool` pads explicitly (-inf for max, 0 for average) to the exact ONNX output size and then
pools without padding. For averages the divisor is pooled from a mask of the positions that count
(the input, plus the explicit pads when count_include_pad=1).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_converter, register_emitter

_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def same_pads(sizes, kernel, strides, dilations, mode: str) -> list[int]:
    """ONNX auto_pad SAME_UPPER/SAME_LOWER pads [b1.., e1..] so that out = ceil(in / stride)."""
    begins, ends = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        total = max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else big)
        ends.append(big if mode == "SAME_UPPER" else small)
    return begins + ends


class Pool(nn.Module):
    def __init__(self, mode: str, kernel: list[int], strides: list[int], pads: list[int], dilations: list[int],
                 ceil_mode: bool = False, auto_pad: str = "NOTSET", count_include_pad: bool = False):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', not {mode!r}")
        self.mode, self.kernel, self.strides, self.pads, self.dilations = mode, kernel, strides, pads, dilations
        self.ceil_mode, self.auto_pad, self.count_include_pad = ceil_mode, auto_pad, count_include_pad

    def _pads_and_sizes(self, sizes):
        k, s, d = self.kernel, self.strides, self.dilations
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = same_pads(sizes, k, s, d, self.auto_pad)
            outs = [math.ceil(n / st) for n, st in zip(sizes, s)]
            return pads, outs
        pads = [0] * (2 * len(k)) if self.auto_pad == "VALID" else list(self.pads)
        n = len(k)
        outs = []
        for i in range(n):
            span = sizes[i] + pads[i] + pads[i + n] - ((k[i] - 1) * d[i] + 1)
            if self.ceil_mode:
                out = math.ceil(span / s[i]) + 1
                if (out - 1) * s[i] >= sizes[i] + pads[i]:  # the last window would start in the end padding
                    out -= 1
            else:
                out = span // s[i] + 1
            outs.append(out)
        return pads, outs

    def forward(self, x):
        n = len(self.kernel)
        sizes = list(x.shape[-n:])
        pads, outs = self._pads_and_sizes(sizes)
        # extra end padding so that floor-mode pooling yields exactly `outs` windows
        extra = [max(0, (o - 1) * st + (k - 1) * d + 1 - (sz + pb + pe))
                 for o, st, k, d, sz, pb, pe in zip(outs, self.strides, self.kernel, self.dilations, sizes, pads[:n], pads[n:])]
        begin, end = pads[:n], [pe + e for pe, e in zip(pads[n:], extra)]
        torch_pads = [p for i in reversed(range(n)) for p in (begin[i], end[i])]
        if self.mode == "max":
            if any(torch_pads):
                x = F.pad(x, torch_pads, value=-math.inf)
            out = _MAX[n](x, self.kernel, self.strides, 0, self.dilations)
        else:
            if any(d != 1 for d in self.dilations):
                raise ValueError("AveragePool with dilations is not supported")
            if not any(torch_pads):
                return _AVG[n](x, self.kernel, self.strides, 0)
            total = _AVG[n](F.pad(x, torch_pads), self.kernel, self.strides, 0) * math.prod(self.kernel)
            mask = torch.ones([1, 1] + sizes, dtype=x.dtype, device=x.device)
            if self.count_include_pad:  # explicit pads count, the ceil_mode extension does not
                mask = F.pad(mask, [p for i in reversed(range(n)) for p in (begin[i], pads[n + i])], value=1.0)
                mask = F.pad(mask, [p for i in reversed(range(n)) for p in (0, extra[i])])
            else:
                mask = F.pad(mask, torch_pads)
            count = _AVG[n](mask, self.kernel, self.strides, 0) * math.prod(self.kernel)
            out = total / count
        return out[(...,) + tuple(slice(0, o) for o in outs)]

    def extra_repr(self):
        return (f"{self.mode}, kernel={self.kernel}, strides={self.strides}, pads={self.pads}, dilations={self.dilations}, "
                f"ceil_mode={self.ceil_mode}, auto_pad={self.auto_pad!r}, count_include_pad={self.count_include_pad}")


def _convert_pool(node, ctx):
    node.single_output()
    kernel = [int(k) for k in node.attrs["kernel_shape"]]
    n = len(kernel)
    if n not in (1, 2, 3):
        raise node.error(f"{n}-D pooling is not supported")
    auto_pad = node.attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.error(f"unknown auto_pad {auto_pad!r}")
    dilations = [int(v) for v in node.attrs.get("dilations", [1] * n)]
    mode = "max" if node.op_type == "MaxPool" else "avg"
    if mode == "avg" and any(d != 1 for d in dilations):
        raise node.error("dilations are not supported for AveragePool")
    return Pool(mode, kernel, [int(v) for v in node.attrs.get("strides", [1] * n)],
                [int(v) for v in node.attrs.get("pads", [0] * 2 * n)], dilations,
                bool(node.attrs.get("ceil_mode", 0)), auto_pad, bool(node.attrs.get("count_include_pad", 0)))


register_converter("MaxPool")(_convert_pool)
register_converter("AveragePool")(_convert_pool)


def _explicit_end_pads(m: Pool, sizes: list[int]) -> tuple[list[int], list[int]]:
    """(begin pads, end pads) that give, with ceil_mode=0, the output size onnxruntime computes with ceil_mode=1.

    ONNX shape inference before opset 22 keeps a last window that starts in the end padding, which
    onnxruntime (and torch) drop; written with explicit pads, both agree."""
    pads, outs = m._pads_and_sizes(sizes)
    n = len(m.kernel)
    ends = [max(0, (outs[i] - 1) * m.strides[i] + (m.kernel[i] - 1) * m.dilations[i] + 1 - sizes[i] - pads[i])
            for i in range(n)]
    return pads[:n], ends


@register_emitter(Pool)
def emit_pool(ctx, name, m, inputs, outputs):
    n = len(m.kernel)
    attrs = {"kernel_shape": m.kernel, "strides": m.strides}
    if m.auto_pad != "NOTSET":
        attrs["auto_pad"] = m.auto_pad
    else:
        attrs["pads"] = m.pads
    if m.ceil_mode:
        attrs["ceil_mode"] = 1
        shape = ctx.shape(inputs[0])
        if m.auto_pad == "NOTSET" and shape is not None and all(isinstance(d, int) for d in shape[-n:]):
            begins, ends = _explicit_end_pads(m, list(shape[-n:]))
            attrs["ceil_mode"] = None
            if m.mode == "avg" and m.count_include_pad and any(e > p for e, p in zip(ends, m.pads[n:])):
                # the explicit pads count in the average but the ceil-mode extension does not:
                # pad with zeros first, then pool with uncounted end padding
                padded = ctx.fresh(f"{name}_padded")
                rank = len(shape)
                full = [0] * (rank - n) + m.pads[:n] + [0] * (rank - n) + m.pads[n:]
                ctx.add_node("Pad", [inputs[0], ctx.add_initializer(f"{name}_pads", np.array(full, np.int64))],
                             [padded], name=f"{name}_pad")
                inputs = [padded]
                sizes = [d + b + e for d, b, e in zip(shape[-n:], m.pads[:n], m.pads[n:])]
                _, outs = m._pads_and_sizes(list(shape[-n:]))
                ends = [max(0, (o - 1) * st + (k - 1) * dl + 1 - sz)
                        for o, st, k, dl, sz in zip(outs, m.strides, m.kernel, m.dilations, sizes)]
                attrs["pads"], attrs["count_include_pad"] = [0] * n + ends, 0
                ctx.add_node("AveragePool", inputs, outputs, name=name, **attrs)
                return
            attrs["pads"] = begins + ends
    if m.mode == "max":
        if any(d != 1 for d in m.dilations):
            attrs["dilations"] = m.dilations
        ctx.add_node("MaxPool", inputs, outputs, name=name, **attrs)
    else:
        attrs["count_include_pad"] = int(m.count_include_pad)
        ctx.add_node("AveragePool", inputs, outputs, name=name, **attrs)


class GlobalPool(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, x):
        dims = tuple(range(2, x.dim()))
        return x.mean(dim=dims, keepdim=True) if self.mode == "avg" else x.amax(dim=dims, keepdim=True)

    def extra_repr(self):
        return self.mode


register_converter("GlobalAveragePool")(lambda node, ctx: GlobalPool("avg"))
register_converter("GlobalMaxPool")(lambda node, ctx: GlobalPool("max"))


@register_emitter(GlobalPool)
def emit_global_pool(ctx, name, m, inputs, outputs):
    ctx.add_node("GlobalAveragePool" if m.mode == "avg" else "GlobalMaxPool", inputs, outputs, name=name)


@register_emitter(nn.MaxPool2d, nn.AvgPool2d)
def emit_torch_pool2d(ctx, name, m, inputs, outputs):
    pair = lambda v: list(v) if isinstance(v, (tuple, list)) else [v, v]  # noqa: E731
    k, s, p = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
    if isinstance(m, nn.MaxPool2d):
        pool = Pool("max", k, s, p + p, pair(m.dilation), m.ceil_mode)
    else:
        pool = Pool("avg", k, s, p + p, [1, 1], m.ceil_mode, count_include_pad=m.count_include_pad)
    emit_pool(ctx, name, pool, inputs, outputs)
