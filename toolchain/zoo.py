"""Reference model registry (timm-style).

Each folder ``models/<name>/`` holds ``model.py`` (the definition, registered with
``@register_model``), its card (``README.md``), recipes and shipped ONNX files.
``models/`` lives at the repository root, so the registry finds it relative to this package.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.nn as nn

from .errors import ToolchainError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one sample, without the batch dimension
    dataset: str  # "mnist" or "imagenet"
    folder: Path = field(default_factory=Path)

    @property
    def onnx_path(self) -> Path:
        """The shipped trained (or, for AlexNet, freshly initialised) dense ONNX file."""
        return self.folder / f"{self.name}.onnx"


_REGISTRY: dict[str, ModelSpec] = {}
_discovered = False


def register_model(name: str, input_shape: tuple[int, ...], dataset: str):
    def deco(fn: Callable[[], nn.Module]):
        _REGISTRY[name] = ModelSpec(name, fn, tuple(input_shape), dataset, MODELS_DIR / name)
        return fn

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for path in sorted(MODELS_DIR.glob("*/model.py")):
        spec = importlib.util.spec_from_file_location(f"toolchain_zoo_{path.parent.name.replace('-', '_')}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)


def list_models() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    _discover()
    if name not in _REGISTRY:
        raise ToolchainError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_model(name: str) -> nn.Module:
    return get_model_spec(name).build()
