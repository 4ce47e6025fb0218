"""Export of a compressed network: each compressed layer type's emitter writes its compact form
(toolchain/methods/*/onnx.py); `form` picks the portable (stock onnxruntime) or fast (custom ops) form."""
from __future__ import annotations

import converters

from . import methods  # noqa: F401  (registers every method's emitters)
from .kernels.graph import to_fast_ops
from ._version import __version__
from .methods.base import EXPORT_HOOKS, densify

FORMS = ("portable", "fast", "dense")  # dense: plain float32 weights, zeros kept (methods.base.densify)


def export_compressed(net, path=None, form: str = "portable", opset: int = 17, metadata: dict[str, str] | None = None):
    """Write `net` as ONNX (atomically when `path` is given); returns the ModelProto."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}")
    was_training = net.training
    net.eval()
    src = net
    if form == "dense":
        net = densify(net).eval()
    try:
        options, finishers = {}, []
        for hook in EXPORT_HOOKS.values():
            extra, finish = hook(net, form)
            options.update(extra)
            finishers += [finish] if finish else []
        if form == "fast":
            finishers.append(to_fast_ops)  # standard ops the library runs faster (LRN)
        model = converters.export_onnx(net, None if finishers else path, opset=opset, form=form, metadata=metadata,
                                       producer=("toolchain", __version__), **options)
    finally:
        src.train(was_training)
    for finish in finishers:
        finish(model)
    if finishers and path is not None:
        converters.atomic_write_bytes(path, model.SerializeToString())
    return model
