"""Packed (quantized) sparse formats for the fast form: encoders, numpy reference decoders, ONNX nodes.

Two ops in domain "ai.toolchain", version 1 (the C++ side is toolchain/kernels/csrc/ops.cc). Both
store a pruned weight W [M, K] row by row as *entries*; entry e of row m has an 8-bit delta d:

    d in 1..255   a kept weight at column col(e) = col(e-1) + d    (col(-1) = -1 at each row start)
    d = 0         a filler: no weight, the position advances 255 columns (col(e) = col(e-1) + 255)

so a gap g >= 1 from the previous position needs (g - 1) // 255 fillers (Deep Compression's padding
when a gap exceeds the index width; the zero is explicit in d = 0, so it costs no codebook value --
the same convention as toolchain/methods/quantize/coding.py). row_ptr [M+1] int32 delimits each
row's entries (fillers included). A filler's code / value byte is ignored (written as 0).

SparseLinearCodebook (weight sharing, Deep Compression):
    inputs  X float [..., K], codebook float [C] (1 <= C <= 2^bits), codes uint8 [ceil(E*bits/8)],
            deltas uint8 [E], row_ptr int32 [M+1], bias float [M] (optional)
    attrs   in_features = K, bits = 4 or 8
    W[m, col(e)] = codebook[code(e)] for kept entries, code(e) = codes[e] (8 bits) or
    (codes[e // 2] >> 4 * (e % 2)) & 15 (4 bits: two per byte, low nibble first, over all entries).
SparseLinearInt8:
    inputs  X float [..., K], values int8 [E], deltas uint8 [E], row_ptr int32 [M+1],
            scales float [M], bias float [M] (optional)
    attrs   in_features = K
    W[m, col(e)] = scales[m] * values[e] for kept entries (fp32 accumulation).

Bytes per kept weight (before fillers and the 4 bytes per row of row_ptr, and for int8 the 4 bytes
per row of scales): codebook 4-bit 1.5, codebook 8-bit 2, int8 2 (fp32 CSR with uint16 indices: 6).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from toolchain.errors import ModelFormatError
from toolchain.kernels import DOMAIN
from ..prune import csr

MAX_DELTA = 255


@dataclass
class PackedCodebook:
    """A weight in the SparseLinearCodebook layout (arrays exactly as stored in the file)."""
    codebook: np.ndarray  # float32 [C]
    codes: np.ndarray     # uint8 [ceil(E*bits/8)]
    deltas: np.ndarray    # uint8 [E]
    row_ptr: np.ndarray   # int32 [M+1]
    bits: int
    in_features: int
    fillers: int          # filler entries among the E

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_ptr) - 1, self.in_features

    def nbytes(self) -> int:
        return self.codebook.nbytes + self.codes.nbytes + self.deltas.nbytes + self.row_ptr.nbytes


@dataclass
class PackedInt8:
    """A weight in the SparseLinearInt8 layout."""
    values: np.ndarray    # int8 [E]
    deltas: np.ndarray    # uint8 [E]
    row_ptr: np.ndarray   # int32 [M+1]
    scales: np.ndarray    # float32 [M]
    in_features: int
    fillers: int

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.row_ptr) - 1, self.in_features

    def nbytes(self) -> int:
        return self.values.nbytes + self.deltas.nbytes + self.row_ptr.nbytes + self.scales.nbytes


def _check_2d(weight) -> np.ndarray:
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ModelFormatError(f"packed formats need a 2-D weight [out, in], got shape {w.shape}")
    if w.shape[1] < 1:
        raise ModelFormatError("packed formats need at least one input column")
    return w


def _entries(mask: np.ndarray):
    """Entry layout of the kept positions of `mask` [M, K]: (deltas uint8 [E], row_ptr int32 [M+1],
    source index into the row-major kept positions per entry (-1 for fillers))."""
    m_rows = mask.shape[0]
    rows, cols = np.nonzero(mask)
    cols = cols.astype(np.int64)
    prev = np.full_like(cols, -1)
    if len(cols):
        same_row = np.r_[False, rows[1:] == rows[:-1]]
        prev[same_row] = cols[:-1][same_row[1:]]
    gap = cols - prev                                           # >= 1
    nfill = (gap - 1) // MAX_DELTA
    per = nfill + 1
    total = int(per.sum())
    if total > np.iinfo(np.int32).max:
        raise ModelFormatError("more than 2^31-1 entries do not fit int32 row_ptr")
    owner = np.repeat(np.arange(len(cols)), per)               # kept position each entry belongs to
    first = np.cumsum(per) - per                                # its first entry
    pos = np.arange(total) - np.repeat(first, per)              # 0..nfill: fillers first, then the weight
    is_real = pos == nfill[owner]
    deltas = np.where(is_real, gap[owner] - MAX_DELTA * nfill[owner], 0).astype(np.uint8)
    src = np.where(is_real, owner, -1)
    counts = np.bincount(rows, weights=per, minlength=m_rows).astype(np.int64)
    row_ptr = np.zeros(m_rows + 1, np.int32)
    np.cumsum(counts, out=row_ptr[1:])
    return deltas, row_ptr, src


def _entry_columns(deltas: np.ndarray, row_ptr: np.ndarray) -> np.ndarray:
    """Column of every entry (a filler's: where its step lands), restarted per row."""
    step = np.where(deltas == 0, MAX_DELTA, deltas.astype(np.int64))
    c = np.cumsum(step)
    starts = row_ptr[:-1].astype(np.int64)
    lens = np.diff(row_ptr.astype(np.int64))
    before = np.where(starts > 0, c[np.maximum(starts - 1, 0)] if len(c) else 0, 0)
    return c - np.repeat(before, lens) - 1


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    c = codes.astype(np.uint8)
    if len(c) % 2:
        c = np.r_[c, np.uint8(0)]
    return (c[0::2] | (c[1::2] << 4)).astype(np.uint8)


def _unpack_codes(codes: np.ndarray, bits: int, n: int) -> np.ndarray:
    if bits == 8:
        return codes[:n].astype(np.int64)
    out = np.empty(2 * len(codes), np.int64)
    out[0::2] = codes & 15
    out[1::2] = codes >> 4
    return out[:n]


def encode_codebook(weight, codebook, bits: int = 4, codes=None) -> PackedCodebook:
    """SparseLinearCodebook layout of `weight` [M, K]: its non-zeros are the kept weights.

    Each kept weight gets the index of the nearest `codebook` value, or `codes[m, k]` when given
    (the cluster assignment of a weight-sharing method).
    """
    if bits not in (4, 8):
        raise ModelFormatError(f"codebook bits must be 4 or 8, got {bits}")
    w = _check_2d(weight).astype(np.float32, copy=False)
    cb = np.asarray(codebook, dtype=np.float32).ravel().copy()
    if not 1 <= len(cb) <= 1 << bits:
        raise ModelFormatError(f"a {bits}-bit codebook holds 1..{1 << bits} values, got {len(cb)}")
    if not np.all(np.isfinite(cb)):
        raise ModelFormatError("codebook values must be finite")
    mask = w != 0
    if codes is None:
        kept = w[mask]
        order = np.argsort(cb, kind="stable")
        srt = cb[order]
        i = np.clip(np.searchsorted(srt, kept), 1, max(len(srt) - 1, 1))
        lo = np.clip(i - 1, 0, len(srt) - 1)
        hi = np.clip(i, 0, len(srt) - 1)
        pick = np.where(np.abs(kept - srt[lo]) <= np.abs(srt[hi] - kept), lo, hi)
        kept_codes = order[pick]
    else:
        codes = np.asarray(codes)
        if codes.shape != w.shape:
            raise ModelFormatError(f"codes shape {codes.shape} must equal the weight's {w.shape}")
        kept_codes = codes[mask].astype(np.int64)
        if len(kept_codes) and (kept_codes.min() < 0 or kept_codes.max() >= len(cb)):
            raise ModelFormatError(f"codes must index the {len(cb)}-entry codebook")
    deltas, row_ptr, src = _entries(mask)
    entry_codes = np.where(src >= 0, kept_codes[np.maximum(src, 0)] if len(kept_codes) else 0, 0)
    packed = _pack_nibbles(entry_codes) if bits == 4 else entry_codes.astype(np.uint8)
    return PackedCodebook(cb, packed, deltas, row_ptr, bits, int(w.shape[1]), int(np.count_nonzero(src < 0)))


def decode_codebook(p: PackedCodebook) -> np.ndarray:
    """Dense float32 [M, K] weight of a codebook layout (numpy reference)."""
    m, k = p.shape
    e = len(p.deltas)
    cols = _entry_columns(p.deltas, p.row_ptr)
    vals = p.codebook[_unpack_codes(p.codes, p.bits, e)]
    rows = np.repeat(np.arange(m), np.diff(p.row_ptr.astype(np.int64)))
    real = p.deltas != 0
    out = np.zeros((m, k), np.float32)
    out[rows[real], cols[real]] = vals[real]
    return out


def int8_scales(weight) -> np.ndarray:
    """Symmetric per-row scales: max |w| / 127 (1.0 for an all-zero row)."""
    w = _check_2d(weight).astype(np.float32, copy=False)
    amax = np.abs(w).max(axis=1)
    return np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)


def encode_int8(weight, scales=None) -> PackedInt8:
    """SparseLinearInt8 layout of `weight` [M, K] (non-zeros kept): values = round(w / scales[m]),
    clipped to [-127, 127]. `scales` [M] defaults to int8_scales(weight)."""
    w = _check_2d(weight).astype(np.float32, copy=False)
    s = int8_scales(w) if scales is None else np.asarray(scales, dtype=np.float32).ravel()
    if s.shape != (w.shape[0],):
        raise ModelFormatError(f"scales must have shape ({w.shape[0]},), got {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s == 0):
        raise ModelFormatError("scales must be finite and non-zero")
    mask = w != 0
    rows, _ = np.nonzero(mask)
    q = np.clip(np.rint(w[mask] / s[rows]), -127, 127).astype(np.int8)
    deltas, row_ptr, src = _entries(mask)
    values = np.where(src >= 0, q[np.maximum(src, 0)] if len(q) else 0, 0).astype(np.int8)
    return PackedInt8(values, deltas, row_ptr, s.astype(np.float32), int(w.shape[1]), int(np.count_nonzero(src < 0)))


def decode_int8(p: PackedInt8) -> np.ndarray:
    """Dense float32 [M, K] weight of an int8 layout: scales[m] * values (numpy reference)."""
    m, k = p.shape
    cols = _entry_columns(p.deltas, p.row_ptr)
    rows = np.repeat(np.arange(m), np.diff(p.row_ptr.astype(np.int64)))
    real = p.deltas != 0
    out = np.zeros((m, k), np.float32)
    out[rows[real], cols[real]] = p.values[real].astype(np.float32) * p.scales[rows[real]]
    return out


def _bias_tensor(name: str, bias, m: int) -> list[TensorProto]:
    if bias is None:
        return []
    b = np.asarray(bias, dtype=np.float32)
    if b.shape != (m,):
        raise ModelFormatError(f"{name}: bias must have shape ({m},), got {b.shape}")
    return [numpy_helper.from_array(b, f"{name}.bias")]


def codebook_linear_node(input_name: str, output_name: str, packed: PackedCodebook, bias=None, *,
                         name: str = "fc") -> tuple[onnx.NodeProto, list[TensorProto]]:
    """SparseLinearCodebook node (Y = X W^T + bias) and its initializers <name>.codebook/.codes/
    .deltas/.row_ptr/.bias."""
    tensors = [
        numpy_helper.from_array(packed.codebook.astype(np.float32), f"{name}.codebook"),
        numpy_helper.from_array(packed.codes.astype(np.uint8), f"{name}.codes"),
        numpy_helper.from_array(packed.deltas.astype(np.uint8), f"{name}.deltas"),
        numpy_helper.from_array(packed.row_ptr.astype(np.int32), f"{name}.row_ptr"),
    ] + _bias_tensor(name, bias, packed.shape[0])
    node = helper.make_node("SparseLinearCodebook", [input_name, *[t.name for t in tensors]], [output_name],
                            name=name, domain=DOMAIN, in_features=int(packed.in_features), bits=int(packed.bits))
    return node, tensors


def int8_linear_node(input_name: str, output_name: str, packed: PackedInt8, bias=None, *,
                     name: str = "fc") -> tuple[onnx.NodeProto, list[TensorProto]]:
    """SparseLinearInt8 node (Y = X W^T + bias) and its initializers <name>.values/.deltas/.row_ptr/
    .scales/.bias."""
    tensors = [
        numpy_helper.from_array(packed.values.astype(np.int8), f"{name}.values"),
        numpy_helper.from_array(packed.deltas.astype(np.uint8), f"{name}.deltas"),
        numpy_helper.from_array(packed.row_ptr.astype(np.int32), f"{name}.row_ptr"),
        numpy_helper.from_array(packed.scales.astype(np.float32), f"{name}.scales"),
    ] + _bias_tensor(name, bias, packed.shape[0])
    node = helper.make_node("SparseLinearInt8", [input_name, *[t.name for t in tensors]], [output_name],
                            name=name, domain=DOMAIN, in_features=int(packed.in_features))
    return node, tensors


def packed_linear_node(input_name: str, output_name: str, packed, bias=None, *, name: str = "fc"):
    """codebook_linear_node or int8_linear_node, by the layout's type."""
    if isinstance(packed, PackedCodebook):
        return codebook_linear_node(input_name, output_name, packed, bias, name=name)
    if isinstance(packed, PackedInt8):
        return int8_linear_node(input_name, output_name, packed, bias, name=name)
    raise TypeError(f"not a packed layout: {type(packed).__name__}")


def decode(packed) -> np.ndarray:
    return decode_codebook(packed) if isinstance(packed, PackedCodebook) else decode_int8(packed)


def make_packed_linear_model(packed, bias=None, *, batch: int | str = "N", name: str = "fc") -> onnx.ModelProto:
    """One-node model X [batch, K] -> Y [batch, M] with a packed linear layer."""
    node, tensors = packed_linear_node("X", "Y", packed, bias, name=name)
    m, k = packed.shape
    graph = helper.make_graph(
        [node], "packed_linear",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch, m])],
        initializer=tensors,
    )
    return helper.make_model(graph, opset_imports=csr.opset_imports(), ir_version=csr.IR_VERSION,
                             producer_name="toolchain.kernels")


__all__ = [
    "MAX_DELTA", "PackedCodebook", "PackedInt8", "encode_codebook", "decode_codebook", "int8_scales", "encode_int8",
    "decode_int8", "decode", "codebook_linear_node", "int8_linear_node", "packed_linear_node",
    "make_packed_linear_model",
]
