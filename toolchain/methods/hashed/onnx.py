"""Export of HashedNets layers (toolchain.methods.hashed.layers): K real weights + the hash, in stock ONNX.

The file stores the K real weights, the bias and a few int64 scalars (the hash coefficients, K, the
virtual weight count, the shape). A small subgraph recomputes the virtual weight with standard
int64 ops (any opset >= 13):

    n = Range(0, N, 1)                                       virtual weight indices
    g_j = Mod(Add(Mul(g_j, n), c_ji), P)  (Horner, j = 0, 1) the two polynomial hashes mod P
    V = Reshape(Gather(w, Mod(g_0, K)) * (1 - 2 * Cast(Mod(g_1, 2))), shape)

and the layer runs as a plain Gemm / MatMul / Conv on V. Every input of that subgraph is an
initializer, so onnxruntime constant-folds it once when the session is created; inference then
runs the dense kernels (docs/lowrank_hashed.md has the session-start and latency measurements).
The same graph serves both export forms.

The model's metadata (`ai.toolchain.hashed`: layer -> seed, K, sign, real-weight initializer) lets
`restore_hashed_layers` turn the imported layers back into hashed ones, so a hashed file re-imports
K-sized (trainable in compressed form, re-exported K-sized) instead of as the dense layer the
folded subgraph computes.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import torch
import torch.nn as nn
from onnx import numpy_helper

from converters.ops.layers import conv_attrs, write_conv, write_fc
from converters.onnx_import import RESTORERS
from converters.ops.registry import register_emitter

from .layers import PRIME, HashedConv2d, HashedLinear, _Hashed, hash_coefficients, hashed_from_dense

FLOAT, INT64 = 1, 7  # TensorProto data types
METADATA_KEY = "ai.toolchain.hashed"
log = logging.getLogger(__name__)


def _i64(ctx, name: str, value) -> str:
    return ctx.add_initializer(name, np.array(value, dtype=np.int64))


def virtual_weight_value(ctx, name: str, m: _Hashed) -> str:
    """Add the nodes computing the layer's virtual weight; returns its value name (`{name}.weight`)."""
    count = m.virtual_count
    w = ctx.add_initializer(f"{name}.hashed_weight", m.weight.detach().cpu().numpy().astype(np.float32))
    _record(ctx, name, m, w)
    n = ctx.fresh(f"{name}.hash_index")
    ctx.add_node("Range", [_i64(ctx, f"{name}.hash_start", 0), _i64(ctx, f"{name}.hash_count", count),
                           _i64(ctx, f"{name}.hash_step", 1)], [n], name=f"{name}_hash_range")
    prime = _i64(ctx, f"{name}.hash_prime", PRIME)

    def poly(which: int, label: str) -> str:
        coefs = hash_coefficients(m.seed, which)
        h = _i64(ctx, f"{name}.{label}_c0", coefs[0])
        for i, c in enumerate(coefs[1:], 1):
            prod, acc, red = (ctx.fresh(f"{name}.{label}_{k}{i}") for k in ("mul", "add", "mod"))
            ctx.add_node("Mul", [h, n], [prod], name=f"{name}_{label}_mul{i}")
            ctx.add_node("Add", [prod, _i64(ctx, f"{name}.{label}_c{i}", c)], [acc], name=f"{name}_{label}_add{i}")
            ctx.add_node("Mod", [acc, prime], [red], name=f"{name}_{label}_mod{i}", fmod=0)
            h = red
        return h

    bucket = ctx.fresh(f"{name}.bucket")
    ctx.add_node("Mod", [poly(0, "bucket_hash"), _i64(ctx, f"{name}.buckets", m.buckets)], [bucket],
                 name=f"{name}_bucket", fmod=0)
    # Value names: the importer names the layer after the Gemm/Conv node when the flat weight's name
    # has no weight suffix, and measure after the reshaped `{name}.weight` -- both "ip1".
    flat = ctx.fresh(f"{name}.shared_weight" if m.use_sign else f"{name}.weight_flat")
    ctx.add_node("Gather", [w, bucket], [flat], name=f"{name}_gather", axis=0)
    if m.use_sign:
        parity, parity_f, sign, signed = (ctx.fresh(f"{name}.{k}") for k in ("sign_parity", "sign_parity_f", "sign", "weight_flat"))
        ctx.add_node("Mod", [poly(1, "sign_hash"), _i64(ctx, f"{name}.two", 2)], [parity], name=f"{name}_parity", fmod=0)
        ctx.add_node("Cast", [parity], [parity_f], name=f"{name}_parity_float", to=FLOAT)
        minus2 = ctx.add_initializer(f"{name}.minus_two", np.array(-2.0, np.float32))
        one = ctx.add_initializer(f"{name}.one", np.array(1.0, np.float32))
        scaled = ctx.fresh(f"{name}.sign_scaled")
        ctx.add_node("Mul", [parity_f, minus2], [scaled], name=f"{name}_sign_scale")
        ctx.add_node("Add", [scaled, one], [sign], name=f"{name}_sign")
        ctx.add_node("Mul", [flat, sign], [signed], name=f"{name}_apply_sign")
        flat = signed
    out = ctx.fresh(f"{name}.weight")
    ctx.add_node("Reshape", [flat, _i64(ctx, f"{name}.weight_shape", list(m.weight_shape))], [out],
                 name=f"{name}_virtual_weight")
    return out


def _bias(m) -> np.ndarray | None:
    return None if m.bias is None else m.bias.detach().cpu().numpy().astype(np.float32)


def _record(ctx, name: str, m: _Hashed, real_weight: str) -> None:
    layers = json.loads(ctx.metadata.get(METADATA_KEY, "{}"))
    layers[name] = {"seed": m.seed, "buckets": m.buckets, "sign": m.use_sign, "weight": real_weight}
    ctx.metadata[METADATA_KEY] = json.dumps(layers, sort_keys=True)


@register_emitter(HashedLinear)
def emit_hashed_linear(ctx, name, m, inputs, outputs):
    write_fc(ctx, name, inputs[0], ctx.rank(inputs[0]), virtual_weight_value(ctx, name, m), _bias(m), outputs[0])


@register_emitter(HashedConv2d)
def emit_hashed_conv(ctx, name, m, inputs, outputs):
    write_conv(ctx, name, inputs[0], virtual_weight_value(ctx, name, m), _bias(m), outputs[0],
               conv_attrs(ctx, name, m))


@RESTORERS.register("hashed")
def restore_hashed_layers(net, model) -> list[str]:
    """Replace the layers the exporter recorded as hashed (model metadata) by hashed layers; returns their names.

    The importer has folded each hash subgraph into a dense weight W. A layer is restored from its
    recorded seed, K and real-weight initializer only if they reproduce W exactly; otherwise (an
    edited file, a stale record) it stays the dense layer W, which computes the same function, and a
    warning says so.
    """
    text = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if text is None:
        return []
    try:
        records = {str(k): (int(v["seed"]), int(v["buckets"]), bool(v["sign"]), str(v["weight"]))
                   for k, v in json.loads(text).items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        log.warning("ignoring malformed %s metadata; hashed layers import as dense ones", METADATA_KEY)
        return []
    inits = {t.name: t for t in model.graph.initializer}
    restored = []
    for name, (seed, buckets, sign, weight_name) in records.items():
        dense = net.ops[name] if name in net.ops else None
        real = numpy_helper.to_array(inits[weight_name]) if weight_name in inits else None
        if not isinstance(dense, (nn.Linear, nn.Conv2d)) or real is None or real.shape != (buckets,):
            log.warning("layer %r recorded as hashed has no matching Linear/Conv2d or real weights; kept dense", name)
            continue
        try:
            hashed = hashed_from_dense(dense, buckets, seed, init="dense", use_sign=sign)
        except ValueError as e:
            log.warning("layer %r: %s; kept dense", name, e)
            continue
        with torch.no_grad():
            hashed.weight.copy_(torch.from_numpy(real.astype(np.float32)))
            exact = torch.equal(hashed.virtual_weight(), dense.weight.detach())
        if not exact:
            log.warning("layer %r: recorded hash (seed %d, K %d) does not reproduce its weight; kept dense", name,
                        seed, buckets)
            continue
        net.replace_layer(name, hashed)
        restored.append(name)
    return restored
