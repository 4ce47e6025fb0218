"""Compact storage of a pruned weight for the portable ONNX form.

The non-zero positions of the flattened weight are stored as gaps between consecutive positions
in the narrowest unsigned type that fits (uint8 or uint16, with zero-valued filler entries where a
gap is too long, as in Han et al.'s Deep Compression), or as absolute int32 positions when that is
smaller. Decoding in the graph: positions = CumSum(Cast(gaps)) - 1, then ScatterND into zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from converters.errors import ModelFormatError

from .csr import validate_csr  # noqa: F401  (THE check of the CSR arrays, re-exported here)


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


def positions(enc: EncodedSparse, where: str = "sparse weight") -> np.ndarray:
    """The validated absolute positions of an encoding: each in [0, size), strictly increasing
    (gaps >= 1), so no index wraps around (a negative position would silently address the end)."""
    idx = np.asarray(enc.index)
    if enc.kind not in ("gaps", "positions"):
        raise ModelFormatError(f"{where}: unknown index kind {enc.kind!r}")
    if idx.ndim != 1 or np.asarray(enc.values).shape != idx.shape:
        raise ModelFormatError(f"{where}: {np.asarray(enc.values).size} values but {idx.size} indices")
    if idx.dtype.kind not in "iu":
        raise ModelFormatError(f"{where}: indices must be integers, not {idx.dtype}")
    pos = idx.astype(np.int64)
    if enc.kind == "gaps":
        if pos.size and pos.min() < 1:
            raise ModelFormatError(f"{where}: gap {int(pos.min())} < 1 (gaps between positions are >= 1)")
        pos = np.cumsum(pos) - 1
    elif pos.size and np.any(np.diff(pos) <= 0):
        raise ModelFormatError(f"{where}: positions are not strictly increasing")
    if pos.size and (pos.min() < 0 or pos.max() >= enc.size):
        bad = int(pos.min()) if pos.min() < 0 else int(pos.max())
        raise ModelFormatError(f"{where}: position {bad} is outside the weight's {enc.size} entries")
    return pos


def sparse_linear_reference(x: np.ndarray, values, col_idx, row_ptr, n_cols: int) -> np.ndarray:
    """Y = X W^T for a CSR W [M, n_cols], with the SEMANTICS OF THE DENSE GEMM it replaces: the product
    with a pruned (zero) weight is 0 * x, so a NaN or infinite input makes every output that does not
    store a weight for it NaN, exactly as the dense layer (and the portable form) computes it.
    A kernel that only visits stored non-zeros must add this back for non-finite inputs (docs/hardening.md)."""
    values, ci, rp = validate_csr(values, col_idx, row_ptr, n_cols)
    x = np.asarray(x, dtype=np.float32)
    m = len(rp) - 1
    rows = np.repeat(np.arange(m), np.diff(rp))
    y = np.zeros((x.shape[0], m), np.float32)
    np.add.at(y.T, rows, (values[:, None] * x[:, ci].T))
    bad = ~np.isfinite(x)
    if bad.any():
        stored = np.zeros((m, n_cols), bool)
        stored[rows, ci] = True
        # 0 * (NaN or +-inf) = NaN for every (row, column) whose weight is not stored
        hits = bad.astype(np.int64) @ (~stored).T.astype(np.int64)
        y[hits > 0] = np.nan
    return y


def decode(enc: EncodedSparse, shape) -> np.ndarray:
    """numpy reference of the in-graph decoding (positions validated first)."""
    pos = positions(enc)
    out = np.zeros(enc.size, np.float32)
    out[pos] = enc.values
    return out.reshape(shape)
