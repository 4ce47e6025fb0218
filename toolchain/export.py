"""Export of a compressed network: each compressed layer type's emitter writes its compact form
(converters/export_*.py); `form` picks the portable (stock onnxruntime) or fast (custom ops) form."""
from __future__ import annotations

import importlib
import pkgutil

import converters

FORMS = ("portable", "fast")


def _load_compressed_emitters() -> None:
    for info in pkgutil.iter_modules(converters.__path__):
        if info.name.startswith("export_"):
            importlib.import_module(f"converters.{info.name}")


def export_compressed(net, path=None, form: str = "portable", opset: int = 17):
    """Write `net` as ONNX (atomically when `path` is given); returns the ModelProto."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}")
    _load_compressed_emitters()
    was_training = net.training
    net.eval()
    try:
        return converters.export_onnx(net, path, opset=opset, form=form)
    finally:
        net.train(was_training)
