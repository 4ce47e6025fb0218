// AVX-512 kernels (F, BW, VL; 16-lane vectors and mask registers). This file is compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx2 -mfma and is only called after a run-time CPU and OS check
// (ops.cc); it must not include headers with inline functions other than the intrinsics.
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

namespace tcops {
namespace {

// Batch 1: CSR SpMV over row-major blocks, 16-lane gathers, two accumulators.
void spmv(const BlockedCsr& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  const int64_t M = w.rows, S = w.nsub;
  const float* val = w.val;
  const uint16_t* idx = w.idx;
  for (int64_t b = 0; b < w.nblocks; ++b) {
    const int32_t* sp = w.seg_ptr + b * M * S;
    const float* xb = x + b * w.block_cols;
    for (int64_t m = m0; m < m1; ++m) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t j = sp[m * S];
      const int64_t e = sp[(m + 1) * S];
      for (; j + 32 <= e; j += 32) {
        const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + j)));
        const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + j + 16)));
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + j), _mm512_i32gather_ps(i0, xb, 4), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + j + 16), _mm512_i32gather_ps(i1, xb, 4), a1);
      }
      if (j < e) {  // 1..31 left: up to two masked steps
        const int64_t r = e - j;
        const __mmask16 k0 = r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1);
        const __m512i i0 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k0, idx + j));
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k0, val + j),
                             _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k0, i0, xb, 4), a0);
        if (r > 16) {
          const __mmask16 k1 = __mmask16((1u << (r - 16)) - 1);
          const __m512i i1 = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k1, idx + j + 16));
          a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k1, val + j + 16),
                               _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k1, i1, xb, 4), a1);
        }
      }
      const float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      const float init = b == 0 ? (bias ? bias[m] : 0.f) : y[m];
      y[m] = init + s;
    }
  }
}

// Tile rows of 8*NV lanes as NZ = ceil(NV/2) 16-lane vectors, the last one half-masked when NV is odd.
template <int NV>
struct TileShape {
  static constexpr int NT = 8 * NV;
  static constexpr int NZ = (NV + 1) / 2;
  static constexpr __mmask16 kLast = NV % 2 ? __mmask16(0x00FF) : __mmask16(0xFFFF);
  static inline __m512 load(const float* p, int z) {
    return (z == NZ - 1 && NV % 2) ? _mm512_maskz_loadu_ps(kLast, p + 16 * z) : _mm512_loadu_ps(p + 16 * z);
  }
  static inline void store(float* p, int z, __m512 v) {
    if (z == NZ - 1 && NV % 2)
      _mm512_mask_storeu_ps(p + 16 * z, kLast, v);
    else
      _mm512_storeu_ps(p + 16 * z, v);
  }
};

// Tile product with U interleaved accumulator sets (U*NZ independent FMA chains).
template <int NV, int U>
void spmm_t(const BlockedCsr& w, int64_t m0, int64_t m1, const float* xt, const float* bias, float* out,
            int64_t ldo, int n_valid, float* scratch) {
  using T = TileShape<NV>;
  constexpr int NT = T::NT, NZ = T::NZ;
  const int64_t M = w.rows, S = w.nsub, passes = w.nblocks * S;
  const float* val = w.val;
  const uint16_t* idx = w.idx;
  for (int64_t p = 0; p < passes; ++p) {
    const int64_t b = p / S;
    const int32_t* sp = w.seg_ptr + b * M * S + (p % S) * w.sub_stride;
    const int64_t rs = w.row_stride;
    const float* xb = xt + b * w.block_cols * NT;
    const bool first = p == 0, last = p == passes - 1;
    for (int64_t m = m0; m < m1; ++m) {
      __m512 acc[U][NZ];
      float* part = scratch + (m - m0) * NT;
      const __m512 init = _mm512_set1_ps(first && bias ? bias[m] : 0.f);
#pragma GCC unroll 8
      for (int z = 0; z < NZ; ++z) acc[0][z] = first ? init : T::load(part, z);
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
        for (int z = 0; z < NZ; ++z) acc[u][z] = _mm512_setzero_ps();
      int64_t j = sp[m * rs];
      const int64_t e = sp[m * rs + 1];
      for (; j + U <= e; j += U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const __m512 wv = _mm512_set1_ps(val[j + u]);
          const float* xr = xb + static_cast<int64_t>(idx[j + u]) * NT;
#pragma GCC unroll 8
          for (int z = 0; z < NZ; ++z) acc[u][z] = _mm512_fmadd_ps(wv, T::load(xr, z), acc[u][z]);
        }
      }
      for (; j < e; ++j) {
        const __m512 wv = _mm512_set1_ps(val[j]);
        const float* xr = xb + static_cast<int64_t>(idx[j]) * NT;
#pragma GCC unroll 8
        for (int z = 0; z < NZ; ++z) acc[0][z] = _mm512_fmadd_ps(wv, T::load(xr, z), acc[0][z]);
      }
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
        for (int z = 0; z < NZ; ++z) acc[0][z] = _mm512_add_ps(acc[0][z], acc[u][z]);
      if (!last) {
#pragma GCC unroll 8
        for (int z = 0; z < NZ; ++z) T::store(part, z, acc[0][z]);
      } else if (n_valid == NT) {
        float* o = out + (m - m0) * ldo;
#pragma GCC unroll 8
        for (int z = 0; z < NZ; ++z) T::store(o, z, acc[0][z]);
      } else {
        alignas(64) float tmp[16 * NZ];
#pragma GCC unroll 8
        for (int z = 0; z < NZ; ++z) _mm512_store_ps(tmp + 16 * z, acc[0][z]);
        memcpy(out + (m - m0) * ldo, tmp, sizeof(float) * n_valid);
      }
    }
  }
}

void spmm(const BlockedCsr& w, int64_t m0, int64_t m1, const float* xt, int nv, const float* bias, float* out,
          int64_t ldo, int n_valid, float* scratch) {
  switch (nv) {
    case 1: return spmm_t<1, 8>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 2: return spmm_t<2, 8>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 3: return spmm_t<3, 4>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 4: return spmm_t<4, 4>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 5: return spmm_t<5, 2>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 6: return spmm_t<6, 2>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 7: return spmm_t<7, 2>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    default: return spmm_t<8, 2>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
  }
}

template <int NV, int U>
void spmm_offsets_t(const OffsetCsr& w, int64_t m0, int64_t m1, const float* base, const float* bias, float* out,
                    int64_t ldo) {
  using T = TileShape<NV>;
  constexpr int NZ = T::NZ;
  const float* val = w.val;
  const int32_t* off = w.off;
  for (int64_t m = m0; m < m1; ++m) {
    __m512 acc[U][NZ];
    const __m512 init = _mm512_set1_ps(bias ? bias[m] : 0.f);
#pragma GCC unroll 8
    for (int z = 0; z < NZ; ++z) acc[0][z] = init;
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int z = 0; z < NZ; ++z) acc[u][z] = _mm512_setzero_ps();
    int64_t j = w.row_ptr[m];
    const int64_t e = w.row_ptr[m + 1];
    for (; j + U <= e; j += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const __m512 wv = _mm512_set1_ps(val[j + u]);
        const float* xr = base + off[j + u];
#pragma GCC unroll 8
        for (int z = 0; z < NZ; ++z) acc[u][z] = _mm512_fmadd_ps(wv, T::load(xr, z), acc[u][z]);
      }
    }
    for (; j < e; ++j) {
      const __m512 wv = _mm512_set1_ps(val[j]);
      const float* xr = base + off[j];
#pragma GCC unroll 8
      for (int z = 0; z < NZ; ++z) acc[0][z] = _mm512_fmadd_ps(wv, T::load(xr, z), acc[0][z]);
    }
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int z = 0; z < NZ; ++z) acc[0][z] = _mm512_add_ps(acc[0][z], acc[u][z]);
    float* o = out + (m - m0) * ldo;
#pragma GCC unroll 8
    for (int z = 0; z < NZ; ++z) T::store(o, z, acc[0][z]);
  }
}

void spmm_offsets(const OffsetCsr& w, int64_t m0, int64_t m1, const float* base, int nv, const float* bias,
                  float* out, int64_t ldo) {
  switch (nv) {
    case 1: return spmm_offsets_t<1, 8>(w, m0, m1, base, bias, out, ldo);
    case 2: return spmm_offsets_t<2, 8>(w, m0, m1, base, bias, out, ldo);
    case 3: return spmm_offsets_t<3, 4>(w, m0, m1, base, bias, out, ldo);
    case 4: return spmm_offsets_t<4, 4>(w, m0, m1, base, bias, out, ldo);
    case 5: return spmm_offsets_t<5, 2>(w, m0, m1, base, bias, out, ldo);
    case 6: return spmm_offsets_t<6, 2>(w, m0, m1, base, bias, out, ldo);
    case 7: return spmm_offsets_t<7, 2>(w, m0, m1, base, bias, out, ldo);
    default: return spmm_offsets_t<8, 2>(w, m0, m1, base, bias, out, ldo);
  }
}

// Inclusive prefix sum of sixteen 32-bit lanes (valignd shifts lanes up, filling zeros).
inline __m512i prefix16(__m512i d) {
  const __m512i z = _mm512_setzero_si512();
  d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, z, 15));
  d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, z, 14));
  d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, z, 12));
  d = _mm512_add_epi32(d, _mm512_alignr_epi32(d, z, 8));
  return d;
}

// Weight values of the sixteen entries starting at e (e even for kCodebook4); lanes outside k are
// zero.
template <int KIND>
inline __m512 values16(const PackedRows& w, int64_t e, __m512 table16, __mmask16 k) {
  if (KIND == kCodebook4) {
    // 8 bytes = 16 nibbles: lanes 0-7 take the low 32 bits, lanes 8-15 the high ones.
    const __m512i b = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.code + (e >> 1)))));
    const __m512i idx = _mm512_and_si512(
        _mm512_srlv_epi32(b, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)),
        _mm512_set1_epi32(15));
    return _mm512_maskz_permutexvar_ps(k, idx, table16);  // the 16-entry codebook is one register
  } else if (KIND == kCodebook8) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.code + e)));
    return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, w.table, 4);
  } else {
    return _mm512_maskz_cvtepi32_ps(
        k, _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.code + e))));
  }
}

template <int KIND>
void spmv_packed_t(const PackedRows& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  const __m512 table16 = KIND == kCodebook4 ? _mm512_loadu_ps(w.table) : _mm512_setzero_ps();
  const __m512i last = _mm512_set1_epi32(15);
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t e0 = w.start[m], n = w.len[m];
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512i base = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      const int64_t e = e0 + i;
      __m512i c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.delta + e)));
      __m512i c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.delta + e + 16)));
      c0 = _mm512_add_epi32(prefix16(c0), base);
      c1 = _mm512_add_epi32(prefix16(c1), _mm512_permutexvar_epi32(last, c0));
      base = _mm512_permutexvar_epi32(last, c1);
      a0 = _mm512_fmadd_ps(values16<KIND>(w, e, table16, 0xFFFF), _mm512_i32gather_ps(c0, x, 4), a0);
      a1 = _mm512_fmadd_ps(values16<KIND>(w, e + 16, table16, 0xFFFF), _mm512_i32gather_ps(c1, x, 4), a1);
    }
    for (; i < n; i += 16) {  // masked tail (the padded arrays may be read past the row)
      const int64_t e = e0 + i;
      const int64_t r = n - i;
      const __mmask16 k = r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1);
      __m512i c0 = _mm512_maskz_cvtepu8_epi32(k, _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.delta + e)));
      c0 = _mm512_add_epi32(prefix16(c0), base);
      base = _mm512_permutexvar_epi32(last, c0);
      a0 = _mm512_fmadd_ps(values16<KIND>(w, e, table16, k),
                           _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, c0, x, 4), a0);
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    if (KIND == kInt8) s *= w.scale[m];
    y[m] = (bias ? bias[m] : 0.f) + s;
  }
}

void spmv_packed(const PackedRows& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  switch (w.kind) {
    case kCodebook4: return spmv_packed_t<kCodebook4>(w, m0, m1, x, bias, y);
    case kCodebook8: return spmv_packed_t<kCodebook8>(w, m0, m1, x, bias, y);
    default: return spmv_packed_t<kInt8>(w, m0, m1, x, bias, y);
  }
}

}  // namespace

// The 8x8 register transpose of the AVX2 file serves this path too (it is not on a hot loop).
const KernelTable* avx512_kernels() {
  static const KernelTable table = {"avx512", spmv, spmm, avx2_kernels()->transpose, spmm_offsets, spmv_packed};
  return &table;
}

}  // namespace tcops
