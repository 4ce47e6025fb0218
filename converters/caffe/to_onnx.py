"""Caffe network (+ weights) -> an equivalent ONNX graph (opset 17).

Names: each Caffe layer becomes a node named after the layer (helper nodes are ``<layer>/<what>``);
learned tensors are initializers ``<layer>.weight`` / ``<layer>.bias`` (BatchNorm also
``<layer>.running_mean`` / ``<layer>.running_var``). Graph inputs and outputs carry the Caffe blob
names; the batch dimension is the symbol ``N``. In-place layers (top == bottom) get fresh value names
(``<blob>/<layer>``) so the graph stays in SSA form.

Inference semantics (Caffe's TEST phase): layers are filtered by include/exclude rules for phase TEST;
Data layers become the graph input, loss/accuracy layers are dropped, Dropout is the identity.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from converters.errors import ModelFormatError
from converters.fileio import atomic_write_bytes
from converters.registry import Registry

from .prototxt import Blob, Layer, filter_layers, parse_prototxt, read_caffemodel

OPSET = 17
IR_VERSION = 8  # the IR version that introduced opset 17
BATCH = "N"

# Layers that feed data in training nets (the first top is the image, the others labels).
DATA_LAYERS = {"Data", "ImageData", "HDF5Data", "MemoryData", "WindowData", "DummyData", "AnnotatedData"}
# Data layers that decode 8-bit images: their raw pixels are 0..255.
IMAGE_DATA_LAYERS = {"Data", "ImageData", "WindowData", "AnnotatedData"}
# Layers without a role at inference.
DROPPED_LAYERS = {"Accuracy", "Silence", "HDF5Output"}
ALIAS_LAYERS = {"Dropout", "Split"}


def _is_dropped(type_: str) -> bool:
    return type_ in DROPPED_LAYERS or type_.endswith("Loss")


@dataclass
class Preprocess:
    """net input = (x * input_scale - mean) * post_scale, with x the image in [0, 1]."""

    input_scale: float = 1.0
    mean: tuple[float, ...] = ()
    post_scale: float = 1.0  # a Data layer's transform_param.scale

    @property
    def identity(self) -> bool:
        return self.input_scale * self.post_scale == 1.0 and not any(self.mean)

    def describe(self) -> str:
        s = "x" if self.input_scale == 1 else f"x*{self.input_scale:g}"
        if any(self.mean):
            s += f" - [{', '.join(f'{m:g}' for m in self.mean)}]"
        if self.post_scale != 1:
            s = f"({s})*{self.post_scale:g}"
        return s


@dataclass
class ImportResult:
    model: onnx.ModelProto
    net_name: str
    legacy: bool  # the prototxt used V1 `layers`
    layers: list[tuple[str, str]]  # (name, type) of the Caffe layers converted
    skipped: list[tuple[str, str]]  # (name, type) left out: data, loss, accuracy, dropout...
    inputs: dict[str, tuple]  # graph input -> shape
    outputs: dict[str, tuple]  # graph output -> shape
    num_params: int  # values of the Caffe parameter blobs
    random_init: bool
    preprocess: Preprocess | None = None
    serialized: bytes | None = field(default=None, repr=False)  # the checked model's bytes

    def summary(self) -> str:
        fmt = lambda d: ", ".join(f"{k} [{','.join(map(str, s))}]" for k, s in d.items())  # noqa: E731
        lines = [
            f"caffe net {self.net_name!r}{' (legacy V1 layers)' if self.legacy else ''}: "
            f"{len(self.layers)} layers converted, {len(self.model.graph.node)} ONNX nodes, "
            f"{self.num_params:,} parameters{' (random init)' if self.random_init else ''}",
            f"  input:  {fmt(self.inputs)}",
            f"  output: {fmt(self.outputs)}",
        ]
        if self.skipped:
            lines.append("  left out: " + ", ".join(f"{n} ({t})" for n, t in self.skipped))
        if self.preprocess is not None and not self.preprocess.identity:
            lines.append(f"  preprocessing in graph: {next(iter(self.inputs))} = {self.preprocess.describe()}")
        return "\n".join(lines)


def _shape_str(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _prod(dims) -> int:
    return int(math.prod(int(d) for d in dims))


# --- Caffe's fillers (for prototxt-only conversion) --------------------------------------------------------

def fill(filler, shape: tuple[int, ...], rng: np.random.Generator, default: str, where: str) -> np.ndarray:
    """Values as Caffe's filler `filler` (a FillerParameter or None) would draw them.

    `default`: what to use without a filler ("xavier", or "constant:<value>").
    """
    shape = tuple(int(d) for d in shape)
    count = _prod(shape)
    if filler is None:
        kind, value = (default.split(":") + ["0"])[:2]
        if kind == "constant":
            return np.full(shape, float(value), np.float32)
        filler_type, variance_norm = kind, 0
        mean, std, lo, hi, sparse = 0.0, 1.0, 0.0, 1.0, -1
    else:
        filler_type, variance_norm = filler.type, filler.variance_norm
        mean, std, lo, hi, sparse = filler.mean, filler.std, filler.min, filler.max, filler.sparse
        if filler_type == "constant":
            return np.full(shape, filler.value, np.float32)
    if filler_type == "gaussian":
        out = rng.normal(mean, std, shape)
        if sparse >= 0 and shape:
            out *= rng.random(shape) < sparse / shape[0]
    elif filler_type == "uniform":
        out = rng.uniform(lo, hi, shape)
    elif filler_type in ("xavier", "msra"):
        fan_in = count / shape[0] if shape else count
        fan_out = count / shape[1] if len(shape) > 1 else count
        n = {0: fan_in, 1: fan_out, 2: (fan_in + fan_out) / 2}[variance_norm]
        if filler_type == "xavier":
            scale = math.sqrt(3.0 / n)
            out = rng.uniform(-scale, scale, shape)
        else:
            out = rng.normal(0.0, math.sqrt(2.0 / n), shape)
    elif filler_type == "positive_unitball":
        out = rng.random(shape)
        rows = out.reshape(shape[0] if shape else 1, -1)
        out = (rows / rows.sum(axis=1, keepdims=True)).reshape(shape)
    else:
        raise ModelFormatError(f"{where}: filler type {filler_type!r} is not supported for random initialisation")
    return np.asarray(out, np.float32)


# --- pooling arithmetic (Caffe's PoolingLayer::Reshape and Forward_cpu) ------------------------------------

def caffe_pool_output_size(size: int, kernel: int, pad: int, stride: int, ceil_mode: bool, padded: bool) -> int:
    """Caffe's pooled size. `padded`: the layer has any non-zero pad (pad_h or pad_w)."""
    span = size + 2 * pad - kernel
    if span < 0:
        raise ValueError(f"kernel {kernel} is larger than the padded input {size + 2 * pad}")
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # With padding, Caffe drops a last window that would start in the right-hand padding.
    if padded and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def caffe_pool_windows(size: int, kernel: int, pad: int, stride: int, out: int):
    """Per output index: (number of input elements in the window, Caffe's AVE divisor)."""
    valid, divisor = [], []
    for o in range(out):
        start = o * stride - pad
        end = min(start + kernel, size + pad)
        divisor.append(end - start)
        valid.append(min(end, size) - max(start, 0))
    return np.array(valid), np.array(divisor)


# --- the converter -----------------------------------------------------------------------------------------

class _Converter:
    def __init__(self, net, weights, weights_path, input_shape, input_scale, mean, seed):
        self.net = net
        self.weights = weights
        self.weights_path = weights_path
        self.user_input_shape = tuple(input_shape) if input_shape is not None else None
        self.user_input_scale = input_scale
        self.user_mean = tuple(mean) if mean is not None else None
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.used: set[str] = set()
        self.values: dict[str, tuple[str, tuple]] = {}  # blob -> (ONNX value, shape)
        self.unavailable: dict[str, str] = {}  # blob -> why it does not exist at inference
        self.graph_inputs: list[tuple[str, tuple]] = []
        self.num_params = 0
        self.preprocess: Preprocess | None = None
        self.primary_input: str | None = None
        self.converted: list[tuple[str, str]] = []
        self.skipped: list[tuple[int, str, str]] = []  # (file index, name, type)

    # -- naming and emission --

    def unique(self, name: str) -> str:
        base, i = name, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))

    def const(self, name: str, array, dtype=np.float32) -> str:
        name = self.unique(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(array, dtype=dtype)), name))
        return name

    def tmp(self, name: str) -> str:
        return self.unique(name)

    def err(self, layer: Layer, msg: str) -> ModelFormatError:
        return ModelFormatError(f"layer {layer.name!r} ({layer.type}): {msg}")

    def axis(self, layer: Layer, axis: int, rank: int, what: str = "axis") -> int:
        a = axis + rank if axis < 0 else axis
        if not 0 <= a < rank:
            raise self.err(layer, f"{what} {axis} is out of range for a {rank}-D input")
        if a == 0:
            raise self.err(layer, f"{what} 0 (the batch axis) is not supported")
        return a

    def arity(self, layer: Layer, min_bottoms: int, max_bottoms: int | None = None, tops: int = 1) -> None:
        nb, nt = len(layer.bottoms), len(layer.tops)
        max_bottoms = min_bottoms if max_bottoms is None else max_bottoms
        if not min_bottoms <= nb <= max_bottoms or nt != tops:
            want = (str(min_bottoms) if max_bottoms == min_bottoms else
                    f"{min_bottoms} or more" if max_bottoms >= 1 << 16 else f"{min_bottoms} to {max_bottoms}")
            raise self.err(layer, f"expects {want} bottom(s) and {tops} top(s), has {nb} and {nt}")

    # -- weights --

    def blobs(self, layer: Layer, specs: list[tuple[str, tuple, object, str]]) -> list[np.ndarray]:
        """The layer's parameter blobs, checked against `specs`: (role, shape, filler, default filler)."""
        shapes = [tuple(int(d) for d in s[1]) for s in specs]
        if self.weights is None:
            arrays = [fill(f, shp, self.rng, d, f"layer {layer.name!r} {role}")
                      for (role, _, f, d), shp in zip(specs, shapes)]
        else:
            stored = self.weights.get(layer.name)
            if stored is None:
                raise self.err(layer, f"{self.weights_path} has no weights for this layer")
            if len(stored) != len(specs):
                raise self.err(layer, f"{self.weights_path} has {len(stored)} blobs for this layer, "
                                      f"the prototxt implies {len(specs)} ({', '.join(s[0] for s in specs)})")
            arrays = []
            for blob, (role, *_), shp in zip(stored, specs, shapes):
                if not _blob_shape_matches(blob, shp):
                    raise self.err(layer, f"{role} blob in {self.weights_path} has shape {list(blob.shape)}, "
                                          f"the prototxt implies {list(shp)}")
                arrays.append(blob.data.reshape(shp))
        self.num_params += sum(a.size for a in arrays)
        return arrays

    # -- inputs and preprocessing --

    def add_input(self, layer: Layer | None, blob: str, shape: tuple, data_layer: Layer | None = None) -> None:
        if blob in self.values:
            where = f"layer {layer.name!r}" if layer else "the net's `input`"
            raise ModelFormatError(f"{where}: input blob {blob!r} is defined twice")
        shape = (BATCH,) + tuple(int(d) for d in shape[1:])
        if any(d <= 0 for d in shape[1:]):
            raise ModelFormatError(f"input {blob!r} has a non-positive dimension {_shape_str(shape)}")
        self.used.add(blob)
        self.graph_inputs.append((blob, shape))
        self.values[blob] = (blob, shape)
        if self.primary_input is None:
            self.primary_input = blob
            self.apply_preprocess(blob, shape, data_layer)
        elif data_layer is not None:
            raise ModelFormatError(f"data layer {data_layer.name!r}: only one data layer (or input) is supported")

    def input_dims(self, declared: tuple | None, what: str) -> tuple:
        if self.user_input_shape is not None:
            if self._n_inputs > 1:
                raise ModelFormatError("--input-shape is ambiguous: the net has several inputs")
            return (1,) + self.user_input_shape
        if declared is None or len(declared) < 1:
            raise ModelFormatError(f"{what} has no shape; give one with --input-shape C,H,W")
        return tuple(declared)

    def apply_preprocess(self, blob: str, shape: tuple, data_layer: Layer | None) -> None:
        pre = Preprocess()
        mean_file = None
        if data_layer is not None:
            if data_layer.type in IMAGE_DATA_LAYERS:
                pre.input_scale = 255.0
            tp = data_layer.sub("transform_param")
            if data_layer.has("transform_param"):
                pre.post_scale = float(tp.scale)
                pre.mean = tuple(float(m) for m in tp.mean_value)
                mean_file = tp.mean_file or None
            # Legacy spellings that Caffe's upgrade moves into transform_param.
            for legacy in ("data_param", "image_data_param"):
                if data_layer.has(legacy):
                    lp = data_layer.sub(legacy)
                    if lp.HasField("scale") and not tp.HasField("scale"):
                        pre.post_scale = float(lp.scale)
                    if lp.mean_file and not mean_file:
                        mean_file = lp.mean_file
        if self.user_input_scale is not None:
            pre.input_scale = float(self.user_input_scale)
        if self.user_mean is not None:
            pre.mean = self.user_mean
        elif mean_file:
            raise ModelFormatError(
                f"data layer {data_layer.name!r} subtracts the mean image {mean_file!r}, which is not "
                "supported; give the per-channel mean with --mean")
        channels = shape[1] if len(shape) > 1 else 1
        if pre.mean and len(pre.mean) not in (1, channels):
            raise ModelFormatError(f"the mean has {len(pre.mean)} values but input {blob!r} has {channels} channels")
        self.preprocess = pre
        if pre.identity:
            return
        value = blob
        a = pre.input_scale * pre.post_scale
        if a != 1.0:
            out = self.tmp(f"{blob}/scaled")
            self.node("Mul", [value, self.const("preprocess/scale", np.float32(a))], [out], "preprocess/scale")
            value = out
        if any(pre.mean):
            shift = -np.asarray(pre.mean, np.float32) * np.float32(pre.post_scale)
            if len(shift) > 1:
                shift = shift.reshape((len(shift),) + (1,) * (len(shape) - 2))
            else:
                shift = shift.reshape(())
            out = self.tmp(f"{blob}/normalized")
            self.node("Add", [value, self.const("preprocess/shift", shift)], [out], "preprocess/shift")
            value = out
        self.values[blob] = (value, shape)

    # -- main loop --

    def run(self) -> None:
        layers = filter_layers(self.net)
        kept = []
        for layer in layers:
            if _is_dropped(layer.type):
                self.skipped.append((layer.index, layer.name, layer.type))
            else:
                kept.append(layer)
        names = set()
        for layer in kept:
            if layer.name in names:
                raise ModelFormatError(f"two layers are named {layer.name!r}")
            names.add(layer.name)
        if not self.net.msg.input and not any(l.type in DATA_LAYERS or l.type == "Input" for l in kept):
            dropped = [l for l in self.net.layers if (l.type in DATA_LAYERS or l.type == "Input")
                       and all(l is not k for k in layers)]
            if dropped:
                rules = "; ".join(f"{l.name!r} ({l.type}): {' '.join(str(r).split())}"
                                  for l in dropped for r in list(l.param.include) + list(l.param.exclude))
                raise ModelFormatError(
                    f"no input: every data layer is excluded at inference by its include/exclude rules ({rules}); "
                    "the import uses phase TEST with no stages and level 0: remove the stage/level rules or "
                    "declare an Input layer")
        self._n_inputs = len(self.net.msg.input) + sum(
            len(layer.tops) if layer.type == "Input" else 1 for layer in kept
            if layer.type == "Input" or layer.type in DATA_LAYERS)

        # Caffe's bookkeeping: which blobs are left unconsumed (the net's outputs), last definitions.
        input_blobs = set(self.net.msg.input)
        available: dict[str, None] = {}
        last_def: dict[str, int] = {}
        for i, layer in enumerate(kept):
            for b in layer.bottoms:
                available.pop(b, None)
            tops = layer.tops[:1] if layer.type in DATA_LAYERS else layer.tops
            if layer.type in DATA_LAYERS or layer.type == "Input":
                input_blobs.update(tops)
            for t in tops:
                available.pop(t, None)
                available[t] = None
                last_def[t] = i
        self.net_outputs = [b for b in available if last_def.get(b) is not None
                            and not (b in input_blobs and kept[last_def[b]].type in DATA_LAYERS | {"Input"})]
        self.last_def = last_def
        self.input_blobs = input_blobs
        # Reserve the plain blob names for the graph inputs and each blob's final version.
        self.used.update(input_blobs)
        self.used.update(b for b in last_def if b not in input_blobs)

        self.declare_net_inputs()
        for i, layer in enumerate(kept):
            self.convert_layer(i, layer)
        if not self.net_outputs:
            raise ModelFormatError("the network has no output (every blob is consumed by a later layer)")

    def declare_net_inputs(self) -> None:
        msg = self.net.msg
        names = list(msg.input)
        if not names:
            return
        shapes: list[tuple | None]
        if len(msg.input_shape):
            if len(msg.input_shape) != len(names):
                raise ModelFormatError(f"the net declares {len(names)} inputs but {len(msg.input_shape)} input_shape")
            shapes = [tuple(s.dim) for s in msg.input_shape]
        elif len(msg.input_dim):
            if len(msg.input_dim) != 4 * len(names):
                raise ModelFormatError(f"the net declares {len(names)} inputs, which needs {4 * len(names)} "
                                       f"input_dim values, not {len(msg.input_dim)}")
            dims = list(msg.input_dim)
            shapes = [tuple(dims[4 * i:4 * i + 4]) for i in range(len(names))]
        else:
            shapes = [None] * len(names)
        for name, shape in zip(names, shapes):
            self.add_input(None, name, self.input_dims(shape, f"input {name!r}"))

    def value_name(self, i: int, layer: Layer, top: str) -> str:
        """The plain blob name for a blob's final version (reserved in run()), else `<blob>/<layer>`."""
        if self.last_def.get(top) == i and top not in self.input_blobs:
            return top
        return self.unique(f"{top}/{layer.name}")

    def convert_layer(self, i: int, layer: Layer) -> None:
        if layer.type == "Input":
            ip = layer.sub("input_param")
            shapes = [tuple(s.dim) for s in ip.shape]
            if len(shapes) not in (0, 1, len(layer.tops)):
                raise self.err(layer, f"has {len(layer.tops)} tops but {len(shapes)} shapes")
            for k, top in enumerate(layer.tops):
                declared = shapes[k] if len(shapes) == len(layer.tops) else (shapes[0] if shapes else None)
                self.add_input(layer, top, self.input_dims(declared, f"input layer {layer.name!r}"))
            return
        if layer.type in DATA_LAYERS:
            if not layer.tops:
                raise self.err(layer, "has no top")
            declared = None
            if layer.type == "MemoryData":
                mp = layer.sub("memory_data_param")
                if mp.channels and mp.height and mp.width:
                    declared = (1, mp.channels, mp.height, mp.width)
            self.add_input(layer, layer.tops[0], self.input_dims(declared, f"data layer {layer.name!r}"), layer)
            for t in layer.tops[1:]:
                self.unavailable[t] = f"comes from data layer {layer.name!r} and does not exist at inference"
            self.skipped.append((layer.index, layer.name, layer.type))
            return

        handler = None
        if layer.type not in ALIAS_LAYERS:
            handler = CAFFE_LAYERS.get(layer.type)
            if handler is None:
                raise ModelFormatError(f"layer {layer.name!r} has unsupported type {layer.type!r} "
                                       f"(supported: {', '.join(SUPPORTED_LAYERS)})")
        xs = []
        for b in layer.bottoms:
            if b in self.values:
                xs.append(self.values[b])
            elif b in self.unavailable:
                raise self.err(layer, f"bottom blob {b!r} {self.unavailable[b]}")
            else:
                raise self.err(layer, f"bottom blob {b!r} is not produced by any earlier layer")

        for k, top in enumerate(layer.tops):
            in_place = k < len(layer.bottoms) and layer.bottoms[k] == top
            if not in_place and (top in self.values or top in self.unavailable):
                raise self.err(layer, f"top blob {top!r} is already produced by an earlier layer "
                                      "(only in-place layers may reuse a blob name)")

        if layer.type in ALIAS_LAYERS:
            self.arity(layer, 1, 1, max(1, len(layer.tops)) if layer.type == "Split" else 1)
            for k, top in enumerate(layer.tops):
                value, shape = xs[0]
                if top in self.net_outputs and self.last_def.get(top) == i and value != top:
                    out = self.value_name(i, layer, top)
                    self.node("Identity", [value], [out], layer.name if len(layer.tops) == 1 else f"{layer.name}/{top}")
                    value = out
                self.values[top] = (value, shape)
            self.skipped.append((layer.index, layer.name, layer.type))
            return

        outs = [self.value_name(i, layer, t) for t in layer.tops]
        shapes = handler(self, layer, xs, outs)
        for top, out, shape in zip(layer.tops, outs, shapes):
            self.values[top] = (out, tuple(shape))
            self.unavailable.pop(top, None)
        self.converted.append((layer.name, layer.type))

# ------------------------------------------------------------------------------- layer converters
# One registered function per Caffe layer type: f(converter, layer, inputs [(value, shape)], output names)
# -> the shapes of the layer's tops. A new Caffe layer type is one more registration here.
CAFFE_LAYERS: Registry = Registry("caffe layer")

@CAFFE_LAYERS.register("Convolution")
def _convolution(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1)
    x, shape = xs[0]
    cp = L.sub("convolution_param")
    if cp.axis != 1:
        raise cv.err(L, f"axis {cp.axis} is not supported (only channels at axis 1)")
    if len(shape) != 4:
        raise cv.err(L, f"only 2-D convolution is supported; input is {_shape_str(shape)}")
    if not cp.num_output:
        raise cv.err(L, "num_output is missing")
    kh, kw = _hw(cv, L, cp, "kernel", list(cp.kernel_size), None)
    sh, sw = _hw(cv, L, cp, "stride", list(cp.stride), 1)
    ph, pw = _hw(cv, L, cp, "pad", list(cp.pad), 0)
    dh, dw = _pair(cv, L, "dilation", list(cp.dilation), 1)
    if min(kh, kw, sh, sw, dh, dw) < 1:
        raise cv.err(L, "kernel, stride and dilation must be positive")
    c, g, n = shape[1], cp.group, cp.num_output
    if g < 1 or c % g or n % g:
        raise cv.err(L, f"group {g} does not divide input channels {c} and num_output {n}")
    oh = (shape[2] + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (shape[3] + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    if oh < 1 or ow < 1:
        raise cv.err(L, f"kernel is larger than the padded input {_shape_str(shape)}")
    specs = [("weight", (n, c // g, kh, kw), cp.weight_filler if cp.HasField("weight_filler") else None, "xavier")]
    if cp.bias_term:
        specs.append(("bias", (n,), cp.bias_filler if cp.HasField("bias_filler") else None, "constant:0"))
    arrays = cv.blobs(L, specs)
    inputs = [x, cv.const(f"{L.name}.weight", arrays[0])]
    if cp.bias_term:
        inputs.append(cv.const(f"{L.name}.bias", arrays[1]))
    cv.node("Conv", inputs, outs, L.name, kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw],
              dilations=[dh, dw], group=g)
    return [(shape[0], n, oh, ow)]

@CAFFE_LAYERS.register("InnerProduct")
def _innerproduct(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1)
    x, shape = xs[0]
    ip = L.sub("inner_product_param")
    if not ip.num_output:
        raise cv.err(L, "num_output is missing")
    axis = cv.axis(L, ip.axis, len(shape))
    n, k = ip.num_output, _prod(shape[axis:])
    caffe_shape = (k, n) if ip.transpose else (n, k)
    specs = [("weight", caffe_shape, ip.weight_filler if ip.HasField("weight_filler") else None, "xavier")]
    if ip.bias_term:
        specs.append(("bias", (n,), ip.bias_filler if ip.HasField("bias_filler") else None, "constant:0"))
    arrays = cv.blobs(L, specs)
    w = arrays[0].T if ip.transpose else arrays[0]  # stored as [out, in] for Gemm(transB=1)
    inputs = [cv.const(f"{L.name}.weight", w)]
    if ip.bias_term:
        inputs.append(cv.const(f"{L.name}.bias", arrays[1]))
    if len(shape) > 2:
        flat = cv.tmp(f"{L.name}/flatten")
        cv.node("Flatten", [x], [flat], f"{L.name}/flatten", axis=axis)
        x = flat
    out_shape = tuple(shape[:axis]) + (n,)
    if axis == 1:
        cv.node("Gemm", [x] + inputs, outs, L.name, transB=1)
    else:
        y = cv.tmp(f"{L.name}/gemm")
        cv.node("Gemm", [x] + inputs, [y], L.name, transB=1)
        target = cv.const(f"{L.name}/shape", [-1] + [int(d) for d in shape[1:axis]] + [n], np.int64)
        cv.node("Reshape", [y, target], outs, f"{L.name}/reshape")
    return [out_shape]

@CAFFE_LAYERS.register("Pooling")
def _pooling(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1)
    x, shape = xs[0]
    if len(shape) != 4:
        raise cv.err(L, f"expects a 4-D input, got {_shape_str(shape)}")
    pp = L.sub("pooling_param")
    h, w = shape[2], shape[3]
    method = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}[pp.pool]
    if method == "STOCHASTIC":
        raise cv.err(L, "STOCHASTIC pooling is not supported")
    if pp.global_pooling:
        if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
            raise cv.err(L, "global_pooling does not take a kernel size")
        if pp.pad or pp.pad_h or pp.pad_w or pp.stride != 1 or pp.stride_h > 1 or pp.stride_w > 1:
            raise cv.err(L, "global_pooling needs pad 0 and stride 1")
        op = "GlobalMaxPool" if method == "MAX" else "GlobalAveragePool"
        cv.node(op, [x], outs, L.name)
        return [(shape[0], shape[1], 1, 1)]
    if pp.HasField("kernel_size"):
        if pp.HasField("kernel_h") or pp.HasField("kernel_w"):
            raise cv.err(L, "give kernel_size or kernel_h/kernel_w, not both")
        kh = kw = pp.kernel_size
    elif pp.HasField("kernel_h") and pp.HasField("kernel_w"):
        kh, kw = pp.kernel_h, pp.kernel_w
    else:
        raise cv.err(L, "has no kernel size (kernel_size or kernel_h and kernel_w)")
    if pp.HasField("pad_h") or pp.HasField("pad_w"):
        ph, pw = pp.pad_h, pp.pad_w
    else:
        ph = pw = pp.pad
    if pp.HasField("stride_h") or pp.HasField("stride_w"):
        sh, sw = pp.stride_h, pp.stride_w
    else:
        sh = sw = pp.stride
    if min(kh, kw, sh, sw) < 1:
        raise cv.err(L, "kernel and stride must be positive")
    if ph >= kh or pw >= kw:
        raise cv.err(L, "pad must be smaller than the kernel")
    ceil_mode = pp.round_mode == 0
    padded = bool(ph or pw)
    try:
        oh = caffe_pool_output_size(h, kh, ph, sh, ceil_mode, padded)
        ow = caffe_pool_output_size(w, kw, pw, sw, ceil_mode, padded)
    except ValueError as e:
        raise cv.err(L, f"{e} (input {_shape_str(shape)})") from None
    vh, dvh = caffe_pool_windows(h, kh, ph, sh, oh)
    vw, dvw = caffe_pool_windows(w, kw, pw, sw, ow)
    if (vh < 1).any() or (vw < 1).any():
        raise cv.err(L, "a pooling window lies entirely outside the input")
    # ONNX floor-mode pooling with an explicit end pad reproduces Caffe's output size exactly.
    eh = max(0, (oh - 1) * sh + kh - h - ph)
    ew = max(0, (ow - 1) * sw + kw - w - pw)
    assert (h + ph + eh - kh) // sh + 1 == oh and (w + pw + ew - kw) // sw + 1 == ow
    attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, eh, ew])
    if method == "MAX":
        # ONNX MaxPool ignores padded positions, as Caffe's max over the clipped window.
        cv.node("MaxPool", [x], outs, L.name, **attrs)
    else:
        # AveragePool(count_include_pad=0) averages the in-image elements; Caffe divides their sum by
        # the window clipped to the padded image (pads count, the ceil-mode overhang does not).
        corr = np.outer(vh, vw) / np.outer(dvh, dvw)
        if np.all(corr == 1.0):
            cv.node("AveragePool", [x], outs, L.name, count_include_pad=0, **attrs)
        else:
            y = cv.tmp(f"{L.name}/mean")
            cv.node("AveragePool", [x], [y], L.name, count_include_pad=0, **attrs)
            cv.node("Mul", [y, cv.const(f"{L.name}/divisor_correction", corr)], outs,
                      f"{L.name}/divisor_correction")
    return [(shape[0], shape[1], oh, ow)]

@CAFFE_LAYERS.register("ReLU")
def _relu(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1)
    slope = L.sub("relu_param").negative_slope
    if slope:
        cv.node("LeakyRelu", [xs[0][0]], outs, L.name, alpha=float(slope))
    else:
        cv.node("Relu", [xs[0][0]], outs, L.name)
    return [xs[0][1]]


@CAFFE_LAYERS.register("LRN")
def _lrn(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1)
    x, shape = xs[0]
    lp = L.sub("lrn_param")
    if len(shape) != 4:
        raise cv.err(L, f"expects a 4-D input, got {_shape_str(shape)}")
    size = lp.local_size
    if size % 2 != 1:
        raise cv.err(L, f"local_size must be odd, got {size}")
    if lp.norm_region == 0:  # ACROSS_CHANNELS: x / (k + alpha/n * sum x^2)^beta, as ONNX LRN
        cv.node("LRN", [x], outs, L.name, size=size, alpha=float(lp.alpha), beta=float(lp.beta),
                  bias=float(lp.k))
        return [shape]
    # WITHIN_CHANNEL: Caffe computes x * (1 + alpha * avgpool_n(x^2))^-beta (k is not used), the average
    # over an n x n window zero-padded by (n-1)/2, always divided by n*n.
    pad = (size - 1) // 2
    sq, avg, scaled, base, powed = (cv.tmp(f"{L.name}/{s}") for s in ("square", "avg", "scaled", "base", "pow"))
    cv.node("Mul", [x, x], [sq], f"{L.name}/square")
    cv.node("AveragePool", [sq], [avg], f"{L.name}/avg", kernel_shape=[size, size], pads=[pad] * 4,
              count_include_pad=1)
    cv.node("Mul", [avg, cv.const(f"{L.name}/alpha", np.float32(lp.alpha))], [scaled], f"{L.name}/alpha")
    cv.node("Add", [scaled, cv.const(f"{L.name}/one", np.float32(1.0))], [base], f"{L.name}/shift")
    cv.node("Pow", [base, cv.const(f"{L.name}/exponent", np.float32(-lp.beta))], [powed], f"{L.name}/pow")
    cv.node("Mul", [x, powed], outs, L.name)
    return [shape]

@CAFFE_LAYERS.register("Softmax")
def _softmax(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1)
    axis = cv.axis(L, L.sub("softmax_param").axis, len(xs[0][1]))
    cv.node("Softmax", [xs[0][0]], outs, L.name, axis=axis)
    return [xs[0][1]]

@CAFFE_LAYERS.register("Concat")
def _concat(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1, 1 << 16)
    cp = L.sub("concat_param")
    raw = cp.axis if cp.HasField("axis") or not cp.HasField("concat_dim") else cp.concat_dim
    shapes = [s for _, s in xs]
    axis = cv.axis(L, raw, len(shapes[0]))
    for s in shapes[1:]:
        if len(s) != len(shapes[0]) or any(a != b for j, (a, b) in enumerate(zip(s, shapes[0])) if j != axis):
            raise cv.err(L, f"inputs {' and '.join(map(_shape_str, shapes))} differ outside axis {axis}")
    cv.node("Concat", [v for v, _ in xs], outs, L.name, axis=axis)
    out = list(shapes[0])
    out[axis] = sum(s[axis] for s in shapes)
    return [tuple(out)]

@CAFFE_LAYERS.register("Eltwise")
def _eltwise(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 2, 1 << 16)
    ep = L.sub("eltwise_param")
    shapes = [s for _, s in xs]
    if any(s != shapes[0] for s in shapes):
        raise cv.err(L, f"inputs must have the same shape, got {' and '.join(map(_shape_str, shapes))}")
    op = {0: "PROD", 1: "SUM", 2: "MAX"}[ep.operation]
    coeffs = list(ep.coeff)
    if coeffs and op != "SUM":
        raise cv.err(L, "coeff is only allowed with operation SUM")
    if coeffs and len(coeffs) != len(xs):
        raise cv.err(L, f"has {len(coeffs)} coeff for {len(xs)} bottoms")
    values = [v for v, _ in xs]
    if op == "SUM":
        terms = []
        for k, (v, c) in enumerate(zip(values, coeffs or [1.0] * len(values))):
            if c != 1.0:
                t = cv.tmp(f"{L.name}/term{k}")
                cv.node("Mul", [v, cv.const(f"{L.name}/coeff{k}", np.float32(c))], [t], f"{L.name}/coeff{k}")
                v = t
            terms.append(v)
        cv.node("Add" if len(terms) == 2 else "Sum", terms, outs, L.name)
    elif op == "PROD":
        acc = values[0]
        for k, v in enumerate(values[1:], 1):
            last = k == len(values) - 1
            out = outs[0] if last else cv.tmp(f"{L.name}/prod{k}")
            cv.node("Mul", [acc, v], [out], L.name if last else f"{L.name}/prod{k}")
            acc = out
    else:
        cv.node("Max", values, outs, L.name)
    return [shapes[0]]

@CAFFE_LAYERS.register("BatchNorm")
def _batchnorm(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1)
    x, shape = xs[0]
    if len(shape) < 2:
        raise cv.err(L, f"expects at least a 2-D input, got {_shape_str(shape)}")
    c = shape[1]
    bp = L.sub("batch_norm_param")
    mean, var, factor = cv.blobs(L, [("mean", (c,), None, "constant:0"), ("variance", (c,), None, "constant:1"),
                                       ("scale factor", (1,), None, "constant:1")])
    # Caffe stores running sums; the statistics are blobs[0] / blobs[2] and blobs[1] / blobs[2].
    f = 0.0 if factor[0] == 0 else 1.0 / float(factor[0])
    inputs = [x, cv.const(f"{L.name}.weight", np.ones(c, np.float32)),
              cv.const(f"{L.name}.bias", np.zeros(c, np.float32)),
              cv.const(f"{L.name}.running_mean", mean * np.float32(f)),
              cv.const(f"{L.name}.running_var", var * np.float32(f))]
    cv.node("BatchNormalization", inputs, outs, L.name, epsilon=float(bp.eps))
    return [shape]

@CAFFE_LAYERS.register("Scale")
def _scale(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1, 2)
    x, shape = xs[0]
    sp = L.sub("scale_param")
    rank = len(shape)
    if len(xs) == 2:
        s_value, s_shape = xs[1]
        axis = sp.axis + rank if sp.axis < 0 else sp.axis
        if not 0 <= axis <= rank - len(s_shape) or tuple(shape[axis:axis + len(s_shape)]) != tuple(s_shape):
            raise cv.err(L, f"scale {_shape_str(s_shape)} does not fit input {_shape_str(shape)} "
                              f"at axis {sp.axis}")
        trailing = rank - axis - len(s_shape)
        if trailing:
            u = cv.tmp(f"{L.name}/unsqueeze")
            axes = cv.const(f"{L.name}/axes", list(range(len(s_shape), len(s_shape) + trailing)), np.int64)
            cv.node("Unsqueeze", [s_value, axes], [u], f"{L.name}/unsqueeze")
            s_value = u
        pshape = tuple(s_shape)
        bshape = pshape + (1,) * trailing
    else:
        axis = cv.axis(L, sp.axis, rank)
        num_axes = rank - axis if sp.num_axes == -1 else sp.num_axes
        if num_axes < 0 or axis + num_axes > rank:
            raise cv.err(L, f"num_axes {sp.num_axes} does not fit a {rank}-D input at axis {axis}")
        pshape = tuple(shape[axis:axis + num_axes])
        bshape = pshape + (1,) * (rank - axis - num_axes)
    specs = []
    if len(xs) == 1:
        specs.append(("scale", pshape, sp.filler if sp.HasField("filler") else None, "constant:1"))
    if sp.bias_term:
        if any(not isinstance(d, int) for d in pshape):
            raise cv.err(L, "a learned bias over the batch axis is not supported")
        specs.append(("bias", pshape, sp.bias_filler if sp.HasField("bias_filler") else None, "constant:0"))
    arrays = cv.blobs(L, specs)
    if len(xs) == 1:
        s_value = cv.const(f"{L.name}.weight", arrays[0].reshape(bshape))
    if sp.bias_term:
        y = cv.tmp(f"{L.name}/scaled")
        cv.node("Mul", [x, s_value], [y], f"{L.name}/scale")
        cv.node("Add", [y, cv.const(f"{L.name}.bias", arrays[-1].reshape(bshape))], outs, L.name)
    else:
        cv.node("Mul", [x, s_value], outs, L.name)
    return [shape]

@CAFFE_LAYERS.register("Flatten")
def _flatten(cv: "_Converter", L: Layer, xs, outs):
    cv.arity(L, 1)
    x, shape = xs[0]
    fp = L.sub("flatten_param")
    rank = len(shape)
    axis = cv.axis(L, fp.axis, rank)
    end = fp.end_axis + rank if fp.end_axis < 0 else fp.end_axis
    if not axis <= end < rank:
        raise cv.err(L, f"end_axis {fp.end_axis} is out of range for axis {fp.axis} of a {rank}-D input")
    out = tuple(shape[:axis]) + (_prod(shape[axis:end + 1]),) + tuple(shape[end + 1:])
    if axis == 1 and end == rank - 1:
        cv.node("Flatten", [x], outs, L.name, axis=1)
    else:
        target = cv.const(f"{L.name}/shape", [0] * axis + [-1] + [int(d) for d in shape[end + 1:]], np.int64)
        cv.node("Reshape", [x, target], outs, L.name)
    return [out]

def _elementwise(op_type: str):
    """A one-input Caffe layer that is one ONNX element-wise op (shape unchanged)."""

    def convert(cv: "_Converter", L: Layer, xs, outs):
        cv.arity(L, 1)
        cv.node(op_type, [xs[0][0]], outs, L.name)
        return [xs[0][1]]

    return convert


for _caffe_type, _onnx_op in (("Sigmoid", "Sigmoid"), ("TanH", "Tanh")):
    CAFFE_LAYERS.add(_caffe_type, _elementwise(_onnx_op))


@CAFFE_LAYERS.register("PReLU")
def _prelu(cv: "_Converter", L: Layer, xs, outs):
    """Caffe PReLU: y = max(0, x) + a * min(0, x), a per channel (axis 1) or one shared value."""
    cv.arity(L, 1)
    x, shape = xs[0]
    pp = L.sub("prelu_param")
    if len(shape) < 2:
        raise cv.err(L, f"needs an input with a channel axis, not shape {list(shape)}")
    n = 1 if pp.channel_shared else int(shape[1])
    slope = cv.blobs(L, [("slope", (n,), pp.filler if pp.HasField("filler") else None, "constant:0.25")])[0]
    slope = slope.reshape((n,) + (1,) * (len(shape) - 2)) if not pp.channel_shared else slope.reshape(())
    cv.node("PRelu", [x, cv.const(f"{L.name}.slope", slope.astype(np.float32))], outs, L.name)
    return [shape]


SUPPORTED_LAYERS = sorted(list(CAFFE_LAYERS) + ["Dropout", "Split", "Input"] + sorted(DATA_LAYERS))


def _pair(conv, layer, what, values, default):
    if not values:
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise conv.err(layer, f"{what} has {len(values)} values; only 2-D is supported")


def _hw(conv, layer, cp, what, values, default):
    """Caffe's rule: `<what>_h`/`<what>_w` (both), else the repeated `<what>` (one value or one per axis)."""
    h, w = f"{what}_h", f"{what}_w"
    if cp.HasField(h) or cp.HasField(w):
        if values:
            raise conv.err(layer, f"give {what}_size/{what} or {h}/{w}, not both" if what == "kernel"
                           else f"give {what} or {h}/{w}, not both")
        if what in ("kernel", "stride") and not (cp.HasField(h) and cp.HasField(w)):
            raise conv.err(layer, f"{h} and {w} must be given together")
        return getattr(cp, h), getattr(cp, w)
    if default is None and not values:
        raise conv.err(layer, "has no kernel size")
    return _pair(conv, layer, what, values, default)


def _blob_shape_matches(blob: Blob, expected: tuple[int, ...]) -> bool:
    """Caffe's Blob::ShapeEquals: an exact match, or for legacy 4-D blobs the shape padded with leading 1s."""
    if blob.legacy:
        return len(expected) <= 4 and tuple(blob.shape) == (1,) * (4 - len(expected)) + tuple(expected)
    return tuple(blob.shape) == tuple(expected)


def _parse_input_shape(shape) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ModelFormatError(f"input shape {shape!r} must be integers like 3,227,227") from None
    if not dims or any(d <= 0 for d in dims):
        raise ModelFormatError(f"input shape {list(dims)} must be positive (C,H,W, without the batch)")
    return dims


def convert_caffe(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None = None, *,
                  input_shape: Sequence[int] | None = None, input_scale: float | None = None,
                  mean: Sequence[float] | None = None, seed: int = 0) -> ImportResult:
    """Convert a Caffe net (and its weights; without them, Caffe-like random init from `seed`) to ONNX.

    input_shape: one sample's shape (C,H,W), required for nets fed by a Data layer, else overrides
    the declared one. input_scale / mean: bake ``x*input_scale - mean`` into the graph (see docs/caffe.md
    for how a Data layer's transform_param combines with them).
    """
    net = parse_prototxt(prototxt)
    weights = read_caffemodel(caffemodel) if caffemodel is not None else None
    conv = _Converter(net, weights, str(caffemodel) if caffemodel is not None else None,
                      _parse_input_shape(input_shape), input_scale, mean, seed)
    if mean is not None and not len(conv.user_mean):
        raise ModelFormatError("--mean needs at least one value")
    conv.run()

    graph_name = net.name or Path(prototxt).stem
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in conv.graph_inputs]
    outputs = []
    out_shapes = {}
    for b in conv.net_outputs:
        value, shape = conv.values[b]
        outputs.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, list(shape)))
        out_shapes[value] = shape
    graph = helper.make_graph(conv.nodes, graph_name, inputs, outputs, initializer=conv.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="toolchain",
                              doc_string=f"converted from Caffe {Path(prototxt).name}"
                              + (f" + {Path(caffemodel).name}" if caffemodel is not None else " (random weights)"))
    model.ir_version = IR_VERSION
    props = {"source_format": "caffe", "caffe_prototxt": Path(prototxt).name}
    if conv.preprocess is not None and not conv.preprocess.identity:
        props["preprocessing"] = f"{conv.primary_input} = {conv.preprocess.describe()}"
    helper.set_model_props(model, props)
    serialized = model.SerializeToString()
    onnx.checker.check_model(serialized, full_check=True)
    return ImportResult(
        model=model, net_name=graph_name, legacy=net.legacy, layers=conv.converted,
        skipped=[(n, t) for _, n, t in sorted(conv.skipped)],
        inputs=dict(conv.graph_inputs), outputs=out_shapes, num_params=int(conv.num_params),
        random_init=weights is None, preprocess=conv.preprocess, serialized=serialized)


def import_caffe(prototxt: str | os.PathLike, caffemodel: str | os.PathLike | None, output: str | os.PathLike,
                 **kwargs) -> ImportResult:
    """convert_caffe() and write the ONNX file atomically (nothing is written when conversion fails)."""
    out = Path(output)
    for src in (prototxt, caffemodel):
        if src is not None and Path(src).exists() and out.exists() and out.resolve() == Path(src).resolve():
            raise ModelFormatError(f"output {out} would overwrite the input {src}")
    result = convert_caffe(prototxt, caffemodel, **kwargs)
    atomic_write_bytes(out, result.serialized)
    return result
