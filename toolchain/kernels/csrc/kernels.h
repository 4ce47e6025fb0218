// Sparse compute kernels shared by the onnxruntime ops (ops.cc) and the three ISA back ends
// (kernels_portable.cc: plain C++; kernels_avx2.cc: AVX2+FMA intrinsics, compiled with -mavx2 -mfma;
// kernels_avx512.cc: AVX-512 F/BW/VL intrinsics, compiled with -mavx512f -mavx512bw -mavx512vl).
//
// This header holds only plain structs and declarations: the AVX2 translation unit must not
// instantiate inline library code that the linker could merge into the portable path.
#pragma once

#include <stdint.h>

namespace tcops {

// CSR matrix [rows, cols] split into column blocks of `block_cols` columns, each split again into
// `nsub` sub-blocks of `sub_cols` columns. Segment (b, r, s) holds the non-zeros of row r in sub-block
// s of block b: idx/val[seg_ptr[i] .. seg_ptr[i+1]) with i = b*rows*nsub + r*row_stride + s*sub_stride.
// idx is relative to the block's first column (so it always fits 16 bits). Two storage orders:
//   row-major  (row_stride = nsub, sub_stride = 1): a row's whole block is contiguous (batch-1 SpMV);
//   sub-major  (row_stride = 1, sub_stride = rows): a sub-block is contiguous over rows (tile
//              products walk one sub-block at a time, so the dense tile rows they touch stay in L1).
//
// Row-major stores for batch 1 keep their entries in chunks instead of idx/val (both null): the n entries
// of row r in block b (its sub-blocks in order; n from seg_ptr) fill ceil(n / kChunk) consecutive chunks
// from chunk_ptr[b*rows + r], chunk c at chunks + c * kChunkBytes holding kChunk fp32 values, then their
// kChunk uint16 column offsets. The last chunk of a row is padded with entries of value 0 and offset 0,
// which the kernels mask out. ops.cc lays the chunks out in the order its batch-1 tasks read them, so the
// weights are one interleaved sequential stream instead of two arrays walked block by block.
constexpr int kChunk = 8;
constexpr int kChunkBytes = kChunk * 6;

struct BlockedCsr {
  int64_t rows;
  int64_t cols;
  int64_t block_cols;
  int64_t nblocks;
  int64_t sub_cols;
  int64_t nsub;
  int64_t row_stride;
  int64_t sub_stride;
  const int32_t* seg_ptr;  // nblocks * rows * nsub + 1 absolute offsets
  const uint16_t* idx;
  const float* val;
  const int32_t* chunk_ptr = nullptr;  // batch-1 chunks (see above): first chunk of each (block, row)
  const uint8_t* chunks = nullptr;
};

// CSR whose column entries are precomputed element offsets (direct convolution).
struct OffsetCsr {
  int64_t rows;
  const int32_t* row_ptr;  // rows + 1
  const int32_t* off;
  const float* val;
};

// Batch-1 layout of the compact formats (SparseLinearCodebook / SparseLinearInt8), rebuilt from the
// file's delta-coded rows when the op is created: column blocks of block_cols columns (the x block
// stays in L1, as for BlockedCsr), row-major segments. Segment (b, m) holds len[i] entries from
// entry start[i], i = b*rows + m; entry e has column b*block_cols + idx[e] and value v(e):
//   kind kCodebook4: table[(code[e/2] >> 4*(e&1)) & 15]   (start[i] is even: segments begin on a byte)
//   kind kCodebook8: table[code[e]]
//   kind kInt8:      static_cast<int8_t>(code[e]); each segment's sum is multiplied by scale[m].
// idx/code are padded with 64 zero bytes past the last entry, so vector loads may run over.
enum PackedKind { kCodebook4 = 0, kCodebook8 = 1, kInt8 = 2 };

struct PackedRows {
  int64_t rows;
  int64_t block_cols;
  int64_t nblocks;
  int kind;
  const int64_t* start;
  const int32_t* len;
  const uint16_t* idx;
  const uint8_t* code;
  const float* table;  // codebook: 16 (kCodebook4) or 256 (kCodebook8) entries, unused ones zero
  const float* scale;  // kInt8: per-row scale
};

// Maximum lanes of one dense tile: 8 vectors of 8 floats.
constexpr int kMaxTileVecs = 8;
constexpr int kMaxTile = 8 * kMaxTileVecs;

struct KernelTable {
  const char* name;

  // y[m] = bias[m] + sum_k W[m,k] x[k] for m in [m0, m1). bias may be null. w must be a row-major store
  // in batch-1 chunks.
  void (*spmv)(const BlockedCsr& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y);

  // Tile product: xt is a dense [w.cols, 8*nv] row-major tile (one row per column of W, one
  // lane per batch item / output position; 64-byte aligned). For m in [m0, m1) writes lanes
  // [0, n_valid) of out + (m - m0) * ldo with bias[m] + sum_k W[m,k] xt[k, lane].
  // `scratch` ([m1-m0, 8*nv] floats, aligned) holds partial sums when there is more than one
  // (block, sub-block) pass; it may be `out` itself when ldo == 8*nv and n_valid == 8*nv.
  void (*spmm)(const BlockedCsr& w, int64_t m0, int64_t m1, const float* xt, int nv, const float* bias,
               float* out, int64_t ldo, int n_valid, float* scratch);

  // dst[c*ldd + r] = src[r*lds + c] for r < rows, c < cols.
  void (*transpose)(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);

  // Direct form: r = bias[m] + sum_j val[j] * base[off[j] + lane] for all 8*nv lanes, written to
  // o = out[(m-m0)*ldo + lane]. With max_into, o = max(o, r) instead, a NaN in either giving NaN (a
  // fused max pool: the window's first position is written, the others max'ed in).
  void (*spmm_offsets)(const OffsetCsr& w, int64_t m0, int64_t m1, const float* base, int nv,
                       const float* bias, float* out, int64_t ldo, bool max_into);

  // y[m] = bias[m] + sum over blocks of (scale[m] *) sum_e v(e) x[col(e)], m in [m0, m1), blocks in
  // order. bias may be null.
  void (*spmv_packed)(const PackedRows& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y);

  // True when none of x[0 .. n) is NaN or +-Inf (the scan before the non-finite repair of ops.cc).
  bool (*all_finite)(const float* x, int64_t n);

  // Local response normalisation of one image (x, y: [C, P] row-major, P spatial positions), positions
  // [p0, p1): y[c,p] = x[c,p] * t^(-beta), t = bias + coef * sum of x[k,p]^2 for k in
  // [max(0, c-lo), min(C-1, c+hi)], squares summed in increasing k. t^-0.75, t^-0.5 and t^-1 are
  // computed with square roots and one division; any other beta with powf.
  void (*lrn)(const float* x, float* y, int64_t C, int64_t P, int64_t p0, int64_t p1, int64_t lo, int64_t hi,
              float bias, float coef, float beta);
};

const KernelTable* portable_kernels();
const KernelTable* avx2_kernels();
const KernelTable* avx512_kernels();

}  // namespace tcops
