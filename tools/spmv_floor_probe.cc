// Probe: why the fp32 batch-1 sparse kernel stays above the bandwidth floor on this CPU.
//
// Built with -mavx2 -mfma (main checks the CPU first) and run by tools/spmv_floor_probe.py. It times loops
// over the layout of the fp32 fast form (column blocks of 2048, row-major segments, uint16 column offsets,
// fp32 values, on 2 MiB huge pages) of AlexNet's fc stack at 10 % density. Only the first three loops compute
// the product; the others are timing probes that read the same value and index streams but do less per
// non-zero, to show which part of the work keeps a kernel from streaming at the memory's read rate.
//
//   probe_chunks      the library's batch-1 kernel (kernels_avx2.cc, linked in) over its layout since stop 22:
//                     chunks of 8 fp32 values followed by their 8 uint16 column offsets (one interleaved
//                     stream, each row's last chunk padded and masked), offsets read as 64-bit words,
//                     1.5 loads per non-zero
//   probe_gather      the product over separate value and index arrays, each x value loaded by index
//                     (scalar loads into 4-lane vectors: the library's AVX2 batch-1 kernel until stop 21),
//                     2.25 loads per non-zero
//   probe_idx64       the same product, indices read 4 at a time as 64-bit words (1.5 loads / non-zero)
//   probe_half        x loaded for every other non-zero only (1.25 loads / non-zero; wrong result)
//   probe_fixed       one x load per non-zero at addresses that do not depend on the index (1.25 loads)
//   probe_none        no x loads: values times indices (0.25 loads / non-zero)
//   probe_none_fp     probe_none plus 2 vector multiplies per non-zero (FP work, no loads)
//   two_streams       the value and index arrays read in one loop, no segments, no x
//   one_stream        one sequential read of a buffer of the same size as the weights
//
// Output: one line per probe, "name streamed_ns_per_nz l2_ns_per_nz", and a first line
// "bandwidth GBps bytes_per_nz B chunk_bytes_per_nz C nnz N error E" (C: bytes per non-zero of the chunked
// layout, padding included; E: the product probes' largest error on fc6 against a float64 reference). Arguments: [rows of fc6/fc7] [timed runs] [MiB of the bandwidth / flush buffer].
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "kernels.h"  // the library's batch-1 kernel (toolchain/kernels/csrc), linked in for probe_chunks

namespace {

double now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

// 2 MiB-aligned copy with MADV_HUGEPAGE, as the library places its weight arrays.
template <class T>
T* huge_copy(const std::vector<T>& v) {
  const size_t align = 2u << 20, bytes = v.size() * sizeof(T), size = (bytes + align - 1) / align * align;
  void* p = aligned_alloc(align, size);
  if (!p) abort();
  madvise(p, size, MADV_HUGEPAGE);
  memcpy(p, v.data(), bytes);
  return static_cast<T*>(p);
}

constexpr int kBlockCols = 2048;

using tcops::kChunk;
using tcops::kChunkBytes;

struct Csr {
  int rows = 0, nblocks = 0, block_cols = 0;
  const int32_t* seg = nullptr;  // nblocks * rows + 1
  const uint16_t* idx = nullptr;
  const float* val = nullptr;
  const int32_t* chunk_start = nullptr;  // the same matrix in chunks: first chunk of segment (block, row)
  const uint8_t* chunks = nullptr;
  tcops::BlockedCsr view{};                // the chunks as the library's kernels take them
  size_t nnz = 0, bytes = 0, chunk_bytes = 0;
};

Csr make_layer(int rows, int cols, double density, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  const int nblocks = (cols + kBlockCols - 1) / kBlockCols, bc = (cols + nblocks - 1) / nblocks;
  std::vector<std::vector<std::pair<int, float>>> row(rows);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      if (u(rng) < density) row[r].push_back({c, u(rng) - 0.5f});
  std::vector<int32_t> seg{0};
  std::vector<uint16_t> idx;
  std::vector<float> val;
  for (int b = 0; b < nblocks; ++b)
    for (int r = 0; r < rows; ++r) {
      for (auto& e : row[r])
        if (e.first / bc == b) {
          idx.push_back(static_cast<uint16_t>(e.first - b * bc));
          val.push_back(e.second);
        }
      seg.push_back(static_cast<int32_t>(idx.size()));
    }
  Csr w;
  w.rows = rows;
  w.nblocks = nblocks;
  w.block_cols = bc;
  w.nnz = idx.size();
  w.bytes = w.nnz * 6 + seg.size() * 4;
  // chunked copy: segments in order, each padded to whole chunks (value 0, offset 0)
  std::vector<int32_t> cs;
  std::vector<uint8_t> ch;
  for (size_t i = 0; i + 1 < seg.size(); ++i) {
    cs.push_back(static_cast<int32_t>(ch.size() / kChunkBytes));
    for (int32_t j = seg[i]; j < seg[i + 1]; j += kChunk) {
      uint8_t c[kChunkBytes] = {};
      for (int k = 0; k < kChunk && j + k < seg[i + 1]; ++k) {
        memcpy(c + 4 * k, &val[j + k], 4);
        memcpy(c + 4 * kChunk + 2 * k, &idx[j + k], 2);
      }
      ch.insert(ch.end(), c, c + kChunkBytes);
    }
  }
  w.chunk_bytes = ch.size() + cs.size() * 4;
  w.chunk_start = huge_copy(cs);
  w.chunks = huge_copy(ch);
  idx.resize(idx.size() + 64);
  val.resize(val.size() + 64);
  w.seg = huge_copy(seg);
  w.idx = huge_copy(idx);
  w.val = huge_copy(val);
  // one sub-block per block: segment (b, r) is seg[b * rows + r], as the library's row-major store numbers it
  w.view = tcops::BlockedCsr{rows, cols, bc, nblocks, bc, 1, 1, 1, w.seg, nullptr, nullptr, w.chunk_start, w.chunks};
  return w;
}

inline float hsum4(__m128 a) {
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}
inline float hsum8(__m256 a) { return hsum4(_mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1))); }
inline __m128 gather4(const float* x, const uint16_t* i) { return _mm_setr_ps(x[i[0]], x[i[1]], x[i[2]], x[i[3]]); }
inline __m128 gather4w(const float* x, uint64_t w) {
  return _mm_setr_ps(x[w & 0xffff], x[(w >> 16) & 0xffff], x[(w >> 32) & 0xffff], x[w >> 48]);
}
inline __m256 idx8(const uint16_t* i) {
  return _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(i))));
}

// Every probe walks the same segments; `Body` handles 16 non-zeros from j, `Tail` one.
template <class Body, class Tail>
void walk(const Csr& w, const float* x, float* y, Body body, Tail tail) {
  for (int b = 0; b < w.nblocks; ++b) {
    const float* xb = x + static_cast<int64_t>(b) * w.block_cols;
    const int32_t* sp = w.seg + static_cast<int64_t>(b) * w.rows;
    for (int m = 0; m < w.rows; ++m) {
      __m128 a[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
      int64_t j = sp[m];
      const int64_t e = sp[m + 1];
      for (; j + 16 <= e; j += 16) body(xb, j, a);
      float s = hsum4(_mm_add_ps(_mm_add_ps(a[0], a[1]), _mm_add_ps(a[2], a[3])));
      for (; j < e; ++j) s += tail(xb, j);
      y[m] = (b ? y[m] : 0.f) + s;
    }
  }
}

// The library's batch-1 kernel itself (kernels_avx2.cc, which the AVX-512 table uses too) over the chunks.
void probe_chunks(const Csr& w, const float* x, float* y) { tcops::avx2_kernels()->spmv(w.view, 0, w.rows, x, nullptr, y); }

void probe_gather(const Csr& w, const float* x, float* y) {
  const float* v = w.val;
  const uint16_t* ix = w.idx;
  walk(w, x, y, [&](const float* xb, int64_t j, __m128* a) {
    for (int q = 0; q < 4; ++q) a[q] = _mm_fmadd_ps(_mm_loadu_ps(v + j + 4 * q), gather4(xb, ix + j + 4 * q), a[q]);
  }, [&](const float* xb, int64_t j) { return v[j] * xb[ix[j]]; });
}

void probe_idx64(const Csr& w, const float* x, float* y) {
  const float* v = w.val;
  const uint16_t* ix = w.idx;
  walk(w, x, y, [&](const float* xb, int64_t j, __m128* a) {
    uint64_t w0, w1, w2, w3;
    memcpy(&w0, ix + j, 8);
    memcpy(&w1, ix + j + 4, 8);
    memcpy(&w2, ix + j + 8, 8);
    memcpy(&w3, ix + j + 12, 8);
    a[0] = _mm_fmadd_ps(_mm_loadu_ps(v + j), gather4w(xb, w0), a[0]);
    a[1] = _mm_fmadd_ps(_mm_loadu_ps(v + j + 4), gather4w(xb, w1), a[1]);
    a[2] = _mm_fmadd_ps(_mm_loadu_ps(v + j + 8), gather4w(xb, w2), a[2]);
    a[3] = _mm_fmadd_ps(_mm_loadu_ps(v + j + 12), gather4w(xb, w3), a[3]);
  }, [&](const float* xb, int64_t j) { return v[j] * xb[ix[j]]; });
}

void probe_half(const Csr& w, const float* x, float* y) {
  const float* v = w.val;
  const uint16_t* ix = w.idx;
  walk(w, x, y, [&](const float* xb, int64_t j, __m128* a) {
    const __m128 g = gather4(xb, ix + j), h = gather4(xb, ix + j + 8);
    a[0] = _mm_fmadd_ps(_mm_loadu_ps(v + j), g, a[0]);
    a[1] = _mm_fmadd_ps(_mm_loadu_ps(v + j + 4), g, a[1]);
    a[2] = _mm_fmadd_ps(_mm_loadu_ps(v + j + 8), h, a[2]);
    a[3] = _mm_fmadd_ps(_mm_loadu_ps(v + j + 12), h, a[3]);
  }, [&](const float* xb, int64_t j) { return v[j] * xb[ix[j]]; });
}

void probe_fixed(const Csr& w, const float* x, float* y) {
  const float* v = w.val;
  const uint16_t* ix = w.idx;
  walk(w, x, y, [&](const float* xb, int64_t j, __m128* a) {
    const float* q = xb + (j & 1023);
    const __m256 g = _mm256_setr_ps(q[0], q[3], q[7], q[11], q[13], q[17], q[19], q[23]);
    const __m256 h = _mm256_setr_ps(q[29], q[31], q[37], q[41], q[43], q[47], q[53], q[59]);
    const __m256 z = _mm256_setzero_ps();
    const __m256 s0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j), _mm256_add_ps(g, idx8(ix + j)), z);
    const __m256 s1 = _mm256_fmadd_ps(_mm256_loadu_ps(v + j + 8), _mm256_add_ps(h, idx8(ix + j + 8)), z);
    a[0] = _mm_add_ps(a[0], _mm256_castps256_ps128(s0));
    a[1] = _mm_add_ps(a[1], _mm256_extractf128_ps(s0, 1));
    a[2] = _mm_add_ps(a[2], _mm256_castps256_ps128(s1));
    a[3] = _mm_add_ps(a[3], _mm256_extractf128_ps(s1, 1));
  }, [&](const float* xb, int64_t j) { return v[j] * ix[j]; });
}

void probe_none(const Csr& w, const float* x, float* y) {
  const float* v = w.val;
  const uint16_t* ix = w.idx;
  walk(w, x, y, [&](const float*, int64_t j, __m128* a) {
    const __m256 s0 = _mm256_mul_ps(_mm256_loadu_ps(v + j), idx8(ix + j));
    const __m256 s1 = _mm256_mul_ps(_mm256_loadu_ps(v + j + 8), idx8(ix + j + 8));
    a[0] = _mm_add_ps(a[0], _mm256_castps256_ps128(s0));
    a[1] = _mm_add_ps(a[1], _mm256_extractf128_ps(s0, 1));
    a[2] = _mm_add_ps(a[2], _mm256_castps256_ps128(s1));
    a[3] = _mm_add_ps(a[3], _mm256_extractf128_ps(s1, 1));
  }, [&](const float*, int64_t j) { return v[j] * ix[j]; });
}

void probe_none_fp(const Csr& w, const float* x, float* y) {
  const float* v = w.val;
  const uint16_t* ix = w.idx;
  walk(w, x, y, [&](const float*, int64_t j, __m128* a) {
    const __m256 k = _mm256_set1_ps(0.999f);
    __m256 s[2] = {_mm256_mul_ps(_mm256_loadu_ps(v + j), idx8(ix + j)),
                   _mm256_mul_ps(_mm256_loadu_ps(v + j + 8), idx8(ix + j + 8))};
    __m256 u[8];
    for (int r = 0; r < 8; ++r) u[r] = s[r & 1];
    for (int q = 0; q < 4; ++q)  // 32 multiplies per 16 non-zeros in 8 chains that end with the iteration
      for (auto& r : u) r = _mm256_mul_ps(r, k);
    const __m256 t0 = _mm256_add_ps(_mm256_add_ps(u[0], u[2]), _mm256_add_ps(u[4], u[6]));
    const __m256 t1 = _mm256_add_ps(_mm256_add_ps(u[1], u[3]), _mm256_add_ps(u[5], u[7]));
    a[0] = _mm_add_ps(a[0], _mm256_castps256_ps128(t0));
    a[1] = _mm_add_ps(a[1], _mm256_extractf128_ps(t0, 1));
    a[2] = _mm_add_ps(a[2], _mm256_castps256_ps128(t1));
    a[3] = _mm_add_ps(a[3], _mm256_extractf128_ps(t1, 1));
  }, [&](const float*, int64_t j) { return v[j] * ix[j]; });
}

float read_stream(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_load_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_load_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_load_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_load_ps(p + i + 24));
  }
  return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

// The value and index arrays of a layer read in one loop, without its segments.
float read_two_streams(const Csr& w) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  __m256i b = _mm256_setzero_si256();
  for (size_t j = 0; j + 16 <= w.nnz; j += 16) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(w.val + j));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(w.val + j + 8));
    b = _mm256_add_epi16(b, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.idx + j)));
  }
  return hsum8(_mm256_add_ps(a0, a1)) + _mm256_extract_epi16(b, 0);
}

float* huge_floats(size_t n, float value) {
  const size_t align = 2u << 20, size = (n * 4 + align - 1) / align * align;
  float* p = static_cast<float*>(aligned_alloc(align, size));
  if (!p) abort();
  madvise(p, size, MADV_HUGEPAGE);
  std::fill(p, p + n, value);
  return p;
}

// Largest |y - reference| of one layer's product, the reference summed in double.
double product_error(const Csr& w, const float* x, const float* y) {
  double worst = 0;
  for (int m = 0; m < w.rows; ++m) {
    double ref = 0;
    for (int b = 0; b < w.nblocks; ++b) {
      const int64_t s = static_cast<int64_t>(b) * w.rows + m;
      for (int32_t j = w.seg[s]; j < w.seg[s + 1]; ++j)
        ref += double(w.val[j]) * x[static_cast<int64_t>(b) * w.block_cols + w.idx[j]];
    }
    worst = std::max(worst, std::abs(ref - y[m]));
  }
  return worst;
}

volatile float g_sink;

double median(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    fprintf(stderr, "this probe needs AVX2 and FMA\n");
    return 2;
  }
  const int rows = argc > 1 ? atoi(argv[1]) : 4096, runs = argc > 2 ? atoi(argv[2]) : 30;
  const long big_mib = argc > 3 ? atol(argv[3]) : 1024;
  if (rows < 16 || runs < 1 || big_mib < 1) {
    fprintf(stderr, "usage: spmv_floor_probe [rows >= 16] [runs >= 1] [MiB of the bandwidth buffer >= 1]\n");
    return 2;
  }
  // AlexNet fc6-fc8 shapes (fc8 keeps 1000 rows when rows = 4096), 10 % density.
  std::vector<Csr> stack = {make_layer(rows, 9216, 0.1, 1), make_layer(rows, rows, 0.1, 2),
                            make_layer(std::max(16, rows * 1000 / 4096), rows, 0.1, 3)};
  Csr small = make_layer(160, 9216, 0.1, 4);  // 0.9 MB: stays in L2 between repetitions
  size_t nnz = 0, bytes = 0, chunk_bytes = 0;
  for (auto& w : stack) nnz += w.nnz, bytes += w.bytes, chunk_bytes += w.chunk_bytes;
  const size_t one_n = (bytes / 4 + 31) / 32 * 32;
  const float* one = huge_floats(one_n, 1.f);
  const size_t big_n = size_t(big_mib) << 18;  // floats of the bandwidth pass and the cache flush
  const float* big = huge_floats(big_n, 1.f);
  // sized for every layer's input / output (the small layer writes 160 rows; probe_fixed reads x[0 .. 1083))
  const size_t act = std::max<size_t>(rows, 9216) + 64;
  std::vector<float> x(act), h1(act), h2(act), out(act);
  std::mt19937 rng(5);
  for (auto& v : x) v = std::uniform_real_distribution<float>(0.f, 1.f)(rng);

  using Probe = void (*)(const Csr&, const float*, float*);
  const struct {
    const char* name;
    Probe f;
  } probes[] = {{"chunks", probe_chunks}, {"gather", probe_gather},   {"idx64", probe_idx64}, {"half", probe_half},
                {"fixed", probe_fixed},     {"none", probe_none},   {"none_fp", probe_none_fp},
                {"two_streams", nullptr}, {"one_stream", nullptr}};
  const int np = sizeof(probes) / sizeof(probes[0]);
  std::vector<std::vector<double>> streamed(np), resident(np);
  for (int r = 0; r < runs; ++r)
    for (int p = 0; p < np; ++p) {  // interleaved, so host noise hits every probe alike
      g_sink = read_stream(big, std::min(big_n, size_t(64) << 20));  // 256 MB read: evicts an L3 of 32 MB
      double t = now();
      if (probes[p].f) {
        probes[p].f(stack[0], x.data(), h1.data());
        probes[p].f(stack[1], h1.data(), h2.data());
        probes[p].f(stack[2], h2.data(), out.data());
      } else if (!strcmp(probes[p].name, "two_streams")) {
        for (auto& w : stack) g_sink = read_two_streams(w);
      } else {
        g_sink = read_stream(one, one_n);
      }
      streamed[p].push_back(now() - t);
      if (!probes[p].f) continue;
      probes[p].f(small, x.data(), out.data());
      t = now();
      for (int k = 0; k < 10; ++k) probes[p].f(small, x.data(), out.data());
      resident[p].push_back((now() - t) / 10);
    }
  std::vector<double> bw;
  for (int r = 0; r < 7; ++r) {
    const double t = now();
    g_sink = read_stream(big, big_n);
    bw.push_back(big_n * 4 / (now() - t));
  }
  probe_chunks(stack[0], x.data(), h1.data());
  double error = product_error(stack[0], x.data(), h1.data());
  probe_gather(stack[0], x.data(), h1.data());
  error = std::max(error, product_error(stack[0], x.data(), h1.data()));
  probe_idx64(stack[0], x.data(), h1.data());
  error = std::max(error, product_error(stack[0], x.data(), h1.data()));
  printf("bandwidth %.3f bytes_per_nz %.4f chunk_bytes_per_nz %.4f nnz %zu error %.3g\n", median(bw) / 1e9,
         double(bytes) / nnz, double(chunk_bytes) / nnz, nnz, error);
  for (int p = 0; p < np; ++p)
    printf("%s %.4f %.4f\n", probes[p].name, median(streamed[p]) / nnz * 1e9,
           probes[p].f ? median(resident[p]) / small.nnz * 1e9 : 0.0);
  return 0;
}
