"""Deep Compression's quantization stages (Han, Mao, Dally, ICLR 2016) and linear int8.

    kmeans.py   1-D k-means with linear / density / random initialisation
    layers.py   SharedLinear / SharedConv2d (codebook + codes + mask), Int8Linear / Int8Conv2d
    pass_.py    the `quantize` pass (method "share" or "int8"), composing after `prune`
    coding.py   relative indices with fillers, b-bit packing, canonical Huffman
    report.py   the paper's per-layer bits / compression table (P, P+Q, P+Q+H)
    onnx.py     ONNX emitters (portable packed form, int8 QDQ, `dense` form), re-import

`register()` (run on import; toolchain.methods imports this package) registers the pass, the
emitters / converters (onnx.py) and the import restorer that turns weight-sharing files back into
SharedLinear / SharedConv2d.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from converters.onnx_import import RESTORERS
    from toolchain.train import TrainHooks

    from ..base import CompressionPass, register_pass
    from . import onnx as _onnx
    from .pass_ import make_pass_class

    register_pass("quantize")(make_pass_class(CompressionPass, TrainHooks))
    RESTORERS.register("quantize")(_onnx.restore_quantized_layers)


register()

from . import coding, kmeans, layers, report  # noqa: E402,F401  (public submodules)
