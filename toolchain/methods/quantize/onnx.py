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

fast: fully connected layers on 2-D inputs run as the custom ops SparseLinearCodebook (codes of
<= 4 bits in the 4-bit layout, 5..8 bits in the 8-bit one; toolchain/methods/quantize/packed.py) and
SparseLinearInt8, which decode the packed values inside the kernel; conv layers and other inputs
fall back to the portable form.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from onnx import numpy_helper

from converters.ops.layers import conv_attrs, write_conv, write_fc
from converters.ops.registry import register_converter, register_emitter
from toolchain.errors import ModelFormatError
from toolchain.kernels import DOMAIN, OPSET_VERSION
from toolchain.methods.base import EXPORT_HOOKS, densify

from . import coding
from .packed import encode_codebook, encode_int8
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
    """An initializer shared by every quantized layer of the graph (pow2 tables, small scalars),
    with a short name (the graph's bytes count in the file size)."""
    cache = _shared_consts(ctx)
    if key not in cache:
        cache[key] = ctx.add_initializer(f"k{len(cache)}", np.asarray(array))
    return cache[key]


def _i64(ctx, v) -> str:
    v = np.asarray(v, np.int64)
    return _const(ctx, "i" + "_".join(map(str, v.reshape(-1).tolist())) + ("s" if v.ndim == 0 else ""), v)


@dataclass
class GroupStream:
    """Several weight-sharing layers with the same code width stored as ONE stream: their flattened
    weights concatenated (layer l at [starts[l], starts[l] + sizes[l])), relative indices running
    across layer boundaries, each layer's codebook padded to 2**bits entries (codebook[l * 2**bits + code]).
    Up to 7 trailing fillers make the stream a whole number of bytes (they land past the last layer)."""

    names: list[str]
    layer_bits: list[int]
    bits: int
    width: int
    starts: list[int]
    sizes: list[int]
    codebook: np.ndarray  # float32 [len(names) * 2**bits]
    coded: coding.DeltaCoded  # size = the scatter target (sum of sizes + room for the trailing fillers)

    @property
    def field_bits(self) -> int:
        return self.width + self.bits


def encode_group(layers: list[tuple[str, _Shared]], width: int | None = None) -> GroupStream:
    bits = max(m.bits for _, m in layers)
    masks = [m.mask.detach().cpu().numpy().reshape(-1) for _, m in layers]
    sizes = [int(x.size) for x in masks]
    starts = [int(v) for v in np.cumsum([0] + sizes[:-1])]
    mask = np.concatenate(masks)
    codes = np.concatenate([m.codes.detach().cpu().numpy().reshape(-1) for _, m in layers])
    fixed = {m.index_bits for _, m in layers if getattr(m, "index_bits", None)}
    w = width or (fixed.pop() if len(fixed) == 1 else best_index_bits(mask, bits))
    if w + bits > MAX_FIELD_BITS:
        raise ValueError(f"{w} index bits + {bits} code bits exceed {MAX_FIELD_BITS}")
    pos = np.flatnonzero(mask)
    coded = coding.delta_encode(pos, codes[pos], w, mask.size)
    extra = 0
    while (coded.entries + extra) * (w + bits) % 8:
        extra += 1
    limit = (1 << w) - 1
    coded = coding.DeltaCoded(np.concatenate([coded.deltas, np.zeros(extra, np.int64)]),
                              np.concatenate([coded.codes, np.zeros(extra, np.int64)]), w, mask.size + extra * limit)
    cb = np.zeros(len(layers) << bits, np.float32)
    for i, (_, m) in enumerate(layers):
        cb[i << bits: (i << bits) + (1 << m.bits)] = m.codebook.detach().cpu().numpy()
    return GroupStream([n for n, _ in layers], [m.bits for _, m in layers], bits, w, starts, sizes, cb, coded)


def _node(ctx, op, inputs, **attrs) -> str:
    """A node with a short value / node name (the graph's bytes count in the file size)."""
    out = ctx.fresh("q")
    ctx.add_node(op, inputs, [out], name=out, **attrs)
    return out


def emit_group(ctx, layers: list[tuple[str, _Shared]]) -> dict[str, str]:
    """Nodes decoding one group's packed stream into its layers' dense weights; returns name -> value."""
    g = encode_group(layers)
    f, n, w = g.field_bits, g.coded.entries, g.width
    key = layers[0][0] if len(layers) == 1 else f"q{len(_groups(ctx))}"
    cb = ctx.add_initializer(f"{key}.codebook", g.codebook)
    packed = ctx.add_initializer(f"{key}.packed", pack_fields(g.coded, g.bits)[:, None])
    records = json.loads(ctx.metadata.get(METADATA_KEY, "{}"))
    records[key] = {"l": [[nm, lb, st, sz] for nm, lb, st, sz in zip(g.names, g.layer_bits, g.starts, g.sizes)],
                    "b": g.bits, "w": w, "n": n, "s": g.coded.size, "c": cb, "p": packed}
    ctx.metadata[METADATA_KEY] = json.dumps(records, sort_keys=True, separators=(",", ":"))
    node = lambda op, inputs, **attrs: _node(ctx, op, inputs, **attrs)  # noqa: E731
    pow8 = _const(ctx, "pow2_8", (1 << np.arange(8)).astype(np.int64))
    powf = _const(ctx, f"pow2_{f}", (1 << np.arange(f)).astype(np.int64))
    byte = node("Cast", [packed], to=INT64)  # [bytes, 1]
    bits = node("Mod", [node("Div", [byte, pow8]), _i64(ctx, 2)], fmod=0)  # [bytes, 8]: shift, mask
    bits = node("Reshape", [bits, _i64(ctx, [n, f])])  # n * f == 8 * bytes (trailing fillers)
    fields = node("ReduceSum", [node("Mul", [bits, powf]), _i64(ctx, [1])], keepdims=1)  # [n, 1]
    d = node("Mod", [fields, _i64(ctx, 1 << w)], fmod=0)
    code = node("Div", [fields, _i64(ctx, 1 << w)])
    filler = node("Equal", [d, _i64(ctx, 0)])
    step = node("Where", [filler, _i64(ctx, (1 << w) - 1), d])
    pos = node("Sub", [node("CumSum", [step, _i64(ctx, 0)]), _i64(ctx, 1)])
    if len(layers) > 1:  # which layer an entry is in: the number of later layers' starts it has passed
        passed = node("Cast", [node("GreaterOrEqual", [pos, _i64(ctx, g.starts[1:])])], to=INT64)
        layer = node("ReduceSum", [passed, _i64(ctx, [1])], keepdims=1)
        code = node("Add", [code, node("Mul", [layer, _i64(ctx, 1 << g.bits)])])
    vals = node("Where", [filler, _const(ctx, "f0", np.array(0.0, np.float32)), node("Gather", [cb, code], axis=0)])
    zeros = node("ConstantOfShape", [_i64(ctx, [g.coded.size, 1])], value=ctx.tensor(np.zeros(1, np.float32)))
    # Value names: the importer names a layer after where its folded weight came from (through
    # Reshape), so each layer's flat weight is called `{name}.weight`.
    whole = len(layers) == 1 and g.coded.size == g.sizes[0]
    flat = ctx.fresh(f"{layers[0][0]}.weight") if whole else ctx.fresh("q")
    ctx.add_node("ScatterElements", [zeros, pos, vals], [flat], name=flat, axis=0)
    out = {}
    for (name, m), start, size in zip(layers, g.starts, g.sizes):
        part = flat
        if not whole:
            part = ctx.fresh(f"{name}.weight")
            ctx.add_node("Slice", [flat, _i64(ctx, [start]), _i64(ctx, [start + size])], [part], name=part)
        out[name] = ctx.fresh(f"{name}.W")
        ctx.add_node("Reshape", [part, _i64(ctx, list(m.weight_shape))], [out[name]], name=out[name])
    return out


def _groups(ctx) -> dict:
    cache = getattr(ctx, "_quantize_groups", None)
    if cache is None:
        cache = {}
        ctx._quantize_groups = cache
    return cache


def shared_weight_value(ctx, name: str, m: _Shared) -> str:
    """The value holding the layer's decoded weight: its group's decoding is emitted with its first layer.
    Groups come from the export option `quantize_groups` (export_quantized: one per code width);
    without it every layer is its own group."""
    done = _groups(ctx)
    if name not in done:
        layers = ctx.options.get("quantize_groups", {}).get(name) or [(name, m)]
        try:
            done.update(emit_group(ctx, layers))
        except ValueError as e:
            raise ctx.error(f"layer {name!r}: {e}") from None
    return done[name]


def _bias(m):
    b = getattr(m, "effective_bias", m.bias)
    return None if b is None else b.detach().cpu().numpy().astype(np.float32)


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


def _bias_value(ctx, name, m):
    """The bias: float32, or float16 + Cast in the portable form of a weight-sharing layer whose
    `bias_bits` is 16 (half the bytes; the layer's own bias is rounded to float16 when it is set)."""
    b = _bias(m)
    if b is None or ctx.options.get("form") == "dense" or getattr(m, "bias_bits", 32) != 16:
        return b
    half = ctx.add_initializer(f"{name}.bias16", b.astype(np.float16))
    out = ctx.fresh(f"{name}.bias")
    ctx.add_node("Cast", [half], [out], name=out, to=FLOAT)
    return out


def _fc(ctx, name, x, rank, weight, bias, out):
    if bias is None or isinstance(bias, np.ndarray):
        return write_fc(ctx, name, x, rank, weight, bias, out)
    if rank == 2:
        ctx.add_node("Gemm", [x, weight, bias], [out], name=name, transB=1)
        return
    wt, mm = ctx.fresh(f"{name}.weight.T"), ctx.fresh(f"{name}_matmul")
    ctx.add_node("Transpose", [weight], [wt], name=f"{name}_transpose", perm=[1, 0])
    ctx.add_node("MatMul", [x, wt], [mm], name=name)
    ctx.add_node("Add", [mm, bias], [out], name=f"{name}_bias")


def _emit_fast_linear(ctx, name, m, x: str, out: str) -> None:
    """The layer as SparseLinearCodebook / SparseLinearInt8 (the weights stay packed in the file and in
    the kernel)."""
    w = _dense(m)
    bias = None if m.bias is None else (m.effective_bias if isinstance(m, _Shared) else m.bias).detach().cpu().numpy()
    if isinstance(m, _Shared):
        bits = 4 if m.bits <= 4 else 8
        packed = encode_codebook(w, m.codebook.detach().cpu().numpy(), bits=bits, codes=m.codes.cpu().numpy())
        arrays = {"codebook": packed.codebook, "codes": packed.codes, "deltas": packed.deltas, "row_ptr": packed.row_ptr}
        op, attrs = "SparseLinearCodebook", {"bits": bits}
    else:
        packed = encode_int8(w, scales=m.scale.detach().cpu().numpy())
        arrays = {"values": packed.values, "deltas": packed.deltas, "row_ptr": packed.row_ptr, "scales": packed.scales}
        op, attrs = "SparseLinearInt8", {}
    if bias is not None:
        arrays["bias"] = bias.astype(np.float32)
    names = [ctx.add_initializer(f"{name}.{key}", value) for key, value in arrays.items()]
    ctx.require_opset(DOMAIN, OPSET_VERSION)
    ctx.add_node(op, [x, *names], [out], name=name, domain=DOMAIN, in_features=int(w.shape[1]), **attrs)


@register_emitter(SharedLinear, Int8Linear)
def emit_quantized_linear(ctx, name, m, inputs, outputs):
    if ctx.options.get("form") == "fast" and ctx.rank(inputs[0]) == 2:
        return _emit_fast_linear(ctx, name, m, inputs[0], outputs[0])
    _fc(ctx, name, inputs[0], ctx.rank(inputs[0]), _weight(ctx, name, m), _bias_value(ctx, name, m), outputs[0])


@register_emitter(SharedConv2d, Int8Conv2d)
def emit_quantized_conv(ctx, name, m, inputs, outputs):
    bias = _bias_value(ctx, name, m)
    if bias is None or isinstance(bias, np.ndarray):
        return write_conv(ctx, name, inputs[0], _weight(ctx, name, m), bias, outputs[0], conv_attrs(ctx, name, m))
    ctx.add_node("Conv", [inputs[0], _weight(ctx, name, m), bias], outputs[:1], name=name, **conv_attrs(ctx, name, m))


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
    """group -> record (layers [name, bits, start, size], code bits b, index width w, entries n,
    scatter size s, codebook c and packed p initializer names); ModelFormatError if malformed."""
    text = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if text is None:
        return {}
    try:
        out = {}
        for k, v in json.loads(text).items():
            out[str(k)] = {"layers": [(str(nm), int(lb), int(st), int(sz)) for nm, lb, st, sz in v["l"]],
                           "bits": int(v["b"]), "width": int(v["w"]), "entries": int(v["n"]), "size": int(v["s"]),
                           "codebook": str(v["c"]), "packed": str(v["p"])}
            r = out[str(k)]
            if not (1 <= r["bits"] <= 8 and 1 <= r["width"] <= 8 and r["entries"] >= 0):
                raise ValueError
        return out
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        raise ModelFormatError(f"malformed {METADATA_KEY} metadata record") from None


def decode_group(rec: dict, inits: dict) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """name -> (codebook, flat codes, flat mask) of a recorded group; ModelFormatError if corrupted."""
    for key in ("codebook", "packed"):
        if rec[key] not in inits:
            raise ModelFormatError(f"quantized layers: initializer {rec[key]!r} is missing")
    bits, layers = rec["bits"], rec["layers"]
    codebook = numpy_helper.to_array(inits[rec["codebook"]]).copy()
    if codebook.dtype != np.float32 or codebook.shape != (len(layers) << bits,):
        raise ModelFormatError(f"corrupted codebook {rec['codebook']!r}: {codebook.dtype} {list(codebook.shape)}, "
                               f"expected float32 [{len(layers) << bits}]")
    if not np.all(np.isfinite(codebook)):
        raise ModelFormatError(f"corrupted codebook {rec['codebook']!r}: non-finite values")
    packed = numpy_helper.to_array(inits[rec["packed"]])
    d, code = unpack_fields(packed.reshape(-1) if packed.ndim == 2 else packed, rec["entries"], rec["width"], bits)
    pos, codes = coding.delta_decode(coding.DeltaCoded(d, code, rec["width"], rec["size"]))
    out = {}
    end = 0
    for i, (name, lb, start, size) in enumerate(layers):
        if start != end or not 1 <= lb <= bits:
            raise ModelFormatError(f"malformed {METADATA_KEY} metadata record for layer {name!r}")
        end = start + size
        sel = (pos >= start) & (pos < end)
        c = codes[sel]
        if c.size and c.max() >= (1 << lb):
            raise ModelFormatError(f"corrupted code stream: layer {name!r} has codes past its {1 << lb} shared values")
        full, mask = np.zeros(size, np.int64), np.zeros(size, bool)
        full[pos[sel] - start], mask[pos[sel] - start] = c, True
        out[name] = (codebook[i << bits: (i << bits) + (1 << lb)], full, mask)
    if np.any(pos >= end):
        raise ModelFormatError("corrupted index stream: weights past the last layer")
    return out


def restore_quantized_layers(net, model) -> list[str]:
    """Turn the layers recorded as weight-sharing back into SharedLinear / SharedConv2d (returns their names).

    Raises ModelFormatError for a corrupted record, codebook or stream, or when the decoded layer
    does not reproduce the weight the graph computes."""
    inits = {t.name: t for t in model.graph.initializer}
    restored = []
    for rec in read_records(model).values():
        decoded = decode_group(rec, inits)
        for name, bits, _, size in rec["layers"]:
            dense = net.ops[name] if name in net.ops else None
            if not isinstance(dense, (nn.Linear, nn.Conv2d)) or dense.weight.numel() != size:
                raise ModelFormatError(f"layer {name!r} recorded as quantized is not a Linear/Conv2d of {size} weights "
                                       "after import")
            codebook, codes, mask = decoded[name]
            if isinstance(dense, nn.Linear):
                new = SharedLinear(dense.in_features, dense.out_features, bits, dense.bias is not None)
            else:
                new = SharedConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, bits, dense.stride,
                                   dense.padding, dense.dilation, dense.groups, dense.bias is not None)
            shape = tuple(dense.weight.shape)
            with torch.no_grad():
                new.codebook.copy_(torch.from_numpy(codebook))
                new.codes.copy_(torch.from_numpy(codes.reshape(shape)))
                new.mask.copy_(torch.from_numpy(mask.reshape(shape)))
                if dense.bias is not None:
                    new.bias.copy_(dense.bias)
                if not torch.equal(new.weight, dense.weight.detach()):
                    raise ModelFormatError(f"layer {name!r}: the recorded codebook and codes do not reproduce its weight")
            new.index_bits = rec["width"]
            if f"{name}.bias16" in inits:
                new.bias_bits = 16
            net.replace_layer(name, new)
            restored.append(name)
    return restored


def import_quantized(src):
    """import_onnx, which runs restore_quantized_layers (a registered restorer)."""
    from converters.onnx_import import import_onnx

    return import_onnx(src)


# ----------------------------------------------------------------------------- dense form
def export_quantized(net, path=None, form: str = "portable", opset: int = 17, group: bool = True):
    """Write `net` in `form`: "portable" (packed codebook streams, int8 QDQ), "dense" (plain float32
    weights with their zeros, for onnxruntime.quantization) or "fast" (fully connected weight-sharing
    and int8 layers as the SparseLinearCodebook / SparseLinearInt8 custom ops, convolutions portable).
    group: decode all weight-sharing layers of one code width from one stream (a smaller graph)."""
    import converters

    if form == "dense":
        d = densify(net)
        d.eval()
        return converters.export_onnx(d, path, opset=opset, form="dense")
    if form not in ("portable", "fast"):
        raise ValueError(f"form must be portable, fast or dense, not {form!r}")
    if not group:
        return _export_grouped(net, path, form, opset, grouped=False)
    model = _export_grouped(net, None, form, opset)
    _drop_decode_node_names(model)
    if path is not None:
        from converters.fileio import atomic_write_bytes

        atomic_write_bytes(path, model.SerializeToString())
    return model


def _drop_decode_node_names(model) -> None:
    for node in model.graph.node:  # node names are optional; the decoding nodes' (q, q_1, ...) cost bytes
        if _DECODE_NODE.match(node.name) and list(node.output) == [node.name]:
            node.name = ""


@EXPORT_HOOKS.register("quantize")
def _export_hook(net, form: str):
    """toolchain.export of a network with weight-sharing layers writes the file export_quantized writes:
    the layers grouped into the fewest stream bytes, the decoding nodes unnamed."""
    if form != "portable" or not any(isinstance(m, _Shared) for m in net.layers().values()):
        return {}, None
    return {"quantize_groups": shared_groups(net)}, _drop_decode_node_names


_DECODE_NODE = re.compile(r"^q(_\d+)?$")


GROUP_OVERHEAD_BYTES = 700  # about what one group's decoding nodes and constants add to the file


def _partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


def shared_groups(net) -> dict[str, list]:
    """Layer name -> its group. Layers sharing one stream pay the widest code and a common index
    width but share one decoding subgraph; the partition of the weight-sharing layers with the
    fewest estimated bytes (stream bytes + GROUP_OVERHEAD_BYTES per group) is chosen (exhaustively
    up to 6 layers, else one group per code width)."""
    layers = [(n, m) for n, m in net.layers().items() if isinstance(m, _Shared)]

    def cost(group):
        g = encode_group(group)
        return g.coded.entries * g.field_bits / 8 + g.codebook.size * 4 + GROUP_OVERHEAD_BYTES

    if len(layers) <= 6:
        cache: dict[tuple, float] = {}

        def group_cost(group):
            key = tuple(n for n, _ in group)
            if key not in cache:
                try:
                    cache[key] = cost(group)
                except ValueError:  # index + code bits too wide
                    cache[key] = float("inf")
            return cache[key]

        best = min(_partitions(layers), key=lambda part: sum(group_cost(g) for g in part))
        best = [sorted(g, key=lambda nm: [n for n, _ in layers].index(nm[0])) for g in best]
    else:
        by_bits: dict[int, list] = {}
        for name, m in layers:
            by_bits.setdefault(m.bits, []).append((name, m))
        best = list(by_bits.values())
    return {name: group for group in best for name, _ in group}


def _export_grouped(net, path, form, opset, grouped: bool = True):
    import converters
    from toolchain._version import __version__

    was = net.training
    net.eval()
    try:
        return converters.export_onnx(net, path, opset=opset, form=form, producer=("toolchain", __version__),
                                      **({"quantize_groups": shared_groups(net)} if grouped else {}))
    finally:
        net.train(was)
