"""Export of HashedNets layers (toolchain.layers.hashed): K real weights + the hash, in stock ONNX.

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
"""
from __future__ import annotations

import numpy as np

from toolchain.layers.hashed import PRIME, HashedConv2d, HashedLinear, _Hashed, hash_coefficients

from .ops.registry import register_emitter

FLOAT, INT64 = 1, 7  # TensorProto data types


def _i64(ctx, name: str, value) -> str:
    return ctx.add_initializer(name, np.array(value, dtype=np.int64))


def virtual_weight_value(ctx, name: str, m: _Hashed) -> str:
    """Add the nodes computing the layer's virtual weight; returns its value name (`{name}.weight`)."""
    count = m.virtual_count
    w = ctx.add_initializer(f"{name}.hashed_weight", m.weight.detach().cpu().numpy().astype(np.float32))
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
    flat = ctx.fresh(f"{name}.shared_weight")
    ctx.add_node("Gather", [w, bucket], [flat], name=f"{name}_gather", axis=0)
    if m.use_sign:
        parity, parity_f, sign, signed = (ctx.fresh(f"{name}.{k}") for k in ("sign_parity", "sign_parity_f", "sign", "signed_weight"))
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


def _bias(ctx, name: str, m) -> list[str]:
    if m.bias is None:
        return []
    return [ctx.add_initializer(f"{name}.bias", m.bias.detach().cpu().numpy().astype(np.float32))]


@register_emitter(HashedLinear)
def emit_hashed_linear(ctx, name, m, inputs, outputs):
    weight = virtual_weight_value(ctx, name, m)
    if ctx.rank(inputs[0]) == 2:
        ctx.add_node("Gemm", [inputs[0], weight, *_bias(ctx, name, m)], outputs, name=name, transB=1)
        return
    wt = ctx.fresh(f"{name}.weight.T")
    ctx.add_node("Transpose", [weight], [wt], name=f"{name}_transpose", perm=[1, 0])
    if m.bias is None:
        ctx.add_node("MatMul", [inputs[0], wt], outputs, name=name)
        return
    mm = ctx.fresh(f"{name}_matmul")
    ctx.add_node("MatMul", [inputs[0], wt], [mm], name=name)
    ctx.add_node("Add", [mm, *_bias(ctx, name, m)], outputs, name=f"{name}_bias")


@register_emitter(HashedConv2d)
def emit_hashed_conv(ctx, name, m, inputs, outputs):
    weight = virtual_weight_value(ctx, name, m)
    ctx.add_node("Conv", [inputs[0], weight, *_bias(ctx, name, m)], outputs, name=name,
                 kernel_shape=list(m.kernel_size), strides=list(m.stride), dilations=list(m.dilation),
                 pads=list(m.padding) * 2, group=m.groups)
