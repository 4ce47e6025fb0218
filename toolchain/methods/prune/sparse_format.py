"""Compact storage of a pruned weight for the portable ONNX form.

The non-zero positions of the flattened weight are stored as gaps between consecutive positions
in the narrowest unsigned type that fits (uint8 or uint16, with zero-valued filler entries where a
gap is too long, as in Han et al.'s Deep Compression), or as absolute int32 positions when that is
smaller. Decoding in the graph: positions = CumSum(Cast(gaps)) - 1, then ScatterND into zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EncodedSparse:
    values: np.ndarray  # float32 [n] (fillers are 0)
    index: np.ndarray  # uint8 / uint16 gaps, or int32 absolute positions, [n]
    kind: str  # "gaps" or "positions"
    size: int  # flattened dense size

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.index.nbytes


def _gaps_with_fillers(pos: np.ndarray, vals: np.ndarray, limit: int):
    gaps = np.diff(pos, prepend=-1)  # first gap = p0 + 1; positions = cumsum(gaps) - 1
    repeats = (gaps - 1) // limit  # fillers needed before each entry
    n = len(pos) + int(repeats.sum())
    out_gaps = np.full(n, limit, dtype=np.int64)
    out_vals = np.zeros(n, dtype=np.float32)
    real = np.arange(len(pos)) + np.cumsum(repeats)  # index of each real entry in the output
    out_gaps[real] = gaps - repeats * limit
    out_vals[real] = vals
    return out_gaps, out_vals


def encode(weight: np.ndarray) -> EncodedSparse:
    """Encode the non-zeros of `weight` (any shape, flattened in C order) in the smallest form."""
    flat = np.ascontiguousarray(weight, dtype=np.float32).ravel()
    pos = np.flatnonzero(flat)
    vals = flat[pos]
    best = EncodedSparse(vals.copy(), pos.astype(np.int32), "positions", flat.size)
    for dtype in (np.uint8, np.uint16):
        limit = np.iinfo(dtype).max
        gaps, v = _gaps_with_fillers(pos, vals, limit)
        cand = EncodedSparse(v, gaps.astype(dtype), "gaps", flat.size)
        if cand.nbytes < best.nbytes:
            best = cand
    return best


def decode(enc: EncodedSparse, shape) -> np.ndarray:
    """numpy reference of the in-graph decoding."""
    pos = enc.index.astype(np.int64)
    if enc.kind == "gaps":
        pos = np.cumsum(pos) - 1
    out = np.zeros(enc.size, np.float32)
    out[pos] = enc.values
    return out.reshape(shape)
