// Portable kernels: plain C++ the compiler may auto-vectorise for the baseline ISA (SSE2 on x86-64).
// Same loop structure and summation order per output as documented in kernels.h.
#include <string.h>

#include "kernels.h"

namespace tcops {
namespace {

// Four-lane vectors (GCC/Clang vector extension: SSE2 on x86-64, NEON on ARM, scalar elsewhere).
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

// Four x values by the four uint16 column offsets at ip (chunk bytes, read with memcpy).
inline v4f gather4(const float* xb, const uint8_t* ip) {
  uint16_t i[4];
  memcpy(i, ip, sizeof(i));
  const v4f g = {xb[i[0]], xb[i[1]], xb[i[2]], xb[i[3]]};
  return g;
}

inline v4f load4(const uint8_t* p) {
  v4f v;
  memcpy(&v, p, sizeof(v));
  return v;
}

// Batch 1 over the interleaved chunks of a row-major store (kernels.h): x gathered four at a time into a
// vector, four vector accumulators (two per chunk, chunks in pairs), a row's last chunk masked.
void spmv(const BlockedCsr& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  const int64_t M = w.rows, S = w.nsub;
  constexpr int kIdx = 4 * kChunk;  // offset of a chunk's column offsets
  for (int64_t b = 0; b < w.nblocks; ++b) {
    const int32_t* sp = w.seg_ptr + b * M * S;
    const int32_t* cp = w.chunk_ptr + b * M;
    const float* xb = x + b * w.block_cols;
    for (int64_t m = m0; m < m1; ++m) {
      v4f a0 = {0.f, 0.f, 0.f, 0.f}, a1 = a0, a2 = a0, a3 = a0;
      const int64_t n = sp[(m + 1) * S] - sp[m * S];
      if (n > 0) {
        const uint8_t* p = w.chunks + static_cast<int64_t>(cp[m]) * kChunkBytes;
        const int64_t full = (n - 1) / kChunk;  // chunks before the last one
        const uint8_t* last = p + full * kChunkBytes;
        for (; p + kChunkBytes < last; p += 2 * kChunkBytes) {
          a0 += load4(p) * gather4(xb, p + kIdx);
          a1 += load4(p + 16) * gather4(xb, p + kIdx + 8);
          a2 += load4(p + kChunkBytes) * gather4(xb, p + kChunkBytes + kIdx);
          a3 += load4(p + kChunkBytes + 16) * gather4(xb, p + kChunkBytes + kIdx + 8);
        }
        if (p < last) {
          a0 += load4(p) * gather4(xb, p + kIdx);
          a1 += load4(p + 16) * gather4(xb, p + kIdx + 8);
          p += kChunkBytes;
        }
        // The last chunk: lanes past its r real entries are cleared in x, so padding adds 0 * 0.
        const int32_t r = static_cast<int32_t>(n - full * kChunk);  // 1..8
        const v4i lane = {0, 1, 2, 3}, rr = {r, r, r, r};
        const v4i k0 = lane < rr, k1 = lane + 4 < rr;  // -1 where the lane is real
        a2 += load4(p) * (v4f)((v4i)gather4(xb, p + kIdx) & k0);
        a3 += load4(p + 16) * (v4f)((v4i)gather4(xb, p + kIdx + 8) & k1);
      }
      const v4f a = (a0 + a2) + (a1 + a3);
      const float s = (a[0] + a[1]) + (a[2] + a[3]);
      const float init = b == 0 ? (bias ? bias[m] : 0.f) : y[m];
      y[m] = init + s;
    }
  }
}

// The tile is processed in strips of SW lanes so the accumulators stay in registers (an SSE2
// target has 16 of 4 lanes); the segment's few non-zeros are re-read from L1 for each strip.
template <int NV>
void spmm_t(const BlockedCsr& w, int64_t m0, int64_t m1, const float* xt, const float* bias, float* out,
            int64_t ldo, int n_valid, float* scratch) {
  constexpr int NT = 8 * NV;
  constexpr int SW = NT % 16 == 0 ? 16 : 8;
  const int64_t M = w.rows, S = w.nsub, passes = w.nblocks * S;
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t b = p / S;
    const int32_t* sp = w.seg_ptr + b * M * S + (p % S) * w.sub_stride;
    const int64_t rs = w.row_stride;
    const float* xb = xt + b * w.block_cols * NT;
    const bool first = p == 0, last = p == passes - 1;
    for (int64_t m = m0; m < m1; ++m) {
      float* part = scratch + (m - m0) * NT;
      float* o = out + (m - m0) * ldo;
      const int64_t j0 = sp[m * rs], j1 = sp[m * rs + 1];
      for (int l0 = 0; l0 < NT; l0 += SW) {
        float acc[SW];
        if (first) {
          const float init = bias ? bias[m] : 0.f;
          for (int l = 0; l < SW; ++l) acc[l] = init;
        } else {
          for (int l = 0; l < SW; ++l) acc[l] = part[l0 + l];
        }
        for (int64_t j = j0; j < j1; ++j) {
          const float v = w.val[j];
          const float* xr = xb + static_cast<int64_t>(w.idx[j]) * NT + l0;
          for (int l = 0; l < SW; ++l) acc[l] += v * xr[l];
        }
        if (!last) {
          memcpy(part + l0, acc, sizeof(acc));
        } else if (l0 < n_valid) {
          const int n = n_valid - l0 < SW ? n_valid - l0 : SW;
          memcpy(o + l0, acc, sizeof(float) * n);
        }
      }
    }
  }
}

void spmm(const BlockedCsr& w, int64_t m0, int64_t m1, const float* xt, int nv, const float* bias, float* out,
          int64_t ldo, int n_valid, float* scratch) {
  switch (nv) {
    case 1: return spmm_t<1>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 2: return spmm_t<2>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 3: return spmm_t<3>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 4: return spmm_t<4>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 5: return spmm_t<5>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 6: return spmm_t<6>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 7: return spmm_t<7>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    default: return spmm_t<8>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
  }
}

template <int NV>
void spmm_offsets_t(const OffsetCsr& w, int64_t m0, int64_t m1, const float* base, const float* bias, float* out,
                    int64_t ldo, bool max_into) {
  constexpr int NT = 8 * NV;
  constexpr int SW = NT % 16 == 0 ? 16 : 8;
  for (int64_t m = m0; m < m1; ++m) {
    for (int l0 = 0; l0 < NT; l0 += SW) {
      float acc[SW];
      const float init = bias ? bias[m] : 0.f;
      for (int l = 0; l < SW; ++l) acc[l] = init;
      for (int64_t j = w.row_ptr[m], e = w.row_ptr[m + 1]; j < e; ++j) {
        const float v = w.val[j];
        const float* xr = base + w.off[j] + l0;
        for (int l = 0; l < SW; ++l) acc[l] += v * xr[l];
      }
      float* o = out + (m - m0) * ldo + l0;
      if (max_into) {
        for (int l = 0; l < SW; ++l) o[l] = (acc[l] > o[l] || acc[l] != acc[l]) ? acc[l] : o[l];
      } else {
        memcpy(o, acc, sizeof(acc));
      }
    }
  }
}

void spmm_offsets(const OffsetCsr& w, int64_t m0, int64_t m1, const float* base, int nv, const float* bias,
                  float* out, int64_t ldo, bool max_into) {
  switch (nv) {
    case 1: return spmm_offsets_t<1>(w, m0, m1, base, bias, out, ldo, max_into);
    case 2: return spmm_offsets_t<2>(w, m0, m1, base, bias, out, ldo, max_into);
    case 3: return spmm_offsets_t<3>(w, m0, m1, base, bias, out, ldo, max_into);
    case 4: return spmm_offsets_t<4>(w, m0, m1, base, bias, out, ldo, max_into);
    case 5: return spmm_offsets_t<5>(w, m0, m1, base, bias, out, ldo, max_into);
    case 6: return spmm_offsets_t<6>(w, m0, m1, base, bias, out, ldo, max_into);
    case 7: return spmm_offsets_t<7>(w, m0, m1, base, bias, out, ldo, max_into);
    default: return spmm_offsets_t<8>(w, m0, m1, base, bias, out, ldo, max_into);
  }
}

bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    memcpy(&bits, x + i, sizeof(bits));
    bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t c0 = 0; c0 < cols; c0 += 16) {  // 16 source columns at a time keep the writes in L1
    const int64_t c1 = c0 + 16 < cols ? c0 + 16 : cols;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = c0; c < c1; ++c) dst[c * ldd + r] = src[r * lds + c];
  }
}

// Packed rows: four partial sums per segment.
template <int KIND>
void spmv_packed_t(const PackedRows& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  const uint16_t* idx = w.idx;
  const uint8_t* code = w.code;
  const float* table = w.table;
  for (int64_t b = 0; b < w.nblocks; ++b) {
    const float* xb = x + b * w.block_cols;
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t i = b * w.rows + m;
      float s[4] = {0.f, 0.f, 0.f, 0.f};
      const int64_t e0 = w.start[i], e1 = e0 + w.len[i];
      for (int64_t e = e0; e < e1; ++e) {
        float v;
        if (KIND == kCodebook4)
          v = table[(code[e >> 1] >> (4 * (e & 1))) & 15];
        else if (KIND == kCodebook8)
          v = table[code[e]];
        else
          v = static_cast<float>(static_cast<int8_t>(code[e]));
        s[(e - e0) & 3] += v * xb[idx[e]];
      }
      float t = (s[0] + s[1]) + (s[2] + s[3]);
      if (KIND == kInt8) t *= w.scale[m];
      const float init = b == 0 ? (bias ? bias[m] : 0.f) : y[m];
      y[m] = init + t;
    }
  }
}

void spmv_packed(const PackedRows& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  switch (w.kind) {
    case kCodebook4: return spmv_packed_t<kCodebook4>(w, m0, m1, x, bias, y);
    case kCodebook8: return spmv_packed_t<kCodebook8>(w, m0, m1, x, bias, y);
    default: return spmv_packed_t<kInt8>(w, m0, m1, x, bias, y);
  }
}

// t^-beta for the LRN: square roots and a division for the common betas (AlexNet's 0.75), powf otherwise.
inline float lrn_factor(float t, float beta) {
  if (beta == 0.75f) {
    const float s = __builtin_sqrtf(t);
    return 1.f / (s * __builtin_sqrtf(s));
  }
  if (beta == 0.5f) return 1.f / __builtin_sqrtf(t);
  if (beta == 1.f) return 1.f / t;
  return __builtin_powf(t, -beta);
}

// LRN over positions in blocks of 64: the window's squares accumulate in a block-sized array.
void lrn(const float* x, float* y, int64_t C, int64_t P, int64_t p0, int64_t p1, int64_t lo, int64_t hi, float bias,
         float coef, float beta) {
  constexpr int64_t kB = 64;
  float acc[kB];
  for (int64_t q = p0; q < p1; q += kB) {
    const int64_t n = p1 - q < kB ? p1 - q : kB;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t a = c - lo > 0 ? c - lo : 0, b = c + hi < C - 1 ? c + hi : C - 1;
      for (int64_t i = 0; i < n; ++i) acc[i] = 0.f;
      for (int64_t k = a; k <= b; ++k) {
        const float* xk = x + k * P + q;
        for (int64_t i = 0; i < n; ++i) acc[i] += xk[i] * xk[i];
      }
      const float* xc = x + c * P + q;
      float* yc = y + c * P + q;
      for (int64_t i = 0; i < n; ++i) yc[i] = xc[i] * lrn_factor(bias + coef * acc[i], beta);
    }
  }
}

const KernelTable kTable = {"portable", spmv, spmm, transpose, spmm_offsets, spmv_packed, all_finite, lrn};

}  // namespace

const KernelTable* portable_kernels() { return &kTable; }

}  // namespace tcops
