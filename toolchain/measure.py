"""Per-layer measurement of an ONNX model: parameters, non-zeros, MACs, stored bytes.

Works on any of our exports (dense, portable sparse/hashed/factored, custom-op fast form) and on
third-party files: weights that the graph computes from stored tensors (e.g. a sparse layer
expanded with ScatterND) are evaluated once in onnxruntime, and a layer's stored bytes are the
initializers its weight and bias are computed from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .runtime import CUSTOM_DOMAIN, load_onnx, make_session, run

# Nodes counted as layers, and which input holds the weight (None: custom layout, see _custom_weight).
LAYER_OPS = {("", "Conv"): 1, ("", "Gemm"): 1, ("", "MatMul"): 1, ("", "ConvTranspose"): 1}
SUFFIXES = (".weight", "_w_0", ".W", "_W", "_w", "_weight")


@dataclass
class LayerStats:
    name: str
    op: str
    weight_shape: tuple[int, ...]
    params: int  # dense weight + bias elements (what the layer computes with)
    nnz: int  # non-zero weights + bias
    stored: int  # elements stored in the file for this layer
    stored_bytes: int
    macs_dense: int  # per sample
    macs: int  # per sample, skipping zero weights

    @property
    def density(self) -> float:
        return self.nnz / self.params if self.params else 0.0


def layer_name(node: onnx.NodeProto, weight_input: str | None) -> str:
    if weight_input:
        for s in SUFFIXES:
            if weight_input.endswith(s):
                return weight_input[: -len(s)]
    return node.name or weight_input or node.op_type


def _const_closure(graph: onnx.GraphProto) -> tuple[set[str], dict[str, onnx.NodeProto]]:
    """Values computable from initializers alone, and the producer of every value."""
    const = {i.name for i in graph.initializer}
    producer = {}
    for n in graph.node:
        for o in n.output:
            producer[o] = n
        if all((not i) or i in const for i in n.input) and n.domain == "":
            const.update(o for o in n.output if o)
    return const, producer


def _ancestor_initializers(value: str, producer, init_names) -> set[str]:
    seen, stack, found = set(), [value], set()
    while stack:
        v = stack.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v in init_names:
            found.add(v)
        elif v in producer:
            stack.extend(producer[v].input)
    return found


def _evaluate_values(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Compute constant values in onnxruntime (only the initializer-only subgraph is kept)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    direct = {n: numpy_helper.to_array(inits[n]) for n in names if n in inits}
    todo = [n for n in names if n not in inits]
    if not todo:
        return direct
    const, producer = _const_closure(g)
    needed, stack = set(), list(todo)  # ids of the nodes the wanted values depend on
    seen = set()
    while stack:
        v = stack.pop()
        if v in seen or v in inits or not v:
            continue
        seen.add(v)
        node = producer[v]
        needed.add(id(node))
        stack.extend(node.input)
    order = [n for n in g.node if id(n) in needed]
    used = {i for n in order for i in n.input}
    sub = helper.make_graph(
        order, "weights", [], [helper.make_empty_tensor_value_info(n) for n in todo],
        [inits[i] for i in used if i in inits],
    )
    sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sess = make_session(sub_model, optimize=False)
    out = dict(zip(todo, run(sess, {}, todo)))
    out.update(direct)
    return out


# Our custom layer ops: how many inputs after X hold the weight, and which input is the bias.
CUSTOM_LAYERS = {"SparseLinear": (3, 4), "SparseConv": (3, 4), "SparseLinearCodebook": (4, 5), "SparseLinearInt8": (4, 5)}


def _custom_weight(node: onnx.NodeProto, values: dict[str, np.ndarray]):
    """(dense weight shape, nnz) for our custom sparse ops (fp32 CSR and the packed formats)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("SparseLinearCodebook", "SparseLinearInt8"):
        from .methods.quantize import packed as pk

        a = [values[i] for i in node.input[1:5]]
        k = int(attrs["in_features"])
        if node.op_type == "SparseLinearCodebook":
            w = pk.decode_codebook(pk.PackedCodebook(*a, bits=int(attrs["bits"]), in_features=k, fillers=0))
        else:
            w = pk.decode_int8(pk.PackedInt8(a[0], a[1], a[2], a[3], in_features=k, fillers=0))
        return w.shape, int(np.count_nonzero(w))
    if node.op_type in ("SparseLinear", "SparseConv"):
        vals, row_ptr = values[node.input[1]], values[node.input[3]]
        rows = len(row_ptr) - 1
        if node.op_type == "SparseLinear":
            shape = (rows, int(attrs["in_features"]))
        else:
            shape = (rows, int(attrs["in_channels"]) // int(attrs.get("group", 1)), *map(int, attrs["kernel_shape"]))
        return shape, int(np.count_nonzero(vals))
    raise KeyError(node.op_type)


def measure(src: str | os.PathLike | onnx.ModelProto) -> tuple[list[LayerStats], dict]:
    """Per-layer stats and totals (incl. file size when given a path)."""
    model = load_onnx(src, check=False)
    g = model.graph
    init_names = {i.name for i in g.initializer}
    init_bytes = {i.name: numpy_helper.to_array(i).nbytes for i in g.initializer}
    init_elems = {i.name: int(np.prod(i.dims)) for i in g.initializer}
    const, producer = _const_closure(g)

    layer_nodes = []
    for n in g.node:
        key = (n.domain if n.domain != "ai.onnx" else "", n.op_type)
        if key in LAYER_OPS:
            w = n.input[LAYER_OPS[key]]
            if w in const:  # a MatMul of two activations is not a layer
                layer_nodes.append((n, w))
        elif n.domain == CUSTOM_DOMAIN and n.op_type in CUSTOM_LAYERS:
            layer_nodes.append((n, None))

    # Shapes of every layer's output at batch 1, and the constant inputs we need.
    want_consts = []
    for n, w in layer_nodes:
        n_weight, bias_at = CUSTOM_LAYERS.get(n.op_type, (0, 2)) if not w else (0, 2)
        want_consts += [w] if w else [i for i in n.input[1:1 + n_weight] if i]
        if n.op_type in ("Conv", "Gemm", *CUSTOM_LAYERS) and len(n.input) > bias_at and n.input[bias_at]:
            want_consts.append(n.input[bias_at])
    values = _evaluate_values(model, [v for v in dict.fromkeys(want_consts) if v])
    # a SparseConv with a fused max pool: its MACs are those of the conv output, found from its input
    pooled = [n for n, _ in layer_nodes if n.op_type == "SparseConv" and any(a.name == "max_pool" for a in n.attribute)]
    out_shapes = _output_shapes(model, list(dict.fromkeys([n.output[0] for n, _ in layer_nodes]
                                                          + [n.input[0] for n in pooled])))

    stats, layer_roots = [], []
    for n, w in layer_nodes:
        if w:
            W = values[w]
            shape, nnz_w = W.shape, int(np.count_nonzero(W))
            if n.op_type == "Gemm":
                trans_b = any(a.name == "transB" and a.i for a in n.attribute)
                shape = shape if trans_b else shape[::-1]
            elif n.op_type == "MatMul":
                shape = shape[::-1]  # report as [out, in] like Gemm/Linear
            bias = n.input[2] if n.op_type in ("Conv", "Gemm") and len(n.input) > 2 and n.input[2] else None
        else:
            shape, nnz_w = _custom_weight(n, values)
            n_weight, bias_at = CUSTOM_LAYERS[n.op_type]
            bias = n.input[bias_at] if len(n.input) > bias_at and n.input[bias_at] else None
        b = values.get(bias) if bias else None
        n_w = int(np.prod(shape))
        n_b = 0 if b is None else int(b.size)
        nnz_b = 0 if b is None else int(np.count_nonzero(b))
        roots = set()
        for v in ([w] if w else list(n.input[1:1 + CUSTOM_LAYERS[n.op_type][0]])) + ([bias] if bias else []):
            roots |= _ancestor_initializers(v, producer, init_names)
        layer_roots.append(roots)
        out = out_shapes.get(n.output[0])
        if any(n is p for p in pooled):
            out = _conv_output_shape(n, out_shapes[n.input[0]])
        positions = int(np.prod(out[2:])) if (out is not None and n.op_type in ("Conv", "SparseConv", "ConvTranspose")) else 1
        if n.op_type == "MatMul" and out is not None and len(out) > 2:
            positions = int(np.prod(out[1:-1]))
        stats.append(LayerStats(
            name=layer_name(n, w) if w else (n.name or n.output[0]),
            op=n.op_type if not n.domain else f"{n.domain}.{n.op_type}",
            weight_shape=tuple(int(s) for s in shape),
            params=n_w + n_b, nnz=nnz_w + nnz_b,
            stored=0, stored_bytes=0, macs_dense=n_w * positions, macs=nnz_w * positions,
        ))
    # A stored tensor several layers decode from (one packed stream for a whole network) is split
    # between them, so the per-layer figures add up to what the file stores, never count it twice.
    users: dict[str, list[int]] = {}
    for i, roots in enumerate(layer_roots):
        for r in sorted(roots):
            users.setdefault(r, []).append(i)
    for r, idx in users.items():
        for j, i in enumerate(idx):  # equal parts, the remainder to the first users
            stats[i].stored += init_elems[r] // len(idx) + (j < init_elems[r] % len(idx))
            stats[i].stored_bytes += init_bytes[r] // len(idx) + (j < init_bytes[r] % len(idx))
    totals = {
        "params": sum(s.params for s in stats), "nnz": sum(s.nnz for s in stats),
        "stored": sum(init_elems.values()), "stored_bytes": sum(init_bytes.values()),
        "macs_dense": sum(s.macs_dense for s in stats), "macs": sum(s.macs for s in stats),
        "file_bytes": file_size(src) if isinstance(src, (str, os.PathLike)) else len(model.SerializeToString()),
    }
    return stats, totals


def file_size(path) -> int:
    """Bytes on disk of an ONNX file plus any external-data files it references."""
    raw = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in raw.graph.initializer for e in t.external_data if e.key == "location"}
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(os.path.dirname(path), loc)) for loc in locations)


def _output_shapes(model: onnx.ModelProto, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Run the model once at batch 1 on zeros and record the shapes of `names` (graph inputs among
    them: the shape fed)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    inputs = {i.name for i in m.graph.input}
    computed = [nm for nm in names if nm not in inputs]
    for nm in computed:
        if nm not in existing:
            m.graph.output.append(helper.make_empty_tensor_value_info(nm))
    sess = make_session(m)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
        dtype = np.float32 if "float" in i.type else np.int64
        feeds[i.name] = np.zeros(shape, dtype)
    outs = run(sess, feeds, computed)
    shapes = {nm: o.shape for nm, o in zip(computed, outs)}
    shapes.update({nm: feeds[nm].shape for nm in names if nm in feeds})
    return shapes


def _conv_output_shape(node: onnx.NodeProto, x_shape) -> tuple[int, ...]:
    """[N, M, OH, OW] of a (Sparse)Conv node with input shape x_shape, before any fused pool."""
    from .methods.prune.csr import conv_output_hw

    a = {at.name: helper.get_attribute_value(at) for at in node.attribute}
    oh, ow = conv_output_hw(x_shape[2:], a["kernel_shape"], a.get("strides", [1, 1]), a.get("pads", [0, 0, 0, 0]),
                            a.get("dilations", [1, 1]))
    return (x_shape[0], -1, oh, ow)


def format_table(stats: list[LayerStats], totals: dict, baseline: dict | None = None) -> str:
    """Markdown table of per-layer stats (and compression against a dense baseline's totals)."""
    rows = ["| layer | op | weight shape | params | non-zeros | density | MACs | MACs (non-zero) | stored bytes |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in stats:
        rows.append(f"| {s.name} | {s.op} | {'x'.join(map(str, s.weight_shape))} | {s.params:,} | {s.nnz:,} | "
                    f"{100 * s.density:.1f}% | {s.macs_dense:,} | {s.macs:,} | {s.stored_bytes:,} |")
    t = totals
    dens = t["nnz"] / t["params"] if t["params"] else 0
    rows.append(f"| **total** | | | {t['params']:,} | {t['nnz']:,} | {100 * dens:.1f}% | {t['macs_dense']:,} | "
                f"{t['macs']:,} | {t['stored_bytes']:,} |")
    lines = ["\n".join(rows), f"file size: {t['file_bytes']:,} bytes"]
    if baseline:
        lines.append(f"vs dense: {baseline['nnz'] / max(t['nnz'], 1):.1f}x fewer non-zero weights (as computed), "
                     f"{baseline['stored_bytes'] / max(t['stored_bytes'], 1):.1f}x fewer stored bytes, "
                     f"{baseline['file_bytes'] / max(t['file_bytes'], 1):.1f}x smaller file")
    return "\n".join(lines)


def format_comparison(before: tuple[list[LayerStats], dict], after: tuple[list[LayerStats], dict]) -> str:
    """Per-layer before/after table (Han et al. Tables 2-3 style: weights%, MACs%)."""
    b_stats, b_tot = before
    a_stats, a_tot = after
    a_by_name = {s.name: s for s in a_stats}
    rows = ["| layer | weights before | non-zero after | weights % | MACs before | MACs after | MACs % | stored bytes after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in b_stats:
        a = a_by_name.get(s.name)
        if a is None:
            rows.append(f"| {s.name} | {s.params:,} | (replaced) | | {s.macs_dense:,} | | | |")
            continue
        rows.append(f"| {s.name} | {s.params:,} | {a.nnz:,} | {100 * a.nnz / max(s.params, 1):.1f}% | {s.macs_dense:,} | "
                    f"{a.macs:,} | {100 * a.macs / max(s.macs_dense, 1):.1f}% | {a.stored_bytes:,} |")
    kept = f"{100 * a_tot['nnz'] / b_tot['params']:.2f}%" if b_tot["params"] else "n/a (no weights)"
    rows.append(f"| **total** | {b_tot['params']:,} | {a_tot['nnz']:,} | {kept} | "
                f"{b_tot['macs_dense']:,} | {a_tot['macs']:,} | {100 * a_tot['macs'] / max(b_tot['macs_dense'], 1):.1f}% | "
                f"{a_tot['stored_bytes']:,} |")
    rows.append("")
    rows.append(f"compression: {b_tot['params'] / max(a_tot['nnz'], 1):.1f}x fewer non-zero parameters (as computed), "
                f"{b_tot['stored_bytes'] / max(a_tot['stored_bytes'], 1):.1f}x fewer stored bytes; "
                f"file {b_tot['file_bytes']:,} -> {a_tot['file_bytes']:,} bytes "
                f"({b_tot['file_bytes'] / max(a_tot['file_bytes'], 1):.1f}x smaller)")
    return "\n".join(rows)
