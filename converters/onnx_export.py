"""Network -> ONNX (our own emitter), and plain torch modules -> ONNX (torch.onnx.export).

`export_onnx` walks the graph and calls, for each node, the emitter registered for its module's
type (converters/ops: `@register_emitter(nn.Linear)`); emitters build nodes and initializers through
an `ExportContext`. Value shapes are traced by running the net,
so emitters can ask for ranks (e.g. Linear -> Gemm on 2-D input, MatMul + Add otherwise).
Shapes come from one run on zero inputs of batch size 1.
"""
from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import helper, numpy_helper

from converters.errors import ModelFormatError, ToolchainError
from converters.fileio import atomic_write_bytes

from . import ops as _ops  # noqa: F401  (registers the emitters)
from .ir import Network
from .ops.registry import MAX_OPSET, find_emitter, onnx_dtype

__all__ = ["ExportContext", "export_onnx", "torch_to_onnx", "MIN_EXPORT_OPSET"]

log = logging.getLogger(__name__)

MIN_EXPORT_OPSET = 13


class ExportContext:
    """What an emitter gets: builders for nodes and initializers, and what is known about values."""

    def __init__(self, opset: int, reserved: set[str], shapes: dict[str, list], dtypes: dict[str, torch.dtype],
                 constants: dict[str, torch.Tensor], options: dict | None = None):
        self.opset = opset  # the default-domain opset being written
        self.options = dict(options or {})  # emitter options given to export_onnx (e.g. form="fast")
        self.model = onnx.ModelProto()
        self.graph = self.model.graph  # initializers are written straight into it (no copies of big tensors)
        self.nodes: list[onnx.NodeProto] = []
        self.opsets: dict[str, int] = {"": opset}
        self._values = set(reserved)
        self._node_names: set[str] = set()
        self._shapes, self._dtypes, self._constants = shapes, dtypes, constants
        self.metadata: dict[str, str] = {}  # written to the model's metadata_props (e.g. how to re-import a layer)

    # ------------------------------------------------------------------ builders
    def fresh(self, name: str) -> str:
        """A value name not used anywhere in the graph yet (`name`, else `name_1`, ...); reserves it."""
        candidate, i = name, 1
        while candidate in self._values:
            candidate, i = f"{name}_{i}", i + 1
        self._values.add(candidate)
        return candidate

    def add_initializer(self, name: str, array) -> str:
        """Add a constant tensor; returns its (made unique) value name."""
        return self._initializer(self.fresh(name), array)

    def _initializer(self, name: str, array) -> str:
        arr = np.asarray(array)
        tensor = self.graph.initializer.add()
        if arr.dtype.kind in "fiub" and arr.dtype.itemsize > 0 and arr.dtype.byteorder in "=|<":
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            tensor.dims.extend(arr.shape)
            tensor.raw_data = np.ascontiguousarray(arr).tobytes()
        else:
            tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def add_node(self, op_type: str, inputs, outputs, name: str | None = None, domain: str = "", **attrs) -> onnx.NodeProto:
        """Append a node; attributes given as None are omitted. Node names are made unique."""
        base = name or op_type
        node_name, i = base, 1
        while node_name in self._node_names:
            node_name, i = f"{base}_{i}", i + 1
        self._node_names.add(node_name)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        node = helper.make_node(op_type, list(inputs), list(outputs), name=node_name, domain=domain or None, **attrs)
        self._values.update(o for o in outputs if o)
        self.nodes.append(node)
        if domain:
            self.opsets.setdefault(domain, 1)
        return node

    def require_opset(self, domain: str, version: int) -> None:
        """Declare that the model needs `domain` at `version` or later (custom-op domains)."""
        if domain in ("", "ai.onnx"):
            if version > self.opset:
                raise ToolchainError(f"this model needs opset >= {version}; export with a higher opset")
            return
        self.opsets[domain] = max(self.opsets.get(domain, 1), version)

    def tensor(self, array, name: str = "") -> onnx.TensorProto:
        """A TensorProto, for tensor-valued attributes."""
        return numpy_helper.from_array(np.ascontiguousarray(np.asarray(array)), name)

    def error(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"cannot export: {message}")

    # ------------------------------------------------------------------ what is known
    def shape(self, value: str) -> list[int | str | None] | None:
        """Shape of a graph value as traced with batch size 1 (so dim 0 reads 1); None if unknown."""
        if value in self._constants:
            return list(self._constants[value].shape)
        return self._shapes.get(value)

    def rank(self, value: str) -> int | None:
        shape = self.shape(value)
        return None if shape is None else len(shape)

    def dtype(self, value: str) -> np.dtype | None:
        t = self._constants[value].dtype if value in self._constants else self._dtypes.get(value)
        if t is None:
            return None
        try:
            return torch.empty(0, dtype=t).numpy().dtype
        except TypeError:  # bfloat16 has no numpy dtype
            return None

    def const(self, value: str) -> np.ndarray | None:
        """The value of a graph constant (Network.consts), else None."""
        t = self._constants.get(value)
        return None if t is None else t.detach().cpu().numpy()


def _trace(net: Network) -> tuple[dict[str, list], dict[str, torch.dtype]]:
    """Shapes and dtypes of all values, from running the net on zero inputs of batch size 1."""
    for name in net.input_names:
        dims = net.input_shapes.get(name)
        if dims is None or not all(isinstance(d, int) for d in dims[1:]):
            return {}, {}
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    inputs = [torch.zeros([d if isinstance(d, int) else 1 for d in net.input_shapes[name]],
                          dtype=net.input_dtypes.get(name, torch.float32), device=device) for name in net.input_names]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            values = net.run(*inputs)
    except Exception as e:  # emitters then work without shapes
        log.debug("shape tracing failed: %s", e)
        return {}, {}
    finally:
        net.train(was_training)
    shapes = {k: list(v.shape) for k, v in values.items() if isinstance(v, torch.Tensor)}
    dtypes = {k: v.dtype for k, v in values.items() if isinstance(v, torch.Tensor)}
    return shapes, dtypes


def _output_dims(traced: list | None, declared: list | None) -> list | None:
    """Traced output dims (batch 1) with the batch dim "N" and other dims the model named symbolically kept."""
    if traced is None:
        return declared
    dims = list(traced)
    if declared is not None and len(declared) == len(dims):
        dims = [d if isinstance(d, str) and not d.startswith("unk__") else t for t, d in zip(traced, declared)]
    if dims:
        dims[0] = "N"
    return dims


def _value_info(name: str, dtype: torch.dtype, dims: list | None) -> onnx.ValueInfoProto:
    if dims is None:
        return helper.make_tensor_value_info(name, onnx_dtype(dtype), None)
    shape = [d if isinstance(d, int) else (d if isinstance(d, str) else ("N" if i == 0 else None)) for i, d in enumerate(dims)]
    return helper.make_tensor_value_info(name, onnx_dtype(dtype), shape)


def export_onnx(net: Network, path: str | os.PathLike | None = None, opset: int = 17, *,
                check: bool = True, producer: tuple[str, str] = ("converters", ""),
                metadata: dict[str, str] | None = None, **options) -> onnx.ModelProto:
    """Write `net` as an ONNX model (atomically to `path`, if given) and return it.

    Every node's module is written by the emitter registered for its type; a module type without
    one raises ModelFormatError. The result passes onnx.checker (full_check) unless check=False.
    `producer` is (name, version); `metadata` entries join the emitters' records in `metadata_props`.
    Extra keyword `options` reach the emitters as `ctx.options`.
    """
    if not MIN_EXPORT_OPSET <= opset <= MAX_OPSET:
        raise ToolchainError(f"export opset must be between {MIN_EXPORT_OPSET} and {MAX_OPSET}, not {opset}")
    shapes, dtypes = _trace(net)
    constants = {v: net.constant(v) for v in net.const_keys}
    ctx = ExportContext(opset, net.value_names(), shapes, dtypes, constants, options)
    written: set[str] = set()

    def write_const(value: str) -> None:
        if value in constants and value not in written:
            ctx._initializer(value, constants[value].detach().cpu().numpy())
            written.add(value)

    for node in net.nodes:
        for v in node.inputs:
            write_const(v)
        module = net.ops[node.name]
        emitter = find_emitter(module)
        if emitter is None:
            raise ModelFormatError(f"cannot export node {node.name!r}: no ONNX emitter registered for "
                                   f"{type(module).__module__}.{type(module).__qualname__}")
        emitter(ctx, node.name, module, list(node.inputs), list(node.outputs))
    for v in net.output_names:
        write_const(v)

    inputs = [_value_info(n, net.input_dtypes.get(n, torch.float32), net.input_shapes.get(n)) for n in net.input_names]
    outputs = []
    for n in net.output_names:
        dtype = dtypes.get(n) or (constants[n].dtype if n in constants else torch.float32)
        outputs.append(_value_info(n, dtype, _output_dims(shapes.get(n), net.output_shapes.get(n))))
    if any(not o.type.tensor_type.HasField("shape") for o in outputs):
        outputs = _infer_output_types(ctx, inputs, outputs)
    model, graph = ctx.model, ctx.graph
    graph.name = net.graph_name or "graph"
    graph.node.extend(ctx.nodes)
    graph.input.extend(inputs)
    graph.output.extend(outputs)
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in ctx.opsets.items())
    model.producer_name, model.producer_version = producer
    for key, value in sorted({**ctx.metadata, **(metadata or {})}.items()):
        model.metadata_props.add(key=key, value=value)
    model.ir_version = max(7, helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    data = _serialize(model)
    if check:
        try:
            onnx.checker.check_model(data, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise ModelFormatError(f"exported model fails the ONNX checker: {' '.join(str(e).split())[:400]}") from None
    if path is not None:
        atomic_write_bytes(path, data)
    return model


def _infer_output_types(ctx: ExportContext, inputs, outputs) -> list[onnx.ValueInfoProto]:
    """Output types by ONNX shape inference, for outputs whose shape tracing did not find (the checker needs one)."""
    m = onnx.ModelProto()
    m.graph.node.extend(ctx.nodes)
    m.graph.input.extend(inputs)
    m.graph.output.extend(outputs)
    for t in ctx.graph.initializer:  # types only: shape inference does not need big tensors' data
        if np.prod(t.dims) <= 1024:
            m.graph.initializer.append(t)
        else:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.opset_import.extend(helper.make_opsetid(d, v) for d, v in ctx.opsets.items())
    m.ir_version = max(7, helper.find_min_ir_version_for(list(m.opset_import), ignore_unknown=True))
    try:
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(m, data_prop=True).graph.output}
    except Exception as e:
        raise ModelFormatError(f"cannot export: output shapes unknown ({' '.join(str(e).split())[:200]})") from None
    result = []
    for o in outputs:
        if not o.type.tensor_type.HasField("shape") and o.name in inferred and inferred[o.name].type.tensor_type.HasField("shape"):
            o = inferred[o.name]
        result.append(o)
    return result


def _serialize(model: onnx.ModelProto) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError as e:  # over protobuf's 2 GB message limit
        raise ModelFormatError(f"cannot serialize the model ({e}); a single ONNX protobuf file is limited to 2 GB") from None


# --------------------------------------------------------------------------- torch -> ONNX
def torch_to_onnx(module: nn.Module, sample_input, path: str | os.PathLike | None = None, *,
                  input_names: tuple[str, ...] = ("data",), output_names: tuple[str, ...] = ("output",),
                  opset: int | None = None, dynamic_batch: bool = True) -> onnx.ModelProto:
    """Export a plain torch module (e.g. a zoo nn.Sequential) with torch.onnx.export (dynamo exporter),
    batch dimension dynamic ("N"), as one self-contained file written atomically to `path`.

    Initializers holding a parameter or buffer are named after it (`ip1.weight`; `fc.weight.T` for a
    transposed copy), so importing the file gives layers named like the module's children.
    """
    sample = tuple(sample_input) if isinstance(sample_input, (tuple, list)) else (sample_input,)
    if dynamic_batch:  # a batch of 1 would be specialised away by torch.export
        sample = tuple(torch.cat([x, x]) if x.dim() and x.shape[0] == 1 else x for x in sample)
    kwargs = {"dynamo": True, "input_names": list(input_names), "output_names": list(output_names), "verbose": False}
    if dynamic_batch:
        batch = torch.export.Dim("N")
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in sample)
    if opset is not None:
        kwargs["opset_version"] = opset
    was_training = module.training
    module.eval()
    onnx_log = logging.getLogger("torch.onnx")  # quiet the exporter's notes (e.g. torchvision ops not registered)
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch.export
            program = torch.onnx.export(module, sample, **kwargs)
    finally:
        onnx_log.setLevel(level)
        module.train(was_training)
    model = program.model_proto
    _name_initializers_after_parameters(model, module)
    onnx.checker.check_model(model)
    if path is not None:
        atomic_write_bytes(path, _serialize(model))
    return model


def _name_initializers_after_parameters(model: onnx.ModelProto, module: nn.Module) -> None:
    tensors = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    taken = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input} | \
            {o for n in model.graph.node for o in n.output}
    renames = {}
    for init in model.graph.initializer:
        if init.name in tensors:
            continue
        dims = tuple(init.dims)
        for key, value in tensors.items():
            for candidate, arr in ((key, value), (f"{key}.T", value.T if value.ndim == 2 else None)):
                if arr is None or candidate in taken or tuple(arr.shape) != dims:
                    continue
                if np.array_equal(numpy_helper.to_array(init), arr):
                    renames[init.name] = candidate
                    taken.add(candidate)
                    break
            if init.name in renames:
                break
    if not renames:
        return
    for init in model.graph.initializer:
        if init.name in renames:
            init.name = renames[init.name]
    for node in model.graph.node:
        for i, v in enumerate(node.input):
            if v in renames:
                node.input[i] = renames[v]
    for vi in list(model.graph.input) + list(model.graph.value_info):
        if vi.name in renames:
            vi.name = renames[vi.name]
