// onnxruntime custom-op library: SparseLinear, SparseConv, the packed SparseLinearCodebook /
// SparseLinearInt8, and a vectorised LRN (domain "ai.toolchain", version 1).
//
// The sparse weights are CSR initializers read once at kernel creation, validated (a corrupt model
// must fail with a message, never crash or compute garbage) and repacked into column-blocked CSR
// with 16-bit block-relative indices (kernels.h). Compute runs on onnxruntime's intra-op thread
// pool; every output element is produced by one task in a fixed summation order, so results do
// not depend on the number of threads.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <atomic>
#include <cstdarg>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "kernels.h"
#include "onnxruntime_c_api.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace tcops {
namespace {

constexpr const char* kDomain = "ai.toolchain";
// Tuning constants (measured on the 2-core Zen 4 target, see docs/kernels.md).
constexpr int64_t kBlockCols = 2048;   // column block: the batch-1 x block (8 KiB) stays in L1
constexpr double kSubBlockNnz = 20;    // target non-zeros per (row, sub-block) segment for tile products
constexpr int64_t kMinSubCols = 64;
constexpr int64_t kLinearRowChunk = 256;  // rows per SparseLinear tile task (partial sums: 64 KiB)
// Linear ops run batches up to this size as one batch-1 product per row of X: a tile product costs about
// the same for 2 to 16 rows, more than two batch-1 products at 2 rows (docs/kernels.md).
constexpr int64_t kRowwiseMaxBatch = 3;
constexpr int64_t kMaxAttr = 1 << 16;  // bound on conv kernel/stride/pad/dilation (no overflow below)
constexpr double kDirectMaxReuse = 12.0;  // SparseConv: direct below this output-channel reuse
constexpr double kBatchPooledMaxReuse = 40.0;  // ... and images in lanes below this one with a fused max pool
constexpr int64_t kBatchMinN = 16;        // SparseConv: images-in-lanes from this batch size ...
constexpr int64_t kBatchMaxTileBytes = 1 << 20;  // ... when a lane tile of the padded input fits in L2
constexpr int64_t kFillerStep = 255;      // packed formats: a delta of 0 (filler) advances 255 columns

const OrtApi* g_api = nullptr;

// ---------------------------------------------------------------------------------------------
// Errors: thrown inside the library, turned into an OrtStatus at the C boundary.

struct OpError : std::runtime_error {
  OrtErrorCode code;
  OpError(OrtErrorCode c, const std::string& m) : std::runtime_error(m), code(c) {}
};

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char buf[1024];
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

void ort_check(OrtStatus* st, const std::string& what) {
  if (!st) return;
  std::string msg = what + ": " + g_api->GetErrorMessage(st);
  g_api->ReleaseStatus(st);
  throw OpError(ORT_FAIL, msg);
}

template <class F>
OrtStatus* guarded(F&& f) noexcept {
  try {
    f();
    return nullptr;
  } catch (const OpError& e) {
    return g_api->CreateStatus(e.code, e.what());
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "toolchain sparse ops: out of memory");
  } catch (const std::exception& e) {
    return g_api->CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return g_api->CreateStatus(ORT_FAIL, "toolchain sparse ops: unknown error");
  }
}

// ---------------------------------------------------------------------------------------------
// Buffers.

// Allocator of the repacked weight arrays. One of 1 MiB or more is placed on 2 MiB boundaries and the
// kernel is asked to back it with transparent huge pages (madvise; a hint, ignored where they are off).
// Batch 1 streams every weight once per call, and hardware prefetchers stop at each 4 KiB page: on 4 KiB
// pages the AlexNet fc stack took 2.47 ms against 2.20-2.27 ms (Zen 4, tools/bench_sparse_fc.py
// --deepsparse, docs/kernels.md).
// TOOLCHAIN_KERNELS_HUGEPAGES=0 turns the hint off (read with TOOLCHAIN_KERNELS_ISA when an op is created).
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeMinBytes = size_t(1) << 20;
std::atomic<bool> g_huge_pages{true};

template <class T>
struct HugePageAllocator {
  using value_type = T;
  HugePageAllocator() = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
    void* p = nullptr;
    if (bytes >= kHugeMinBytes && g_huge_pages.load(std::memory_order_relaxed)) {
      const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
      if (posix_memalign(&p, kHugePage, size) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, size, MADV_HUGEPAGE);
#endif
    } else if (!(p = malloc(bytes))) {
      throw std::bad_alloc();
    }
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { free(p); }
};
template <class T, class U>
bool operator==(const HugePageAllocator<T>&, const HugePageAllocator<U>&) { return true; }
template <class T, class U>
bool operator!=(const HugePageAllocator<T>&, const HugePageAllocator<U>&) { return false; }
template <class T>
using WeightVec = std::vector<T, HugePageAllocator<T>>;

struct AlignedBuf {
  float* p = nullptr;
  size_t cap = 0;  // floats
  AlignedBuf() = default;
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
  AlignedBuf(AlignedBuf&& o) noexcept : p(o.p), cap(o.cap) { o.p = nullptr, o.cap = 0; }
  ~AlignedBuf() { free(p); }
  float* get(size_t n) {
    if (n > cap) {
      free(p);
      p = nullptr;
      cap = 0;
      void* q = nullptr;
      if (posix_memalign(&q, 64, std::max<size_t>(n, 16) * sizeof(float)) != 0) throw std::bad_alloc();
      p = static_cast<float*>(q);
      cap = n;
    }
    return p;
  }
};

// Per-thread scratch for tasks (tile of im2col, output tile, partial sums).
float* thread_scratch(int which, size_t n) {
  static thread_local AlignedBuf bufs[3];
  return bufs[which].get(n);
}

// Per-kernel pool of per-call buffers; concurrent Run() calls each get their own.
class BufferPool {
 public:
  AlignedBuf acquire() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return AlignedBuf();
    AlignedBuf b = std::move(free_.back());
    free_.pop_back();
    return b;
  }
  void release(AlignedBuf&& b) {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < 4) free_.push_back(std::move(b));
  }

 private:
  std::mutex mu_;
  std::vector<AlignedBuf> free_;
};

struct PooledBuf {
  BufferPool& pool;
  AlignedBuf buf;
  explicit PooledBuf(BufferPool& p) : pool(p), buf(p.acquire()) {}
  ~PooledBuf() { pool.release(std::move(buf)); }
};

// ---------------------------------------------------------------------------------------------
// Kernel selection.

// What this CPU and OS support, detected once per process: cpuid feature bits, and xgetbv for
// the register state the OS saves (YMM for AVX2; opmask + ZMM for AVX-512).
struct CpuIsa {
  bool avx2 = false;    // AVX2 + FMA + OS-enabled YMM state
  bool avx512 = false;  // AVX-512 F/BW/VL + the above + OS-enabled opmask/ZMM state
  bool vnni = false;    // AVX512-VNNI (reported; the fp32-activation kernels do not use it)
};

#if defined(__x86_64__) || defined(__i386__)
uint64_t read_xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

CpuIsa detect_isa() {
  CpuIsa c;
  unsigned a, b, cx, d;
  if (!__get_cpuid(1, &a, &b, &cx, &d)) return c;
  const bool osxsave = cx & (1u << 27), avx = cx & (1u << 28), fma = cx & (1u << 12);
  if (!osxsave || !avx) return c;
  const uint64_t xcr0 = read_xcr0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;            // SSE + AVX state
  const bool zmm_os = (xcr0 & 0xE6) == 0xE6;           // + opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return c;
  __cpuid_count(7, 0, a, b, cx, d);
  const bool avx2 = b & (1u << 5);
  const bool f = b & (1u << 16), bw = b & (1u << 30), vl = b & (1u << 31);
  c.avx2 = ymm_os && avx2 && fma;
  c.avx512 = c.avx2 && zmm_os && f && bw && vl;
  c.vnni = c.avx512 && (cx & (1u << 11));
  return c;
}
#else
CpuIsa detect_isa() { return CpuIsa(); }
#endif

// Detected once; TOOLCHAIN_KERNELS_ISA_CAP=avx2|portable pretends the CPU has no more than that
// (for testing the "forced path not supported" error on machines that have everything).
const CpuIsa& cpu_isa() {
  static const CpuIsa isa = [] {
    CpuIsa c = detect_isa();
    const char* cap = getenv("TOOLCHAIN_KERNELS_ISA_CAP");
    const std::string s = cap ? cap : "";
    if (s == "avx2") c.avx512 = c.vnni = false;
    if (s == "portable") c = CpuIsa();
    return c;
  }();
  return isa;
}

// TOOLCHAIN_KERNELS_ISA (read when an op is created): auto picks the widest supported path.
const KernelTable* select_kernels() {
  const char* hp = getenv("TOOLCHAIN_KERNELS_HUGEPAGES");
  const std::string huge = hp ? hp : "";
  if (huge != "" && huge != "0" && huge != "1")
    throw OpError(ORT_INVALID_ARGUMENT, format("TOOLCHAIN_KERNELS_HUGEPAGES=%s is not 0 or 1", huge.c_str()));
  g_huge_pages.store(huge != "0", std::memory_order_relaxed);
  const char* env = getenv("TOOLCHAIN_KERNELS_ISA");
  const std::string isa = env ? env : "";
  const CpuIsa& cpu = cpu_isa();
  if (isa.empty() || isa == "auto")
    return cpu.avx512 ? avx512_kernels() : cpu.avx2 ? avx2_kernels() : portable_kernels();
  if (isa == "portable") return portable_kernels();
  if (isa == "avx2") {
    if (!cpu.avx2)
      throw OpError(ORT_FAIL, "TOOLCHAIN_KERNELS_ISA=avx2 but this CPU/OS lacks AVX2+FMA; use auto or portable");
    return avx2_kernels();
  }
  if (isa == "avx512") {
    if (!cpu.avx512)
      throw OpError(ORT_FAIL,
                    "TOOLCHAIN_KERNELS_ISA=avx512 but this CPU/OS lacks AVX-512 F/BW/VL; use auto, avx2 or portable");
    return avx512_kernels();
  }
  throw OpError(ORT_INVALID_ARGUMENT,
                format("TOOLCHAIN_KERNELS_ISA=%s is not one of auto, avx512, avx2, portable", isa.c_str()));
}

// ---------------------------------------------------------------------------------------------
// Parallel for over the session's intra-op thread pool.

template <class F>
void parallel_for(OrtKernelContext* ctx, size_t n, const F& f) {
  if (n == 0) return;
  if (n == 1) {
    f(size_t(0));
    return;
  }
  struct State {
    const F* f;
    std::atomic<int> failed{0};
    std::string msg;
    std::mutex mu;
  } st;
  st.f = &f;
  auto tramp = [](void* user, size_t i) {
    State* s = static_cast<State*>(user);
    if (s->failed.load(std::memory_order_relaxed)) return;
    try {
      (*s->f)(i);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(s->mu);
      if (!s->failed.exchange(1)) s->msg = e.what();
    } catch (...) {
      std::lock_guard<std::mutex> lock(s->mu);
      if (!s->failed.exchange(1)) s->msg = "unknown error in worker";
    }
  };
  ort_check(g_api->KernelContext_ParallelFor(ctx, tramp, n, 0, &st), "KernelContext_ParallelFor");
  if (st.failed.load()) throw OpError(ORT_FAIL, st.msg);
}

// Split [0, rows) into chunks of >= min_rows rows, aiming for `target` chunks (never depends on
// the thread count, so results are the same for any number of threads).
int64_t chunk_rows(int64_t rows, int64_t target, int64_t min_rows, int64_t max_rows) {
  int64_t c = (rows + target - 1) / std::max<int64_t>(target, 1);
  c = std::max(c, min_rows);
  c = std::min(c, max_rows);
  return std::max<int64_t>(c, 1);
}

// Rows of W per task of a batch-1 linear product (linear_rowwise); the batch-1 layouts are laid out for it.
int64_t rowwise_task_rows(int64_t rows) { return chunk_rows(rows, 16, 64, 512); }

// f(b, m) for the (block b, row m) segments of a batch-1 layout in the order its tasks read them: all
// blocks of a task's rows, then the next task's rows. Laid out in this order, the segments one call reads
// form one sequential stream (the fp32 chunks and the packed formats' segments).
template <class F>
void for_each_segment_in_task_order(int64_t rows, int64_t nblocks, const F& f) {
  const int64_t task_rows = rowwise_task_rows(rows);
  for (int64_t r0 = 0; r0 < rows; r0 += task_rows)
    for (int64_t b = 0; b < nblocks; ++b)
      for (int64_t m = r0; m < std::min(rows, r0 + task_rows); ++m) f(b, m);
}

// ---------------------------------------------------------------------------------------------
// Reading the node.

struct NodeInfo {
  const OrtKernelInfo* info;
  std::string op;    // op type
  std::string name;  // node name
  std::string where() const { return op + " node '" + name + "'"; }
  [[noreturn]] void fail(const std::string& msg) const { throw OpError(ORT_INVALID_ARGUMENT, where() + ": " + msg); }
};

std::string node_name(const OrtKernelInfo* info) {
  size_t size = 0;
  if (OrtStatus* st = g_api->KernelInfo_GetNodeName(info, nullptr, &size)) {
    g_api->ReleaseStatus(st);
    return "?";
  }
  std::string s(size, '\0');
  if (OrtStatus* st = g_api->KernelInfo_GetNodeName(info, &s[0], &size)) {
    g_api->ReleaseStatus(st);
    return "?";
  }
  s.resize(strlen(s.c_str()));
  return s;
}

bool get_int_attr(const NodeInfo& n, const char* name, int64_t* out) {
  OrtStatus* st = g_api->KernelInfoGetAttribute_int64(n.info, name, out);
  if (!st) return true;
  g_api->ReleaseStatus(st);
  return false;
}

bool get_float_attr(const NodeInfo& n, const char* name, float* out) {
  OrtStatus* st = g_api->KernelInfoGetAttribute_float(n.info, name, out);
  if (!st) return true;
  g_api->ReleaseStatus(st);
  return false;
}

bool get_ints_attr(const NodeInfo& n, const char* name, std::vector<int64_t>* out) {
  size_t size = 0;
  OrtStatus* st = g_api->KernelInfoGetAttributeArray_int64(n.info, name, nullptr, &size);
  if (st) {
    g_api->ReleaseStatus(st);
    return false;
  }
  out->assign(size, 0);
  if (size == 0) return true;
  ort_check(g_api->KernelInfoGetAttributeArray_int64(n.info, name, out->data(), &size), n.where() + " attribute " + name);
  return true;
}

bool get_string_attr(const NodeInfo& n, const char* name, std::string* out) {
  size_t size = 0;
  OrtStatus* st = g_api->KernelInfoGetAttribute_string(n.info, name, nullptr, &size);
  if (st) {
    g_api->ReleaseStatus(st);
    return false;
  }
  std::string s(size, '\0');
  ort_check(g_api->KernelInfoGetAttribute_string(n.info, name, &s[0], &size), n.where() + " attribute " + name);
  s.resize(strlen(s.c_str()));
  *out = s;
  return true;
}

// Optional string attribute `activation` of the layer ops: absent or "" for none, "Relu" for a ReLU
// fused into the output pass (y = y < 0 ? 0 : y, so NaN and -0 pass as through onnxruntime's Relu).
bool read_activation(const NodeInfo& n) {
  std::string a;
  if (!get_string_attr(n, "activation", &a) || a.empty()) return false;
  if (a != "Relu") n.fail(format("activation must be \"Relu\" or absent, got \"%s\"", a.c_str()));
  return true;
}

void relu_inplace(float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = y[i] < 0.f ? 0.f : y[i];
}

struct TensorRef {
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t size() const {
    int64_t s = 1;
    for (int64_t d : shape) s *= d;
    return s;
  }
};

TensorRef describe(const OrtValue* v, const std::string& what) {
  TensorRef t;
  OrtTensorTypeAndShapeInfo* ti = nullptr;
  ort_check(g_api->GetTensorTypeAndShape(v, &ti), what);
  size_t nd = 0;
  OrtStatus* st = g_api->GetTensorElementType(ti, &t.type);
  if (!st) st = g_api->GetDimensionsCount(ti, &nd);
  if (!st) {
    t.shape.assign(nd, 0);
    if (nd) st = g_api->GetDimensions(ti, t.shape.data(), nd);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(ti);
  ort_check(st, what);
  void* p = nullptr;
  ort_check(g_api->GetTensorMutableData(const_cast<OrtValue*>(v), &p), what);
  t.data = p;
  return t;
}

size_t input_count(const NodeInfo& n) {
  size_t c = 0;
  ort_check(g_api->KernelInfo_GetInputCount(n.info, &c), n.where());
  return c;
}

bool input_present(const NodeInfo& n, size_t index) {
  if (index >= input_count(n)) return false;
  size_t size = 0;
  OrtStatus* st = g_api->KernelInfo_GetInputName(n.info, index, nullptr, &size);
  if (st) {
    g_api->ReleaseStatus(st);
    return false;
  }
  return size > 1;  // includes the terminating NUL; an omitted optional input has an empty name
}

TensorRef const_input(const NodeInfo& n, size_t index, const char* what) {
  int is_const = 0;
  const OrtValue* v = nullptr;
  ort_check(g_api->KernelInfoGetConstantInput_tensor(n.info, index, &is_const, &v), n.where() + " input " + what);
  if (!is_const || !v)
    n.fail(format("input '%s' must be a constant initializer (not a graph input or computed tensor)", what));
  return describe(v, n.where() + " input " + what);
}

// ---------------------------------------------------------------------------------------------
// CSR validation and repacking.

struct Csr {
  int64_t rows = 0;
  int64_t nnz = 0;
  int64_t max_col = -1;
  std::vector<int32_t> row_ptr;  // rows + 1
  std::vector<int32_t> col;
  std::vector<float> val;
  std::vector<float> bias;  // empty if none
};

// Reads values (1), col_idx (2), row_ptr (3) and optional bias (4); checks every structural rule.
// `cols` bounds the column indices when known (> 0).
Csr read_csr(const NodeInfo& n, int64_t cols) {
  TensorRef values = const_input(n, 1, "values");
  TensorRef col_idx = const_input(n, 2, "col_idx");
  TensorRef row_ptr = const_input(n, 3, "row_ptr");
  if (values.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) n.fail("values must be float32");
  if (row_ptr.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) n.fail("row_ptr must be int32");
  const bool idx16 = col_idx.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;
  if (!idx16 && col_idx.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) n.fail("col_idx must be uint16 or int32");
  if (values.shape.size() != 1) n.fail(format("values must be 1-D, got rank %zu", values.shape.size()));
  if (col_idx.shape.size() != 1) n.fail(format("col_idx must be 1-D, got rank %zu", col_idx.shape.size()));
  if (row_ptr.shape.size() != 1) n.fail(format("row_ptr must be 1-D, got rank %zu", row_ptr.shape.size()));

  Csr c;
  c.nnz = values.shape[0];
  if (col_idx.shape[0] != c.nnz)
    n.fail(format("col_idx has %lld entries but values has %lld (must be equal)", (long long)col_idx.shape[0],
                  (long long)c.nnz));
  if (row_ptr.shape[0] < 2)
    n.fail(format("row_ptr must have M+1 >= 2 entries, got %lld", (long long)row_ptr.shape[0]));
  if (c.nnz > INT32_MAX) n.fail("more than 2^31-1 non-zeros");
  c.rows = row_ptr.shape[0] - 1;

  const int32_t* rp = static_cast<const int32_t*>(row_ptr.data);
  if (rp[0] != 0) n.fail(format("row_ptr[0] must be 0, got %d", rp[0]));
  for (int64_t m = 0; m < c.rows; ++m) {
    if (rp[m + 1] < rp[m])
      n.fail(format("row_ptr must be non-decreasing: row_ptr[%lld]=%d < row_ptr[%lld]=%d", (long long)(m + 1),
                    rp[m + 1], (long long)m, rp[m]));
  }
  if (rp[c.rows] != c.nnz)
    n.fail(format("row_ptr[M]=%d must equal the number of non-zeros (len(values)=%lld)", rp[c.rows], (long long)c.nnz));
  c.row_ptr.assign(rp, rp + c.rows + 1);

  c.col.resize(c.nnz);
  for (int64_t j = 0; j < c.nnz; ++j) {
    const int64_t v = idx16 ? static_cast<const uint16_t*>(col_idx.data)[j] : static_cast<const int32_t*>(col_idx.data)[j];
    if (v < 0) n.fail(format("col_idx[%lld]=%lld is negative", (long long)j, (long long)v));
    if (cols > 0 && v >= cols)
      n.fail(format("col_idx[%lld]=%lld out of range: must be < %lld columns", (long long)j, (long long)v,
                    (long long)cols));
    c.col[j] = static_cast<int32_t>(v);
    c.max_col = std::max(c.max_col, v);
  }
  const float* vp = static_cast<const float*>(values.data);
  c.val.assign(vp, vp + c.nnz);

  if (input_present(n, 4)) {
    TensorRef bias = const_input(n, 4, "bias");
    if (bias.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) n.fail("bias must be float32");
    if (bias.shape.size() != 1 || bias.shape[0] != c.rows)
      n.fail(format("bias must have shape [M]=[%lld] (M = len(row_ptr)-1), got %lld elements", (long long)c.rows,
                    (long long)bias.size()));
    const float* bp = static_cast<const float*>(bias.data);
    c.bias.assign(bp, bp + c.rows);
  }
  return c;
}

// Column offset and value of entry e (numbered as in seg_ptr) of row m in block b of `w`, in either layout.
inline void entry_of(const BlockedCsr& w, int64_t b, int64_t m, int64_t e, uint16_t* idx, float* val) {
  if (!w.chunk_ptr) {  // (chunk_ptr, not chunks: a matrix without entries has no chunks)
    *idx = w.idx[e];
    *val = w.val[e];
    return;
  }
  const int64_t k = e - w.seg_ptr[(b * w.rows + m) * w.nsub];  // position in the row's chunks
  const uint8_t* c = w.chunks + (static_cast<int64_t>(w.chunk_ptr[b * w.rows + m]) + k / kChunk) * kChunkBytes;
  memcpy(val, c + 4 * (k % kChunk), 4);
  memcpy(idx, c + 4 * kChunk + 2 * (k % kChunk), 2);
}

// Owned column-blocked copy of a CSR matrix (see BlockedCsr).
struct BlockedStore {
  WeightVec<int32_t> seg_ptr;
  WeightVec<uint16_t> idx;
  WeightVec<float> val;
  WeightVec<int32_t> chunk_ptr;  // batch-1 layout (kernels.h), built by to_chunks()
  WeightVec<uint8_t> chunks;
  BlockedCsr view{};

  // Row-major blocked copy of `c` (columns < cols). Within a segment the file's order is kept.
  void build_row_major(const Csr& c, int64_t cols) {
    const int64_t M = c.rows;
    const int64_t nb = std::max<int64_t>(1, (cols + kBlockCols - 1) / kBlockCols);
    const int64_t bc = std::max<int64_t>(1, (cols + nb - 1) / nb);  // balanced blocks, <= kBlockCols
    // Sub-blocks: about kSubBlockNnz non-zeros per (row, sub-block) amortise the per-segment cost
    // (partial sums, loop exit) while a [sub_cols, 64] tile of X stays near L1 (tuned on Zen 4).
    const double density = c.nnz ? static_cast<double>(c.nnz) / (static_cast<double>(M) * cols) : 1.0;
    int64_t sc = static_cast<int64_t>(std::min(kSubBlockNnz / density, 1e9));
    sc = std::min(bc, std::max<int64_t>(kMinSubCols, (sc + 31) / 32 * 32));
    const int64_t S = (bc + sc - 1) / sc;
    const int64_t nseg = nb * M * S;
    if (nseg >= INT32_MAX) throw OpError(ORT_FAIL, "sparse matrix too large to repack");
    seg_ptr.assign(nseg + 1, 0);
    auto seg_of = [&](int64_t m, int64_t col) { return ((col / bc) * M + m) * S + (col % bc) / sc; };
    for (int64_t m = 0; m < M; ++m)
      for (int32_t j = c.row_ptr[m]; j < c.row_ptr[m + 1]; ++j) seg_ptr[seg_of(m, c.col[j]) + 1]++;
    for (int64_t i = 0; i < nseg; ++i) seg_ptr[i + 1] += seg_ptr[i];
    idx.resize(c.nnz);
    val.resize(c.nnz);
    std::vector<int32_t> fill(seg_ptr.begin(), seg_ptr.end() - 1);
    for (int64_t m = 0; m < M; ++m) {
      for (int32_t j = c.row_ptr[m]; j < c.row_ptr[m + 1]; ++j) {
        const int32_t at = fill[seg_of(m, c.col[j])]++;
        idx[at] = static_cast<uint16_t>(c.col[j] % bc);
        val[at] = c.val[j];
      }
    }
    view = BlockedCsr{M, cols, bc, nb, sc, S, S, 1, seg_ptr.data(), idx.data(), val.data()};
  }

  // Row-major store -> the batch-1 chunks of kernels.h; idx and val are freed. A row's last chunk is
  // padded with value 0, offset 0 (the kernels mask those lanes). The chunks are laid out in the order the
  // batch-1 tasks read them (for_each_segment_in_task_order).
  void to_chunks() {
    const int64_t M = view.rows, S = view.nsub, nb = view.nblocks;
    chunk_ptr.assign(nb * M + 1, 0);
    int64_t total = 0;
    for_each_segment_in_task_order(M, nb, [&](int64_t b, int64_t m) {
      const int64_t g = b * M + m;
      chunk_ptr[g] = static_cast<int32_t>(total);
      total += (seg_ptr[(g + 1) * S] - seg_ptr[g * S] + kChunk - 1) / kChunk;
      if (total >= INT32_MAX) throw OpError(ORT_FAIL, "sparse matrix too large to repack");
    });
    chunk_ptr[nb * M] = static_cast<int32_t>(total);
    chunks.assign(total * kChunkBytes, 0);
    for (int64_t g = 0; g < nb * M; ++g) {
      uint8_t* c = chunks.data() + static_cast<int64_t>(chunk_ptr[g]) * kChunkBytes;
      for (int64_t e = seg_ptr[g * S], k = 0; e < seg_ptr[(g + 1) * S]; ++e, ++k) {
        uint8_t* at = c + (k / kChunk) * kChunkBytes;
        memcpy(at + 4 * (k % kChunk), &val[e], 4);
        memcpy(at + 4 * kChunk + 2 * (k % kChunk), &idx[e], 2);
      }
    }
    idx = WeightVec<uint16_t>();
    val = WeightVec<float>();
    view.idx = nullptr;
    view.val = nullptr;
    view.chunk_ptr = chunk_ptr.data();
    view.chunks = chunks.data();
  }

  // Same segments as `src` (row-major, either layout), stored sub-major.
  void build_sub_major(const BlockedCsr& src) {
    const int64_t M = src.rows, S = src.nsub, nseg = src.nblocks * M * S;
    seg_ptr.assign(nseg + 1, 0);
    const int64_t nnz = src.seg_ptr[nseg];
    idx.resize(nnz);
    val.resize(nnz);
    int64_t at = 0, i = 0;
    for (int64_t b = 0; b < src.nblocks; ++b) {
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t m = 0; m < M; ++m) {
          const int64_t k = b * M * S + m * S + s;
          const int32_t j0 = src.seg_ptr[k], j1 = src.seg_ptr[k + 1];
          seg_ptr[i++] = static_cast<int32_t>(at);
          for (int32_t j = j0; j < j1; ++j, ++at) entry_of(src, b, m, j, &idx[at], &val[at]);
        }
      }
    }
    seg_ptr[nseg] = static_cast<int32_t>(at);
    view = src;
    view.row_stride = 1;
    view.sub_stride = M;
    view.seg_ptr = seg_ptr.data();
    view.idx = idx.data();
    view.val = val.data();
    view.chunk_ptr = nullptr;
    view.chunks = nullptr;
  }
};

// A weight matrix in both orders: row-major built at creation when batch-1 SpMV is possible,
// sub-major for tile products built on first use (so batch-1-only sessions hold one copy).
class BlockedWeights {
 public:
  void init(const Csr& c, int64_t cols, bool want_row_major) {
    row_major_.build_row_major(c, cols);
    if (want_row_major) {
      row_major_.to_chunks();
    } else {
      sub_major_.build_sub_major(row_major_.view);
      sub_ready_.store(true);
      row_major_ = BlockedStore();
    }
  }
  const BlockedCsr& row_major() const { return row_major_.view; }
  const BlockedCsr& sub_major() {
    if (!sub_ready_.load(std::memory_order_acquire)) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!sub_ready_.load(std::memory_order_relaxed)) {
        sub_major_.build_sub_major(row_major_.view);
        sub_ready_.store(true, std::memory_order_release);
      }
    }
    return sub_major_.view;
  }

 private:
  BlockedStore row_major_, sub_major_;
  std::mutex mu_;
  std::atomic<bool> sub_ready_{false};
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Non-finite inputs. A dense product multiplies every input by every weight, so an input NaN or
// Inf at column k turns each output whose weight at k is zero into NaN (0 * Inf = NaN); the sparse
// kernels never touch the weights they leave out. After the kernels, outputs that the dense form
// makes NaN this way are set to NaN, so both forms agree (docs/hardening.md). The scan costs one
// read of X (KernelTable::all_finite); the repair runs only for rows of X that hold a non-finite value.

// Columns that row m of a blocked CSR stores (both storage orders).
template <class F>
void for_each_column(const BlockedCsr& w, int64_t m, const F& f) {
  for (int64_t b = 0; b < w.nblocks; ++b)
    for (int64_t s = 0; s < w.nsub; ++s) {
      const int64_t i = b * w.rows * w.nsub + m * w.row_stride + s * w.sub_stride;
      for (int32_t e = w.seg_ptr[i]; e < w.seg_ptr[i + 1]; ++e) {
        uint16_t k = 0;
        float v = 0.f;
        entry_of(w, b, m, e, &k, &v);
        f(b * w.block_cols + k);
      }
    }
}

// Columns that row m of a packed layout stores (entries whose value is zero are not stored).
template <class F>
void for_each_column(const PackedRows& w, int64_t m, const F& f) {
  for (int64_t b = 0; b < w.nblocks; ++b) {
    const int64_t i = b * w.rows + m;
    for (int64_t p = w.start[i]; p < w.start[i] + w.len[i]; ++p) f(b * w.block_cols + w.idx[p]);
  }
}

// Y [N, M] from X [N, K]: y[n, m] = NaN where row n of X is non-finite at a column row m of W does
// not store. `w` is a BlockedCsr or PackedRows.
template <class Weights>
void restore_nonfinite_linear(const KernelTable* kt, const Weights& w, const float* x, float* y, int64_t N, int64_t K,
                              int64_t M) {
  if (kt->all_finite(x, N * K)) return;
  std::vector<uint8_t> bad(K);
  std::vector<int64_t> seen(K);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * K;
    if (kt->all_finite(xn, K)) continue;
    int64_t nbad = 0;
    for (int64_t k = 0; k < K; ++k) {
      bad[k] = !std::isfinite(xn[k]);
      nbad += bad[k];
    }
    std::fill(seen.begin(), seen.end(), -1);
    for (int64_t m = 0; m < M; ++m) {
      int64_t hit = 0;  // distinct non-finite columns row m stores
      for_each_column(w, m, [&](int64_t k) {
        if (bad[k] && seen[k] != m) seen[k] = m, ++hit;
      });
      if (hit < nbad) y[n * M + m] = nan;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Linear ops: shared input/output handling and the batched (tile) path.

// TOOLCHAIN_KERNELS_LINEAR=auto|rowwise|tile, read when a linear op is created: the largest batch run as
// one batch-1 product per row of X (auto: kRowwiseMaxBatch; rowwise: every batch; tile: batch 1 only).
int64_t rowwise_max_batch_from_env() {
  const char* env = getenv("TOOLCHAIN_KERNELS_LINEAR");
  std::string a = env ? env : "";
  if (a.empty() || a == "auto") return kRowwiseMaxBatch;
  if (a == "rowwise") return std::numeric_limits<int64_t>::max();
  if (a == "tile") return 1;
  throw OpError(ORT_INVALID_ARGUMENT,
                format("TOOLCHAIN_KERNELS_LINEAR=%s is not one of auto, rowwise, tile", a.c_str()));
}

struct LinearIo {
  const float* x = nullptr;
  float* y = nullptr;
  int64_t N = 0;  // rows of X (product of the leading dimensions); 0: nothing to compute
};

LinearIo linear_io(OrtKernelContext* ctx, const std::string& where, int64_t in_features, int64_t rows) {
  const OrtValue* xv = nullptr;
  ort_check(g_api->KernelContext_GetInput(ctx, 0, &xv), where);
  TensorRef x = describe(xv, where + " input X");
  if (x.shape.size() < 2)
    throw OpError(ORT_INVALID_ARGUMENT, format("%s: X must have rank >= 2 ([N, K]), got rank %zu", where.c_str(),
                                               x.shape.size()));
  const int64_t K = x.shape.back();
  if (K != in_features)
    throw OpError(ORT_INVALID_ARGUMENT, format("%s: X has %lld features (last dim) but in_features is %lld",
                                               where.c_str(), (long long)K, (long long)in_features));
  LinearIo io;
  io.N = x.size() / K;
  std::vector<int64_t> yshape(x.shape.begin(), x.shape.end() - 1);
  yshape.push_back(rows);
  OrtValue* yv = nullptr;
  ort_check(g_api->KernelContext_GetOutput(ctx, 0, yshape.data(), yshape.size(), &yv), where + " output");
  if (io.N == 0) return io;
  ort_check(g_api->GetTensorMutableData(yv, reinterpret_cast<void**>(&io.y)), where + " output");
  io.x = static_cast<const float*>(x.data);
  return io;
}

// Y [N, M] = X [N, K] W^T + bias for N > 1: batch tiles of up to 64 rows of X, transposed to
// [K, NT] so that one W row updates a whole tile with contiguous loads (w sub-major).
void linear_batched(OrtKernelContext* ctx, const KernelTable* kt, const BlockedCsr& w, int64_t M, int64_t K,
                    const LinearIo& io, const float* bias, BufferPool& pool, bool relu) {
  const int64_t N = io.N;
  const float* xp = io.x;
  float* y = io.y;
  const int64_t ntiles = ceil_div(N, kMaxTile);
  PooledBuf xt_buf(pool);
  float* xt = xt_buf.buf.get(static_cast<size_t>(ntiles) * K * kMaxTile);
  auto tile_geom = [&](int64_t t, int64_t* n0, int* valid, int* nv) {
    *n0 = t * kMaxTile;
    *valid = static_cast<int>(std::min<int64_t>(kMaxTile, N - *n0));
    *nv = (*valid + 7) / 8;
  };
  const int64_t kc = 512;
  const int64_t kchunks = ceil_div(K, kc);
  parallel_for(ctx, ntiles * kchunks, [&](size_t task) {
    const int64_t t = task / kchunks, k0 = (task % kchunks) * kc, k1 = std::min(K, k0 + kc);
    int64_t n0;
    int valid, nv;
    tile_geom(t, &n0, &valid, &nv);
    const int NT = nv * 8;
    float* dst = xt + t * K * kMaxTile;
    kt->transpose(xp + n0 * K + k0, K, dst + k0 * NT, NT, valid, k1 - k0);
    if (valid < NT)
      for (int64_t k = k0; k < k1; ++k) std::fill(dst + k * NT + valid, dst + (k + 1) * NT, 0.f);
  });

  const int64_t mc = chunk_rows(M, std::max<int64_t>(1, 16 / ntiles), 32, kLinearRowChunk);
  const int64_t mchunks = ceil_div(M, mc);
  parallel_for(ctx, ntiles * mchunks, [&](size_t task) {
    const int64_t t = task / mchunks, m0 = (task % mchunks) * mc, m1 = std::min(M, m0 + mc);
    int64_t n0;
    int valid, nv;
    tile_geom(t, &n0, &valid, &nv);
    const int NT = nv * 8;
    float* yt = thread_scratch(0, static_cast<size_t>(m1 - m0) * NT);
    kt->spmm(w, m0, m1, xt + t * K * kMaxTile, nv, bias, yt, NT, NT, yt);
    if (relu) relu_inplace(yt, (m1 - m0) * NT);
    kt->transpose(yt, NT, y + n0 * M + m0, M, m1 - m0, valid);
  });
}

// Y [N, M] as one batch-1 product per row of X: spmv(m0, m1, x_n, y_n) computes rows [m0, m1) of y_n from
// x_n. Tasks are (row of X, chunk of rows of W).
template <class Spmv>
void linear_rowwise(OrtKernelContext* ctx, const LinearIo& io, int64_t M, int64_t K, bool relu, const Spmv& spmv) {
  const int64_t mc = rowwise_task_rows(M), chunks = ceil_div(M, mc);
  parallel_for(ctx, io.N * chunks, [&](size_t t) {
    const int64_t n = t / chunks, m0 = (t % chunks) * mc, m1 = std::min(M, m0 + mc);
    float* yn = io.y + n * M;
    spmv(m0, m1, io.x + n * K, yn);
    if (relu) relu_inplace(yn + m0, m1 - m0);
  });
}

// ---------------------------------------------------------------------------------------------
// SparseLinear: Y[..., M] = X[..., K] W^T + bias.

class SparseLinear {
 public:
  static constexpr size_t kInputs = 5;
  static constexpr bool kBiasInput = true;  // the last input (bias) is optional
  static ONNXTensorElementDataType input_type(size_t index) {
    switch (index) {
      case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // col_idx: uint16 or int32
      case 3: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }

  explicit SparseLinear(const OrtKernelInfo* info) {
    NodeInfo n{info, "SparseLinear", node_name(info)};
    where_ = n.where();
    kernels_ = select_kernels();
    rowwise_max_ = rowwise_max_batch_from_env();
    if (!get_int_attr(n, "in_features", &in_features_)) n.fail("missing required int attribute 'in_features'");
    if (in_features_ < 1) n.fail(format("in_features must be >= 1, got %lld", (long long)in_features_));
    relu_ = read_activation(n);
    Csr c = read_csr(n, in_features_);
    rows_ = c.rows;
    bias_ = std::move(c.bias);
    // Columns past the largest index hold no non-zeros: blocking stops there.
    w_.init(c, std::max<int64_t>(c.max_col + 1, 1), /*want_row_major=*/true);
  }

  void compute(OrtKernelContext* ctx) {
    const LinearIo io = linear_io(ctx, where_, in_features_, rows_);
    if (io.N == 0) return;
    const float* bias = bias_.empty() ? nullptr : bias_.data();
    const KernelTable* kt = kernels_;
    const int64_t M = rows_, K = in_features_;
    if (io.N <= rowwise_max_) {
      const BlockedCsr& w = w_.row_major();
      linear_rowwise(ctx, io, M, K, relu_, [&](int64_t m0, int64_t m1, const float* xn, float* yn) {
        kt->spmv(w, m0, m1, xn, bias, yn);
      });
      restore_nonfinite_linear(kt, w, io.x, io.y, io.N, K, M);
      return;
    }
    const BlockedCsr& w = w_.sub_major();
    linear_batched(ctx, kt, w, M, in_features_, io, bias, pool_, relu_);
    restore_nonfinite_linear(kt, w, io.x, io.y, io.N, in_features_, M);
  }

 private:
  std::string where_;
  const KernelTable* kernels_ = nullptr;
  int64_t in_features_ = 0;
  int64_t rows_ = 0;
  int64_t rowwise_max_ = kRowwiseMaxBatch;  // batches up to this size: one batch-1 product per row of X
  bool relu_ = false;  // fused ReLU (attribute activation)
  std::vector<float> bias_;
  BlockedWeights w_;
  BufferPool pool_;
};

// ---------------------------------------------------------------------------------------------
// Packed linear ops (compact file formats; docs/kernels.md and packed.py define them).
//
// SparseLinearCodebook: X, codebook float [C], codes uint8 [ceil(E*bits/8)], deltas uint8 [E],
//   row_ptr int32 [M+1], bias? float [M]; attributes in_features, bits (4 or 8). Entry e of row m
//   (row_ptr[m] <= e < row_ptr[m+1]) steps deltas[e] columns (255 when deltas[e] = 0) from the
//   previous entry (from column -1 for the row's first): a real weight when deltas[e] >= 1, with
//   value codebook[code(e)]; a filler (no weight) when deltas[e] = 0. 4-bit codes are packed two
//   per byte, low nibble first, over the whole entry sequence.
// SparseLinearInt8: X, values int8 [E], deltas uint8 [E], row_ptr int32 [M+1], scales float [M],
//   bias? float [M]; attribute in_features. W[m, col(e)] = scales[m] * values[e] (same deltas).
//
// Batch 1 runs on the packed rows (PackedRows: 1.5 / 2 / 2 bytes per entry streamed); batch > 1
// decodes once to fp32 blocked CSR (built on first use) and shares SparseLinear's tile path.

class PackedLinear {
 public:
  static constexpr size_t kInputs = 6;
  static constexpr bool kBiasInput = true;  // the last input (bias) is optional

  PackedLinear(const OrtKernelInfo* info, const char* op, bool codebook) {
    NodeInfo n{info, op, node_name(info)};
    where_ = n.where();
    kernels_ = select_kernels();
    rowwise_max_ = rowwise_max_batch_from_env();
    relu_ = read_activation(n);
    if (!get_int_attr(n, "in_features", &in_features_)) n.fail("missing required int attribute 'in_features'");
    if (in_features_ < 1 || in_features_ > INT32_MAX)
      n.fail(format("in_features must be in [1, 2^31), got %lld", (long long)in_features_));
    if (codebook)
      read_codebook(n);
    else
      read_int8(n);
    if (input_present(n, 5)) {
      TensorRef bias = const_input(n, 5, "bias");
      if (bias.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) n.fail("bias must be float32");
      if (bias.shape.size() != 1 || bias.shape[0] != rows_)
        n.fail(format("bias must have shape [M]=[%lld] (M = len(row_ptr)-1), got %lld elements", (long long)rows_,
                      (long long)bias.size()));
      const float* bp = static_cast<const float*>(bias.data);
      bias_.assign(bp, bp + rows_);
    }
    view_ = PackedRows{rows_, block_cols_, nblocks_, kind_, start_.data(), len_.data(), idx_.data(), code_.data(),
                       table_.data(), scale_.data()};
  }

  void compute(OrtKernelContext* ctx) {
    const LinearIo io = linear_io(ctx, where_, in_features_, rows_);
    if (io.N == 0) return;
    const float* bias = bias_.empty() ? nullptr : bias_.data();
    const KernelTable* kt = kernels_;
    const int64_t M = rows_, K = in_features_;
    if (io.N <= rowwise_max_) {
      linear_rowwise(ctx, io, M, K, relu_, [&](int64_t m0, int64_t m1, const float* xn, float* yn) {
        kt->spmv_packed(view_, m0, m1, xn, bias, yn);
      });
    } else {
      linear_batched(ctx, kt, decoded(), M, in_features_, io, bias, pool_, relu_);
    }
    restore_nonfinite_linear(kt, view_, io.x, io.y, io.N, in_features_, M);
  }

 private:
  [[noreturn]] void fail(const std::string& msg) const { throw OpError(ORT_INVALID_ARGUMENT, where_ + ": " + msg); }

  // row_ptr (input `index`) over E entries: sets rows_ and rp_.
  void read_row_ptr(const NodeInfo& n, size_t index, int64_t entries) {
    TensorRef row_ptr = const_input(n, index, "row_ptr");
    if (row_ptr.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32) n.fail("row_ptr must be int32");
    if (row_ptr.shape.size() != 1) n.fail(format("row_ptr must be 1-D, got rank %zu", row_ptr.shape.size()));
    if (row_ptr.shape[0] < 2) n.fail(format("row_ptr must have M+1 >= 2 entries, got %lld", (long long)row_ptr.shape[0]));
    rows_ = row_ptr.shape[0] - 1;
    const int32_t* rp = static_cast<const int32_t*>(row_ptr.data);
    if (rp[0] != 0) n.fail(format("row_ptr[0] must be 0, got %d", rp[0]));
    for (int64_t m = 0; m < rows_; ++m)
      if (rp[m + 1] < rp[m])
        n.fail(format("row_ptr must be non-decreasing: row_ptr[%lld]=%d < row_ptr[%lld]=%d", (long long)(m + 1),
                      rp[m + 1], (long long)m, rp[m]));
    if (rp[rows_] != entries)
      n.fail(format("row_ptr[M]=%d must equal the number of entries (len(deltas)=%lld)", rp[rows_],
                    (long long)entries));
    rp_.assign(rp, rp + rows_ + 1);
  }

  TensorRef read_deltas(const NodeInfo& n, size_t index) {
    TensorRef d = const_input(n, index, "deltas");
    if (d.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) n.fail("deltas must be uint8");
    if (d.shape.size() != 1) n.fail(format("deltas must be 1-D, got rank %zu", d.shape.size()));
    if (d.shape[0] > INT32_MAX) n.fail("more than 2^31-1 entries");
    return d;
  }

  // Column of every entry (a filler's: where its 255-column step lands); each must stay below
  // in_features (a large delta or a filler run must not step past the row).
  std::vector<int32_t> entry_columns(const NodeInfo& n, const uint8_t* deltas) const {
    std::vector<int32_t> cols(rp_[rows_]);
    for (int64_t m = 0; m < rows_; ++m) {
      int64_t col = -1;
      for (int32_t e = rp_[m]; e < rp_[m + 1]; ++e) {
        col += deltas[e] ? deltas[e] : kFillerStep;
        if (col >= in_features_)
          n.fail(format("row %lld: entry %d reaches column %lld, past in_features=%lld (deltas or filler entries "
                        "step past the row)", (long long)m, e, (long long)col, (long long)in_features_));
        cols[e] = static_cast<int32_t>(col);
      }
    }
    return cols;
  }

  // Batch-1 layout (PackedRows): column blocks, segments (block, row); fillers and entries whose
  // value is zero are dropped. code_of(e) gives the entry's 4/8-bit code or int8 byte; zero(e)
  // tells whether the entry contributes nothing.
  template <class CodeOf, class IsZero>
  void layout(const std::vector<int32_t>& cols, const CodeOf& code_of, const IsZero& zero) {
    const int64_t K = in_features_;
    nblocks_ = std::max<int64_t>(1, (K + kBlockCols - 1) / kBlockCols);
    block_cols_ = (K + nblocks_ - 1) / nblocks_;
    const int64_t nseg = nblocks_ * rows_;
    start_.assign(nseg, 0);
    len_.assign(nseg, 0);
    for (int64_t m = 0; m < rows_; ++m)
      for (int32_t e = rp_[m]; e < rp_[m + 1]; ++e)
        if (!zero(e)) len_[(cols[e] / block_cols_) * rows_ + m]++;
    const bool even = kind_ == kCodebook4;
    int64_t at = 0;
    for_each_segment_in_task_order(rows_, nblocks_, [&](int64_t b, int64_t m) {
      const int64_t i = b * rows_ + m;
      if (even) at += at & 1;
      start_[i] = at;
      at += len_[i];
    });
    idx_.assign(at + 64, 0);
    code_.assign((even ? (at + 1) / 2 : at) + 64, 0);
    std::vector<int64_t> fill(start_.begin(), start_.end());
    for (int64_t m = 0; m < rows_; ++m)
      for (int32_t e = rp_[m]; e < rp_[m + 1]; ++e) {
        if (zero(e)) continue;
        const int64_t b = cols[e] / block_cols_;
        const int64_t p = fill[b * rows_ + m]++;
        idx_[p] = static_cast<uint16_t>(cols[e] - b * block_cols_);
        const uint8_t c = static_cast<uint8_t>(code_of(e));
        if (even)
          code_[p >> 1] |= static_cast<uint8_t>(c << (4 * (p & 1)));
        else
          code_[p] = c;
      }
  }

  void read_codebook(const NodeInfo& n) {
    int64_t bits = 0;
    if (!get_int_attr(n, "bits", &bits)) n.fail("missing required int attribute 'bits'");
    if (bits != 4 && bits != 8) n.fail(format("bits must be 4 or 8, got %lld", (long long)bits));
    kind_ = bits == 4 ? kCodebook4 : kCodebook8;
    TensorRef cb = const_input(n, 1, "codebook");
    if (cb.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) n.fail("codebook must be float32");
    if (cb.shape.size() != 1) n.fail(format("codebook must be 1-D, got rank %zu", cb.shape.size()));
    const int64_t C = cb.shape[0];
    if (C < 1 || C > (int64_t(1) << bits))
      n.fail(format("codebook has %lld entries; %lld-bit codes need 1..%d", (long long)C, (long long)bits,
                    1 << bits));
    const float* cbp = static_cast<const float*>(cb.data);
    for (int64_t i = 0; i < C; ++i)
      if (!std::isfinite(cbp[i])) n.fail(format("codebook[%lld] is not finite", (long long)i));
    table_.assign(size_t(1) << bits, 0.f);
    std::copy(cbp, cbp + C, table_.begin());

    TensorRef codes = const_input(n, 2, "codes");
    if (codes.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) n.fail("codes must be uint8");
    if (codes.shape.size() != 1) n.fail(format("codes must be 1-D, got rank %zu", codes.shape.size()));
    TensorRef deltas = read_deltas(n, 3);
    const int64_t E = deltas.shape[0];
    const int64_t want = (E * bits + 7) / 8;
    if (codes.shape[0] != want)
      n.fail(format("codes has %lld bytes; %lld entries of %lld bits need %lld", (long long)codes.shape[0],
                    (long long)E, (long long)bits, (long long)want));
    read_row_ptr(n, 4, E);
    const uint8_t* cp = static_cast<const uint8_t*>(codes.data);
    auto code_of = [&](int64_t e) -> int { return bits == 8 ? cp[e] : (cp[e >> 1] >> (4 * (e & 1))) & 15; };
    for (int64_t e = 0; e < E; ++e)
      if (code_of(e) >= C)
        n.fail(format("code of entry %lld is %d, past the codebook's %lld entries", (long long)e, code_of(e),
                      (long long)C));
    const std::vector<int32_t> cols = entry_columns(n, static_cast<const uint8_t*>(deltas.data));
    const uint8_t* dp = static_cast<const uint8_t*>(deltas.data);
    layout(cols, code_of, [&](int64_t e) { return dp[e] == 0 || table_[code_of(e)] == 0.f; });
    scale_.assign(1, 1.f);
  }

  void read_int8(const NodeInfo& n) {
    kind_ = kInt8;
    TensorRef values = const_input(n, 1, "values");
    if (values.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) n.fail("values must be int8");
    if (values.shape.size() != 1) n.fail(format("values must be 1-D, got rank %zu", values.shape.size()));
    TensorRef deltas = read_deltas(n, 2);
    const int64_t E = deltas.shape[0];
    if (values.shape[0] != E)
      n.fail(format("values has %lld entries but deltas has %lld (must be equal)", (long long)values.shape[0],
                    (long long)E));
    read_row_ptr(n, 3, E);
    TensorRef scales = const_input(n, 4, "scales");
    if (scales.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) n.fail("scales must be float32");
    if (scales.shape.size() != 1 || scales.shape[0] != rows_)
      n.fail(format("scales must have shape [M]=[%lld], got %lld elements", (long long)rows_,
                    (long long)scales.size()));
    const float* sp = static_cast<const float*>(scales.data);
    for (int64_t m = 0; m < rows_; ++m)
      if (!std::isfinite(sp[m])) n.fail(format("scales[%lld] is not finite", (long long)m));
    scale_.assign(sp, sp + rows_);
    const std::vector<int32_t> cols = entry_columns(n, static_cast<const uint8_t*>(deltas.data));
    const uint8_t* vp = static_cast<const uint8_t*>(values.data);
    const uint8_t* dp = static_cast<const uint8_t*>(deltas.data);
    layout(cols, [&](int64_t e) { return vp[e]; }, [&](int64_t e) { return dp[e] == 0 || vp[e] == 0; });
    table_.assign(16, 0.f);
  }

  float value_of(int64_t m, int64_t p) const {
    switch (kind_) {
      case kCodebook4: return table_[(code_[p >> 1] >> (4 * (p & 1))) & 15];
      case kCodebook8: return table_[code_[p]];
      default: return static_cast<float>(static_cast<int8_t>(code_[p])) * scale_[m];
    }
  }

  // fp32 blocked CSR (sub-major) of the decoded weights, built on the first batch > 1 call.
  const BlockedCsr& decoded() {
    std::lock_guard<std::mutex> lock(dec_mu_);
    if (!dec_) {
      Csr c;
      c.rows = rows_;
      c.row_ptr.assign(rows_ + 1, 0);
      for (int64_t m = 0; m < rows_; ++m) {
        for (int64_t b = 0; b < nblocks_; ++b) {
          const int64_t i = b * rows_ + m;
          for (int64_t p = start_[i]; p < start_[i] + len_[i]; ++p) {
            const int64_t col = b * block_cols_ + idx_[p];
            c.col.push_back(static_cast<int32_t>(col));
            c.val.push_back(value_of(m, p));
            c.max_col = std::max(c.max_col, col);
          }
        }
        c.row_ptr[m + 1] = static_cast<int32_t>(c.col.size());
      }
      c.nnz = static_cast<int64_t>(c.col.size());
      auto w = std::make_unique<BlockedWeights>();
      w->init(c, std::max<int64_t>(c.max_col + 1, 1), /*want_row_major=*/false);
      dec_ = std::move(w);
    }
    return dec_->sub_major();
  }

  std::string where_;
  const KernelTable* kernels_ = nullptr;
  int kind_ = kCodebook4;
  bool relu_ = false;  // fused ReLU (attribute activation)
  int64_t in_features_ = 0, rows_ = 0, nblocks_ = 1, block_cols_ = 1;
  int64_t rowwise_max_ = kRowwiseMaxBatch;  // batches up to this size: one batch-1 product per row of X
  std::vector<int32_t> rp_;
  WeightVec<int64_t> start_;
  WeightVec<int32_t> len_;
  WeightVec<uint16_t> idx_;
  WeightVec<uint8_t> code_;
  std::vector<float> table_, scale_, bias_;
  PackedRows view_{};
  std::mutex dec_mu_;
  std::unique_ptr<BlockedWeights> dec_;
  BufferPool pool_;
};

class SparseLinearCodebook : public PackedLinear {
 public:
  static ONNXTensorElementDataType input_type(size_t index) {
    switch (index) {
      case 2: case 3: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;  // codes, deltas
      case 4: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  explicit SparseLinearCodebook(const OrtKernelInfo* info) : PackedLinear(info, "SparseLinearCodebook", true) {}
};

class SparseLinearInt8 : public PackedLinear {
 public:
  static ONNXTensorElementDataType input_type(size_t index) {
    switch (index) {
      case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
      case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 3: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  explicit SparseLinearInt8(const OrtKernelInfo* info) : PackedLinear(info, "SparseLinearInt8", false) {}
};

// ---------------------------------------------------------------------------------------------
// SparseConv: 2-D convolution (ONNX Conv semantics) with a CSR weight [M, C/group*kh*kw].

enum class ConvAlgo { kAuto, kIm2col, kDirect, kBatch };

ConvAlgo conv_algo_from_env() {
  const char* env = getenv("TOOLCHAIN_KERNELS_CONV");
  std::string a = env ? env : "";
  if (a.empty() || a == "auto") return ConvAlgo::kAuto;
  if (a == "im2col") return ConvAlgo::kIm2col;
  if (a == "direct") return ConvAlgo::kDirect;
  if (a == "batch") return ConvAlgo::kBatch;
  throw OpError(ORT_INVALID_ARGUMENT,
                format("TOOLCHAIN_KERNELS_CONV=%s is not one of auto, im2col, direct, batch", a.c_str()));
}

class SparseConv {
 public:
  static constexpr size_t kInputs = 5;
  static constexpr bool kBiasInput = true;  // the last input (bias) is optional
  static ONNXTensorElementDataType input_type(size_t index) { return SparseLinear::input_type(index); }

  explicit SparseConv(const OrtKernelInfo* info) {
    NodeInfo n{info, "SparseConv", node_name(info)};
    where_ = n.where();
    kernels_ = select_kernels();
    algo_ = conv_algo_from_env();

    std::vector<int64_t> v;
    if (!get_ints_attr(n, "kernel_shape", &v)) n.fail("missing required attribute 'kernel_shape'");
    if (v.size() != 2 || v[0] < 1 || v[1] < 1 || v[0] > kMaxAttr || v[1] > kMaxAttr)
      n.fail("kernel_shape must be 2 positive ints [kh, kw]");
    kh_ = v[0], kw_ = v[1];
    if (get_ints_attr(n, "strides", &v)) {
      if (v.size() != 2 || v[0] < 1 || v[1] < 1 || v[0] > kMaxAttr || v[1] > kMaxAttr)
        n.fail("strides must be 2 positive ints");
      sh_ = v[0], sw_ = v[1];
    }
    if (get_ints_attr(n, "dilations", &v)) {
      if (v.size() != 2 || v[0] < 1 || v[1] < 1 || v[0] > kMaxAttr || v[1] > kMaxAttr)
        n.fail("dilations must be 2 positive ints");
      dh_ = v[0], dw_ = v[1];
    }
    if (get_ints_attr(n, "pads", &v)) {
      if (v.size() != 4 || *std::min_element(v.begin(), v.end()) < 0 || *std::max_element(v.begin(), v.end()) > kMaxAttr)
        n.fail("pads must be 4 non-negative ints [top, left, bottom, right]");
      pt_ = v[0], pl_ = v[1], pb_ = v[2], pr_ = v[3];
    }
    std::string auto_pad;
    if (get_string_attr(n, "auto_pad", &auto_pad) && !auto_pad.empty() && auto_pad != "NOTSET")
      n.fail("auto_pad is not supported; give explicit pads");
    relu_ = read_activation(n);
    if (get_ints_attr(n, "max_pool", &v)) {
      if (v.size() != 2 || v[0] < 1 || v[1] < 1 || v[0] > kMaxAttr || v[1] > kMaxAttr)
        n.fail("max_pool must be 2 positive ints [ph, pw] (the pool window, and its strides)");
      ph_ = v[0], pw_ = v[1];
    }
    if (get_int_attr(n, "group", &group_) && (group_ < 1 || group_ > INT32_MAX))
      n.fail(format("group must be in [1, 2^31), got %lld", (long long)group_));
    if (get_int_attr(n, "in_channels", &in_channels_)) {
      if (in_channels_ < 1 || in_channels_ > INT32_MAX || in_channels_ % group_ != 0)
        n.fail(format("in_channels=%lld must be a positive multiple of group=%lld", (long long)in_channels_,
                      (long long)group_));
    } else {
      in_channels_ = 0;
    }
    const int64_t taps = kh_ * kw_;
    const int64_t cols = in_channels_ ? in_channels_ / group_ * taps : 0;
    if (cols > INT32_MAX) n.fail("in_channels/group*kh*kw must be < 2^31");
    Csr c = read_csr(n, cols);
    rows_ = c.rows;
    if (rows_ % group_ != 0)
      n.fail(format("M=%lld output channels (len(row_ptr)-1) is not divisible by group=%lld", (long long)rows_,
                    (long long)group_));
    // Only columns up to the largest index are gathered; without in_channels they are checked
    // against X's channels at run time.
    cols_ = std::max<int64_t>(c.max_col + 1, 1);
    density_ = static_cast<double>(c.nnz) / (static_cast<double>(rows_) * (cols ? cols : cols_));
    bias_ = std::move(c.bias);
    w_.init(c, cols_, /*want_row_major=*/false);
    csr_row_ptr_ = std::move(c.row_ptr);
    csr_col_ = std::move(c.col);
    csr_val_ = std::move(c.val);
  }

  void compute(OrtKernelContext* ctx) {
    const OrtValue* xv = nullptr;
    ort_check(g_api->KernelContext_GetInput(ctx, 0, &xv), where_);
    TensorRef x = describe(xv, where_ + " input X");
    if (x.shape.size() != 4) fail(format("X must be 4-D [N, C, H, W], got rank %zu", x.shape.size()));
    const int64_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
    if (in_channels_ && C != in_channels_)
      fail(format("X has %lld channels but in_channels is %lld", (long long)C, (long long)in_channels_));
    if (C % group_ != 0) fail(format("X has %lld channels, not divisible by group=%lld", (long long)C, (long long)group_));
    const int64_t Cg = C / group_;
    if (Cg * kh_ * kw_ < cols_)
      fail(format("col_idx up to %lld needs C/group*kh*kw > that, but X has %lld channels", (long long)(cols_ - 1),
                  (long long)C));
    const int64_t OH = (H + pt_ + pb_ - dh_ * (kh_ - 1) - 1) / sh_ + 1;
    const int64_t OW = (W + pl_ + pr_ - dw_ * (kw_ - 1) - 1) / sw_ + 1;
    if (H + pt_ + pb_ < dh_ * (kh_ - 1) + 1 || W + pl_ + pr_ < dw_ * (kw_ - 1) + 1)
      fail(format("input %lldx%lld (padded) is smaller than the dilated kernel", (long long)H, (long long)W));
    const int64_t M = rows_;
    const bool pooled = ph_ > 0;
    if (pooled && (OH < ph_ || OW < pw_))
      fail(format("the convolution's output %lldx%lld is smaller than the max_pool window %lldx%lld", (long long)OH,
                  (long long)OW, (long long)ph_, (long long)pw_));
    std::vector<int64_t> yshape{N, M, pooled ? OH / ph_ : OH, pooled ? OW / pw_ : OW};
    OrtValue* yv = nullptr;
    ort_check(g_api->KernelContext_GetOutput(ctx, 0, yshape.data(), yshape.size(), &yv), where_ + " output");
    if (N == 0) return;
    float* y = nullptr;
    ort_check(g_api->GetTensorMutableData(yv, reinterpret_cast<void**>(&y)), where_ + " output");
    Shape s{N, C, H, W, Cg, OH, OW};
    const float* xp = static_cast<const float*>(x.data);
    if (pooled && use_batch(s) && kernels_->all_finite(xp, N * C * H * W)) {
      compute_batch(ctx, xp, s, y, /*pooled=*/true);  // the pool runs on the lanes, in cache
      return;
    }
    // Unfused: the convolution (into a scratch buffer when pooled), its non-finite repair, the pool.
    std::optional<PooledBuf> conv_buf;  // its own pool: sharing pool_ would swap buffer sizes every call
    float* yc = y;
    if (pooled) yc = conv_buf.emplace(conv_out_pool_).buf.get(static_cast<size_t>(N * M * OH * OW));
    if (use_batch(s))
      compute_batch(ctx, xp, s, yc, /*pooled=*/false);
    else if (use_direct(s))
      compute_direct(ctx, xp, s, yc);
    else
      compute_im2col(ctx, xp, s, yc);
    restore_nonfinite(xp, s, yc);
    if (pooled) max_pool(ctx, yc, N * M, OH, OW, y);
  }

 private:
  struct Shape {
    int64_t N, C, H, W, Cg, OH, OW;
  };

  [[noreturn]] void fail(const std::string& msg) const { throw OpError(ORT_INVALID_ARGUMENT, where_ + ": " + msg); }

  // y = max pool of the conv output yc ([planes, OH, OW]) with window and strides [ph_, pw_], no padding,
  // floor mode; a NaN anywhere in a window gives NaN (as torch's max_pool2d; stock onnxruntime's MaxPool
  // keeps a NaN only in some window positions, docs/kernels.md). The window's rows are max'ed first, along
  // whole rows (vectorised), then its columns.
  void max_pool(OrtKernelContext* ctx, const float* yc, int64_t planes, int64_t OH, int64_t OW, float* y) const {
    const int64_t POH = OH / ph_, POW = OW / pw_, L = POW * pw_;
    parallel_for(ctx, static_cast<size_t>(ceil_div(planes, 8)), [&](size_t t) {
      float* row = thread_scratch(2, static_cast<size_t>(L));
      for (int64_t pl = t * 8; pl < std::min<int64_t>(planes, t * 8 + 8); ++pl) {
        const float* src = yc + pl * OH * OW;
        float* dst = y + pl * POH * POW;
        for (int64_t i = 0; i < POH; ++i) {
          const float* r = src + i * ph_ * OW;
          memcpy(row, r, sizeof(float) * L);
          for (int64_t a = 1; a < ph_; ++a)
            for (int64_t k = 0; k < L; ++k) row[k] = nan_max(row[k], r[a * OW + k]);
          float* d = dst + i * POW;
          if (pw_ == 2) {  // the common window: a loop of constant stride, which vectorises
            for (int64_t j = 0; j < POW; ++j) d[j] = nan_max(row[2 * j], row[2 * j + 1]);
            continue;
          }
          for (int64_t j = 0; j < POW; ++j) {
            float m = row[j * pw_];
            for (int64_t b = 1; b < pw_; ++b) m = nan_max(m, row[j * pw_ + b]);
            d[j] = m;
          }
        }
      }
    });
  }
  // max(m, v), NaN if either is; a select on bits, not a branch (random data would mispredict half of
  // them: the pass took 1.1 ms for LeNet-5's conv1 at batch 64), and the row loops vectorise
  static inline float nan_max(float m, float v) {
    uint32_t mb, vb;
    memcpy(&mb, &m, 4);
    memcpy(&vb, &v, 4);
    const uint32_t take = 0u - static_cast<uint32_t>((v > m) | (v != v));
    const uint32_t r = (vb & take) | (mb & ~take);
    float out;
    memcpy(&out, &r, 4);
    return out;
  }

  // Images in lanes: lane tiles of the zero-padded input, [C, Hp, Wp, lanes], at most 64 lanes, the
  // images split evenly over the tiles (200 images: 4 tiles of 56 lanes, not 3 x 64 + 8).
  int64_t batch_lanes(const Shape& s) const {
    return ceil_div(ceil_div(s.N, std::max<int64_t>(1, ceil_div(s.N, kMaxTile))), 8) * 8;
  }

  bool use_batch(const Shape& s) const {
    const int64_t Hp = s.H + pt_ + pb_, Wp = s.W + pl_ + pr_, NT = batch_lanes(s);
    if (s.C * Hp * Wp * NT + NT > INT32_MAX) return false;
    if (algo_ == ConvAlgo::kBatch) return true;
    if (algo_ != ConvAlgo::kAuto) return false;
    // Like direct, it gathers nothing, so it pays where reuse is low (low_reuse); with whole vectors of
    // images every load is aligned and no pad column is computed, so from 16 images it beats direct
    // while a lane tile stays in L2 (docs/kernels.md).
    // With a fused max pool it pools in the lanes while the others need a pass over the full output, which
    // moves its break-even with im2col from a reuse of about 12 to about 50 (docs/kernels.md).
    return s.N >= kBatchMinN && s.C * Hp * Wp * NT * int64_t(sizeof(float)) <= kBatchMaxTileBytes &&
           reuse() < (ph_ ? kBatchPooledMaxReuse : kDirectMaxReuse);
  }

  // Measured (docs/kernels.md): gathering im2col tiles pays off when each gathered element feeds many
  // output channels (Mg * density); with little reuse (LeNet-5 conv2: 6) the gather-free forms win.
  double reuse() const { return static_cast<double>(rows_ / group_) * density_; }
  bool low_reuse() const { return reuse() < kDirectMaxReuse; }

  bool use_direct(const Shape& s) const {
    if (sh_ != 1 || sw_ != 1) return false;  // direct form needs unit stride
    const int64_t Hp = s.H + pt_ + pb_, Wp = s.W + pl_ + pr_;
    if (s.Cg * Hp * Wp + kMaxTile + Wp > INT32_MAX) return false;
    if (algo_ == ConvAlgo::kDirect) return true;
    if (algo_ == ConvAlgo::kIm2col) return false;
    return low_reuse();
  }

  // Dense Conv semantics for non-finite inputs (see restore_nonfinite_linear): y[n, m, oh, ow] = NaN
  // where the receptive field holds a non-finite value at a tap that filter m does not store.
  // Padding is zero and never non-finite.
  void restore_nonfinite(const float* x, const Shape& s, float* y) const {
    const int64_t HW = s.H * s.W;
    if (kernels_->all_finite(x, s.N * s.C * HW)) return;
    const int64_t taps = kh_ * kw_, K = s.Cg * taps, G = group_, Mg = rows_ / G, P = s.OH * s.OW;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    std::vector<uint8_t> bad(cols_, 0);
    std::vector<int64_t> seen(cols_, -1);
    std::vector<int64_t> listed;
    int64_t stamp = 0;
    for (int64_t n = 0; n < s.N; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const float* xg = x + (n * s.C + g * s.Cg) * HW;
        if (kernels_->all_finite(xg, s.Cg * HW)) continue;
        for (int64_t oh = 0; oh < s.OH; ++oh)
          for (int64_t ow = 0; ow < s.OW; ++ow) {
            int64_t nbad = 0;
            listed.clear();
            for (int64_t k = 0; k < K; ++k) {
              const int64_t c = k / taps, i = (k % taps) / kw_, j = k % kw_;
              const int64_t ih = oh * sh_ - pt_ + i * dh_, iw = ow * sw_ - pl_ + j * dw_;
              if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W || std::isfinite(xg[c * HW + ih * s.W + iw])) continue;
              ++nbad;
              if (k < cols_) bad[k] = 1, listed.push_back(k);
            }
            if (!nbad) continue;
            for (int64_t m = g * Mg; m < g * Mg + Mg; ++m) {
              ++stamp;
              int64_t hit = 0;  // distinct non-finite taps filter m stores
              for (int32_t e = csr_row_ptr_[m]; e < csr_row_ptr_[m + 1]; ++e) {
                const int64_t k = csr_col_[e];
                if (bad[k] && seen[k] != stamp) seen[k] = stamp, ++hit;
              }
              if (hit < nbad) y[(n * rows_ + m) * P + oh * s.OW + ow] = nan;
            }
            for (int64_t k : listed) bad[k] = 0;
          }
      }
  }

  // Per output-position tile: gather the [cols_, NT] patch matrix, then one sparse tile product.
  void compute_im2col(OrtKernelContext* ctx, const float* x, const Shape& s, float* y) {
    const int64_t P = s.OH * s.OW, G = group_, Mg = rows_ / G, M = rows_;
    const int64_t ptiles = ceil_div(P, kMaxTile);
    const int64_t base_tasks = s.N * G * ptiles;
    const int64_t mc = chunk_rows(Mg, ceil_div(16, base_tasks), 16, Mg);
    const int64_t mchunks = ceil_div(Mg, mc);
    const float* bias = bias_.empty() ? nullptr : bias_.data();
    const KernelTable* kt = kernels_;
    const BlockedCsr& w = w_.sub_major();
    const int64_t K = cols_;
    auto geometry = [&](int64_t tile_task, int64_t* n, int64_t* g, int64_t* p0, int* valid, int* nv) {
      const int64_t pt = tile_task % ptiles, ng = tile_task / ptiles;
      *g = ng % G, *n = ng / G;
      *p0 = pt * kMaxTile;
      *valid = static_cast<int>(std::min<int64_t>(kMaxTile, P - *p0));
      *nv = (*valid + 7) / 8;
    };
    auto product = [&](int64_t tile_task, int64_t mci, const float* xt) {
      int64_t n, g, p0;
      int valid, nv;
      geometry(tile_task, &n, &g, &p0, &valid, &nv);
      const int64_t m0 = g * Mg + mci * mc, m1 = std::min(g * Mg + Mg, m0 + mc);
      float* scratch = thread_scratch(1, static_cast<size_t>(m1 - m0) * nv * 8);
      kt->spmm(w, m0, m1, xt, nv, bias, y + (n * M + m0) * P + p0, P, valid, scratch);
      if (relu_)
        for (int64_t m = m0; m < m1; ++m) relu_inplace(y + (n * M + m) * P + p0, valid);
    };
    auto gather = [&](int64_t tile_task, float* xt) {
      int64_t n, g, p0;
      int valid, nv;
      geometry(tile_task, &n, &g, &p0, &valid, &nv);
      im2col_tile(x + (n * s.C + g * s.Cg) * s.H * s.W, s, p0, valid, nv * 8, xt);
    };
    if (mchunks == 1) {  // one task per tile: gather into per-thread scratch, multiply
      parallel_for(ctx, base_tasks, [&](size_t t) {
        float* xt = thread_scratch(0, static_cast<size_t>(K) * kMaxTile);
        gather(t, xt);
        product(t, 0, xt);
      });
      return;
    }
    // Few tiles, output channels split too: gather every tile once into a shared buffer.
    PooledBuf buf(pool_);
    float* xts = buf.buf.get(static_cast<size_t>(base_tasks) * K * kMaxTile);
    parallel_for(ctx, base_tasks, [&](size_t t) { gather(t, xts + t * K * kMaxTile); });
    parallel_for(ctx, base_tasks * mchunks, [&](size_t task) {
      const int64_t t = task / mchunks;
      product(t, task % mchunks, xts + t * K * kMaxTile);
    });
  }

  // xt[k, l] = X[c, oh*sh - pt + i*dh, ow*sw - pl + j*dw] (0 outside X) for k = (c, i, j) and output
  // position p0 + l = oh*OW + ow; lanes [valid, NT) are zero. Lanes are handled in runs of one
  // output row, which read contiguous input when the stride is 1.
  void im2col_tile(const float* xg, const Shape& s, int64_t p0, int valid, int NT, float* xt) const {
    struct Run {
      int64_t ih0, iw0;  // input position of tap (0, 0) for the run's first lane
      int l0, len;
    } runs[kMaxTile];
    int nruns = 0;
    for (int l = 0; l < valid;) {
      const int64_t p = p0 + l, oh = p / s.OW, ow = p % s.OW;
      const int len = static_cast<int>(std::min<int64_t>(valid - l, s.OW - ow));
      runs[nruns++] = Run{oh * sh_ - pt_, ow * sw_ - pl_, l, len};
      l += len;
    }
    const int64_t H = s.H, W = s.W, taps = kh_ * kw_;
    for (int64_t k = 0; k < cols_; ++k) {
      const int64_t c = k / taps, i = (k % taps) / kw_, j = k % kw_;
      const float* xc = xg + c * H * W;
      float* d = xt + k * NT;
      for (int r = 0; r < nruns; ++r) {
        const Run& run = runs[r];
        float* dr = d + run.l0;
        const int64_t ih = run.ih0 + i * dh_;
        if (ih < 0 || ih >= H) {
          std::fill(dr, dr + run.len, 0.f);
          continue;
        }
        const float* src = xc + ih * W;
        const int64_t iw0 = run.iw0 + j * dw_;
        if (sw_ == 1) {
          const int64_t lo = std::min<int64_t>(run.len, std::max<int64_t>(0, -iw0));
          const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(run.len, W - iw0));
          std::fill(dr, dr + lo, 0.f);
          memcpy(dr + lo, src + iw0 + lo, sizeof(float) * (hi - lo));
          std::fill(dr + hi, dr + run.len, 0.f);
        } else {
          for (int t = 0; t < run.len; ++t) {
            const int64_t iw = iw0 + t * sw_;
            dr[t] = (iw >= 0 && iw < W) ? src[iw] : 0.f;
          }
        }
      }
      std::fill(d + valid, d + NT, 0.f);
    }
  }

  // Unit-stride direct convolution: with X zero-padded to [Hp, Wp] and flattened, output q = oh*Wp
  // + ow reads X_pad[q + off] for a weight tap at offset off = c*Hp*Wp + i*dh*Wp + j*dw, so one W
  // row updates 64 consecutive q with contiguous loads (columns ow >= OW are computed and dropped).
  void compute_direct(OrtKernelContext* ctx, const float* x, const Shape& s, float* y) {
    const int64_t Hp = s.H + pt_ + pb_, Wp = s.W + pl_ + pr_, HWp = Hp * Wp;
    const int64_t G = group_, Mg = rows_ / G, M = rows_, P = s.OH * s.OW;
    std::shared_ptr<const std::vector<int32_t>> offs = offsets_for(s.H, s.W, Hp, Wp);
    const OffsetCsr w{rows_, csr_row_ptr_.data(), offs->data(), csr_val_.data()};

    PooledBuf xp_buf(pool_);
    const int64_t tail = kMaxTile + (kw_ - 1) * dw_ + 8;
    float* xp = xp_buf.buf.get(static_cast<size_t>(s.N * s.C * HWp + tail));
    const int64_t planes = s.N * s.C;
    parallel_for(ctx, ceil_div(planes, 8), [&](size_t t) {
      for (int64_t pi = t * 8; pi < std::min(planes, (int64_t)t * 8 + 8); ++pi) {
        float* d = xp + pi * HWp;
        const float* src = x + pi * s.H * s.W;
        std::fill(d, d + pt_ * Wp, 0.f);
        for (int64_t h = 0; h < s.H; ++h) {
          float* row = d + (pt_ + h) * Wp;
          std::fill(row, row + pl_, 0.f);
          memcpy(row + pl_, src + h * s.W, sizeof(float) * s.W);
          std::fill(row + pl_ + s.W, row + Wp, 0.f);
        }
        std::fill(d + (pt_ + s.H) * Wp, d + HWp, 0.f);
      }
    });
    std::fill(xp + planes * HWp, xp + planes * HWp + tail, 0.f);

    const int64_t Q = s.OH * Wp;
    const int64_t qtiles = ceil_div(Q, kMaxTile);
    const int64_t base_tasks = s.N * G * qtiles;
    const int64_t mc = chunk_rows(Mg, ceil_div(16, base_tasks), 16, Mg);
    const int64_t mchunks = ceil_div(Mg, mc);
    const float* bias = bias_.empty() ? nullptr : bias_.data();
    const KernelTable* kt = kernels_;
    parallel_for(ctx, base_tasks * mchunks, [&](size_t task) {
      int64_t r = task;
      const int64_t mci = r % mchunks;
      r /= mchunks;
      const int64_t qt = r % qtiles;
      r /= qtiles;
      const int64_t g = r % G, n = r / G;
      const int64_t q0 = qt * kMaxTile;
      const int valid = static_cast<int>(std::min<int64_t>(kMaxTile, Q - q0));
      const int nv = (valid + 7) / 8, NT = nv * 8;
      const int64_t m0 = g * Mg + mci * mc, m1 = std::min(g * Mg + Mg, m0 + mc);
      float* out = thread_scratch(0, static_cast<size_t>(m1 - m0) * NT);
      kt->spmm_offsets(w, m0, m1, xp + (n * s.C + g * s.Cg) * HWp + q0, nv, bias, out, NT, false);
      if (relu_) relu_inplace(out, (m1 - m0) * NT);
      // lanes q = oh * Wp + ow with ow < OW are outputs: copy them row segment by row segment
      for (int64_t oh = q0 / Wp; oh * Wp < q0 + valid; ++oh) {
        const int64_t a = std::max(q0, oh * Wp), b = std::min(q0 + valid, oh * Wp + s.OW);
        if (a >= b) continue;
        for (int64_t m = m0; m < m1; ++m)
          memcpy(y + (n * M + m) * P + oh * s.OW + (a - oh * Wp), out + (m - m0) * NT + (a - q0), sizeof(float) * (b - a));
      }
    });
  }

  // Images in lanes: the padded input of a tile of NT images is laid out [C, Hp, Wp, NT]; output
  // position (oh, ow) of filter m is then sum_j val[j] * xt[(off_j + (oh*sh*Wp + ow*sw)) * NT + lane],
  // one aligned NT-float row per non-zero: the offset-CSR tile product with offsets scaled by NT.
  // Each task computes a run of positions for a group's filters into its own [Mg, positions, NT] buffer
  // and transposes it into Y's [N, M, P] while it is in cache. pooled: the positions are those of the
  // max pool's output, each the max of its window's conv positions (computed into the same lanes).
  void compute_batch(OrtKernelContext* ctx, const float* x, const Shape& s, float* y, bool pooled) {
    const int64_t Hp = s.H + pt_ + pb_, Wp = s.W + pl_ + pr_, HWp = Hp * Wp;
    const int64_t wh = pooled ? ph_ : 1, ww = pooled ? pw_ : 1, POW = s.OW / ww;
    const int64_t G = group_, Mg = rows_ / G, M = rows_, P = (s.OH / wh) * POW;
    const int64_t NT = batch_lanes(s), nv = NT / 8, tiles = ceil_div(s.N, NT);
    // the direct form's element offsets, in rows of NT lanes (use_batch bounds C * HWp * NT below 2^31)
    std::shared_ptr<const std::vector<int32_t>> base = offsets_for(s.H, s.W, Hp, Wp);
    std::vector<int32_t> offs(base->size());
    for (size_t j = 0; j < offs.size(); ++j) offs[j] = static_cast<int32_t>((*base)[j] * NT);
    const OffsetCsr w{rows_, csr_row_ptr_.data(), offs.data(), csr_val_.data()};
    const float* bias = bias_.empty() ? nullptr : bias_.data();
    const KernelTable* kt = kernels_;
    PooledBuf xt_buf(pool_);
    float* xt = xt_buf.buf.get(static_cast<size_t>(s.C * HWp * NT));
    const int64_t pc = std::max<int64_t>(1, ceil_div(P, 8));  // positions per task
    const int64_t pchunks = ceil_div(P, pc);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * NT, nn = std::min(NT, s.N - n0);
      parallel_for(ctx, static_cast<size_t>(s.C), [&](size_t c) {
        float* d = xt + c * HWp * NT;
        memset(d, 0, sizeof(float) * HWp * NT);
        for (int64_t h = 0; h < s.H; ++h)  // [images, W] rows of channel c -> [W, lanes] of the padded row
          kt->transpose(x + (n0 * s.C + c) * s.H * s.W + h * s.W, s.C * s.H * s.W, d + ((pt_ + h) * Wp + pl_) * NT, NT,
                        nn, s.W);
      });
      parallel_for(ctx, static_cast<size_t>(G * pchunks), [&](size_t task) {
        const int64_t g = task / pchunks, p0 = (task % pchunks) * pc, p1 = std::min(P, p0 + pc);
        const float* xg = xt + g * s.Cg * HWp * NT;
        float* ob = thread_scratch(0, static_cast<size_t>(Mg * pc * NT));  // [Mg, positions, lanes]
        for (int64_t p = p0; p < p1; ++p)
          for (int64_t a = 0; a < wh; ++a)
            for (int64_t b = 0; b < ww; ++b) {
              const int64_t oh = p / POW * wh + a, ow = p % POW * ww + b;
              kt->spmm_offsets(w, g * Mg, g * Mg + Mg, xg + (oh * sh_ * Wp + ow * sw_) * NT, static_cast<int>(nv),
                               bias, ob + (p - p0) * NT, pc * NT, /*max_into=*/a + b > 0);
            }
        if (relu_) relu_inplace(ob, Mg * pc * NT);
        for (int64_t m = 0; m < Mg; ++m)  // while in cache: [positions, lanes] -> Y[n, m, positions]
          kt->transpose(ob + m * pc * NT, NT, y + n0 * M * P + (g * Mg + m) * P + p0, M * P, p1 - p0, nn);
      });
    }
  }

  std::shared_ptr<const std::vector<int32_t>> offsets_for(int64_t H, int64_t W, int64_t Hp, int64_t Wp) {
    std::lock_guard<std::mutex> lock(offs_mu_);
    if (offs_ && offs_h_ == H && offs_w_ == W) return offs_;
    auto v = std::make_shared<std::vector<int32_t>>(csr_col_.size());
    const int64_t taps = kh_ * kw_;
    for (size_t j = 0; j < csr_col_.size(); ++j) {
      const int64_t k = csr_col_[j], c = k / taps, i = (k / kw_) % kh_, jj = k % kw_;
      (*v)[j] = static_cast<int32_t>(c * Hp * Wp + i * dh_ * Wp + jj * dw_);
    }
    offs_ = v;
    offs_h_ = H, offs_w_ = W;
    return offs_;
  }

  std::string where_;
  const KernelTable* kernels_ = nullptr;
  ConvAlgo algo_ = ConvAlgo::kAuto;
  int64_t kh_ = 0, kw_ = 0, sh_ = 1, sw_ = 1, dh_ = 1, dw_ = 1, pt_ = 0, pl_ = 0, pb_ = 0, pr_ = 0;
  int64_t group_ = 1, in_channels_ = 0, rows_ = 0, cols_ = 0;
  int64_t ph_ = 0, pw_ = 0;  // fused max pool window (= strides); 0: none
  bool relu_ = false;        // fused ReLU (attribute activation); it commutes with the max pool
  double density_ = 1.0;
  std::vector<float> bias_;
  BlockedWeights w_;
  std::vector<int32_t> csr_row_ptr_, csr_col_;
  std::vector<float> csr_val_;
  std::mutex offs_mu_;
  std::shared_ptr<const std::vector<int32_t>> offs_;
  int64_t offs_h_ = -1, offs_w_ = -1;
  BufferPool pool_;
  BufferPool conv_out_pool_;  // the unpooled convolution output of the fused max pool's fallback
};

// ---------------------------------------------------------------------------------------------
// LRN: the ONNX LRN operator (same attributes and formula) on the vectorised kernels. onnxruntime's own
// CPU LRN takes most of a batch-1 AlexNet's time (docs/kernels.md), so the fast form runs this instead.
// X float [N, C, D1, ...] (rank >= 3); attributes size (required, >= 1), alpha, beta, bias (finite;
// defaults 1e-4, 0.75, 1). y = x * (bias + alpha / size * sum of x^2 over channels
// [c - floor((size-1)/2), c + ceil((size-1)/2)])^(-beta).

constexpr int64_t kLrnChunk = 1024;  // positions per task (a multiple of every kernel's vector width)

class Lrn {
 public:
  static constexpr size_t kInputs = 1;
  static constexpr bool kBiasInput = false;
  static ONNXTensorElementDataType input_type(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

  explicit Lrn(const OrtKernelInfo* info) {
    NodeInfo n{info, "LRN", node_name(info)};
    where_ = n.where();
    kernels_ = select_kernels();
    int64_t size = 0;
    if (!get_int_attr(n, "size", &size)) n.fail("missing required int attribute 'size'");
    if (size < 1 || size > kMaxAttr) n.fail(format("size must be in [1, %lld], got %lld", (long long)kMaxAttr, (long long)size));
    float alpha = 1e-4f, beta = 0.75f;
    get_float_attr(n, "alpha", &alpha);
    get_float_attr(n, "beta", &beta);
    get_float_attr(n, "bias", &bias_);
    for (auto [name, v] : {std::pair<const char*, float>{"alpha", alpha}, {"beta", beta}, {"bias", bias_}})
      if (!std::isfinite(v)) n.fail(format("attribute %s must be finite, got %g", name, double(v)));
    lo_ = (size - 1) / 2;
    hi_ = size - 1 - lo_;
    coef_ = alpha / static_cast<float>(size);
    beta_ = beta;
  }

  void compute(OrtKernelContext* ctx) {
    const OrtValue* xv = nullptr;
    ort_check(g_api->KernelContext_GetInput(ctx, 0, &xv), where_);
    TensorRef x = describe(xv, where_ + " input X");
    if (x.shape.size() < 3)
      throw OpError(ORT_INVALID_ARGUMENT,
                    where_ + format(": X must be [N, C, D1, ...] (rank >= 3), got rank %zu", x.shape.size()));
    const int64_t N = x.shape[0], C = x.shape[1];
    int64_t P = 1;
    for (size_t i = 2; i < x.shape.size(); ++i) P *= x.shape[i];
    OrtValue* yv = nullptr;
    ort_check(g_api->KernelContext_GetOutput(ctx, 0, x.shape.data(), x.shape.size(), &yv), where_ + " output");
    if (N == 0 || C == 0 || P == 0) return;
    float* y = nullptr;
    ort_check(g_api->GetTensorMutableData(yv, reinterpret_cast<void**>(&y)), where_ + " output");
    const float* xp = static_cast<const float*>(x.data);
    const int64_t chunks = ceil_div(P, kLrnChunk);
    const KernelTable* kt = kernels_;
    parallel_for(ctx, static_cast<size_t>(N * chunks), [&](size_t t) {
      const int64_t n = static_cast<int64_t>(t) / chunks, p0 = (static_cast<int64_t>(t) % chunks) * kLrnChunk;
      kt->lrn(xp + n * C * P, y + n * C * P, C, P, p0, std::min(P, p0 + kLrnChunk), lo_, hi_, bias_, coef_, beta_);
    });
  }

 private:
  std::string where_;
  const KernelTable* kernels_ = nullptr;
  int64_t lo_ = 0, hi_ = 0;
  float bias_ = 1.f, coef_ = 0.f, beta_ = 0.75f;
};

// ---------------------------------------------------------------------------------------------
// OrtCustomOp glue.

template <class Kernel>
struct OpDef : OrtCustomOp {
  const char* name;
  explicit OpDef(const char* op_name) : OrtCustomOp{}, name(op_name) {
    version = ORT_API_VERSION;
    GetName = [](const OrtCustomOp* op) -> const char* { return static_cast<const OpDef*>(op)->name; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return nullptr; };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return Kernel::kInputs; };
    GetInputType = [](const OrtCustomOp*, size_t index) -> ONNXTensorElementDataType {
      return Kernel::input_type(index);
    };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t index) -> OrtCustomOpInputOutputCharacteristic {
      return Kernel::kBiasInput && index == Kernel::kInputs - 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    GetOutputType = [](const OrtCustomOp*, size_t) -> ONNXTensorElementDataType {
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) -> OrtCustomOpInputOutputCharacteristic {
      return INPUT_OUTPUT_REQUIRED;
    };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) -> OrtMemType { return OrtMemTypeDefault; };
    GetVariadicInputMinArity = [](const OrtCustomOp*) -> int { return 1; };
    GetVariadicInputHomogeneity = [](const OrtCustomOp*) -> int { return 0; };
    GetVariadicOutputMinArity = [](const OrtCustomOp*) -> int { return 1; };
    GetVariadicOutputHomogeneity = [](const OrtCustomOp*) -> int { return 0; };
    CreateKernelV2 = [](const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** kernel) -> OrtStatusPtr {
      *kernel = nullptr;
      return guarded([&] { *kernel = new Kernel(info); });
    };
    KernelComputeV2 = [](void* kernel, OrtKernelContext* ctx) -> OrtStatusPtr {
      return guarded([&] { static_cast<Kernel*>(kernel)->compute(ctx); });
    };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    GetStartVersion = [](const OrtCustomOp*) -> int { return 1; };
    GetEndVersion = [](const OrtCustomOp*) -> int { return 1; };
  }
};

OpDef<SparseLinear> g_linear("SparseLinear");
OpDef<SparseConv> g_conv("SparseConv");
OpDef<SparseLinearCodebook> g_codebook("SparseLinearCodebook");
OpDef<SparseLinearInt8> g_int8("SparseLinearInt8");
OpDef<Lrn> g_lrn("LRN");

}  // namespace
}  // namespace tcops

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  using namespace tcops;
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) {
    // Older runtime: report through the oldest API table every release has.
    const OrtApi* old = api_base->GetApi(1);
    std::string msg = std::string("toolchain sparse ops need onnxruntime >= 1.29, this is ") +
                      api_base->GetVersionString();
    return old ? old->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  g_api = api;
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(kDomain, &domain)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_linear)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_conv)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_codebook)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_int8)) return st;
  if (OrtStatus* st = api->CustomOpDomain_Add(domain, &g_lrn)) return st;
  // The domain must outlive every session using it; it is small and kept until process exit.
  return api->AddCustomOpDomain(options, domain);
}
