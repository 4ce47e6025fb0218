"""Reference model registry (timm-style).

Each folder ``models/<name>/`` holds ``model.py`` (the definition, registered with
``@register_model``), its card (``README.md``), recipes and shipped ONNX files. The built-in models
are the folders named in BUILTIN (no directory scan). ``models/`` lives at the repository root; an
installed package carries a copy as ``toolchain/_models`` (setup.py puts it there), which wins.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.nn as nn

from converters.registry import Registry

from .errors import ToolchainError

BUILTIN = ("lenet-300-100", "lenet-5", "alexnet")


def _models_dir() -> Path:
    here = Path(__file__).resolve().parent
    installed = here / "_models"
    return installed if installed.is_dir() else here.parent / "models"


MODELS_DIR = _models_dir()


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


MODELS: Registry[ModelSpec] = Registry("reference model")
_discovered = False


def register_model(name: str, input_shape: tuple[int, ...], dataset: str):
    def deco(fn: Callable[[], nn.Module]):
        MODELS.add(name, ModelSpec(name, fn, tuple(input_shape), dataset, MODELS_DIR / name))
        return fn

    return deco


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for name in BUILTIN:
        path = MODELS_DIR / name / "model.py"
        if not path.is_file():
            raise ToolchainError(f"reference model {name!r}: {path} is missing (a broken install or checkout)")
        spec = importlib.util.spec_from_file_location(f"toolchain_zoo_{name.replace('-', '_')}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)


def list_models() -> list[str]:
    _discover()
    return sorted(MODELS)


def get_model_spec(name: str) -> ModelSpec:
    _discover()
    if name not in MODELS:
        raise ToolchainError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def create_model(name: str) -> nn.Module:
    return get_model_spec(name).build()
