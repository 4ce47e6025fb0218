"""Export of pruned layers (toolchain.methods.prune.layers): compact sparse storage.

portable form (stock onnxruntime): the non-zeros and their gap-encoded positions
(toolchain.methods.prune.sparse_format) are initializers; a small subgraph (Cast, CumSum, ScatterND, Reshape)
rebuilds the dense weight, which onnxruntime constant-folds once at session start, so the file is
small and inference runs the usual dense kernels.

fast form (ExportContext option form="fast"): layers whose density is below the measured break-even
run as the toolchain's custom ops (SparseLinear / SparseConv over CSR, toolchain/kernels); the others
fall back to the portable form.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn as nn

from converters.errors import ModelFormatError
from converters.onnx_import import RESTORERS
from converters.ops.layers import conv_attrs, write_conv, write_fc
from converters.ops.registry import Converted, register_converter, register_emitter

from ...kernels import DOMAIN, OPSET_VERSION
from .csr import dense_to_csr
from .layers import MaskedConv2d, MaskedLinear, masked_from_dense
from .sparse_format import encode, validate_csr

# Densities up to which the custom ops beat onnxruntime's dense kernels, with a margin below the
# measured break-even (SparseLinear ~70-80%, SparseConv ~60% on AlexNet conv3's 384 filters:
# docs/kernels.md). Small filter banks (<= SMALL_CONV_FILTERS per group) give onnxruntime's dense Conv
# little to block over and cost it two NCHWc reorders in a network: SparseConv is still ahead at 80%
# on LeNet-5 conv2's 50 filters and on a par at 61-66% on conv1's 20 (ahead in the whole network).
FAST_MAX_DENSITY = {"linear": 0.6, "conv": 0.5, "small conv": 0.7}
SMALL_CONV_FILTERS = 64
METADATA_KEY = "ai.toolchain.pruned"  # JSON list of the pruned layers' names


def _form(ctx) -> str:
    return ctx.options.get("form", "portable")


def sparse_weight_value(ctx, name: str, w: np.ndarray) -> str:
    """A graph value equal to the dense `w`, stored as compactly as the portable form allows."""
    enc = encode(w)
    if enc.nbytes >= w.astype(np.float32).nbytes:
        return ctx.add_initializer(f"{name}.weight", w.astype(np.float32))
    values = ctx.add_initializer(f"{name}.nz_values", enc.values)
    index = ctx.add_initializer(f"{name}.nz_{enc.kind}", enc.index)
    pos = ctx.fresh(f"{name}.nz_pos")
    ctx.add_node("Cast", [index], [pos if enc.kind == "positions" else ctx.fresh(f"{name}.nz_gaps64")],
                 name=f"{name}_cast", to=7)
    if enc.kind == "gaps":
        gaps64 = ctx.nodes[-1].output[0]
        csum = ctx.fresh(f"{name}.nz_csum")
        ctx.add_node("CumSum", [gaps64, ctx.add_initializer(f"{name}.axis0", np.array(0, np.int64))], [csum],
                     name=f"{name}_cumsum")
        ctx.add_node("Sub", [csum, ctx.add_initializer(f"{name}.one", np.array(1, np.int64))], [pos],
                     name=f"{name}_pos")
    idx = ctx.fresh(f"{name}.nz_idx")
    ctx.add_node("Unsqueeze", [pos, ctx.add_initializer(f"{name}.axes", np.array([1], np.int64))], [idx],
                 name=f"{name}_unsqueeze")
    zeros = ctx.fresh(f"{name}.zeros")
    ctx.add_node("ConstantOfShape", [ctx.add_initializer(f"{name}.numel", np.array([w.size], np.int64))], [zeros],
                 name=f"{name}_zeros", value=ctx.tensor(np.zeros(1, np.float32)))
    flat = ctx.fresh(f"{name}.weight")  # the importer names the layer after this value
    ctx.add_node("ScatterND", [zeros, idx, values], [flat], name=f"{name}_scatter")
    out = ctx.fresh(f"{name}.weight_shaped")
    ctx.add_node("Reshape", [flat, ctx.add_initializer(f"{name}.shape", np.array(w.shape, np.int64))], [out],
                 name=f"{name}_reshape")
    return out


def _csr_inputs(ctx, name: str, w2d: np.ndarray, bias) -> list[str]:

    ctx.require_opset(DOMAIN, OPSET_VERSION)
    values, col_idx, row_ptr = dense_to_csr(w2d)
    names = [ctx.add_initializer(f"{name}.values", values), ctx.add_initializer(f"{name}.col_idx", col_idx),
             ctx.add_initializer(f"{name}.row_ptr", row_ptr)]
    if bias is not None:
        names.append(ctx.add_initializer(f"{name}.bias", bias))
    return names


def _arrays(m):
    w = m.masked_weight.detach().cpu().numpy().astype(np.float32)
    b = m.bias.detach().cpu().numpy().astype(np.float32) if m.bias is not None else None
    return w, b


@register_emitter(MaskedLinear)
def emit_masked_linear(ctx, name, m, inputs, outputs):
    _record(ctx, name)
    w, b = _arrays(m)
    density = np.count_nonzero(w) / max(w.size, 1)
    if _form(ctx) == "fast" and ctx.rank(inputs[0]) == 2 and density <= FAST_MAX_DENSITY["linear"]:
        ctx.add_node("SparseLinear", [inputs[0], *_csr_inputs(ctx, name, w, b)], outputs, name=name,
                     domain=DOMAIN, in_features=int(w.shape[1]))
        return
    write_fc(ctx, name, inputs[0], ctx.rank(inputs[0]), sparse_weight_value(ctx, name, w), b, outputs[0])


@register_emitter(MaskedConv2d)
def emit_masked_conv(ctx, name, m, inputs, outputs):
    _record(ctx, name)

    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise ctx.error(f"conv {name!r}: only explicit zero padding is exportable in sparse form")
    w, b = _arrays(m)
    attrs = conv_attrs(ctx, name, m)
    density = np.count_nonzero(w) / max(w.size, 1)
    small = m.out_channels // m.groups <= SMALL_CONV_FILTERS
    if _form(ctx) == "fast" and density <= FAST_MAX_DENSITY["small conv" if small else "conv"]:
        ctx.add_node("SparseConv", [inputs[0], *_csr_inputs(ctx, name, w.reshape(w.shape[0], -1), b)], outputs,
                     name=name, domain=DOMAIN, in_channels=int(m.in_channels), **attrs)
        return
    write_conv(ctx, name, inputs[0], sparse_weight_value(ctx, name, w), b, outputs[0], attrs)

# ------------------------------------------------------------------ import of the portable form
def _record(ctx, name: str) -> None:
    """List the layer in the file's metadata, so that `restore_masks` makes it a pruned layer again."""
    layers = set(json.loads(ctx.metadata.get(METADATA_KEY, "[]")))
    ctx.metadata[METADATA_KEY] = json.dumps(sorted(layers | {name}))


@RESTORERS.register("pruned")
def restore_masks(net, model) -> list[str]:
    """Turn the recorded pruned layers of an imported file back into masked layers (mask = non-zeros).

    The portable form stores only the non-zeros, so the mask is what the file holds: a kept weight
    that was exactly 0.0 comes back pruned, which changes no output.
    """
    record = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if record is None:
        return []
    try:
        names = json.loads(record)
    except json.JSONDecodeError:
        raise ModelFormatError(f"metadata {METADATA_KEY!r} is not a JSON list of layer names") from None
    layers, restored = net.layers(), []
    for name in names if isinstance(names, list) else []:
        layer = layers.get(name)
        if isinstance(layer, (nn.Linear, nn.Conv2d)) and not isinstance(layer, (MaskedLinear, MaskedConv2d)):
            masked = masked_from_dense(layer)
            masked.prune_(masked.weight != 0)
            net.replace_layer(name, masked)
            restored.append(name)
    return restored


# ------------------------------------------------------------------ import of the fast form
# SparseLinear / SparseConv become pruned layers (mask = stored non-zeros), so a fast-form file can be
# retrained or re-exported.
def _dense(node, ctx, n_cols: int) -> tuple[np.ndarray, np.ndarray | None]:
    arrays = [ctx.const(node.input(i)) for i in (1, 2, 3)]
    if any(a is None for a in arrays):
        raise node.error("values, col_idx and row_ptr must be initializers")
    try:
        values, col_idx, row_ptr = validate_csr(*arrays, n_cols)
    except ModelFormatError as e:
        raise node.error(f"inconsistent CSR arrays: {e}") from None
    rows = len(row_ptr) - 1
    w = np.zeros((rows, n_cols), np.float32)
    w[np.repeat(np.arange(rows), np.diff(row_ptr)), col_idx] = values
    bias = ctx.const(node.input(4)) if node.input(4) else None
    return w, bias


def _fill(layer, w: np.ndarray, bias) -> None:
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w).reshape(layer.weight.shape))
        if bias is not None:
            layer.bias.copy_(torch.from_numpy(np.array(bias, np.float32)))
        layer.prune_(layer.weight != 0)


@register_converter("SparseLinear", opsets=[1], domain=DOMAIN)
def convert_sparse_linear(node, ctx):
    k = int(node.attrs["in_features"])
    w, bias = _dense(node, ctx, k)
    layer = MaskedLinear(k, w.shape[0], bias is not None)
    _fill(layer, w, bias)
    return Converted(layer, [node.inputs[0]], name_hints=[node.name], post=_activation(node))


def _activation(node) -> list[tuple[str, nn.Module]]:
    """The fused activation of a fast-form layer (attribute activation) as the standard layer."""
    act = node.attrs.get("activation", "")
    act = act.decode() if isinstance(act, bytes) else act
    if act in ("", None):
        return []
    if act != "Relu":
        raise node.error(f"activation must be 'Relu' or absent, got {act!r}")
    return [("Relu", nn.ReLU())]


@register_converter("SparseConv", opsets=[1], domain=DOMAIN)
def convert_sparse_conv(node, ctx):
    a = node.attrs
    kh, kw = (int(v) for v in a["kernel_shape"])
    group = int(a.get("group", 1))
    if "in_channels" not in a:
        raise node.error("needs the in_channels attribute to be imported")
    cin = int(a["in_channels"])
    pads = [int(p) for p in a.get("pads", [0, 0, 0, 0])]
    if pads[:2] != pads[2:]:
        raise node.error("asymmetric pads are not importable")
    w, bias = _dense(node, ctx, cin // group * kh * kw)
    layer = MaskedConv2d(cin, w.shape[0], (kh, kw), [int(s) for s in a.get("strides", [1, 1])], pads[:2],
                         [int(d) for d in a.get("dilations", [1, 1])], group, bias is not None)
    _fill(layer, w, bias)
    post = []
    if "max_pool" in a:  # the fused max pool of toolchain.kernels.graph: the standard layer again
        k = [int(v) for v in a["max_pool"]]
        if len(k) != 2 or min(k) < 1:
            raise node.error(f"max_pool must be 2 positive ints, got {k}")
        post.append(("MaxPool", nn.MaxPool2d(tuple(k), tuple(k))))
    return Converted(layer, [node.inputs[0]], name_hints=[node.name], post=post + _activation(node))
