"""Graph-level rewrites of the fast form, applied after the layers are emitted:

- standard ONNX ops that the custom-op library runs faster than stock onnxruntime, with the same
  attributes and formula. Today one: LRN (onnxruntime's CPU LRN takes about half of a batch-1 AlexNet's
  time; docs/kernels.md);
- a SparseConv whose only reader is a non-overlapping MaxPool (window = strides, no padding, floor mode),
  directly or through a Relu (which commutes with max and then runs on the pooled output), takes the
  pool into its output pass (attribute max_pool): the full-size conv output is never written,
  and with images in lanes the pool is a vector max on data in cache (LeNet-5; docs/kernels.md);
- a Relu that is the only reader of a SparseLinear or SparseConv output runs in that op's output pass
  (attribute activation="Relu"), saving a node and a pass over the tensor.

`to_fast_ops(model)` does both (in place); a fast-form file read back (`toolchain.load`) turns them into
the standard layers again.
"""
from __future__ import annotations

import onnx

from converters.ops.layers import convert_lrn
from converters.ops.registry import register_converter

from . import DOMAIN, OPSET_VERSION

FAST_OPS = ("LRN",)


def to_fast_ops(model: onnx.ModelProto) -> int:
    """Rewrite the main graph's FAST_OPS nodes to DOMAIN and fuse max pools into SparseConv; returns how
    many nodes were rewritten."""
    count = fuse_max_pools(model)
    count += fuse_relus(model)
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in FAST_OPS:
            node.domain = DOMAIN
            count += 1
    if count and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.add(domain=DOMAIN, version=OPSET_VERSION)
    return count


def _ints(node: onnx.NodeProto, name: str, default: list[int]) -> list[int]:
    a = next((a for a in node.attribute if a.name == name), None)
    return list(a.ints) if a is not None else default


def _fusable_pool(node: onnx.NodeProto) -> list[int] | None:
    """The window of a MaxPool the SparseConv output pass computes exactly: 2-D, strides = window, no
    padding, no dilation, floor mode, no Indices output; else None."""
    if node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or len([o for o in node.output if o]) != 1:
        return None
    attrs = {a.name for a in node.attribute}
    if not attrs <= {"kernel_shape", "strides", "pads", "dilations", "ceil_mode", "auto_pad", "storage_order"}:
        return None
    k = _ints(node, "kernel_shape", [])
    if len(k) != 2 or min(k) < 1:
        return None
    auto_pad = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    ceil = next((a.i for a in node.attribute if a.name == "ceil_mode"), 0)
    if (_ints(node, "strides", [1, 1]) != k or any(_ints(node, "pads", [0, 0, 0, 0]))
            or _ints(node, "dilations", [1, 1]) != [1, 1] or ceil or auto_pad not in ("NOTSET", "VALID")):
        return None
    return k


def fuse_max_pools(model: onnx.ModelProto) -> int:
    """SparseConv -> MaxPool and SparseConv -> Relu -> MaxPool chains of the main graph become a SparseConv
    with max_pool = the window (followed by the Relu, which commutes with max), in place; only where no
    value inside the chain has another reader or is a graph output. Returns how many pools were fused."""
    g = model.graph
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for name in set(n.input):
            readers.setdefault(name, []).append(i)
    outputs = {o.name for o in g.output}

    def only_reader(value: str) -> onnx.NodeProto | None:
        users = readers.get(value, [])
        return g.node[users[0]] if len(users) == 1 and value not in outputs else None

    dropped: set[int] = set()
    for n in g.node:
        if n.op_type != "SparseConv" or n.domain != DOMAIN or any(a.name == "max_pool" for a in n.attribute):
            continue
        chain = [only_reader(n.output[0])]
        if chain[0] is not None and chain[0].op_type == "Relu" and chain[0].domain in ("", "ai.onnx"):
            chain.append(only_reader(chain[0].output[0]))
        pool = chain[-1]
        if pool is None or _fusable_pool(pool) is None or len(set(pool.input)) != 1:
            continue
        n.attribute.append(onnx.helper.make_attribute("max_pool", _fusable_pool(pool)))
        stale = {v for c in chain[:-1] for v in c.input} | {pool.input[0]}
        if len(chain) == 1:
            n.output[0] = pool.output[0]
        else:  # conv (pooled) -> relu -> the pool's output
            chain[0].output[0] = pool.output[0]
        dropped.add(readers[pool.input[0]][0])
        _keep(g.value_info, lambda i, v: v.name not in stale)
    _keep(g.node, lambda i, n: i not in dropped)
    return len(dropped)


RELU_HOSTS = ("SparseLinear", "SparseConv")


def fuse_relus(model: onnx.ModelProto) -> int:
    """SparseLinear / SparseConv -> Relu pairs of the main graph become the op with activation="Relu" (in
    place), where the Relu is the op output's only reader and that output is no graph output. Returns the
    count."""
    g = model.graph
    readers: dict[str, list[int]] = {}
    for i, n in enumerate(g.node):
        for name in set(n.input):
            readers.setdefault(name, []).append(i)
    outputs = {o.name for o in g.output}
    dropped: set[int] = set()
    for n in g.node:
        if n.op_type not in RELU_HOSTS or n.domain != DOMAIN or any(a.name == "activation" for a in n.attribute):
            continue
        mid = n.output[0]
        users = readers.get(mid, [])
        if mid in outputs or len(users) != 1:
            continue
        relu = g.node[users[0]]
        if relu.op_type != "Relu" or relu.domain not in ("", "ai.onnx"):
            continue
        n.attribute.append(onnx.helper.make_attribute("activation", "Relu"))
        n.output[0] = relu.output[0]
        dropped.add(users[0])
        _keep(g.value_info, lambda i, v: v.name != mid)
    _keep(g.node, lambda i, n: i not in dropped)
    return len(dropped)


def _keep(field, pred) -> None:
    """Keep the elements of a repeated message field for which pred(index, element) holds."""
    kept = []
    for i, e in enumerate(field):
        if pred(i, e):
            kept.append(type(e)())
            kept[-1].CopyFrom(e)
    del field[:]
    field.extend(kept)


register_converter("LRN", opsets=[OPSET_VERSION], domain=DOMAIN)(convert_lrn)
