// AVX-512 kernels (F, BW, VL; 16-lane vectors and mask registers). This file is compiled with
// -mavx512f -mavx512bw -mavx512vl -mavx2 -mfma and is only called after a run-time CPU and OS check
// (ops.cc); it must not include headers with inline functions other than the intrinsics.
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

namespace tcops {
namespace {

// Sixteen x values by index: scalar loads + inserts into two 8-lane halves. On Zen 4 this beat
// vgatherdps in a development run (AlexNet fc6-fc8, batch 1).
inline __m512 gather16(const float* xb, const uint16_t* ix) {
  const __m256 lo = _mm256_setr_ps(xb[ix[0]], xb[ix[1]], xb[ix[2]], xb[ix[3]], xb[ix[4]], xb[ix[5]], xb[ix[6]],
                                   xb[ix[7]]);
  const __m256 hi = _mm256_setr_ps(xb[ix[8]], xb[ix[9]], xb[ix[10]], xb[ix[11]], xb[ix[12]], xb[ix[13]],
                                   xb[ix[14]], xb[ix[15]]);
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
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
                    int64_t ldo, bool max_into) {
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
    if (max_into) {
#pragma GCC unroll 8
      for (int z = 0; z < NZ; ++z) {  // max(new, old) keeps a NaN in old; the masked move one in new
        const __m512 r = acc[0][z];
        const __m512 mx = _mm512_max_ps(r, T::load(o, z));
        T::store(o, z, _mm512_mask_mov_ps(mx, _mm512_cmp_ps_mask(r, r, _CMP_UNORD_Q), r));
      }
    } else {
#pragma GCC unroll 8
      for (int z = 0; z < NZ; ++z) T::store(o, z, acc[0][z]);
    }
  }
}

void spmm_offsets(const OffsetCsr& w, int64_t m0, int64_t m1, const float* base, int nv, const float* bias,
                  float* out, int64_t ldo, bool max_into) {
  switch (nv) {
    case 1: return spmm_offsets_t<1, 8>(w, m0, m1, base, bias, out, ldo, max_into);
    case 2: return spmm_offsets_t<2, 8>(w, m0, m1, base, bias, out, ldo, max_into);
    case 3: return spmm_offsets_t<3, 4>(w, m0, m1, base, bias, out, ldo, max_into);
    case 4: return spmm_offsets_t<4, 4>(w, m0, m1, base, bias, out, ldo, max_into);
    case 5: return spmm_offsets_t<5, 2>(w, m0, m1, base, bias, out, ldo, max_into);
    case 6: return spmm_offsets_t<6, 2>(w, m0, m1, base, bias, out, ldo, max_into);
    case 7: return spmm_offsets_t<7, 2>(w, m0, m1, base, bias, out, ldo, max_into);
    default: return spmm_offsets_t<8, 2>(w, m0, m1, base, bias, out, ldo, max_into);
  }
}

// Weight values of the sixteen entries starting at e (e even for kCodebook4).
template <int KIND>
inline __m512 values16(const PackedRows& w, int64_t e, __m512 table16) {
  if (KIND == kCodebook4) {
    // 8 bytes = 16 nibbles: lanes 0-7 take the low 32 bits, lanes 8-15 the high ones.
    const __m512i b = _mm512_permutexvar_epi32(
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.code + (e >> 1)))));
    const __m512i idx = _mm512_and_si512(
        _mm512_srlv_epi32(b, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)),
        _mm512_set1_epi32(15));
    return _mm512_permutexvar_ps(idx, table16);  // the 16-entry codebook is one register (vpermps)
  } else if (KIND == kCodebook8) {
    const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.code + e)));
    return _mm512_i32gather_ps(idx, w.table, 4);  // 1 KiB table, L1-resident
  } else {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.code + e))));
  }
}

template <int KIND>
float value1(const PackedRows& w, int64_t e) {
  if (KIND == kCodebook4) return w.table[(w.code[e >> 1] >> (4 * (e & 1))) & 15];
  if (KIND == kCodebook8) return w.table[w.code[e]];
  return static_cast<float>(static_cast<int8_t>(w.code[e]));
}

template <int KIND>
void spmv_packed_t(const PackedRows& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  const __m512 table16 = KIND == kCodebook4 ? _mm512_loadu_ps(w.table) : _mm512_setzero_ps();
  const uint16_t* idx = w.idx;
  for (int64_t b = 0; b < w.nblocks; ++b) {
    const float* xb = x + b * w.block_cols;
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t i = b * w.rows + m;
      const int64_t e0 = w.start[i], e = e0 + w.len[i];
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t j = e0;
      for (; j + 32 <= e; j += 32) {
        a0 = _mm512_fmadd_ps(values16<KIND>(w, j, table16), gather16(xb, idx + j), a0);
        a1 = _mm512_fmadd_ps(values16<KIND>(w, j + 16, table16), gather16(xb, idx + j + 16), a1);
      }
      for (; j + 16 <= e; j += 16) a0 = _mm512_fmadd_ps(values16<KIND>(w, j, table16), gather16(xb, idx + j), a0);
      float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      for (; j < e; ++j) s += value1<KIND>(w, j) * xb[idx[j]];
      if (KIND == kInt8) s *= w.scale[m];
      const float init = b == 0 ? (bias ? bias[m] : 0.f) : y[m];
      y[m] = init + s;
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

// LRN, 16 positions at a time (the last group masked); t^-beta as in the portable kernels.
void lrn(const float* x, float* y, int64_t C, int64_t P, int64_t p0, int64_t p1, int64_t lo, int64_t hi, float bias,
         float coef, float beta) {
  const __m512 vbias = _mm512_set1_ps(bias), vcoef = _mm512_set1_ps(coef), one = _mm512_set1_ps(1.f);
  const int kind = beta == 0.75f ? 0 : beta == 0.5f ? 1 : beta == 1.f ? 2 : 3;
  for (int64_t q = p0; q < p1; q += 16) {
    const int n = p1 - q < 16 ? static_cast<int>(p1 - q) : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t c = 0; c < C; ++c) {
      const int64_t a = c - lo > 0 ? c - lo : 0, b = c + hi < C - 1 ? c + hi : C - 1;
      __m512 s = _mm512_setzero_ps();
      for (int64_t k = a; k <= b; ++k) {
        const __m512 v = _mm512_maskz_loadu_ps(mask, x + k * P + q);
        s = _mm512_add_ps(s, _mm512_mul_ps(v, v));
      }
      const __m512 t = _mm512_add_ps(vbias, _mm512_mul_ps(vcoef, s));
      __m512 f;
      if (kind == 0) {
        const __m512 r = _mm512_sqrt_ps(t);
        f = _mm512_div_ps(one, _mm512_mul_ps(r, _mm512_sqrt_ps(r)));
      } else if (kind == 1) {
        f = _mm512_div_ps(one, _mm512_sqrt_ps(t));
      } else if (kind == 2) {
        f = _mm512_div_ps(one, t);
      } else {
        alignas(64) float tv[16];
        _mm512_store_ps(tv, t);
        for (int i = 0; i < 16; ++i) tv[i] = __builtin_powf(tv[i], -beta);
        f = _mm512_load_ps(tv);
      }
      _mm512_mask_storeu_ps(y + c * P + q, mask, _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, x + c * P + q), f));
    }
  }
}

}  // namespace

// As AVX2's: x * 0 stays 0 for finite x, NaN otherwise; the tail by a masked load.
bool all_finite(const float* x, int64_t n) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), zero, a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), zero, a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 32), zero, a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 48), zero, a3);
  }
  for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), zero, a0);
  if (i < n) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (n - i)) - 1), x + i), zero, a1);
  const __m512 a = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
  return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) == 0;
}

// The 8x8 register transpose of the AVX2 file serves this path too (it is not on a hot loop).
const KernelTable* avx512_kernels() {
  // Batch-1 fp32 SpMV and the transpose are AVX2's: the 16-lane gather build was slower (docs/kernels.md).
  static const KernelTable table = {"avx512", avx2_kernels()->spmv, spmm, avx2_kernels()->transpose, spmm_offsets,
                                    spmv_packed, all_finite, lrn};
  return &table;
}

}  // namespace tcops
