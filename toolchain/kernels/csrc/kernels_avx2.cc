// AVX2+FMA kernels. This file is compiled with -mavx2 -mfma and is only called after a run-time
// CPU check (ops.cc); it must not include headers with inline functions other than the intrinsics.
#include <immintrin.h>
#include <string.h>

#include "kernels.h"

namespace tcops {
namespace {

inline float hsum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Eight x values by index. Scalar loads + inserts beat vgatherdps here (measured on Zen 4).
inline __m256 gather8(const float* xb, const uint16_t* ix) {
  return _mm256_setr_ps(xb[ix[0]], xb[ix[1]], xb[ix[2]], xb[ix[3]], xb[ix[4]], xb[ix[5]], xb[ix[6]], xb[ix[7]]);
}

// Four x values by the four uint16 offsets at ip (scalar loads into one xmm: fewer shuffles per value than
// the eight-lane build). The offsets are read as one 64-bit word and split into 32-bit halves: one load
// for four offsets instead of four.
inline __m128 gather4w(const float* xb, const uint8_t* ip) {
  uint64_t w;
  memcpy(&w, ip, 8);
  const uint32_t lo = static_cast<uint32_t>(w), hi = static_cast<uint32_t>(w >> 32);
  const __m128 a = _mm_insert_ps(_mm_load_ss(xb + (lo & 0xffff)), _mm_load_ss(xb + (lo >> 16)), 0x10);
  const __m128 b = _mm_insert_ps(_mm_load_ss(xb + (hi & 0xffff)), _mm_load_ss(xb + (hi >> 16)), 0x10);
  return _mm_movelh_ps(a, b);
}

// Lane masks of a row's last chunk: lanes [0, r) of loadu(kLaneMask + 8 - r) are set, r in 1..8.
alignas(64) const int32_t kLaneMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};

// Batch 1 over the interleaved chunks of a row-major store (kernels.h): x gathered with scalar loads
// into 4-lane vectors, four independent accumulators (two per chunk, chunks in pairs). Batch 1 is bound
// by the loads, not by the FMA width: on Zen 4 the 8- and 16-lane builds were no faster, so the AVX-512
// table uses this one too. A row's last chunk is masked: its padding lanes multiply 0 by 0, whatever x is.
void spmv(const BlockedCsr& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  const int64_t M = w.rows, S = w.nsub;
  for (int64_t b = 0; b < w.nblocks; ++b) {
    const int32_t* sp = w.seg_ptr + b * M * S;
    const int32_t* cp = w.chunk_ptr + b * M;
    const float* xb = x + b * w.block_cols;
    for (int64_t m = m0; m < m1; ++m) {
      __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps(), a2 = _mm_setzero_ps(), a3 = _mm_setzero_ps();
      const int64_t n = sp[(m + 1) * S] - sp[m * S];
      if (n > 0) {
        const uint8_t* p = w.chunks + static_cast<int64_t>(cp[m]) * kChunkBytes;
        const int64_t full = (n - 1) / kChunk;  // chunks before the last one
        const uint8_t* last = p + full * kChunkBytes;
        // lanes 0-3 of chunk c into lo, lanes 4-7 into hi
        auto chunk = [xb](const uint8_t* c, __m128& lo, __m128& hi) {
          const float* v = reinterpret_cast<const float*>(c);
          lo = _mm_fmadd_ps(_mm_loadu_ps(v), gather4w(xb, c + 4 * kChunk), lo);
          hi = _mm_fmadd_ps(_mm_loadu_ps(v + 4), gather4w(xb, c + 4 * kChunk + 8), hi);
        };
        for (; p + kChunkBytes < last; p += 2 * kChunkBytes) {
          chunk(p, a0, a1);
          chunk(p + kChunkBytes, a2, a3);
        }
        if (p < last) {
          chunk(p, a0, a1);
          p += kChunkBytes;
        }
        // the last chunk, lanes past its r real entries cleared in x
        const int64_t r = n - full * kChunk;  // 1..8
        const __m128 k0 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kLaneMask + 8 - r)));
        const __m128 k1 = _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kLaneMask + 12 - r)));
        const float* v = reinterpret_cast<const float*>(p);
        a2 = _mm_fmadd_ps(_mm_loadu_ps(v), _mm_and_ps(gather4w(xb, p + 4 * kChunk), k0), a2);
        a3 = _mm_fmadd_ps(_mm_loadu_ps(v + 4), _mm_and_ps(gather4w(xb, p + 4 * kChunk + 8), k1), a3);
      }
      __m128 a = _mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3));
      a = _mm_add_ps(a, _mm_movehl_ps(a, a));
      const float s = _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
      const float init = b == 0 ? (bias ? bias[m] : 0.f) : y[m];
      y[m] = init + s;
    }
  }
}

// Tile product with NV vectors per row and U interleaved accumulator sets (U*NV <= 8 independent
// FMA chains hide the FMA latency when the tile is narrow).
template <int NV, int U>
void spmm_t(const BlockedCsr& w, int64_t m0, int64_t m1, const float* xt, const float* bias, float* out,
            int64_t ldo, int n_valid, float* scratch) {
  constexpr int NT = 8 * NV;
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
      __m256 acc[U][NV];
      float* part = scratch + (m - m0) * NT;
      const __m256 init = _mm256_set1_ps(first && bias ? bias[m] : 0.f);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[0][v] = first ? init : _mm256_load_ps(part + 8 * v);
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[u][v] = _mm256_setzero_ps();
      int64_t j = sp[m * rs];
      const int64_t e = sp[m * rs + 1];
      for (; j + U <= e; j += U) {
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) {
          const __m256 wv = _mm256_broadcast_ss(val + j + u);
          const float* xr = xb + static_cast<int64_t>(idx[j + u]) * NT;
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[u][v] = _mm256_fmadd_ps(wv, _mm256_load_ps(xr + 8 * v), acc[u][v]);
        }
      }
      for (; j < e; ++j) {
        const __m256 wv = _mm256_broadcast_ss(val + j);
        const float* xr = xb + static_cast<int64_t>(idx[j]) * NT;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[0][v] = _mm256_fmadd_ps(wv, _mm256_load_ps(xr + 8 * v), acc[0][v]);
      }
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[0][v] = _mm256_add_ps(acc[0][v], acc[u][v]);
      if (!last) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) _mm256_store_ps(part + 8 * v, acc[0][v]);
      } else if (n_valid == NT) {
        float* o = out + (m - m0) * ldo;
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o + 8 * v, acc[0][v]);
      } else {
        alignas(32) float tmp[NT];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) _mm256_store_ps(tmp + 8 * v, acc[0][v]);
        memcpy(out + (m - m0) * ldo, tmp, sizeof(float) * n_valid);
      }
    }
  }
}

void spmm(const BlockedCsr& w, int64_t m0, int64_t m1, const float* xt, int nv, const float* bias, float* out,
          int64_t ldo, int n_valid, float* scratch) {
  switch (nv) {
    case 1: return spmm_t<1, 8>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 2: return spmm_t<2, 4>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 3: return spmm_t<3, 2>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 4: return spmm_t<4, 2>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 5: return spmm_t<5, 1>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 6: return spmm_t<6, 1>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    case 7: return spmm_t<7, 1>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
    default: return spmm_t<8, 1>(w, m0, m1, xt, bias, out, ldo, n_valid, scratch);
  }
}

template <int NV, int U>
void spmm_offsets_t(const OffsetCsr& w, int64_t m0, int64_t m1, const float* base, const float* bias, float* out,
                    int64_t ldo, bool max_into) {
  const float* val = w.val;
  const int32_t* off = w.off;
  for (int64_t m = m0; m < m1; ++m) {
    __m256 acc[U][NV];
    const __m256 init = _mm256_set1_ps(bias ? bias[m] : 0.f);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[0][v] = init;
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[u][v] = _mm256_setzero_ps();
    int64_t j = w.row_ptr[m];
    const int64_t e = w.row_ptr[m + 1];
    for (; j + U <= e; j += U) {
#pragma GCC unroll 8
      for (int u = 0; u < U; ++u) {
        const __m256 wv = _mm256_broadcast_ss(val + j + u);
        const float* xr = base + off[j + u];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[u][v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * v), acc[u][v]);
      }
    }
    for (; j < e; ++j) {
      const __m256 wv = _mm256_broadcast_ss(val + j);
      const float* xr = base + off[j];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[0][v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr + 8 * v), acc[0][v]);
    }
#pragma GCC unroll 8
    for (int u = 1; u < U; ++u)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[0][v] = _mm256_add_ps(acc[0][v], acc[u][v]);
    float* o = out + (m - m0) * ldo;
    if (max_into) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {  // max(new, old) keeps a NaN in old; the blend keeps one in new
        const __m256 r = acc[0][v];
        const __m256 mx = _mm256_max_ps(r, _mm256_loadu_ps(o + 8 * v));
        _mm256_storeu_ps(o + 8 * v, _mm256_blendv_ps(mx, r, _mm256_cmp_ps(r, r, _CMP_UNORD_Q)));
      }
    } else {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o + 8 * v, acc[0][v]);
    }
  }
}

void spmm_offsets(const OffsetCsr& w, int64_t m0, int64_t m1, const float* base, int nv, const float* bias,
                  float* out, int64_t ldo, bool max_into) {
  switch (nv) {
    case 1: return spmm_offsets_t<1, 8>(w, m0, m1, base, bias, out, ldo, max_into);
    case 2: return spmm_offsets_t<2, 4>(w, m0, m1, base, bias, out, ldo, max_into);
    case 3: return spmm_offsets_t<3, 2>(w, m0, m1, base, bias, out, ldo, max_into);
    case 4: return spmm_offsets_t<4, 2>(w, m0, m1, base, bias, out, ldo, max_into);
    case 5: return spmm_offsets_t<5, 1>(w, m0, m1, base, bias, out, ldo, max_into);
    case 6: return spmm_offsets_t<6, 1>(w, m0, m1, base, bias, out, ldo, max_into);
    case 7: return spmm_offsets_t<7, 1>(w, m0, m1, base, bias, out, ldo, max_into);
    default: return spmm_offsets_t<8, 1>(w, m0, m1, base, bias, out, ldo, max_into);
  }
}

// x * 0 is +-0 for a finite x and NaN for NaN or +-Inf: four sums of those stay 0 or become NaN.
bool all_finite(const float* x, int64_t n) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 a0 = zero, a1 = zero, a2 = zero, a3 = zero;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), zero, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), zero, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 16), zero, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 24), zero, a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), zero, a0);
  const __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  float t = 0.f;
  for (; i < n; ++i) t += x[i] * 0.f;
  return _mm256_movemask_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)) == 0 && t == t;
}

// 8x8 blocks transposed in registers; ragged edges element by element.
void transpose(const float* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  const int64_t r8 = rows & ~int64_t(7), c8 = cols & ~int64_t(7);
  for (int64_t r = 0; r < r8; r += 8) {
    for (int64_t c = 0; c < c8; c += 8) {
      const float* s = src + r * lds + c;
      __m256 a0 = _mm256_loadu_ps(s), a1 = _mm256_loadu_ps(s + lds), a2 = _mm256_loadu_ps(s + 2 * lds);
      __m256 a3 = _mm256_loadu_ps(s + 3 * lds), a4 = _mm256_loadu_ps(s + 4 * lds), a5 = _mm256_loadu_ps(s + 5 * lds);
      __m256 a6 = _mm256_loadu_ps(s + 6 * lds), a7 = _mm256_loadu_ps(s + 7 * lds);
      __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
      __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
      __m256 t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5);
      __m256 t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
      __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dst + c * ldd + r;
      _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t c = c8; c < cols; ++c)
      for (int64_t i = r; i < r + 8; ++i) dst[c * ldd + i] = src[i * lds + c];
  }
  for (int64_t i = r8; i < rows; ++i)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + i] = src[i * lds + c];
}

// Weight values of the eight entries starting at e (e is even for kCodebook4).
template <int KIND>
inline __m256 values8(const PackedRows& w, int64_t e, __m256 t0, __m256 t1) {
  if (KIND == kCodebook4) {
    uint32_t c4;
    memcpy(&c4, w.code + (e >> 1), 4);
    const __m256i idx = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(c4)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
        _mm256_set1_epi32(15));
    // 16-entry table: two 8-entry permutes, bit 3 of the code picks one.
    const __m256 lo = _mm256_permutevar8x32_ps(t0, idx), hi = _mm256_permutevar8x32_ps(t1, idx);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
  } else if (KIND == kCodebook8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.code + e)));
    return _mm256_i32gather_ps(w.table, idx, 4);
  } else {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.code + e))));
  }
}

template <int KIND>
float value1(const PackedRows& w, int64_t e) {
  if (KIND == kCodebook4) return w.table[(w.code[e >> 1] >> (4 * (e & 1))) & 15];
  if (KIND == kCodebook8) return w.table[w.code[e]];
  return static_cast<float>(static_cast<int8_t>(w.code[e]));
}

// Same structure as spmv: column-blocked segments, x gathered with scalar loads, 4 accumulators.
template <int KIND>
void spmv_packed_t(const PackedRows& w, int64_t m0, int64_t m1, const float* x, const float* bias, float* y) {
  const __m256 t0 = KIND == kCodebook4 ? _mm256_loadu_ps(w.table) : _mm256_setzero_ps();
  const __m256 t1 = KIND == kCodebook4 ? _mm256_loadu_ps(w.table + 8) : _mm256_setzero_ps();
  const uint16_t* idx = w.idx;
  for (int64_t b = 0; b < w.nblocks; ++b) {
    const float* xb = x + b * w.block_cols;
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t i = b * w.rows + m;
      const int64_t e0 = w.start[i], e = e0 + w.len[i];
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      int64_t j = e0;
      for (; j + 32 <= e; j += 32) {
        a0 = _mm256_fmadd_ps(values8<KIND>(w, j, t0, t1), gather8(xb, idx + j), a0);
        a1 = _mm256_fmadd_ps(values8<KIND>(w, j + 8, t0, t1), gather8(xb, idx + j + 8), a1);
        a2 = _mm256_fmadd_ps(values8<KIND>(w, j + 16, t0, t1), gather8(xb, idx + j + 16), a2);
        a3 = _mm256_fmadd_ps(values8<KIND>(w, j + 24, t0, t1), gather8(xb, idx + j + 24), a3);
      }
      for (; j + 8 <= e; j += 8) a0 = _mm256_fmadd_ps(values8<KIND>(w, j, t0, t1), gather8(xb, idx + j), a0);
      float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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

// LRN, 8 positions at a time (the last group masked); t^-beta as in the portable kernels.
void lrn(const float* x, float* y, int64_t C, int64_t P, int64_t p0, int64_t p1, int64_t lo, int64_t hi, float bias,
         float coef, float beta) {
  const __m256 vbias = _mm256_set1_ps(bias), vcoef = _mm256_set1_ps(coef), one = _mm256_set1_ps(1.f);
  const int kind = beta == 0.75f ? 0 : beta == 0.5f ? 1 : beta == 1.f ? 2 : 3;
  for (int64_t q = p0; q < p1; q += 8) {
    const int n = p1 - q < 8 ? static_cast<int>(p1 - q) : 8;
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t a = c - lo > 0 ? c - lo : 0, b = c + hi < C - 1 ? c + hi : C - 1;
      __m256 s = _mm256_setzero_ps();
      for (int64_t k = a; k <= b; ++k) {
        const __m256 v = n == 8 ? _mm256_loadu_ps(x + k * P + q) : _mm256_maskload_ps(x + k * P + q, mask);
        s = _mm256_add_ps(s, _mm256_mul_ps(v, v));
      }
      const __m256 t = _mm256_add_ps(vbias, _mm256_mul_ps(vcoef, s));
      __m256 f;
      if (kind == 0) {
        const __m256 r = _mm256_sqrt_ps(t);
        f = _mm256_div_ps(one, _mm256_mul_ps(r, _mm256_sqrt_ps(r)));
      } else if (kind == 1) {
        f = _mm256_div_ps(one, _mm256_sqrt_ps(t));
      } else if (kind == 2) {
        f = _mm256_div_ps(one, t);
      } else {
        alignas(32) float tv[8];
        _mm256_store_ps(tv, t);
        for (int i = 0; i < 8; ++i) tv[i] = __builtin_powf(tv[i], -beta);
        f = _mm256_load_ps(tv);
      }
      const float* xc = x + c * P + q;
      if (n == 8) {
        _mm256_storeu_ps(y + c * P + q, _mm256_mul_ps(_mm256_loadu_ps(xc), f));
      } else {
        _mm256_maskstore_ps(y + c * P + q, mask, _mm256_mul_ps(_mm256_maskload_ps(xc, mask), f));
      }
    }
  }
}

const KernelTable kTable = {"avx2", spmv, spmm, transpose, spmm_offsets, spmv_packed, all_finite, lrn};

}  // namespace

const KernelTable* avx2_kernels() { return &kTable; }

}  // namespace tcops
