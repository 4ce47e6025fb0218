"""Compression methods, one folder each (prune/, lowrank/, hashed/, quantize/): its layer types, its pass,
its ONNX forms (export and import) and its kernels' Python side. This module holds the base class and
the pass registry; importing it registers every built-in method (the list at the end: adding a method
means adding its folder and its name there).

Compression pass registry.

A pass is one compression method from the literature. It is applied to the imported network
(converters.ir.Network) in rounds; the driver (toolchain.driver) retrains between rounds
with the pass's training hooks. Passes plug in with `@register_pass("name")`:

    @register_pass("prune")
    class PrunePass(CompressionPass):
        Options = PruneOptions            # dataclass: pass-level recipe keys
        LayerOptions = PruneLayerOptions  # dataclass: per-layer recipe keys
        def apply(self, net, round_index): ...

Recipes name the pass and give Options / LayerOptions values; unknown keys are rejected
before any training starts (toolchain.recipe).
"""
from .base import PASSES, CompressionPass, NoOptions, available_passes, get_pass, register_pass

# The built-in methods, imported for their registrations (passes, layer types, emitters, converters).
from . import hashed, lowrank, prune, quantize  # noqa: E402,F401

__all__ = ["CompressionPass", "NoOptions", "PASSES", "register_pass", "get_pass", "available_passes"]
