"""Deep Compression's quantization stages (Han, Mao, Dally, ICLR 2016) and linear int8.

    kmeans.py   1-D k-means with linear / density / random initialisation
    layers.py   SharedLinear / SharedConv2d (codebook + codes + mask), Int8Linear / Int8Conv2d
    pass_.py    the `quantize` pass (method "share" or "int8"), composing after `prune`
    coding.py   relative indices with fillers, b-bit packing, canonical Huffman
    report.py   the paper's per-layer bits / compression table (P, P+Q, P+Q+H)
    onnx.py     ONNX emitters (portable packed form, int8 QDQ, `dense` form), re-import

Importing this package (toolchain.methods does) registers the pass, the emitters / converters
(onnx.py) and the import restorer that turns weight-sharing files back into
SharedLinear / SharedConv2d.
"""
from __future__ import annotations

from converters.onnx_import import RESTORERS

from . import onnx as _onnx
from .pass_ import QuantizePass  # noqa: F401  (registers the `quantize` pass)

RESTORERS.register("quantize")(_onnx.restore_quantized_layers)

from . import coding, kmeans, layers, report  # noqa: E402,F401  (public submodules)
