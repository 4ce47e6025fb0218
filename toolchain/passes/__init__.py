"""Compression pass registry.

A pass is one compression method from the literature. It is applied to the imported network
(converters.graph.GraphModule) in rounds; the driver (toolchain.compress) retrains between rounds
with the pass's training hooks. Passes plug in with `@register_pass("name")`:

    @register_pass("prune")
    class PrunePass(CompressionPass):
        Options = PruneOptions            # dataclass: pass-level recipe keys
        LayerOptions = PruneLayerOptions  # dataclass: per-layer recipe keys
        def apply(self, net, round_index): ...

Recipes name the pass and give Options / LayerOptions values; unknown keys are rejected
before any training starts (toolchain.recipe).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch.nn as nn

from ..errors import RecipeError
from ..train import TrainHooks

_PASSES: dict[str, type["CompressionPass"]] = {}


def register_pass(name: str):
    def deco(cls):
        cls.name = name
        _PASSES[name] = cls
        return cls

    return deco


def get_pass(name: str) -> type["CompressionPass"]:
    _load_builtin_passes()
    if name not in _PASSES:
        raise RecipeError(f"unknown pass {name!r}; available: {', '.join(sorted(_PASSES))}")
    return _PASSES[name]


def available_passes() -> list[str]:
    _load_builtin_passes()
    return sorted(_PASSES)


def _load_builtin_passes() -> None:
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


@dataclasses.dataclass
class NoOptions:
    pass


class CompressionPass:
    """Base class. Subclasses set Options/LayerOptions and implement `apply`."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    LayerOptions: ClassVar[type] = NoOptions
    # Which layer kinds a pass can handle: nn.Linear and/or nn.Conv2d subclasses.
    layer_types: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)

    def __init__(self, options, layer_options: dict[str, object]):
        self.options = options
        self.layer_options = layer_options  # layer name -> LayerOptions ("default" already expanded)

    @property
    def rounds(self) -> int:
        return int(getattr(self.options, "rounds", 1))

    def apply(self, net: nn.Module, round_index: int) -> None:
        """Compress `net` in place for round `round_index` (0-based)."""
        raise NotImplementedError

    def hooks(self, net: nn.Module) -> TrainHooks:
        """Hooks for retraining after a round (regulariser, after-step projection, teacher)."""
        return TrainHooks()

    def finish(self, net: nn.Module) -> None:
        """Called once after the last round's retraining (e.g. to remove dead neurons)."""

    def summary(self, net: nn.Module) -> list[str]:
        """Short lines describing what the pass did, for the run log."""
        return []
