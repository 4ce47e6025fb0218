"""The toolchain's model IR: a dataflow graph of ONNX-like nodes, each computed by a torch module.

`Network` is what `converters.import_onnx` returns and `converters.export_onnx` writes back.
Values (tensors) are named by strings, as in ONNX. Each `Node` reads values by name and writes its
outputs; its computation is the module `net.ops[node.name]`. Weighted layers (nn.Linear, nn.Conv*d,
and compressed replacements registered with `register_layer_type`) are keyed by their layer name
(`ip1`, `conv1`, `fc6`), so compression passes address them as `net.layers()["fc6"]`.

Constants that are not absorbed into a module (e.g. a mean image subtracted at the input) live as
buffers in `net.consts` and are read by value name like any other value.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from .registry import Registry

__all__ = ["Node", "Network", "register_layer_type", "layer_types", "safe_key", "LAYER_TYPES"]

LAYER_TYPES: Registry[type] = Registry("layer type")
for _cls in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
    LAYER_TYPES.add(_cls, _cls)


def register_layer_type(cls: type) -> type:
    """Count modules of type `cls` (and subclasses) as weighted layers in `Network.layers()`.

    Usable as a class decorator. nn.Linear and nn.Conv1d/2d/3d (and their subclasses) are layers already;
    registering a type twice is a RegistryError.
    """
    return LAYER_TYPES.add(cls, cls)


def layer_types() -> tuple[type, ...]:
    return tuple(LAYER_TYPES.values())


def is_layer(module: nn.Module) -> bool:
    return isinstance(module, layer_types())


_RESERVED = set(dir(nn.ModuleDict())) | set(dir(nn.Module()))


def safe_key(name: str) -> str:
    """A string usable as an nn.ModuleDict key / buffer name: no dots, non-empty, no attribute clash."""
    key = re.sub(r"[^0-9A-Za-z_]", "_", name).strip("_") or "node"
    if key in _RESERVED:
        key += "_"
    return key


@dataclass
class Node:
    """One operation. `op_type`/`attrs` describe the ONNX node it was imported from (informational;
    the module in `Network.ops[name]` is what computes and what the exporter writes).
    An empty string in `inputs` is an omitted optional input (the module receives None)."""

    name: str
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


class Network(nn.Module):
    def __init__(
        self,
        nodes: Iterable[Node],
        modules: dict[str, nn.Module],
        constants: dict[str, torch.Tensor],
        input_names: list[str],
        output_names: list[str],
        input_shapes: dict[str, list[int | str | None]],
        input_dtypes: dict[str, torch.dtype] | None = None,
        output_shapes: dict[str, list[int | str | None]] | None = None,
        name: str = "graph",
    ):
        super().__init__()
        self.graph_name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.input_shapes = {k: list(v) for k, v in input_shapes.items()}
        self.input_dtypes = dict(input_dtypes or {n: torch.float32 for n in self.input_names})
        self.output_shapes = {k: list(v) for k, v in (output_shapes or {}).items()}
        self.nodes: list[Node] = list(nodes)
        self.ops = nn.ModuleDict()
        for node in self.nodes:
            if node.name != safe_key(node.name) or node.name in self.ops:
                raise ValueError(f"node name {node.name!r} is not a unique, safe module key")
            self.ops[node.name] = modules[node.name]
        self.consts = nn.Module()
        self.const_keys: dict[str, str] = {}  # value name -> buffer name in self.consts
        for value, tensor in constants.items():
            self.add_constant(value, tensor)
        self.validate()

    # ----------------------------------------------------------------- values
    def add_constant(self, value: str, tensor: torch.Tensor) -> None:
        """Register (or overwrite) a constant value, stored as a buffer of `self.consts`."""
        key = self.const_keys.get(value)
        if key is None:
            key = base = safe_key(value)
            taken = set(self.const_keys.values())
            i = 1
            while key in taken:
                key, i = f"{base}_{i}", i + 1
            self.const_keys[value] = key
        self.consts.register_buffer(key, torch.as_tensor(tensor))

    def constant(self, value: str) -> torch.Tensor | None:
        key = self.const_keys.get(value)
        return None if key is None else getattr(self.consts, key)

    def is_constant(self, value: str) -> bool:
        return value in self.const_keys

    def value_names(self) -> set[str]:
        names = set(self.input_names) | set(self.const_keys)
        for node in self.nodes:
            names.update(o for o in node.outputs if o)
        return names

    # ---------------------------------------------------------------- running
    def forward(self, *inputs: torch.Tensor):
        env = self._run(inputs)
        outs = tuple(self._get(env, name) for name in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def run(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the graph and return every value computed (inputs, node outputs), by name."""
        return self._run(inputs)

    def _run(self, inputs) -> dict[str, torch.Tensor]:
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}")
        env = dict(zip(self.input_names, inputs))
        for node in self.nodes:
            args = [self._get(env, v) for v in node.inputs]
            out = self.ops[node.name](*args)
            if len(node.outputs) == 1:
                env[node.outputs[0]] = out
            else:
                for name, value in zip(node.outputs, out):
                    if name:
                        env[name] = value
        return env

    def _get(self, env: dict, value: str):
        if not value:
            return None
        if value in env:
            return env[value]
        return getattr(self.consts, self.const_keys[value])

    # ------------------------------------------------------------- structure
    def validate(self) -> None:
        """Raise ValueError unless every node input is defined before use and every output is defined."""
        defined = set(self.input_names) | set(self.const_keys)
        for node in self.nodes:
            for v in node.inputs:
                if v and v not in defined:
                    raise ValueError(f"node {node.name!r} reads {v!r}, which nothing defines before it")
            defined.update(o for o in node.outputs if o)
        for v in self.output_names:
            if v not in defined:
                raise ValueError(f"graph output {v!r} is not computed")

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named {name!r}")

    def producer(self, value: str) -> Node | None:
        """The node computing `value` (None for graph inputs and constants)."""
        for node in self.nodes:
            if value in node.outputs:
                return node
        return None

    def consumers(self, value: str) -> list[Node]:
        """The nodes reading `value`, in graph order."""
        return [node for node in self.nodes if value in node.inputs]

    def layers(self) -> dict[str, nn.Module]:
        """The weighted layers (see `register_layer_type`) by layer name, in graph order."""
        return {n.name: self.ops[n.name] for n in self.nodes if is_layer(self.ops[n.name])}

    def replace_layer(self, name: str, module: nn.Module) -> None:
        """Swap the module computing node `name` (e.g. nn.Linear -> a compressed layer with the same call);
        in a Network bound to a user's module (`bind`), the module there is swapped too."""
        if name not in self.ops:
            raise KeyError(f"no layer named {name!r}; layers: {', '.join(self.layers())}")
        self.ops[name] = module
        source, paths = self.__dict__.get("_source"), self.__dict__.get("_source_paths", {})
        if source is not None and name in paths:
            parent, _, attr = paths[name].rpartition(".")
            setattr(source.get_submodule(parent) if parent else source, attr, module)

    def bind(self, source: nn.Module, paths: dict[str, str]) -> None:
        """Tie this Network to `source`, the module its nodes were traced from: node name -> module path.
        `source` is held outside the module tree (its parameters are this Network's already)."""
        self.__dict__["_source"], self.__dict__["_source_paths"] = source, dict(paths)

    @property
    def source_module(self) -> nn.Module | None:
        """The user's module this Network was traced from (converters.torch_import), else None."""
        return self.__dict__.get("_source")

    def insert_node(self, index: int, node: Node, module: nn.Module) -> None:
        """Insert `node` (computed by `module`) before position `index` of `self.nodes`."""
        if node.name in self.ops or node.name != safe_key(node.name):
            raise ValueError(f"node name {node.name!r} is taken or not a safe module key")
        self.nodes.insert(index, node)
        self.ops[node.name] = module
        try:
            self.validate()
        except ValueError:
            self.nodes.remove(node)
            del self.ops[node.name]
            raise

    def remove_node(self, name: str, rewire_to: str | None = None) -> None:
        """Delete node `name`; readers of its (single) output read `rewire_to` instead (default: its first input)."""
        node = self.node(name)
        if len(node.outputs) != 1:
            raise ValueError(f"node {name!r} has {len(node.outputs)} outputs; cannot rewire")
        src = rewire_to if rewire_to is not None else node.inputs[0]
        out = node.outputs[0]
        saved = ([(n, list(n.inputs)) for n in self.nodes], list(self.nodes), list(self.output_names), self.ops[name])
        self.nodes.remove(node)
        del self.ops[name]
        for other in self.nodes:
            other.inputs = [src if v == out else v for v in other.inputs]
        self.output_names = [src if v == out else v for v in self.output_names]
        try:
            self.validate()
        except ValueError:
            inputs, self.nodes, self.output_names, self.ops[name] = saved
            for n, ins in inputs:
                n.inputs = ins
            raise

    def _walk(self, start_values: Iterable[str], forward: bool) -> Iterator[Node]:
        """Breadth-first over nodes downstream (or upstream) of values, not crossing weighted layers."""
        seen: set[str] = set()
        queue = deque(start_values)
        while queue:
            value = queue.popleft()
            nodes = self.consumers(value) if forward else [p for p in [self.producer(value)] if p is not None]
            for node in nodes:
                if node.name in seen:
                    continue
                seen.add(node.name)
                yield node
                if not is_layer(self.ops[node.name]):
                    queue.extend(v for v in (node.outputs if forward else node.inputs) if v)

    def next_layers(self, name: str) -> list[str]:
        """Layers fed by layer `name` through non-layer nodes (ReLU, pooling, Flatten, Dropout, ...)."""
        return [n.name for n in self._walk(self.node(name).outputs, True) if is_layer(self.ops[n.name])]

    def previous_layers(self, name: str) -> list[str]:
        """Layers feeding layer `name` through non-layer nodes."""
        start = [v for v in self.node(name).inputs if v]
        return [n.name for n in self._walk(start, False) if is_layer(self.ops[n.name])]

    def nodes_after(self, name: str) -> list[Node]:
        """Non-layer nodes between layer `name` and the next layers (graph order of discovery)."""
        return [n for n in self._walk(self.node(name).outputs, True) if not is_layer(self.ops[n.name])]

    def dropouts_after(self, name: str) -> list[nn.Dropout]:
        """The nn.Dropout modules applied to layer `name`'s output before the next layer."""
        return [self.ops[n.name] for n in self.nodes_after(name) if isinstance(self.ops[n.name], nn.Dropout)]

    def extra_repr(self) -> str:
        return f"name={self.graph_name!r}, inputs={self.input_names}, outputs={self.output_names}, nodes={len(self.nodes)}"
