"""Deep Compression's storage (Han, Mao, Dally, ICLR 2016 §2 and §4): relative indices with filler
entries, b-bit packing, canonical Huffman coding, and the paper's bits-per-weight report.

Relative (delta) indices. The non-zeros of a layer's flattened weight (C order) are stored in
order; each entry stores `d`, a `width`-bit field, and a shared-value index (code):

    d in 1 .. 2**width - 1   a real weight, `d` positions after the previous entry
    d = 0                    a filler: advance L = 2**width - 1 positions, weight zero

so a gap g >= 1 needs (g - 1) // L fillers. (The paper pads with a zero weight when a gap exceeds
the bound; reserving d = 0 for the filler makes the zero explicit without spending a codebook entry
on it.) Decoding: step = d + L * (d == 0); position = cumsum(step) - 1; value = codebook[code]
where d != 0. Empty rows are just longer gaps.

Packing. A stream of n fields of b bits (1 <= b <= 8) is stored LSB first in ceil(n * b / 8)
bytes (uint8); field i starts at bit i * b. Reading field i touches bytes i*b // 8 and the next
one: ((byte[j] + 256 * byte[j + 1]) // 2**(i*b mod 8)) mod 2**b -- integer Div / Mod, which the
portable ONNX graph computes with standard ops.

Huffman. Canonical Huffman codes (code lengths from a heap, codes assigned in (length, symbol)
order), so a decoder needs only the length of each symbol's code.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from toolchain.errors import ModelFormatError

MAX_BITS = 8


# ----------------------------------------------------------------------------- relative indices
@dataclass
class DeltaCoded:
    deltas: np.ndarray  # int64 [n] fields in [0, 2**width - 1]; 0 = filler
    codes: np.ndarray  # int64 [n] shared-value index of each entry (0 for fillers)
    width: int
    size: int  # flattened dense size

    @property
    def entries(self) -> int:
        return int(self.deltas.size)

    @property
    def fillers(self) -> int:
        return int(np.count_nonzero(self.deltas == 0))


def delta_encode(positions: np.ndarray, codes: np.ndarray, width: int, size: int) -> DeltaCoded:
    """Relative indices (with fillers) of sorted distinct flat `positions` carrying `codes`."""
    if not 1 <= width <= 16:
        raise ValueError(f"index width must be in 1..16 bits, not {width}")
    pos = np.asarray(positions, np.int64)
    codes = np.asarray(codes, np.int64)
    if pos.shape != codes.shape:
        raise ValueError("positions and codes differ in length")
    if pos.size and (np.any(np.diff(pos) <= 0) or pos[0] < 0 or pos[-1] >= size):
        raise ValueError("positions must be strictly increasing and inside the weight")
    limit = (1 << width) - 1
    gaps = np.diff(pos, prepend=-1)  # >= 1
    fill = (gaps - 1) // limit
    n = pos.size + int(fill.sum())
    deltas = np.zeros(n, np.int64)
    out_codes = np.zeros(n, np.int64)
    real = np.arange(pos.size) + np.cumsum(fill)
    deltas[real] = gaps - fill * limit
    out_codes[real] = codes
    return DeltaCoded(deltas, out_codes, width, int(size))


def delta_decode(coded: DeltaCoded) -> tuple[np.ndarray, np.ndarray]:
    """(positions, codes) of the real entries; the numpy reference of the in-graph decoding."""
    d = np.asarray(coded.deltas, np.int64)
    limit = (1 << coded.width) - 1
    if d.size and (d.min() < 0 or d.max() > limit):
        raise ModelFormatError(f"corrupted index stream: fields outside 0..{limit}")
    pos = np.cumsum(d + limit * (d == 0)) - 1
    real = d != 0
    if real.any() and pos[real][-1] >= coded.size:
        raise ModelFormatError(f"corrupted index stream: position {int(pos[real][-1])} past the weight's "
                               f"{coded.size} entries")
    return pos[real], np.asarray(coded.codes, np.int64)[real]


def encode_weight(weight: np.ndarray, codebook_codes: np.ndarray, width: int) -> DeltaCoded:
    """Delta-code the non-zeros of a layer whose every weight has a code (`codebook_codes`, same shape)."""
    flat = np.ascontiguousarray(weight).reshape(-1)
    pos = np.flatnonzero(flat)
    return delta_encode(pos, np.asarray(codebook_codes).reshape(-1)[pos], width, flat.size)


# ----------------------------------------------------------------------------- bit packing
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative ints < 2**bits, `bits` each, LSB first, into uint8."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, not {bits}")
    v = np.asarray(values, np.int64).reshape(-1)
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values do not fit in {bits} bits")
    bitarr = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(bitarr, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of pack_bits (int64 [count]); the numpy reference of the in-graph Div/Mod reading."""
    packed = np.asarray(packed, np.uint8).reshape(-1)
    need = (count * bits + 7) // 8
    if packed.size < need:
        raise ModelFormatError(f"corrupted packed stream: {packed.size} bytes for {count} fields of {bits} bits "
                               f"({need} needed)")
    bitarr = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits).astype(np.int64)
    return (bitarr << np.arange(bits)).sum(axis=1)


# ----------------------------------------------------------------------------- Huffman
def huffman_lengths(symbols: np.ndarray) -> dict[int, int]:
    """Code length of every symbol occurring in `symbols` (a single symbol gets length 1)."""
    vals, counts = np.unique(np.asarray(symbols, np.int64), return_counts=True)
    if vals.size == 0:
        return {}
    if vals.size == 1:
        return {int(vals[0]): 1}
    heap = [(int(c), i, [int(s)]) for i, (s, c) in enumerate(zip(vals, counts))]
    heapq.heapify(heap)
    lengths = {int(s): 0 for s in vals}
    tie = len(heap)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def canonical_codes(lengths: dict[int, int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length) of the canonical Huffman code with these lengths."""
    out, code, prev = {}, 0, 0
    for s, n in sorted(lengths.items(), key=lambda kv: (kv[1], kv[0])):
        code <<= n - prev
        out[s] = (code, n)
        code += 1
        prev = n
    return out


@dataclass
class HuffmanCoded:
    data: np.ndarray  # uint8, bits MSB first
    nbits: int
    count: int
    lengths: dict[int, int]

    @property
    def bits_per_symbol(self) -> float:
        return self.nbits / max(self.count, 1)


def huffman_encode(symbols: np.ndarray) -> HuffmanCoded:
    s = np.asarray(symbols, np.int64).reshape(-1)
    lengths = huffman_lengths(s)
    table = canonical_codes(lengths)
    bits = []
    for v in s.tolist():
        code, n = table[v]
        bits.extend((code >> (n - 1 - k)) & 1 for k in range(n))
    arr = np.array(bits, np.uint8)
    return HuffmanCoded(np.packbits(arr), int(arr.size), int(s.size), lengths)


def huffman_decode(coded: HuffmanCoded) -> np.ndarray:
    """Decode with the canonical code: per length, the first code and the symbols in order."""
    by_len: dict[int, list[int]] = {}
    for s, n in sorted(coded.lengths.items(), key=lambda kv: (kv[1], kv[0])):
        by_len.setdefault(n, []).append(s)
    first, code, prev = {}, 0, 0
    for n in sorted(by_len):
        code <<= n - prev
        first[n] = code
        code += len(by_len[n])
        prev = n
    bits = np.unpackbits(coded.data)[: coded.nbits].tolist()
    out, cur, n, i = [], 0, 0, 0
    maxlen = max(by_len) if by_len else 0
    while len(out) < coded.count:
        if i >= len(bits):
            raise ModelFormatError("corrupted Huffman stream: ends inside a code")
        cur = (cur << 1) | bits[i]
        n += 1
        i += 1
        if n in by_len and 0 <= cur - first[n] < len(by_len[n]):
            out.append(by_len[n][cur - first[n]])
            cur = n = 0
        elif n >= maxlen:  # no code is longer: these bits are no code at all
            raise ModelFormatError("corrupted Huffman stream: no symbol has this code")
    return np.array(out, np.int64)


def huffman_bits(symbols: np.ndarray) -> int:
    """Total bits of the Huffman-coded stream (without the table)."""
    s = np.asarray(symbols, np.int64).reshape(-1)
    if s.size == 0:
        return 0
    lengths = huffman_lengths(s)
    vals, counts = np.unique(s, return_counts=True)
    return int(sum(lengths[int(v)] * int(c) for v, c in zip(vals, counts)))
