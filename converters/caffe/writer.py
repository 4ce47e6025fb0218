"""Write a PyTorch model (an nn.Sequential of named layers, like the zoo's) as a Caffe deploy net:
``.prototxt`` plus ``.caffemodel``, in the current format (``layer``) or the legacy V1 one (``layers``
with enum types, as bvlc_alexnet's original files).

Caffe's conventions are followed: ReLU, Dropout, BatchNorm and its Scale work in place; a Flatten right
before a Linear is left out (InnerProduct flattens by itself); BatchNorm's running statistics are stored
with a scale factor of 1. A leading ``CaffeImageNormalize`` (x*255 - mean, see models/alexnet) is not a
Caffe layer (Caffe does it in its data transformer): it is left out and reported in
:attr:`CaffeExport.input_scale` / :attr:`CaffeExport.mean`, to be baked back at import with
``--input-scale``/``--mean``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from google.protobuf import text_format

from converters.errors import ModelFormatError
from converters.fileio import atomic_path, atomic_write_text

from . import schema
from .to_onnx import caffe_pool_output_size


@dataclass
class CaffeExport:
    net: object  # NetParameter without blobs
    blobs: dict[str, list[np.ndarray]] = field(repr=False)  # layer name -> parameter blobs, Caffe layout
    legacy: bool
    input_scale: float | None = None  # preprocessing left out of the net (see the module docstring)
    mean: tuple[float, ...] | None = None

    @property
    def layer_names(self) -> list[str]:
        return [lp.name for lp in (self.net.layers if self.legacy else self.net.layer)]

    def prototxt(self) -> str:
        head = schema.NetParameter()
        head.CopyFrom(self.net)
        head.ClearField("layer")
        head.ClearField("layers")
        text = text_format.MessageToString(head)
        key = "layers" if self.legacy else "layer"
        for lp in (self.net.layers if self.legacy else self.net.layer):
            text += f"{key} {{\n{text_format.MessageToString(lp, indent=2)}}}\n"
        return text

    def caffemodel_chunks(self):
        """The .caffemodel bytes, in pieces (weights go straight from numpy, not through protobuf)."""
        head = schema.NetParameter()
        head.CopyFrom(self.net)
        head.ClearField("layer")
        head.ClearField("layers")
        yield head.SerializeToString()
        layer_field, blob_field = (2, 6) if self.legacy else (100, 7)
        for lp in (self.net.layers if self.legacy else self.net.layer):
            parts = [lp.SerializeToString()]
            for arr in self.blobs.get(lp.name, []):
                blob = _blob_chunks(arr, self.legacy)
                parts += [_tag(blob_field, 2) + _varint(sum(len(b) for b in blob))] + blob
            yield _tag(layer_field, 2) + _varint(sum(len(p) for p in parts))
            yield from parts

    def caffemodel_bytes(self) -> bytes:
        return b"".join(self.caffemodel_chunks())

    def write(self, prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None) -> None:
        """Write the files atomically."""
        atomic_write_text(prototxt, self.prototxt())
        if caffemodel is not None:
            with atomic_path(caffemodel) as tmp, open(tmp, "wb") as f:
                for chunk in self.caffemodel_chunks():
                    f.write(chunk)


# --- protobuf wire format for the weights ------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative ints as 64-bit two's complement, as protobuf does
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _blob_chunks(arr: np.ndarray, legacy: bool) -> list[bytes]:
    """A BlobProto: its shape (or legacy num/channels/height/width) and packed float data."""
    a = np.ascontiguousarray(arr, dtype="<f4")
    if legacy:
        if a.ndim > 4:
            raise ModelFormatError(f"a {a.ndim}-D blob does not fit the legacy 4-D blob format")
        dims = (1,) * (4 - a.ndim) + a.shape
        head = b"".join(_tag(i + 1, 0) + _varint(int(d)) for i, d in enumerate(dims))
    else:
        dims = b"".join(_varint(int(d)) for d in a.shape)
        shape = (_tag(1, 2) + _varint(len(dims)) + dims) if dims else b""
        head = _tag(7, 2) + _varint(len(shape)) + shape
    data = a.tobytes()
    return [head, _tag(5, 2) + _varint(len(data)), data]


# --- modules -> layers -------------------------------------------------------------------------------------

def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _set_hw(msg, what: str, hw: tuple[int, int], default: int | None, repeated: bool) -> None:
    """kernel/stride/pad: one value when equal (left out when it is the default), else <what>_h/_w."""
    h, w = hw
    name = "kernel_size" if what == "kernel" else what
    if h == w:
        if h != default:
            if repeated:
                getattr(msg, name).append(h)
            else:
                setattr(msg, name, h)
    else:
        setattr(msg, f"{what}_h", h)
        setattr(msg, f"{what}_w", w)


def _modules(model: nn.Module, prefix: str = ""):
    for name, m in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(m, nn.Sequential):
            yield from _modules(m, full + "_")
        else:
            yield full, m


def export_caffe(model: nn.Module, input_shape: tuple[int, ...], *, name: str = "net", legacy: bool = False,
                 input_style: str = "layer") -> CaffeExport:
    """Describe `model` (eval mode) as a Caffe deploy net for inputs of shape [1, *input_shape].

    input_style: "layer" (an Input layer) or "fields" (the net's input + input_shape); legacy V1 nets
    always use input + input_dim.
    """
    if not isinstance(model, nn.Sequential):
        raise ModelFormatError("the Caffe writer needs an nn.Sequential of named layers")
    if input_style not in ("layer", "fields"):
        raise ValueError(f"input_style must be 'layer' or 'fields', not {input_style!r}")
    model = model.eval()
    net = schema.NetParameter(name=name)
    blobs: dict[str, list[np.ndarray]] = {}
    input_dims = [1] + [int(d) for d in input_shape]
    if legacy:
        if len(input_dims) != 4:
            raise ModelFormatError("legacy V1 nets declare 4-D inputs (input_dim); give input_shape as C,H,W")
        net.input.append("data")
        net.input_dim.extend(input_dims)
    elif input_style == "fields":
        net.input.append("data")
        net.input_shape.add().dim.extend(input_dims)
    else:
        lp = net.layer.add(name="data", type="Input", top=["data"])
        lp.input_param.shape.add().dim.extend(input_dims)

    def add(layer_name: str, type_: str, bottom: str, top: str):
        if legacy:
            try:
                number = schema.v1_type_number(type_)
            except KeyError:
                raise ModelFormatError(f"layer {layer_name!r}: type {type_} does not exist in the legacy V1 "
                                       "format") from None
            return net.layers.add(name=layer_name, type=number, bottom=[bottom], top=[top])
        return net.layer.add(name=layer_name, type=type_, bottom=[bottom], top=[top])

    mods = list(_modules(model))
    x = torch.zeros(input_dims)
    blob = "data"
    input_scale = mean = None
    with torch.no_grad():
        for idx, (lname, m) in enumerate(mods):
            y = m(x)
            t = lambda v: v.detach().cpu().numpy().astype(np.float32)  # noqa: E731
            if type(m).__name__ == "CaffeImageNormalize":
                if idx != 0:
                    raise ModelFormatError(f"module {lname!r}: CaffeImageNormalize must come first")
                input_scale, mean = 255.0, tuple(float(v) for v in m.mean.flatten())
            elif isinstance(m, nn.Identity):
                pass
            elif isinstance(m, nn.Conv2d):
                if m.padding_mode != "zeros":
                    raise ModelFormatError(f"module {lname!r}: padding_mode {m.padding_mode!r} has no Caffe equivalent")
                if isinstance(m.padding, str):
                    raise ModelFormatError(f"module {lname!r}: give the padding as numbers, not {m.padding!r}")
                lp = add(lname, "Convolution", blob, lname)
                cp = lp.convolution_param
                cp.num_output = m.out_channels
                if m.bias is None:
                    cp.bias_term = False
                _set_hw(cp, "kernel", _pair(m.kernel_size), None, True)
                _set_hw(cp, "stride", _pair(m.stride), 1, True)
                _set_hw(cp, "pad", _pair(m.padding), 0, True)
                dil = _pair(m.dilation)
                if dil != (1, 1):
                    cp.dilation.extend(dil if dil[0] != dil[1] else dil[:1])
                if m.groups != 1:
                    cp.group = m.groups
                blobs[lname] = [t(m.weight)] + ([t(m.bias)] if m.bias is not None else [])
                blob = lname
            elif isinstance(m, nn.Linear):
                lp = add(lname, "InnerProduct", blob, lname)
                lp.inner_product_param.num_output = m.out_features
                if m.bias is None:
                    lp.inner_product_param.bias_term = False
                blobs[lname] = [t(m.weight)] + ([t(m.bias)] if m.bias is not None else [])
                blob = lname
            elif isinstance(m, (nn.ReLU, nn.LeakyReLU)):
                lp = add(lname, "ReLU", blob, blob)
                if isinstance(m, nn.LeakyReLU):
                    lp.relu_param.negative_slope = m.negative_slope
            elif isinstance(m, nn.Dropout):
                lp = add(lname, "Dropout", blob, blob)
                lp.dropout_param.dropout_ratio = m.p
            elif isinstance(m, nn.LocalResponseNorm):
                if m.size % 2 != 1:
                    raise ModelFormatError(f"module {lname!r}: Caffe's LRN needs an odd size, not {m.size}")
                lp = add(lname, "LRN", blob, lname)
                lrn = lp.lrn_param
                lrn.local_size, lrn.alpha, lrn.beta, lrn.k = m.size, m.alpha, m.beta, m.k
                blob = lname
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                lp = add(lname, "Pooling", blob, lname)
                _pooling(lname, m, lp.pooling_param, tuple(x.shape[2:]), tuple(y.shape[2:]))
                blob = lname
            elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                if _pair(m.output_size) != (1, 1):
                    raise ModelFormatError(f"module {lname!r}: only adaptive pooling to 1x1 (global pooling) "
                                           "is supported")
                lp = add(lname, "Pooling", blob, lname)
                lp.pooling_param.pool = 1 if isinstance(m, nn.AdaptiveAvgPool2d) else 0
                lp.pooling_param.global_pooling = True
                blob = lname
            elif isinstance(m, nn.Flatten):
                nxt = next((mm for _, mm in mods[idx + 1:] if not isinstance(mm, nn.Identity)), None)
                if m.start_dim == 1 and m.end_dim == -1 and isinstance(nxt, nn.Linear):
                    pass  # InnerProduct flattens its input itself
                else:
                    lp = add(lname, "Flatten", blob, lname)
                    if (m.start_dim, m.end_dim) != (1, -1):
                        if legacy:
                            raise ModelFormatError(f"module {lname!r}: the V1 Flatten layer has no axis parameters")
                        lp.flatten_param.axis, lp.flatten_param.end_axis = m.start_dim, m.end_dim
                    blob = lname
            elif isinstance(m, nn.Softmax):
                if m.dim is None or m.dim == 0:
                    raise ModelFormatError(f"module {lname!r}: give Softmax an explicit non-batch dim")
                lp = add(lname, "Softmax", blob, lname)
                if m.dim != 1:
                    lp.softmax_param.axis = m.dim
                blob = lname
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if m.running_mean is None:
                    raise ModelFormatError(f"module {lname!r}: BatchNorm without running statistics has no "
                                           "Caffe equivalent")
                lp = add(lname, "BatchNorm", blob, blob)
                if m.eps != 1e-5:
                    lp.batch_norm_param.eps = m.eps
                blobs[lname] = [t(m.running_mean), t(m.running_var), np.ones(1, np.float32)]
                if m.affine:
                    sname = f"{lname}_scale"
                    lp = add(sname, "Scale", blob, blob)
                    lp.scale_param.bias_term = True
                    blobs[sname] = [t(m.weight), t(m.bias)]
            else:
                raise ModelFormatError(f"module {lname!r} ({type(m).__name__}) has no Caffe equivalent in this writer")
            x = y
    return CaffeExport(net, blobs, legacy, input_scale, mean)


def _pooling(lname: str, m, pp, in_hw, out_hw) -> None:
    k, s, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
    if isinstance(m, nn.MaxPool2d):
        if _pair(m.dilation) != (1, 1) or m.return_indices:
            raise ModelFormatError(f"module {lname!r}: dilated pooling or return_indices has no Caffe equivalent")
    else:
        pp.pool = 1  # AVE
        if m.divisor_override:
            raise ModelFormatError(f"module {lname!r}: divisor_override has no Caffe equivalent")
        if any(p) and not m.count_include_pad:
            raise ModelFormatError(f"module {lname!r}: Caffe's AVE pooling counts padding; set count_include_pad=True")
    _set_hw(pp, "kernel", k, None, False)
    _set_hw(pp, "stride", s, 1, False)
    _set_hw(pp, "pad", p, 0, False)
    padded = any(p)
    for ceil_mode in (True, False):
        got = tuple(caffe_pool_output_size(n, kk, pd, st, ceil_mode, padded) for n, kk, pd, st in zip(in_hw, k, p, s))
        if got == tuple(out_hw):
            if not ceil_mode:
                pp.round_mode = 1  # FLOOR
            return
    raise ModelFormatError(f"module {lname!r}: no Caffe rounding mode reproduces PyTorch's pooled size {list(out_hw)}")


def write_caffe(model: nn.Module, input_shape: tuple[int, ...], prototxt: str | os.PathLike,
                caffemodel: str | os.PathLike | None = None, **kwargs) -> CaffeExport:
    """export_caffe() and write the .prototxt (and the .caffemodel when a path is given)."""
    export = export_caffe(model, input_shape, **kwargs)
    export.write(Path(prototxt), Path(caffemodel) if caffemodel is not None else None)
    return export
