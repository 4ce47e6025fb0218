"""Deep Compression's per-layer storage report (the layout of the paper's Tables 2-5).

For a weight-sharing layer with `total` weights in the dense original, the stored entries of the
relative-index coding (real weights + fillers), b code bits and w index bits:

    P       weights kept: nnz / total (the paper's "Weights%")
    P+Q     (entries * (b + w) + 2**b * 32) / (total * 32)        fixed-width codes and indices + codebook
    P+Q+H   (H(codes) + H(indices) + 2**b * 32 + table) / (total * 32)
            H = the canonical Huffman code's length of each stream (coding.py), table = the code
            lengths (5 bits per distinct symbol)

Biases are left out as in the paper (the ONNX file sizes include them).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import coding
from .layers import _Shared

TABLE_BITS_PER_SYMBOL = 5


@dataclass
class LayerReport:
    name: str
    total: int  # weights of the dense original layer
    nnz: int
    entries: int  # nnz + fillers
    bits: int
    index_bits: int
    code_huffman_bits: int
    index_huffman_bits: int
    table_bits: int

    @property
    def codebook_bits(self) -> int:
        return (1 << self.bits) * 32

    @property
    def p(self) -> float:
        return self.nnz / self.total

    @property
    def pq_bits(self) -> int:
        return self.entries * (self.bits + self.index_bits) + self.codebook_bits

    @property
    def pqh_bits(self) -> int:
        return self.code_huffman_bits + self.index_huffman_bits + self.codebook_bits + self.table_bits

    @property
    def pq(self) -> float:
        return self.pq_bits / (32 * self.total)

    @property
    def pqh(self) -> float:
        return self.pqh_bits / (32 * self.total)


def layer_report(name: str, m: _Shared, total: int | None = None, index_bits: int | None = None) -> LayerReport:
    from .onnx import layer_streams

    _, coded, width = layer_streams(m, index_bits)
    hc, hi = coding.huffman_lengths(coded.codes), coding.huffman_lengths(coded.deltas)
    return LayerReport(name, int(total or m.mask.numel()), m.nnz(), coded.entries, m.bits, width,
                       coding.huffman_bits(coded.codes), coding.huffman_bits(coded.deltas),
                       TABLE_BITS_PER_SYMBOL * (len(hc) + len(hi)))


def total_report(rows: list[LayerReport]) -> LayerReport:
    """A 'total' row: sums, with the bit widths as entry-weighted means (as the paper's total row)."""
    t = LayerReport("total", sum(r.total for r in rows), sum(r.nnz for r in rows), sum(r.entries for r in rows),
                    0, 0, sum(r.code_huffman_bits for r in rows), sum(r.index_huffman_bits for r in rows),
                    sum(r.table_bits for r in rows))
    t._pq_bits = sum(r.pq_bits for r in rows)
    t._codebook = sum(r.codebook_bits for r in rows)
    t._wbits = sum(r.entries * r.bits for r in rows) / max(t.entries, 1)
    t._ibits = sum(r.entries * r.index_bits for r in rows) / max(t.entries, 1)
    return t


def _get(r, attr):
    return getattr(r, "_" + attr) if hasattr(r, "_" + attr) else getattr(r, attr)


def format_table(rows: list[LayerReport]) -> str:
    """Markdown table: the paper's columns, plus the total row."""
    head = ("| layer | #weights | weights% (P) | weight bits (P+Q) | weight bits (P+Q+H) | index bits (P+Q) | "
            "index bits (P+Q+H) | compress rate (P+Q) | compress rate (P+Q+H) |")
    lines = [head, "|" + "---|" * 9]
    tot = total_report(rows)
    for r in rows + [tot]:
        is_total = r is tot
        wb = tot._wbits if is_total else r.bits
        ib = tot._ibits if is_total else r.index_bits
        pq_bits = tot._pq_bits if is_total else r.pq_bits
        cb = tot._codebook if is_total else r.codebook_bits
        pqh_bits = r.code_huffman_bits + r.index_huffman_bits + cb + r.table_bits
        pq, pqh = pq_bits / (32 * r.total), pqh_bits / (32 * r.total)
        name = f"**{r.name}**" if is_total else r.name
        p = f"{r.p:.2%}" + (f" ({1 / r.p:.0f}x)" if is_total else "")
        lines.append(f"| {name} | {r.total:,} | {p} | {wb:.1f} | {r.code_huffman_bits / max(r.entries, 1):.1f} | "
                     f"{ib:.1f} | {r.index_huffman_bits / max(r.entries, 1):.1f} | {pq:.2%}"
                     + (f" ({1 / pq:.0f}x)" if is_total else "") + f" | {pqh:.2%}"
                     + (f" ({1 / pqh:.0f}x)" if is_total else "") + " |")
    return "\n".join(lines)


def totals(rows: list[LayerReport]) -> dict:
    """Compression factors (dense fp32 weight bits / stored bits) after P, P+Q, P+Q+H."""
    total = sum(r.total for r in rows)
    return {"P": total / sum(r.nnz for r in rows),
            "P+Q": 32 * total / sum(r.pq_bits for r in rows),
            "P+Q+H": 32 * total / sum(r.pqh_bits for r in rows)}
