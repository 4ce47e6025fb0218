"""Registries: ONNX op -> torch module (converters) and torch module type -> ONNX nodes (emitters).

A converter is `fn(node: OnnxNode, ctx: ConvertContext) -> nn.Module | Converted`, registered with
`@register_converter("Conv", opsets=range(1, 23))`. It reads attributes from `node.attrs` and the
values of constant inputs with `ctx.const(name)`. Constant inputs it folds into the module (weights,
shapes, axes) are left out of `Converted.inputs`; the module's forward receives the others, in order
(None for an omitted optional input).

An emitter is `fn(ctx: ExportContext, name, module, inputs, outputs) -> None`, registered with
`@register_emitter(nn.Linear)`; it adds the ONNX nodes and initializers computing `outputs` from
`inputs` (see converters.onnx_export.ExportContext). Emitters are looked up along the module
type's MRO, so a subclass without its own emitter uses its base class's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import onnx
import torch
import torch.nn as nn

from ..errors import ModelFormatError
from ..registry import Registry

MAX_OPSET = onnx.defs.onnx_opset_version()
ALL_OPSETS = range(1, MAX_OPSET + 1)


@dataclass
class OnnxNode:
    """An ONNX node as converters see it: attributes decoded to Python values (str, int, float,
    lists, np.ndarray for tensors, GraphProto for subgraphs); `opset` is the model's version of
    the node's domain."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""
    opset: int = 0

    def input(self, i: int) -> str:
        """Name of input i, or "" when it is omitted."""
        return self.inputs[i] if i < len(self.inputs) else ""

    def error(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{self.op_type} node {self.name!r} (opset {self.opset}): {message}")

    def single_output(self) -> None:
        if any(self.outputs[1:]):
            raise self.error("only the first output is supported, but another output is used")


class ConvertContext(Protocol):
    def const(self, value: str) -> np.ndarray | None:
        """The value of a constant (initializer, Constant node, folded), or None if it is computed at run time."""

    def shape(self, value: str) -> list[int | str | None] | None:
        """The inferred shape (None: unknown rank; a str or None entry: a dynamic dimension)."""

    def origin(self, value: str) -> str:
        """The initializer a constant came from (through Transpose/Cast/... folding), else the value name."""


@dataclass
class Converted:
    module: nn.Module
    inputs: list[str] | None = None  # runtime inputs; None: all of node.inputs
    name_hints: list[str] = field(default_factory=list)  # candidate layer names (initializer names)
    pre: nn.Module | None = None  # optional module applied to the first input first (e.g. asymmetric padding)
    # modules applied in order to the (single) output, with the ONNX op each stands for (fused ops of the
    # fast form: a max pool, a ReLU)
    post: list[tuple[str, nn.Module]] = field(default_factory=list)


Converter = Callable[[OnnxNode, ConvertContext], "nn.Module | Converted"]
Emitter = Callable[..., None]

# (domain, op_type, opset version) -> converter; (module type) -> emitter. A second registration of
# the same op at an overlapping opset, or of the same module type, is a RegistryError.
CONVERTERS: Registry[Converter] = Registry("ONNX converter")
EMITTERS: Registry[Emitter] = Registry("ONNX emitter")


def normalize_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def register_converter(op_type: str, opsets: Iterable[int] = ALL_OPSETS, domain: str = ""):
    """Register `fn` as the converter for `op_type` (in `domain`) at the given opset versions."""

    return CONVERTERS.register(*((normalize_domain(domain), op_type, v) for v in opsets))


def find_converter(op_type: str, domain: str, opset: int) -> Converter | None:
    return CONVERTERS.get((normalize_domain(domain), op_type, opset))


# handled by the importer itself: Constant is folded, If is inlined when its condition is constant
FOLDED_OPS = ("Constant", "If")


def supported_ops() -> list[str]:
    """Sorted op types the importer converts ("domain::Op" outside the default ONNX domain)."""
    return sorted({op if not dom else f"{dom}::{op}" for dom, op, _ in CONVERTERS} | set(FOLDED_OPS))


def register_emitter(*module_types: type):
    """Register `fn` as the ONNX emitter for modules of these types (and subclasses without their own)."""

    return EMITTERS.register(*module_types)


def register_plain_op(op_type: str, module_type: type) -> None:
    """Register both directions for an op without attributes whose module takes no arguments:
    `module_type()` on import, a bare `op_type` node on export."""
    register_converter(op_type)(lambda node, ctx: module_type())
    register_emitter(module_type)(lambda ctx, name, m, inputs, outputs: ctx.add_node(op_type, inputs, outputs, name=name))


def find_emitter(module: nn.Module) -> Emitter | None:
    for cls in type(module).__mro__:
        if cls in EMITTERS:
            return EMITTERS[cls]
    return None


# ---------------------------------------------------------------- dtypes
_ONNX_TO_TORCH = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.UINT16: torch.uint16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}
_TORCH_TO_ONNX = {v: k for k, v in _ONNX_TO_TORCH.items()}


def torch_dtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in _ONNX_TO_TORCH:
        raise ModelFormatError(f"unsupported tensor type {onnx.TensorProto.DataType.Name(onnx_type)}")
    return _ONNX_TO_TORCH[onnx_type]


def onnx_dtype(dtype: torch.dtype) -> int:
    if dtype not in _TORCH_TO_ONNX:
        raise ModelFormatError(f"tensor type {dtype} has no ONNX equivalent here")
    return _TORCH_TO_ONNX[dtype]


def ints(value) -> list[int]:
    """A constant (array, list or scalar) as a list of Python ints."""
    return [int(v) for v in np.asarray(value).reshape(-1)]


def scalar(value) -> float:
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got shape {arr.shape}")
    return arr.reshape(-1)[0].item()
