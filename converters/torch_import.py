"""A user's own torch.nn.Module as a Network, sharing its modules: the format layer for PyTorch.

    net = from_module(model, example_input)      # torch.fx traces model.forward once
    net.layers()                                 # {"fc1": model.fc1, "features_0": model.features[0], ...}
    net.replace_layer("fc1", pruned)             # swaps model.fc1 too: the user's module stays the one trained

Every call_module node keeps the user's module object (so training the user's model trains the
Network's layers and the other way round); each function or method call (F.relu, torch.flatten,
x.view(x.size(0), -1), +, ...) becomes one of the converter modules, so the Network can be
exported with the ONNX emitters and its dataflow (which layer feeds which, which dropout follows a
layer) is known to the compression passes. Layer names are the module paths with dots made
underscores (`features.0` -> `features_0`).

What torch.fx cannot trace (data-dependent control flow) or a function without a converter here is
a ModelFormatError naming it.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import ModelFormatError
from .ir import Network, Node, safe_key
from .ops.elementwise import Binary, Softmax
from .ops.pooling import Pool
from .ops.registry import find_emitter
from .ops.shape import Concat, Flatten, Reshape
from .registry import Registry

__all__ = ["from_module", "FX_FUNCTIONS"]

# ONNX-style op names for the modules users write, so graph walks (dead-unit surgery, dropout
# adjustment) read them as they read imported nodes.
_MODULE_OPS = {nn.Linear: "Gemm", nn.Conv2d: "Conv", nn.ReLU: "Relu", nn.MaxPool2d: "MaxPool", nn.AvgPool2d: "AveragePool",
               nn.Flatten: "Flatten", nn.Dropout: "Dropout", nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh",
               nn.BatchNorm1d: "BatchNormalization", nn.BatchNorm2d: "BatchNormalization", nn.Identity: "Identity"}

# fx target (function, or method name) -> fn(args, kwargs) -> (module, op_type, tensor args kept)
FunctionConverter = Callable[[tuple, dict], tuple[nn.Module, str, list]]
FX_FUNCTIONS: Registry[FunctionConverter] = Registry("torch function converter")


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


@FX_FUNCTIONS.register(F.relu, torch.relu, "relu")
def _relu(args, kwargs):
    return nn.ReLU(), "Relu", [args[0]]


@FX_FUNCTIONS.register(torch.sigmoid, F.sigmoid, "sigmoid")
def _sigmoid(args, kwargs):
    return nn.Sigmoid(), "Sigmoid", [args[0]]


@FX_FUNCTIONS.register(torch.tanh, F.tanh, "tanh")
def _tanh(args, kwargs):
    return nn.Tanh(), "Tanh", [args[0]]


@FX_FUNCTIONS.register(torch.flatten, "flatten")
def _flatten(args, kwargs):
    start, end = _arg(args, kwargs, 1, "start_dim", 0), _arg(args, kwargs, 2, "end_dim", -1)
    if end != -1:
        raise ValueError("flatten with end_dim other than -1")
    return Flatten(start), "Flatten", [args[0]]


@FX_FUNCTIONS.register("view", "reshape", torch.reshape)
def _reshape(args, kwargs):
    x, dims = args[0], list(args[1:])
    if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = list(dims[0])
    shape = []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            shape.append(d)
        elif _is_size_of(d, x, i):
            shape.append(0)  # ONNX Reshape: 0 copies the input's dimension i
        else:
            raise ValueError(f"reshape to a computed size ({d}) other than the input's own dimension {i}")
    return Reshape(shape), "Reshape", [x]


@FX_FUNCTIONS.register(F.max_pool2d, "max_pool2d")
def _max_pool2d(args, kwargs):
    k = _pair(_arg(args, kwargs, 1, "kernel_size"))
    s = _pair(_arg(args, kwargs, 2, "stride") or k)
    p = _pair(_arg(args, kwargs, 3, "padding", 0))
    d = _pair(_arg(args, kwargs, 4, "dilation", 1))
    return Pool("max", k, s, p + p, d, bool(_arg(args, kwargs, 5, "ceil_mode", False))), "MaxPool", [args[0]]


@FX_FUNCTIONS.register(F.avg_pool2d)
def _avg_pool2d(args, kwargs):
    k = _pair(_arg(args, kwargs, 1, "kernel_size"))
    s = _pair(_arg(args, kwargs, 2, "stride") or k)
    p = _pair(_arg(args, kwargs, 3, "padding", 0))
    pool = Pool("avg", k, s, p + p, [1, 1], bool(_arg(args, kwargs, 4, "ceil_mode", False)),
                count_include_pad=bool(_arg(args, kwargs, 5, "count_include_pad", True)))
    return pool, "AveragePool", [args[0]]


@FX_FUNCTIONS.register(F.dropout)
def _dropout(args, kwargs):
    return nn.Dropout(float(_arg(args, kwargs, 1, "p", 0.5))), "Dropout", [args[0]]


@FX_FUNCTIONS.register(F.log_softmax, "log_softmax")
def _log_softmax(args, kwargs):
    return Softmax(int(_arg(args, kwargs, 1, "dim")), log=True), "LogSoftmax", [args[0]]


@FX_FUNCTIONS.register(F.softmax, torch.softmax, "softmax")
def _softmax(args, kwargs):
    return Softmax(int(_arg(args, kwargs, 1, "dim"))), "Softmax", [args[0]]


@FX_FUNCTIONS.register(torch.cat)
def _cat(args, kwargs):
    return Concat(int(_arg(args, kwargs, 1, "dim", 0))), "Concat", list(args[0])


for _ops, _onnx in (((operator.add, torch.add, "add"), "Add"), ((operator.mul, torch.mul, "mul"), "Mul"),
                    ((operator.sub, torch.sub, "sub"), "Sub"), ((operator.truediv, torch.div, "div"), "Div")):
    FX_FUNCTIONS.register(*_ops)(lambda args, kwargs, _op=_onnx: (Binary(_op), _op, [args[0], args[1]]))


def _is_size_of(node, x, i: int) -> bool:
    """`node` is x.size(i), x.size()[i] or x.shape[i]."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method" and node.target == "size" and node.args[0] is x:
        return len(node.args) > 1 and node.args[1] == i
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == i:
        src = node.args[0]
        return isinstance(src, torch.fx.Node) and src.args[0] is x and (
            (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
            or (src.op == "call_method" and src.target == "size" and len(src.args) == 1))
    return False


def _is_shape_query(node: torch.fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "size") or (
        node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or (
        node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node)
        and _is_shape_query(node.args[0]))


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping as one node every module an ONNX emitter writes (compressed layers too)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return super().is_leaf_module(m, qualname) or find_emitter(m) is not None


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', repr(t))}".lstrip(".")


def from_module(module: nn.Module, example_input: torch.Tensor | tuple, input_names: tuple[str, ...] = ("input",),
                output_names: tuple[str, ...] = ("output",)) -> Network:
    """The Network computing `module`'s forward, bound to `module` (see the module docstring).

    `example_input` (a tensor or a tuple of tensors, batch first) gives the input shapes; the batch
    dimension is dynamic.
    """
    examples = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    try:
        tracer = _Tracer()
        gm = torch.fx.GraphModule(module, tracer.trace(module), type(module).__name__)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError)
        raise ModelFormatError(f"cannot trace {type(module).__name__}.forward with torch.fx "
                               f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    names: dict[torch.fx.Node, str] = {}
    nodes: list[Node] = []
    modules: dict[str, nn.Module] = {}
    constants: dict[str, torch.Tensor] = {}
    paths: dict[str, str] = {}
    inputs: list[str] = []
    outputs: list[str] = []

    def value(a, where: str) -> str:
        if isinstance(a, torch.fx.Node):
            return names[a]
        if isinstance(a, (int, float)):
            key = f"const_{len(constants)}"
            constants[key] = torch.tensor(a, dtype=torch.float32)
            return key
        raise ModelFormatError(f"{where}: argument {a!r} is neither a tensor nor a number")

    def unique(key: str) -> str:
        base, i = safe_key(key), 1
        key = base
        while key in modules:
            key, i = f"{base}_{i}", i + 1
        return key

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if len(inputs) >= len(examples):
                raise ModelFormatError(f"{type(module).__name__}.forward takes more inputs than the {len(examples)} example(s) given")
            names[n] = input_names[len(inputs)] if len(inputs) < len(input_names) else n.name
            inputs.append(names[n])
        elif n.op == "get_attr":
            names[n] = safe_key(n.target)
            constants[names[n]] = gm.get_parameter(n.target) if n.target in dict(gm.named_parameters()) \
                else gm.get_buffer(n.target)
        elif n.op == "output":
            outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
            outputs = [names[o] for o in outs]
        elif _is_shape_query(n):
            continue  # sizes are read only by the reshape converter, which turns them into Reshape's 0
        elif n.op == "call_module":
            sub = module.get_submodule(n.target)
            key = unique(n.target)
            op = next((v for k, v in _MODULE_OPS.items() if type(sub) is k), type(sub).__name__)
            if isinstance(sub, (nn.Linear, nn.Conv2d)):
                op = "Gemm" if isinstance(sub, nn.Linear) else "Conv"
            args = [value(a, key) for a in n.args]
            nodes.append(Node(key, op, args, [f"{key}_out"]))
            modules[key], paths[key], names[n] = sub, n.target, f"{key}_out"
        elif n.op in ("call_function", "call_method"):
            conv = FX_FUNCTIONS.get(n.target)
            if conv is None:
                raise ModelFormatError(f"{type(module).__name__}.forward calls {_target_name(n)}, which has no converter "
                                       f"(supported: {', '.join(sorted({_target_name_of(t) for t in FX_FUNCTIONS}))})")
            try:
                mod, op, args = conv(n.args, n.kwargs)
            except (ValueError, TypeError) as e:
                raise ModelFormatError(f"{type(module).__name__}.forward: {_target_name(n)}: {e}") from None
            key = unique(n.name)
            nodes.append(Node(key, op, [value(a, key) for a in args], [f"{key}_out"]))
            modules[key], names[n] = mod, f"{key}_out"
    for i, out in enumerate(outputs):  # graph outputs named like an exported file's ("output")
        if out in inputs or out in constants or i >= len(output_names):
            continue
        outputs[i] = output_names[i]
        for node in nodes:
            node.inputs = [output_names[i] if v == out else v for v in node.inputs]
            node.outputs = [output_names[i] if v == out else v for v in node.outputs]
    shapes = {name: [None, *ex.shape[1:]] for name, ex in zip(inputs, examples)}
    dtypes = {name: ex.dtype for name, ex in zip(inputs, examples)}
    net = Network(nodes, modules, constants, inputs, outputs, shapes, dtypes, name=type(module).__name__)
    net.bind(module, paths)
    return net


def _target_name_of(t: Any) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))
