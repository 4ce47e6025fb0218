"""ONNX -> Network.

Pipeline: parse and validate (structure, onnx.checker) -> shape inference -> constant folding
(Constant nodes, nodes whose inputs are all constant, Shape -> Gather/Slice/Concat chains over
static dimensions, If with a constant condition) -> dead-code removal -> fusions (MatMul + Add of a
bias -> Linear; the exporters' decomposed LocalResponseNorm -> one LRN) -> one module per node
from the converter registry (converters/ops).

Graphs whose inputs have a fixed batch size are imported with a dynamic batch dimension ("N");
constant Reshape targets that hard-code that batch size are rewritten to copy it instead.
"""
from __future__ import annotations

import math
import os
import re
from collections import defaultdict, deque
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from converters.errors import ModelFormatError

from . import ops as _ops  # noqa: F401  (registers the converters)
from .registry import Registry
from .ir import Network, Node, is_layer, safe_key
from .ops.registry import FOLDED_OPS, Converted, OnnxNode, find_converter, normalize_domain, supported_ops, torch_dtype

__all__ = ["import_onnx", "load_model", "RESTORERS"]

# name -> fn(net, model): run after every import, in registration order. A compression method whose
# exported form folds to plain layers registers one to turn them back into its own layer type
# (from the record it wrote in the model's metadata); the format layer knows none of them.
RESTORERS: Registry = Registry("import restorer")

# shape-like initializers (and small ones) are kept for shape inference; big ones become typed inputs
_SMALL_INIT = 1024
_WEIGHT_OPERAND_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MatMulInteger", "QLinearMatMul"}
# ops through which a folded constant keeps the name of the initializer it came from
_LAYOUT_OPS = {"Transpose", "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}
# auto-generated value names and node names, which make poor layer names
_AUTO_VALUE = re.compile(r"^(val_\d+|onnx::.*|\d+|.*_output_\d+|constant_?\d*|t(_\d+)?|_?param_constant\d*|)$", re.I)
_AUTO_NODE = re.compile(r"^((linear|conv\w*|gemm|matmul|addmm|mm|add)(_\d+)?|)$", re.I)
_WEIGHT_SUFFIX = re.compile(r"(\.weight|_weight|\.W|_W|\.w|_w_0|_W_0|_w|\.bias|_bias|\.b|_b_0|_B_0|_b|_B|\.scale|_scale)(\.T)?$")


def import_onnx(src: str | os.PathLike | bytes | onnx.ModelProto, *, dynamic_batch: bool = True) -> Network:
    """Convert an ONNX model (path, serialized bytes or ModelProto) to a trainable Network.

    Raises ModelFormatError (one line) for files that are not ONNX, fail validation or use
    unsupported ops.
    """
    model, label = load_model(src)
    net = _Importer(model, label, dynamic_batch).run()
    for restore in RESTORERS.values():
        restore(net, model)
    return net


# ----------------------------------------------------------------------------------- loading
def load_model(src: str | os.PathLike | bytes | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Parse and validate; returns the model and a label for messages (the file path)."""
    data = None
    if isinstance(src, onnx.ModelProto):
        model, label = src, "model"
        for init in model.graph.initializer:
            if onnx.external_data_helper.uses_external_data(init) and not init.HasField("raw_data"):
                raise ModelFormatError(f"{label}: initializer {init.name!r} has external data that is not loaded; "
                                       "import the model from its file path")
    elif isinstance(src, (bytes, bytearray, memoryview)):
        label, data = "model bytes", bytes(src)
        model = _parse(data, label)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        label = str(path)
        if not path.is_file():
            raise ModelFormatError(f"{label}: no such file")
        data = path.read_bytes()
        model = _parse(data, label)
        if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
            data = str(path)  # the checker resolves the external files relative to the model's path
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
            except Exception as e:  # missing / short .data file
                raise ModelFormatError(f"{label}: cannot load external tensor data: {_one_line(e)}") from None
    else:
        raise TypeError(f"expected a path, bytes or onnx.ModelProto, not {type(src).__name__}")
    _check_structure(model, label)
    try:  # checking the bytes read (or the path) spares serializing the model again
        onnx.checker.check_model(data if data is not None else model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise ModelFormatError(f"{label}: rejected by the ONNX checker: {_one_line(e)}") from None
    return model, label


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise ModelFormatError(f"{label}: not a valid ONNX file (cannot parse: {_one_line(e)})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise ModelFormatError(f"{label}: not an ONNX model (no graph or IR version)")
    return model


def _one_line(e: Exception, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_SAMPLE_ELEMENTS = 2**28  # per-sample elements of a declared input (1 GiB of float32)


def _check_structure(model: onnx.ModelProto, label: str) -> None:
    """Everything onnxruntime would reject later (or run out of memory on), before any work is done."""
    g = model.graph
    if not g.output:
        raise ModelFormatError(f"{label}: the graph has no outputs")
    seen_nodes: set[str] = set()
    seen_values: set[str] = {v.name for v in g.input} | {t.name for t in g.initializer}
    for i, node in enumerate(g.node):
        if node.name:
            if node.name in seen_nodes:
                raise ModelFormatError(f"{label}: two nodes are named {node.name!r} (node names must be unique; "
                                       "onnxruntime refuses the file)")
            seen_nodes.add(node.name)
        for out in node.output:
            if out and out in seen_values:
                raise ModelFormatError(f"{label}: value {out!r} is written twice (node {node.name or '#' + str(i)!r} "
                                       f"({node.op_type}) redefines it)")
            seen_values.add(out)
    inits = {t.name for t in g.initializer}
    for v in g.input:
        dims = _dims(v.type)
        if v.name in inits or not dims:
            continue
        if any(isinstance(d, int) and d < 0 for d in dims):
            raise ModelFormatError(f"{label}: input {v.name!r} declares a negative dimension {dims}")
        per_sample = math.prod(d for d in dims[1:] if isinstance(d, int) and d > 0)
        if per_sample > MAX_SAMPLE_ELEMENTS or any(isinstance(d, int) and d >= 2**31 for d in dims):
            raise ModelFormatError(f"{label}: input {v.name!r} declares shape {dims}: {per_sample:,} values per sample "
                                   f"is more than the {MAX_SAMPLE_ELEMENTS:,} supported")
    defined = {v.name for v in g.input} | {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
    produced_later = {o for n in g.node for o in n.output}
    for i, node in enumerate(g.node):
        for name in node.input:
            if name and name not in defined:
                what = f"node {node.name or '#' + str(i)!r} ({node.op_type})"
                if name in produced_later:
                    raise ModelFormatError(f"{label}: {what} reads {name!r} before the node computing it "
                                           "(nodes are not in topological order)")
                raise ModelFormatError(f"{label}: {what} reads {name!r}, which no node, initializer or graph input provides")
        defined.update(node.output)
    for out in g.output:
        if out.name not in defined:
            raise ModelFormatError(f"{label}: graph output {out.name!r} is not computed by any node")


def _attr_value(attr: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", "replace") for v in value]
    return value


def _dims(type_proto: onnx.TypeProto) -> list | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in type_proto.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    return dims


# ----------------------------------------------------------------------------------- importer
class _Importer:
    """Working state of one import; also the ConvertContext that converters see."""

    def __init__(self, model: onnx.ModelProto, label: str, dynamic_batch: bool):
        self.model, self.label = model, label
        g = model.graph
        self.opsets = {normalize_domain(o.domain): o.version for o in model.opset_import}
        if g.sparse_initializer:
            raise ModelFormatError(f"{label}: sparse initializers are not supported")
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.origins: dict[str, str] = {}
        self.graph_inputs = [v for v in g.input if v.name not in self.consts]
        self.input_names = [v.name for v in self.graph_inputs]
        self.output_names = [v.name for v in g.output]
        self.input_shapes = {v.name: _dims(v.type) for v in self.graph_inputs}
        self.batch_made_dynamic: int | None = None
        if dynamic_batch:
            # a graph input that a MatMul / Gemm / Conv reads as its weight operand has no batch dimension
            weights = {v for n in g.node if n.op_type in _WEIGHT_OPERAND_OPS and not n.domain for v in n.input[1:]}
            for name, dims in self.input_shapes.items():
                if name in weights:
                    continue
                if dims and len(dims) >= 2 and isinstance(dims[0], int):
                    self.batch_made_dynamic = dims[0]
                    dims[0] = "N"
                elif dims and len(dims) >= 2 and dims[0] is None:
                    dims[0] = "N"
        self.nodes = [self._node(n, i) for i, n in enumerate(g.node)]
        self.partial: dict[str, tuple[list, bool, np.dtype]] = {}
        self._rewrites = 0
        self._names = {v.name for v in g.input} | set(self.consts) | {o for n in g.node for o in n.output}

    # ---------------------------------------------------------------- ConvertContext
    def const(self, value: str) -> np.ndarray | None:
        return self.consts.get(value) if value else None

    def shape(self, value: str) -> list | None:
        if value in self.consts:
            return list(np.shape(self.consts[value]))
        return self.shapes.get(value)

    def origin(self, value: str) -> str:
        return self.origins.get(value, value)

    # ---------------------------------------------------------------- helpers
    def _node(self, proto: onnx.NodeProto, index: int) -> OnnxNode:
        domain = normalize_domain(proto.domain)
        return OnnxNode(proto.name or f"{proto.op_type}_{index}", proto.op_type, list(proto.input), list(proto.output),
                        {a.name: _attr_value(a) for a in proto.attribute}, domain, self.opsets.get(domain, 0))

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _converter(self, node: OnnxNode):
        fn = find_converter(node.op_type, node.domain, node.opset)
        if fn is None:
            op = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
            raise ModelFormatError(f"{self.label}: unsupported ONNX op {op!r} (node {node.name!r}, opset {node.opset}); "
                                   f"supported ops: {', '.join(supported_ops())}")
        return fn

    def _convert(self, node: OnnxNode) -> Converted:
        result = self._converter(node)(node, self)
        if not isinstance(result, Converted):
            result = Converted(result)
        if result.inputs is None:
            result.inputs = list(node.inputs)
        return result

    def _scalar(self, value: str) -> float | None:
        c = self.const(value)
        return float(np.asarray(c).reshape(-1)[0]) if c is not None and np.size(c) == 1 else None

    # ---------------------------------------------------------------- pipeline
    def run(self) -> Network:
        for node in self.nodes:
            if not (node.domain == "" and node.op_type in FOLDED_OPS):
                self._converter(node)
        # folding can expose static shapes (a Reshape target becomes constant), which can enable more folding;
        # a rewritten Reshape target changes the shapes downstream (the next channel shuffle of a ShuffleNet
        # only sees its batch dimension once the previous one is rewritten): iterate to a fixed point
        for _ in range(max(4, len(self.nodes) + 1)):
            self._infer_shapes()
            before = (len(self.nodes), self._rewrites)
            self._fold()
            self._remove_dead()
            if (len(self.nodes), self._rewrites) == before:
                break
        for node in self.nodes:
            if node.op_type == "If" and not node.domain:
                raise ModelFormatError(f"{self.label}: If node {node.name!r} (opset {node.opset}) has a condition "
                                       "computed at run time; only If with a constant condition is supported")
        self._fuse_lrn()
        self._fuse_matmul_add()
        return self._build()

    def _infer_shapes(self) -> None:
        """onnx shape inference (with data propagation) on the current nodes; big constants become typed inputs."""
        m = onnx.ModelProto()
        # IR >= 4: initializers need not be graph inputs (IR 3 inference ignores those that are not, so the
        # folded weights of an old file would leave every shape downstream unknown)
        m.ir_version = max(self.model.ir_version, 4)
        m.opset_import.extend(self.model.opset_import)
        g = m.graph
        g.name = self.model.graph.name
        for v in self.graph_inputs:
            vi = g.input.add()
            vi.CopyFrom(v)
            dims = self.input_shapes.get(v.name)
            if dims and vi.type.tensor_type.shape.dim and dims[0] == "N":
                vi.type.tensor_type.shape.dim[0].Clear()
                vi.type.tensor_type.shape.dim[0].dim_param = "N"
        for name, value in self.consts.items():
            value = np.asarray(value)
            if value.size <= _SMALL_INIT:
                g.initializer.append(numpy_helper.from_array(value, name))
            else:
                g.input.append(onnx.helper.make_tensor_value_info(
                    name, onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape)))
        for node in self.nodes:
            g.node.append(_node_proto(node))
        for v in self.model.graph.output:  # declared output shapes may pin the batch size; let inference decide
            g.output.append(onnx.helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None))
        self.shapes: dict[str, list | None] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(m, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # inference is best effort: converters cope with unknown shapes
            inferred = m
        for graph in _all_graphs(inferred.graph):
            for v in list(graph.value_info) + list(graph.input) + list(graph.output):
                dims = _dims(v.type)
                if dims is not None:
                    self.shapes[v.name] = dims
        for name, dims in self.input_shapes.items():
            if dims is not None:
                self.shapes[name] = list(dims)

    # ---------------------------------------------------------------- folding
    def _fold(self) -> None:
        kept: list[OnnxNode] = []
        queue = deque(self.nodes)
        while queue:
            node = queue.popleft()
            if node.domain == "" and node.op_type == "Constant":
                self.consts[node.outputs[0]] = self._constant_value(node)
            elif node.domain == "" and node.op_type == "If":
                if self.const(node.inputs[0]) is None:
                    kept.append(node)  # the condition may become constant once more shapes are known
                else:
                    queue.extendleft(reversed(self._inline_if(node)))
            elif not self._fold_constant(node) and not self._fold_partial(node):
                if node.op_type == "Reshape" and node.domain == "":
                    self._rewrite_reshape_target(node)
                kept.append(node)
        self.nodes = kept

    def _constant_value(self, node: OnnxNode) -> np.ndarray:
        a = node.attrs
        if "value" in a:
            return np.asarray(a["value"])
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                           ("value_int", np.int64), ("value_ints", np.int64)):
            if key in a:
                return np.asarray(a[key], dtype=dtype)
        raise node.error(f"unsupported Constant attribute(s) {sorted(a)}")

    def _inline_if(self, node: OnnxNode) -> list[OnnxNode]:
        cond = self.const(node.inputs[0])
        self._rewrites += 1
        branch = node.attrs["then_branch" if bool(np.asarray(cond).reshape(-1)[0]) else "else_branch"]
        for t in branch.initializer:
            self.consts[t.name] = numpy_helper.to_array(t)
        nodes = [self._node(n, i) for i, n in enumerate(branch.node)]
        for n in nodes:
            n.name = f"{node.name}/{n.name}"
            if not (n.domain == "" and n.op_type in FOLDED_OPS):
                self._converter(n)
        for i, (out, target) in enumerate(zip(branch.output, node.outputs)):
            nodes.append(OnnxNode(f"{node.name}/out{i}", "Identity", [out.name], [target], {}, "", self.opsets.get("", 1)))
        return nodes

    def _fold_constant(self, node: OnnxNode) -> bool:
        """Evaluate a node whose inputs are all constants (using its converter); True if folded."""
        present = [v for v in node.inputs if v]
        if not all(v in self.consts for v in present):
            return False
        converted = self._convert(node)
        module = converted.module
        if converted.pre is not None or converted.post or any(True for _ in module.parameters()):
            return False  # a weighted layer fed by a constant stays a layer
        args = [torch.from_numpy(np.array(self.consts[v])) if v else None for v in converted.inputs]
        module.eval()
        try:
            with torch.no_grad():
                out = module(*args)
        except Exception as e:
            raise node.error(f"cannot evaluate on its constant inputs: {_one_line(e)}") from None
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for name, value in zip(node.outputs, outs):
            if name:
                self.consts[name] = value.numpy()
        if node.op_type in _LAYOUT_OPS and present:
            self.origins[node.outputs[0]] = self.origin(node.inputs[0])
        return True

    def _fold_partial(self, node: OnnxNode) -> bool:
        """Track int vectors with some statically known entries (Shape of a tensor with a dynamic batch,
        and Gather/Slice/Concat/Unsqueeze/Squeeze/Cast of those). Returns True if the value became a constant."""
        if node.domain != "":
            return False
        op, ins = node.op_type, node.inputs
        result = None  # (entries, is_scalar, dtype); an entry is an int or ("dim", value, axis, dim_param)
        if op == "Shape":
            dims = self.shape(ins[0])
            if dims is not None:
                start, end = int(node.attrs.get("start", 0)), node.attrs.get("end")
                entries = [d if isinstance(d, int) else ("dim", ins[0], i, d) for i, d in enumerate(dims)]
                result = (entries[start:int(end) if end is not None else None], False, np.dtype(np.int64))
        elif op == "Gather" and ins[0] in self.partial and self.const(ins[1]) is not None and int(node.attrs.get("axis", 0)) == 0:
            entries, _, dtype = self.partial[ins[0]]
            idx = np.asarray(self.const(ins[1]))
            try:
                picked = [entries[int(i)] for i in idx.reshape(-1)]
            except IndexError:
                return False
            result = (picked, idx.ndim == 0, dtype)
        elif op in ("Cast", "Identity") and ins[0] in self.partial:
            entries, is_scalar, dtype = self.partial[ins[0]]
            if op == "Cast":
                dtype = np.dtype(torch.empty(0, dtype=torch_dtype(int(node.attrs["to"]))).numpy().dtype)
                if dtype.kind not in "iu":
                    return False
            result = (entries, is_scalar, dtype)
        elif op in ("Unsqueeze", "Squeeze") and ins[0] in self.partial:
            entries, is_scalar, dtype = self.partial[ins[0]]
            axes = node.attrs.get("axes") if "axes" in node.attrs else (self.const(node.input(1)) if node.input(1) else None)
            axes = None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
            if op == "Unsqueeze" and is_scalar and axes in ([0], [-1]):
                result = (entries, False, dtype)
            elif op == "Squeeze" and not is_scalar and len(entries) == 1 and axes in (None, [0], [-1]):
                result = (entries, True, dtype)
        elif op == "Concat" and any(v in self.partial for v in ins):
            entries, dtype = [], np.dtype(np.int64)
            for v in ins:
                if v in self.partial and not self.partial[v][1]:
                    entries += self.partial[v][0]
                    dtype = self.partial[v][2]
                elif self.const(v) is not None and np.ndim(self.const(v)) == 1:
                    entries += [int(x) for x in self.const(v)]
                else:
                    return False
            result = (entries, False, dtype)
        elif op == "Slice" and ins[0] in self.partial and not self.partial[ins[0]][1]:
            entries, _, dtype = self.partial[ins[0]]
            if node.opset < 10:
                starts, ends, axes, steps = node.attrs.get("starts"), node.attrs.get("ends"), node.attrs.get("axes"), None
            else:
                starts, ends, axes, steps = (self.const(node.input(i)) if node.input(i) else None for i in range(1, 5))
                if (node.input(1) and starts is None) or (node.input(2) and ends is None) or \
                        (node.input(3) and axes is None) or (node.input(4) and steps is None):
                    return False
            if starts is None or ends is None or np.size(starts) != 1:
                return False
            if axes is not None and int(np.asarray(axes).reshape(-1)[0]) not in (0, -1):
                return False
            step = int(np.asarray(steps).reshape(-1)[0]) if steps is not None else 1
            s, e = int(np.asarray(starts).reshape(-1)[0]), int(np.asarray(ends).reshape(-1)[0])
            if step != 1:
                return False
            result = (entries[s:e], False, dtype)  # for step 1, Python slicing clamps like ONNX
        if result is None:
            return False
        entries, is_scalar, dtype = result
        name = node.outputs[0]
        if all(isinstance(e, int) for e in entries):
            value = np.array(entries, dtype=dtype)
            self.consts[name] = value.reshape(()) if is_scalar else value
            return True
        self.partial[name] = result
        return False

    def _rewrite_reshape_target(self, node: OnnxNode) -> None:
        """Make a Reshape target constant where the dynamic entries are copies of the input's dims
        (x.view(x.size(0), -1) chains), and stop constant targets from pinning a formerly fixed batch size."""
        target_name = node.input(1)
        if not target_name:
            return
        allowzero = bool(node.attrs.get("allowzero", 0))
        data_dims = self.shape(node.inputs[0])
        if target_name in self.partial:
            entries = self.partial[target_name][0]
            literal_zero = any(e == 0 for e in entries if isinstance(e, int))
            new, copies = [], False
            for i, e in enumerate(entries):
                if isinstance(e, int):
                    new.append(e)
                    continue
                _, src, axis, param = e
                same = axis == i and (src == node.inputs[0] or (
                    param is not None and data_dims is not None and i < len(data_dims) and data_dims[i] == param))
                copy = same and not (allowzero and literal_zero)
                copies |= copy
                new.append(0 if copy else None)
            if new.count(None) == 1 and -1 not in new:
                new[new.index(None)] = -1
            if None in new:
                return
        elif self.batch_made_dynamic is not None and target_name in self.consts:
            target = [int(v) for v in np.asarray(self.consts[target_name]).reshape(-1)]
            # the data's first dimension is the (now dynamic) batch: "N", or a symbol inference made up
            # for it downstream of an earlier rewritten Reshape ("unk__0")
            if not (target and target[0] == self.batch_made_dynamic and data_dims and not isinstance(data_dims[0], int)):
                return
            rest = data_dims[1:]
            if -1 not in target[1:] and not (all(isinstance(d, int) for d in rest) and math.prod(target[1:]) == math.prod(rest)):
                return
            if allowzero and 0 in target[1:]:
                if -1 in target[1:]:
                    return
                new, copies = [-1] + target[1:], False
            else:
                new, copies = [0] + target[1:], True
        else:
            return
        name = self._fresh(f"{node.name}_target")
        self.consts[name] = np.array(new, dtype=np.int64)
        node.inputs[1] = name
        self._rewrites += 1
        if copies:
            node.attrs["allowzero"] = 0

    def _remove_dead(self) -> None:
        live = set(self.output_names)
        kept = []
        for node in reversed(self.nodes):
            if any(o in live for o in node.outputs if o):
                kept.append(node)
                live.update(v for v in node.inputs if v)
        self.nodes = kept[::-1]
        for node in self.nodes:
            outs = [o if o in live else "" for o in node.outputs]
            while len(outs) > 1 and outs[-1] == "":
                outs.pop()
            node.outputs = outs

    # ---------------------------------------------------------------- fusions
    def _index(self):
        producer = {o: n for n in self.nodes for o in n.outputs if o}
        consumers = defaultdict(list)
        for n in self.nodes:
            for v in dict.fromkeys(v for v in n.inputs if v):
                consumers[v].append(n)
        return producer, consumers

    def _fuse_matmul_add(self) -> None:
        """x @ W + b with constant W (2-D) and b -> a MatMul node with the bias as a third input."""
        producer, consumers = self._index()
        outputs = set(self.output_names)
        dropped = set()
        for mm in self.nodes:
            if mm.op_type != "MatMul" or mm.domain or len(mm.inputs) != 2:
                continue
            w = self.const(mm.inputs[1])
            out = mm.outputs[0]
            if w is None or w.ndim != 2 or out in outputs or len(consumers[out]) != 1:
                continue
            add = consumers[out][0]
            if add.op_type != "Add" or add.domain or add.opset < 7 or add.inputs.count(out) != 1:
                continue
            other = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
            b = self.const(other)
            out_shape = self.shape(out)
            if b is None or b.size != w.shape[1] or (b.ndim > 1 and any(d != 1 for d in b.shape[:-1])):
                continue
            if b.ndim > 1 and (out_shape is None or b.ndim > len(out_shape)):
                continue  # the bias would add dimensions
            mm.inputs = [mm.inputs[0], mm.inputs[1], other]
            mm.outputs = list(add.outputs)
            dropped.add(id(add))
        self.nodes = [n for n in self.nodes if id(n) not in dropped]

    def _fuse_lrn(self) -> None:
        producer, consumers = self._index()
        removed, replaced = set(), {}
        for div in self.nodes:
            if div.op_type == "Div" and not div.domain and id(div) not in removed:
                match = self._match_lrn(div, producer, consumers)
                if match is not None:
                    lrn, region = match
                    removed |= {id(n) for n in region}
                    replaced[id(div)] = lrn
        self.nodes = [replaced.get(id(n), n) for n in self.nodes if id(n) not in removed or id(n) in replaced]

    _LRN_PATH_OPS = {"Reshape", "Unsqueeze", "Squeeze", "Pad", "AveragePool", "Identity"}
    _LRN_SHAPE_OPS = {"Shape", "Gather", "Concat", "Cast", "Slice", "Unsqueeze", "Squeeze", "Identity",
                      "ConstantOfShape", "Reshape", "Transpose"}

    def _match_lrn(self, div: OnnxNode, producer, consumers):
        """Recognise y = x / (k + alpha * avg_c(x^2))^beta as the exporters decompose LocalResponseNorm
        (square -> reshape/unsqueeze to [N,1,C,...] -> Pad on C -> AveragePool [n,1,..] -> back to x's shape)."""
        outputs = set(self.output_names)

        def single_use(v):
            return v not in outputs and len(consumers.get(v, [])) == 1

        def split_const(node, op):
            if node is None or node.op_type != op or node.domain or len(node.inputs) != 2:
                return None, None
            a, b = node.inputs
            if self._scalar(b) is not None:
                return self._scalar(b), a
            if self._scalar(a) is not None and op != "Pow":
                return self._scalar(a), b
            return None, None

        if len(div.inputs) != 2:
            return None
        x, p = div.inputs
        pw = producer.get(p)
        beta, a = split_const(pw, "Pow")
        if beta is None or not single_use(p):
            return None
        add = producer.get(a)
        k, m = split_const(add, "Add")
        if k is None or not single_use(a):
            return None
        mul = producer.get(m)
        alpha, s = split_const(mul, "Mul")
        if alpha is None or not single_use(m):
            return None
        # the region computing s from x (and constants)
        region, stack = {}, [s]
        while stack:
            v = stack.pop()
            if not v or v == x or v in self.consts:
                continue
            node = producer.get(v)
            if node is None or node.domain or node.op_type not in (self._LRN_PATH_OPS | self._LRN_SHAPE_OPS | {"Mul", "Pow"}):
                return None
            if id(node) not in region:
                region[id(node)] = node
                stack.extend(node.inputs)
        for node in region.values():
            for o in node.outputs:
                if o and (o in outputs or any(id(c) not in region and not (o == s and c is mul) for c in consumers.get(o, []))):
                    return None
        # the data path: s back to the square of x along first inputs
        path, v = [], s
        while True:
            node = producer.get(v)
            if node is None or id(node) not in region:
                return None
            if node.op_type == "Mul" and node.inputs == [x, x] or (
                    node.op_type == "Pow" and node.inputs[0] == x and self._scalar(node.input(1)) == 2.0):
                square = node
                break
            if node.op_type not in self._LRN_PATH_OPS:
                return None
            path.append(node)
            v = node.inputs[0]
        path_ids = {id(n) for n in path}
        for node in region.values():
            if node is not square and x in node.inputs and node.op_type != "Shape":
                return None
            if node is not square and id(node) not in path_ids and node.op_type not in self._LRN_SHAPE_OPS:
                return None
        pools = [n for n in path if n.op_type == "AveragePool"]
        pads = [n for n in path if n.op_type == "Pad"]
        if len(pools) != 1 or len(pads) != 1 or pools[0].inputs[0] != pads[0].outputs[0]:
            return None
        pool, pad = pools[0], pads[0]
        kernel = [int(v) for v in pool.attrs.get("kernel_shape", [])]
        size = kernel[0] if kernel else 0
        if size < 1 or any(v != 1 for v in kernel[1:]) or any(v != 1 for v in pool.attrs.get("strides", [1])) \
                or any(pool.attrs.get("pads", [0])) or pool.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "") \
                or any(v != 1 for v in pool.attrs.get("dilations", [1])):
            return None
        if pad.attrs.get("mode", "constant") != "constant" or pad.input(3):
            return None
        pad_amounts = pad.attrs.get("pads") if pad.opset < 11 else self.const(pad.input(1))
        fill = pad.attrs.get("value", 0.0) if pad.opset < 11 else (self._scalar(pad.input(2)) if pad.input(2) else 0.0)
        if pad_amounts is None or fill != 0.0:
            return None
        pad_amounts = [int(v) for v in np.asarray(pad_amounts).reshape(-1)]
        rank = len(pad_amounts) // 2
        begin, end = pad_amounts[:rank], pad_amounts[rank:]
        if rank < 3 or any(begin[i] or end[i] for i in range(rank) if i != 2):
            return None
        if begin[2] != (size - 1) // 2 or end[2] != size // 2:
            return None  # not ONNX's window (torch centres even sizes differently): keep the ops as they are
        xs, ps, ss = self.shape(x), self.shape(pad.inputs[0]), self.shape(s)
        if xs is None or ps is None or ss is None or len(ps) != rank or len(xs) < 3 or len(ss) != len(xs):
            return None
        if ps[1] != 1 or not isinstance(xs[1], int) or ps[2] != xs[1] or ss[1:] != xs[1:]:
            return None
        if all(isinstance(d, int) for d in ps[3:] + xs[2:]) and math.prod(ps[3:]) != math.prod(xs[2:]):
            return None
        lrn = OnnxNode(div.name, "LRN", [x], [div.outputs[0]],
                       {"size": size, "alpha": alpha, "beta": beta, "bias": k}, "", self.opsets.get("", 1))
        return lrn, list(region.values()) + [mul, add, pw, div]

    # ---------------------------------------------------------------- building
    def _build(self) -> Network:
        converted = [(node, self._convert(node)) for node in self.nodes]
        keys: set[str] = set()

        def unique(base: str) -> str:
            base = safe_key(base)
            key, i = base, 1
            while key in keys:
                key, i = f"{base}_{i}", i + 1
            keys.add(key)
            return key

        names = {}
        for node, c in converted:  # layers first, so they get their clean names
            if is_layer(c.module):
                names[id(node)] = unique(self._layer_name(c.name_hints, node))
        for node, c in converted:
            if id(node) not in names:
                names[id(node)] = unique(_node_label(node))
        nodes, modules, used_consts = [], {}, set()
        for node, c in converted:
            key = names[id(node)]
            inputs = list(c.inputs)
            if c.pre is not None:
                pre_key, padded = unique(f"{key}_pad"), self._fresh(f"{key}_padded")
                nodes.append(Node(pre_key, "Pad", [inputs[0]], [padded]))
                modules[pre_key] = c.pre
                inputs[0] = padded
            used_consts.update(v for v in inputs if v in self.consts)
            attrs = {k: v for k, v in node.attrs.items() if not isinstance(v, onnx.GraphProto)}
            steps = [(key, node.op_type, c.module, attrs)]  # the node, then its fused ops (Converted.post)
            steps += [(unique(f"{key}_{op.lower()}"), op, module, {}) for op, module in c.post]
            for i, (step_key, op, module, step_attrs) in enumerate(steps):
                last = i == len(steps) - 1
                outputs = list(node.outputs) if last else [self._fresh(f"{step_key}_out")]
                nodes.append(Node(step_key, op, inputs, outputs, step_attrs))
                modules[step_key] = module
                inputs = outputs
        used_consts.update(v for v in self.output_names if v in self.consts)
        constants = {v: torch.tensor(np.asarray(self.consts[v])) for v in sorted(used_consts)}
        output_shapes = {}
        for out in self.model.graph.output:  # as declared (batch made dynamic), else as inferred
            dims = _dims(out.type)
            if dims and self.batch_made_dynamic is not None and dims[0] == self.batch_made_dynamic:
                dims[0] = "N"
            dims = dims if dims is not None else self.shape(out.name)
            if dims is not None:
                output_shapes[out.name] = list(dims)
        dtypes = {v.name: torch_dtype(v.type.tensor_type.elem_type) for v in self.graph_inputs}
        try:
            net = Network(nodes, modules, constants, self.input_names, self.output_names,
                              {k: v for k, v in self.input_shapes.items() if v is not None}, dtypes, output_shapes,
                              name=self.model.graph.name or "graph")
        except ValueError as e:
            raise ModelFormatError(f"{self.label}: {e}") from None
        net.eval()
        return net

    def _layer_name(self, hints: list[str], node: OnnxNode) -> str:
        """The weight's initializer name without its suffix (ip1.weight -> ip1, conv1_w_0 -> conv1), else the
        node's name, else an initializer name as it is."""
        for hint in hints:
            if hint and not _AUTO_VALUE.match(hint) and _WEIGHT_SUFFIX.search(hint):
                stripped = _WEIGHT_SUFFIX.sub("", hint)
                if stripped:
                    return stripped
        label = _node_label(node)
        if not _AUTO_NODE.match(label):
            return label
        for hint in hints:
            if hint and not _AUTO_VALUE.match(hint):
                return hint
        return label


def _node_label(node: OnnxNode) -> str:
    """A readable key for a node: the module path of torch's legacy names ("/fc6/Gemm" -> "fc6"),
    dynamo's names without the "node_" prefix, else the node name."""
    name = node.name
    if name.startswith("/"):
        parts = [p for p in name.split("/") if p]
        if len(parts) > 1:
            return "_".join(parts[:-1])
    if name.startswith("node_") and len(name) > 5:
        return name[5:]
    return name or node.op_type.lower()


def _node_proto(node: OnnxNode) -> onnx.NodeProto:
    """A NodeProto for shape inference (attributes that cannot be re-encoded are left out)."""
    proto = onnx.helper.make_node(node.op_type, node.inputs, node.outputs, name=node.name, domain=node.domain or None)
    for key, value in node.attrs.items():
        try:
            if isinstance(value, np.ndarray):
                value = numpy_helper.from_array(value)
            proto.attribute.append(onnx.helper.make_attribute(key, value))
        except (ValueError, TypeError):
            pass
    return proto


def _all_graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)
