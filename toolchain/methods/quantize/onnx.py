"""ONNX forms of the quantized layers.

portable (stock onnxruntime, no custom library). A weight-sharing layer is stored as
  * its codebook, float32 [2**bits];
  * ONE packed uint8 stream of fields of F = index_bits + bits bits (LSB first; coding.py): the low
    index_bits bits of a field are the relative index d (0 = filler), the high bits the code;
  * the bias (float32), and int64 scalars / shapes.
A subgraph of standard ops (opset 13+) decodes it:
    bits   = Mod(Div(Cast<int64>(packed)[:, None], [1, 2, .., 128]), 2)        byte -> 8 bits (shift + mask)
    fields = ReduceSum(Reshape(Slice(Reshape(bits, [-1]), 0, n * F), [n, F]) * [1, 2, .., 2**(F-1)], axis 1)
    d = Mod(fields, 2**w),  code = Div(fields, 2**w)
    filler = Equal(d, 0);  pos = CumSum(Where(filler, 2**w - 1, d)) - 1
    W = Reshape(ScatterElements(zeros[size], pos, Where(filler, 0, Gather(codebook, code))), shape)
and the layer runs as a plain Gemm / MatMul / Conv on W. Every input is an initializer, so
onnxruntime constant-folds the decoding once at session start. The model metadata
`ai.toolchain.quantize` records each layer's bits, index width and initializers, so
`restore_quantized_layers` turns the imported (folded, dense) layers back into SharedLinear /
SharedConv2d, decoding the streams in numpy and rejecting corrupted ones with a ModelFormatError.

int8: QDQ -- DequantizeLinear(int8 weight initializer, per-output-channel float scales, zero
points 0, axis 0) feeding the Gemm / Conv; stock onnxruntime runs it (and fuses it where it can).

dense (`export_dense`): every compressed layer written as a plain float32 initializer with its zeros,
the input that onnxruntime.quantization.quantize_dynamic / quantize_static expect.

fast: the custom-op form is integrated by the lead (toolchain/kernels); until then these layers fall
back to the portable form.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import torch
import torch.nn as nn
from onnx import numpy_helper

from converters.ops.layers import conv_attrs, write_conv, write_fc
from converters.ops.registry import register_converter, register_emitter
from toolchain.errors import ModelFormatError

from . import coding
from .layers import Int8Conv2d, Int8Linear, SharedConv2d, SharedLinear, _Int8, _Shared

METADATA_KEY = "ai.toolchain.quantize"
INT64, FLOAT = 7, 1
MAX_FIELD_BITS = 16


# ----------------------------------------------------------------------------- encoding
def best_index_bits(mask: np.ndarray, bits: int) -> int:
    """The relative-index width (1..8) giving the fewest stored bits for this mask."""
    pos = np.flatnonzero(np.asarray(mask).reshape(-1))
    gaps = np.diff(pos, prepend=-1)
    best, best_bits = 8, None
    for w in range(1, 9):
        n = pos.size + int(((gaps - 1) // ((1 << w) - 1)).sum())
        total = n * (w + bits)
        if best_bits is None or total < best_bits:
            best, best_bits = w, total
    return best


def layer_streams(m: _Shared, index_bits: int | None = None):
    """(codebook float32, DeltaCoded, index width) of a weight-sharing layer."""
    mask = m.mask.detach().cpu().numpy()
    codes = m.codes.detach().cpu().numpy()
    w = index_bits or getattr(m, "index_bits", None) or best_index_bits(mask, m.bits)
    coded = coding.delta_encode(np.flatnonzero(mask.reshape(-1)), codes.reshape(-1)[mask.reshape(-1)], w, mask.size)
    return m.codebook.detach().cpu().numpy().astype(np.float32), coded, w


def pack_fields(coded: coding.DeltaCoded, bits: int) -> np.ndarray:
    """The single packed stream: field = d + code * 2**width, F = width + bits bits each."""
    f = coded.width + bits
    fields = coded.deltas + (coded.codes << coded.width)
    bitarr = ((fields[:, None] >> np.arange(f)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bitarr, bitorder="little")


def unpack_fields(packed: np.ndarray, count: int, width: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    f = width + bits
    need = (count * f + 7) // 8
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.size != need:
        raise ModelFormatError(f"corrupted code stream: {packed.size} bytes of {packed.dtype} where {count} fields "
                               f"of {f} bits need {need} uint8")
    bitarr = np.unpackbits(packed, bitorder="little")[: count * f].reshape(count, f).astype(np.int64)
    fields = (bitarr << np.arange(f)).sum(axis=1)
    return fields & ((1 << width) - 1), fields >> width


# ----------------------------------------------------------------------------- emitters
def _shared_consts(ctx) -> dict:
    cache = getattr(ctx, "_quantize_consts", None)
    if cache is None:
        cache = {}
        ctx._quantize_consts = cache
    return cache


def _const(ctx, key: str, array) -> str:
    """An initializer shared by every quantized layer of the graph (pow2 tables, small scalars)."""
    cache = _shared_consts(ctx)
    if key not in cache:
        cache[key] = ctx.add_initializer(f"q.{key}", np.asarray(array))
    return cache[key]


def _i64(ctx, v) -> str:
    v = np.asarray(v, np.int64)
    return _const(ctx, "i" + "_".join(map(str, v.reshape(-1).tolist())) + ("s" if v.ndim == 0 else ""), v)


def shared_weight_value(ctx, name: str, m: _Shared) -> str:
    """Nodes decoding the layer's packed streams into its dense weight; returns the value name."""
    codebook, coded, width = layer_streams(m)
    f = width + m.bits
    if f > MAX_FIELD_BITS:
        raise ctx.error(f"layer {name!r}: {width} index bits + {m.bits} code bits exceed {MAX_FIELD_BITS}")
    n = coded.entries
    cb = ctx.add_initializer(f"{name}.codebook", codebook)
    packed = ctx.add_initializer(f"{name}.packed", pack_fields(coded, m.bits))
    _record(ctx, name, m, width, n, cb, packed)
    k = iter(range(100))

    def node(op, inputs, **attrs):
        out = ctx.fresh(f"{name}.q{next(k)}")
        ctx.add_node(op, inputs, [out], name=out, **attrs)
        return out

    pow8 = _const(ctx, "pow2_8", (1 << np.arange(8)).astype(np.int64))
    powf = _const(ctx, f"pow2_{f}", (1 << np.arange(f)).astype(np.int64))
    b = node("Cast", [packed], to=INT64)
    b = node("Reshape", [b, _i64(ctx, [-1, 1])])
    bits = node("Mod", [node("Div", [b, pow8]), _i64(ctx, 2)], fmod=0)
    bits = node("Slice", [node("Reshape", [bits, _i64(ctx, [-1])]), _i64(ctx, [0]), _i64(ctx, [n * f])])
    bits = node("Reshape", [bits, _i64(ctx, [n, f])])
    fields = node("ReduceSum", [node("Mul", [bits, powf]), _i64(ctx, [1])], keepdims=0)
    d = node("Mod", [fields, _i64(ctx, 1 << width)], fmod=0)
    code = node("Div", [fields, _i64(ctx, 1 << width)])
    filler = node("Equal", [d, _i64(ctx, 0)])
    step = node("Where", [filler, _i64(ctx, (1 << width) - 1), d])
    pos = node("Sub", [node("CumSum", [step, _i64(ctx, 0)]), _i64(ctx, 1)])
    zero_f = _const(ctx, "f0", np.array(0.0, np.float32))
    vals = node("Where", [filler, zero_f, node("Gather", [cb, code], axis=0)])
    zeros = node("ConstantOfShape", [_i64(ctx, [coded.size])], value=ctx.tensor(np.zeros(1, np.float32)))
    flat = node("ScatterElements", [zeros, pos, vals], axis=0)
    out = ctx.fresh(f"{name}.weight")
    ctx.add_node("Reshape", [flat, _i64(ctx, list(m.weight_shape))], [out], name=out)
    return out


def _record(ctx, name, m, width, n, codebook, packed) -> None:
    layers = json.loads(ctx.metadata.get(METADATA_KEY, "{}"))
    layers[name] = {"bits": m.bits, "index_bits": width, "entries": n, "codebook": codebook, "packed": packed}
    ctx.metadata[METADATA_KEY] = json.dumps(layers, sort_keys=True, separators=(",", ":"))


def _bias(m):
    return None if m.bias is None else m.bias.detach().cpu().numpy().astype(np.float32)


def _dense(m) -> np.ndarray:
    return m.weight.detach().cpu().numpy().astype(np.float32)


def _weight(ctx, name, m):
    if ctx.options.get("form") == "dense":
        return _dense(m)
    if isinstance(m, _Shared):
        return shared_weight_value(ctx, name, m)
    return int8_weight_value(ctx, name, m)


def int8_weight_value(ctx, name: str, m: _Int8) -> str:
    q = ctx.add_initializer(f"{name}.weight_int8", m.qweight.detach().cpu().numpy())
    s = ctx.add_initializer(f"{name}.weight_scale", m.scale.detach().cpu().numpy().astype(np.float32))
    z = ctx.add_initializer(f"{name}.weight_zero_point", np.zeros(m.weight_shape[0], np.int8))
    out = ctx.fresh(f"{name}.weight")
    ctx.add_node("DequantizeLinear", [q, s, z], [out], name=f"{name}_dequantize", axis=0)
    return out


@register_emitter(SharedLinear, Int8Linear)
def emit_quantized_linear(ctx, name, m, inputs, outputs):
    write_fc(ctx, name, inputs[0], ctx.rank(inputs[0]), _weight(ctx, name, m), _bias(m), outputs[0])


@register_emitter(SharedConv2d, Int8Conv2d)
def emit_quantized_conv(ctx, name, m, inputs, outputs):
    write_conv(ctx, name, inputs[0], _weight(ctx, name, m), _bias(m), outputs[0], conv_attrs(ctx, name, m))


# ----------------------------------------------------------------------------- converters (re-import)
class ScatterElements(nn.Module):
    def __init__(self, axis: int = 0):
        super().__init__()
        self.axis = axis

    def forward(self, data, indices, updates):
        axis = self.axis % data.dim()
        idx = indices.long()
        if idx.numel() and (idx.min() < -data.shape[axis] or idx.max() >= data.shape[axis]):
            raise IndexError(f"index out of range for axis of size {data.shape[axis]}")
        idx = torch.where(idx < 0, idx + data.shape[axis], idx)
        return data.scatter(axis, idx, updates.to(data.dtype))


@register_converter("ScatterElements", opsets=range(11, 30))
def convert_scatter_elements(node, ctx):
    if node.attrs.get("reduction", "none") not in ("none", b"none"):
        raise node.error("only reduction='none' is supported")
    return ScatterElements(int(node.attrs.get("axis", 0)))


@register_emitter(ScatterElements)
def emit_scatter_elements(ctx, name, m, inputs, outputs):
    ctx.add_node("ScatterElements", inputs, outputs, name=name, axis=m.axis)


class DequantizeLinear(nn.Module):
    def __init__(self, axis: int = 1):
        super().__init__()
        self.axis = axis

    def forward(self, x, scale, zero_point=None):
        xf = x.to(torch.float32)
        if zero_point is not None:
            xf = xf - zero_point.to(torch.float32).reshape(self._shape(x, zero_point))
        return xf * scale.to(torch.float32).reshape(self._shape(x, scale))

    def _shape(self, x, s):
        if s.numel() == 1:
            return ()
        shape = [1] * x.dim()
        shape[self.axis % x.dim()] = -1
        return shape


@register_converter("DequantizeLinear", opsets=range(10, 30))
def convert_dequantize(node, ctx):
    return DequantizeLinear(int(node.attrs.get("axis", 1)))


@register_emitter(DequantizeLinear)
def emit_dequantize(ctx, name, m, inputs, outputs):
    ctx.add_node("DequantizeLinear", inputs, outputs, name=name, axis=m.axis)


# ----------------------------------------------------------------------------- re-import
def read_records(model) -> dict:
    text = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if text is None:
        return {}
    try:
        records = json.loads(text)
        return {str(k): {"bits": int(v["bits"]), "index_bits": int(v["index_bits"]), "entries": int(v["entries"]),
                         "codebook": str(v["codebook"]), "packed": str(v["packed"])} for k, v in records.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ModelFormatError(f"malformed {METADATA_KEY} metadata record") from None


def decode_layer(rec: dict, inits: dict, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codebook, codes, mask) of a recorded layer from the file's initializers; ModelFormatError if corrupted."""
    for key in ("codebook", "packed"):
        if rec[key] not in inits:
            raise ModelFormatError(f"quantized layer: initializer {rec[key]!r} is missing")
    codebook = numpy_helper.to_array(inits[rec["codebook"]]).copy()
    if codebook.dtype != np.float32 or codebook.shape != (1 << rec["bits"],):
        raise ModelFormatError(f"corrupted codebook {rec['codebook']!r}: {codebook.dtype} {list(codebook.shape)}, "
                               f"expected float32 [{1 << rec['bits']}]")
    if not np.all(np.isfinite(codebook)):
        raise ModelFormatError(f"corrupted codebook {rec['codebook']!r}: non-finite values")
    d, code = unpack_fields(numpy_helper.to_array(inits[rec["packed"]]), rec["entries"], rec["index_bits"],
                            rec["bits"])
    size = int(np.prod(shape))
    pos, codes = coding.delta_decode(coding.DeltaCoded(d, code, rec["index_bits"], size))
    full = np.zeros(size, np.int64)
    mask = np.zeros(size, bool)
    full[pos], mask[pos] = codes, True
    return codebook, full.reshape(shape), mask.reshape(shape)


def restore_quantized_layers(net, model) -> list[str]:
    """Turn the layers recorded as weight-sharing back into SharedLinear / SharedConv2d (returns their names).

    Raises ModelFormatError for a corrupted record, codebook or stream, or when the decoded layer
    does not reproduce the weight the graph computes."""
    records = read_records(model)
    inits = {t.name: t for t in model.graph.initializer}
    restored = []
    for name, rec in records.items():
        dense = net.ops[name] if name in net.ops else None
        if not isinstance(dense, (nn.Linear, nn.Conv2d)):
            raise ModelFormatError(f"layer {name!r} recorded as quantized is not a Linear/Conv2d after import")
        codebook, codes, mask = decode_layer(rec, inits, tuple(dense.weight.shape))
        if isinstance(dense, nn.Linear):
            new = SharedLinear(dense.in_features, dense.out_features, rec["bits"], dense.bias is not None)
        else:
            new = SharedConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, rec["bits"], dense.stride,
                               dense.padding, dense.dilation, dense.groups, dense.bias is not None)
        with torch.no_grad():
            new.codebook.copy_(torch.from_numpy(codebook))
            new.codes.copy_(torch.from_numpy(codes))
            new.mask.copy_(torch.from_numpy(mask))
            if dense.bias is not None:
                new.bias.copy_(dense.bias)
            if not torch.equal(new.weight, dense.weight.detach()):
                raise ModelFormatError(f"layer {name!r}: the recorded codebook and codes do not reproduce its weight")
        new.index_bits = rec["index_bits"]
        net.replace_layer(name, new)
        restored.append(name)
    return restored


def import_quantized(src):
    """import_onnx + restore_quantized_layers (until the importer calls the restorer itself)."""
    import onnx

    from converters.onnx_import import import_onnx, load_model

    model, _ = load_model(src)
    net = import_onnx(model)
    restore_quantized_layers(net, model)
    return net


# ----------------------------------------------------------------------------- dense form
def densify(net):
    """A copy of `net` whose quantized / pruned layers are plain nn.Linear / nn.Conv2d with their dense weights."""
    out = copy.deepcopy(net)
    for name, layer in list(out.layers().items()):
        w = getattr(layer, "masked_weight", None)
        if w is None or type(layer) in (nn.Linear, nn.Conv2d):
            continue
        if isinstance(layer, (nn.Linear, SharedLinear, Int8Linear)) or hasattr(layer, "in_features"):
            new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
        else:
            new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                            layer.dilation, layer.groups, layer.bias is not None)
        with torch.no_grad():
            new.weight.copy_(w.detach())
            if layer.bias is not None:
                new.bias.copy_(layer.bias.detach())
        out.replace_layer(name, new)
    return out


def export_quantized(net, path=None, form: str = "portable", opset: int = 17):
    """Write `net` in `form`: "portable" (packed codebook streams, int8 QDQ), "dense" (plain float32
    weights with their zeros, for onnxruntime.quantization) or "fast" (lead's custom ops; portable here)."""
    import converters
    from toolchain.export import export_compressed

    if form == "dense":
        d = densify(net)
        d.eval()
        return converters.export_onnx(d, path, opset=opset, form="dense")
    return export_compressed(net, path, form=form, opset=opset)
