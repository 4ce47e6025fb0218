"""Graph-level rewrites of the fast form, applied after the layers are emitted:

- standard ONNX ops that the custom-op library runs faster than stock onnxruntime, with the same
  attributes and formula. Today one: LRN (onnxruntime's CPU LRN takes about half of a batch-1 AlexNet's
  time; docs/kernels.md);
- a SparseConv whose only reader is a non-overlapping MaxPool (window = strides, no padding, floor mode),
  directly or through a Relu (which commutes with max and then runs on the pooled output), takes the
  pool into its output pass (attribute max_pool): the full-size conv output is never written,
  and with images in lanes the pool is a vector max on data in cache (LeNet-5; docs/kernels.md);
- a Relu that is the only reader of a layer op's output (SparseLinear, SparseConv, the packed
  SparseLinearCodebook / SparseLinearInt8) runs in that op's output pass (attribute activation="Relu"),
  saving a node and a pass over the tensor.

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
    """Fuse max pools and ReLUs into the layer ops and move the FAST_OPS nodes to DOMAIN, in the main
    graph, in place; returns how many nodes were rewritten or fused away."""
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


class _Readers:
    """The nodes (by index) that read each value of graph g, and g's outputs (which count as read)."""

    def __init__(self, g: onnx.GraphProto):
        self.g = g
        self.readers: dict[str, list[int]] = {}
        for i, n in enumerate(g.node):
            for name in set(n.input):
                self.readers.setdefault(name, []).append(i)
        self.outputs = {o.name for o in g.output}

    def only(self, value: str, op_type: str) -> int | None:
        """Index of the standard-domain `op_type` node that is the only reader of value, else None."""
        users = self.readers.get(value, [])
        if len(users) != 1 or value in self.outputs:
            return None
        n = self.g.node[users[0]]
        return users[0] if n.op_type == op_type and n.domain in ("", "ai.onnx") else None


def _fuse(model: onnx.ModelProto, hosts: tuple[str, ...], attr: str, rewrite) -> int:
    """For every host node (DOMAIN) without `attr`: rewrite(node, readers) fuses what it can into it and
    returns (indices of the nodes it absorbed, values whose value_info is now wrong), or None; those nodes
    and value_infos are dropped. Returns how many nodes went."""
    g = model.graph
    readers = _Readers(g)
    dropped: set[int] = set()
    for n in g.node:
        if n.op_type in hosts and n.domain == DOMAIN and not any(a.name == attr for a in n.attribute):
            done = rewrite(n, readers)
            if done:
                gone, stale = done
                dropped |= gone
                _keep(g.value_info, lambda i, v: v.name not in stale)
    _keep(g.node, lambda i, n: i not in dropped)
    return len(dropped)


def fuse_max_pools(model: onnx.ModelProto) -> int:
    """SparseConv -> MaxPool and SparseConv -> Relu -> MaxPool chains of the main graph become a SparseConv
    with max_pool = the window (followed by the Relu, which commutes with max), in place; only where no
    value inside the chain has another reader or is a graph output. Returns how many pools were fused."""
    g = model.graph

    def rewrite(conv, readers):
        relu = readers.only(conv.output[0], "Relu")
        mid = g.node[relu].output[0] if relu is not None else conv.output[0]
        at = readers.only(mid, "MaxPool")
        window = _fusable_pool(g.node[at]) if at is not None else None
        if window is None:
            return None
        pool = g.node[at]
        stale = {conv.output[0], mid}  # gone, or (the conv's output before a Relu) of another shape now
        conv.attribute.append(onnx.helper.make_attribute("max_pool", window))
        if relu is None:
            conv.output[0] = pool.output[0]
        else:  # conv (pooled) -> relu -> what the pool wrote
            g.node[relu].output[0] = pool.output[0]
        return {at}, stale

    return _fuse(model, ("SparseConv",), "max_pool", rewrite)


RELU_HOSTS = ("SparseLinear", "SparseConv", "SparseLinearCodebook", "SparseLinearInt8")


def fuse_relus(model: onnx.ModelProto) -> int:
    """Layer op (RELU_HOSTS) -> Relu pairs of the main graph become the op with activation="Relu" (in
    place), where the Relu is the op output's only reader and that output is no graph output. Returns the
    count."""
    g = model.graph

    def rewrite(op, readers):
        at = readers.only(op.output[0], "Relu")
        if at is None:
            return None
        mid = op.output[0]
        op.attribute.append(onnx.helper.make_attribute("activation", "Relu"))
        op.output[0] = g.node[at].output[0]
        return {at}, {mid}

    return _fuse(model, RELU_HOSTS, "activation", rewrite)


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
