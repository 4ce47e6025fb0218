"""Deep Compression's quantization stages (Han, Mao, Dally, ICLR 2016) and linear int8.

    kmeans.py   1-D k-means with linear / density / random initialisation
    layers.py   SharedLinear / SharedConv2d (codebook + codes + mask), Int8Linear / Int8Conv2d
    pass_.py    the `quantize` pass (method "share" or "int8"), composing after `prune`
    coding.py   relative indices with fillers, b-bit packing, canonical Huffman
    report.py   the paper's per-layer bits / compression table (P, P+Q, P+Q+H)
    onnx.py     ONNX emitters (portable packed form, int8 QDQ, `dense` form), re-import

`register()` plugs the pass and the emitters into the registries that exist (called on import).
After the restructure (issue 11) only its two lines need re-pointing.
"""
from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from toolchain.passes import CompressionPass, register_pass
    from toolchain.train import TrainHooks

    from . import onnx as _onnx  # noqa: F401  (registers the emitters / converters)
    from .pass_ import make_pass_class

    register_pass("quantize")(make_pass_class(CompressionPass, TrainHooks))


register()
