// apo-kernels: which GEMM the CPU direct path calls for fp32 (csrc/ops.cpp), the oneDNN route, and
// whether a big bf16 layer's forward runs on bf16 GEMMs (below).
//
// The direct path calls torch's BLAS (MKL) by default. MKL runs its AVX-512 kernels on Intel CPUs
// only; on AMD it takes its AVX2 code path. There oneDNN's brgemm micro-kernel (JIT-compiled AVX-512,
// exported by torch as at::native::cpublas::brgemm) is the faster GEMM on the direct path's sizes:
// on Zen 5 (CPU family 0x1A, 512-bit FMAs at full width) 2.2–2.7× MKL (one thread, 32³–512³: 250–287
// against 93–120 GFLOP/s); on Zen 4 (family 0x19, AVX-512 on 256-bit halves) 1.1–1.4× (102–116
// against 72–103 GFLOP/s, the core's FMA peak being 116), which took the MNIST-1D MLP's op from 1.03
// to 0.87 ms at 2 threads. On Intel MKL runs its own AVX-512 kernels, and brgemm wins no clear case: on
// a Xeon with AMX it took the MNIST-1D MLP's plain step from 2.00 to 1.90× SGD but the grouped op over
// 64 small layers from 0.35–0.37 to 0.39–0.42× the loop.
// So `auto` takes oneDNN on AMD CPUs with AVX-512 and keeps MKL everywhere else.
//
// A big layer (one the BLAS engine leaves to torch's matmul) joins the engine, as blocked brgemm
// GEMMs, only where brgemm runs at full width: on Zen 4 MKL's threaded GEMMs beat the blocked ones
// there (the 2048² op's forward + backward 1.40 → 1.54–1.65 s), so `auto` leaves big layers to torch's
// matmul on Zen 4; APO_KERNELS_CPU_GEMM=onednn puts them on the engine on any CPU.
//
// The choice is fixed per process (the same on every rank of identical machines, so replicas stay
// bit-identical) and can be forced with APO_KERNELS_CPU_GEMM=auto|blas|onednn. The result is an fp32
// GEMM either way (fp32 products, fp32 sums); only the order of the sums, hence the last bits, can
// differ between the two.
#pragma once

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define APO_X86_AVX512_TRANSPOSE 1
#else
#define APO_X86_AVX512_TRANSPOSE 0
#endif

namespace apo {
namespace cpu_gemm {

enum class Engine { blas, onednn };

// torch exports an fp32 brgemm (oneDNN's micro-kernel where torch was built with oneDNN ukernels,
// else a plain GEMM fallback inside torch).
#ifdef CPUBLAS_BRGEMM_F32F32F32
constexpr bool kHaveBrgemm = true;
#else
constexpr bool kHaveBrgemm = false;
#endif

// AMD with AVX-512 (Zen 4 and later): the CPU's family, or 0 on any other CPU.
inline unsigned amd_avx512_family() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
  char vendor[13];
  std::memcpy(vendor, &b, 4), std::memcpy(vendor + 4, &d, 4), std::memcpy(vendor + 8, &c, 4);
  vendor[12] = '\0';
  if (std::strcmp(vendor, "AuthenticAMD") != 0) return 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
  const unsigned base = (a >> 8) & 0xF, ext = (a >> 20) & 0xFF;
  const unsigned family = base == 0xF ? base + ext : base;
  unsigned a7 = 0, b7 = 0, c7 = 0, d7 = 0;
  if (!__get_cpuid_count(7, 0, &a7, &b7, &c7, &d7)) return 0;
  const bool avx512f = (b7 >> 16) & 1;
  return avx512f ? family : 0;
#else
  return 0;
#endif
}

constexpr unsigned kFullWidthFamily = 0x1A;  // Zen 5: 512-bit FMAs at full width

// An APO_KERNELS_CPU_* choice: "auto", `first` or `second` (unset or empty: auto). A bad value is a
// ValueError naming the variable, at the first call that would use it.
inline std::string env_choice(const char* name, const char* first, const char* second) {
  const char* env = std::getenv(name);
  const std::string v = env && *env ? env : "auto";
  TORCH_CHECK_VALUE(v == "auto" || v == first || v == second, name, " must be auto, ", first, " or ", second,
                    ", got '", v, "'");
  return v;
}

// APO_KERNELS_CPU_GEMM, checked: auto, blas or onednn.
inline std::string requested() {
  const std::string v = env_choice("APO_KERNELS_CPU_GEMM", "blas", "onednn");
  TORCH_CHECK_VALUE(v != "onednn" || kHaveBrgemm,
                    "APO_KERNELS_CPU_GEMM=onednn: this torch exports no fp32 brgemm (at::native::cpublas)");
  return v;
}

// The engine for this process: the one asked for, else the rule above.
inline Engine choose() {
  const std::string v = requested();
  if (v != "auto") return v == "onednn" ? Engine::onednn : Engine::blas;
  return kHaveBrgemm && amd_avx512_family() != 0 ? Engine::onednn : Engine::blas;
}

inline Engine engine() {
  static const Engine e = choose();
  return e;
}

// Whether a big fp32 layer takes the engine's blocked GEMMs rather than torch's matmul (see above).
inline bool big_layers_on_engine() {
  static const bool yes = engine() == Engine::onednn &&
                          (requested() == "onednn" || amd_avx512_family() >= kFullWidthFamily);
  return yes;
}

// What this process runs, as torch.ops.apo.cpu_gemm_engine() reports it.
inline std::string description() {
  if (engine() == Engine::blas) return "blas";
  return big_layers_on_engine() ? "onednn" : "onednn (big layers: torch matmul)";
}

// ---- bf16 layers off the direct path (ops.cpp's forward_layer and backward_layer)
//
// By default a bf16 layer is computed in fp32 and rounded once. On a CPU with AMX-BF16 tiles torch's bf16
// GEMMs run several times faster than its fp32 ones (Intel Xeon, 2 threads: 1024² 5.4×), so there a bf16
// layer, from a cost of 128·128·256 up, feeds bf16 operands to torch's GEMMs as the torch chain in bf16
// does (each product rounded to bf16, sums in fp32), forward and backward: the op at the chain's speed
// and accuracy, 2–6× faster than rounded once from 256² to 2048². Below that size bf16 GEMMs measured
// slower than the fp32 route.
// APO_KERNELS_CPU_BF16_GEMM=auto|bf16|fp32 forces either route on any CPU; fixed per process.
constexpr double kBf16OperandsMinCost = 128.0 * 128.0 * 256.0;

inline bool has_amx_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return (d >> 22) & 1;  // CPUID.(EAX=7, ECX=0):EDX[22] = AMX-BF16
#else
  return false;
#endif
}

inline bool bf16_operands_chosen() {
  const std::string v = env_choice("APO_KERNELS_CPU_BF16_GEMM", "bf16", "fp32");
  return v == "auto" ? has_amx_bf16() : v == "bf16";
}

inline bool bf16_operands() {
  static const bool yes = bf16_operands_chosen();
  return yes;
}

// What this process does with bf16 layers, as torch.ops.apo.cpu_bf16_gemm() reports it.
inline std::string bf16_description() { return bf16_operands() ? "bf16" : "fp32"; }

// Scratch memory: this thread's, grown on demand and kept, up to kKeepElems (a small layer's or a row
// block's worth); a bigger request (a big layer's) is owned by the object for the call, so that no
// thread keeps a big layer's intermediates. Each Slot is its own kept buffer (one per role: the
// transposed operands and the result below, the direct path's workspace in ops.cpp).
constexpr size_t kKeepElems = size_t(1) << 20;

template <typename T, int Slot>
class Scratch {
 public:
  explicit Scratch(size_t elems) {
    if (elems <= kKeepElems) {
      thread_local std::vector<T> kept;
      if (kept.size() < elems) kept.resize(elems);
      p_ = kept.data();
    } else {
      own_.reset(new T[elems]);  // uninitialized: every element is written before it is read
      p_ = own_.get();
    }
  }
  T* data() const { return p_; }

 private:
  std::unique_ptr<T[]> own_;
  T* p_ = nullptr;
};

// Rows [i0, i1) × columns [j0, j1) of dst (row stride ldd) from src, where dst's (i, j) is src[j·ld + i].
inline void transpose_tile_scalar(float* dst, const float* src, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                                  int64_t ldd, int64_t ld) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* s = src + j * ld;
    for (int64_t i = i0; i < i1; ++i) dst[i * ldd + j] = s[i];
  }
}

#if APO_X86_AVX512_TRANSPOSE
// (GCC 12 flags the intrinsics' own undefined-vector idiom as uninitialized: its false positive.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The 16×16 block at src (rows j0.., 16 floats from i0) lands at dst rows i0.., columns j0...
__attribute__((target("avx512f"))) inline void transpose16_avx512(float* dst, int64_t ldd, const float* src,
                                                                  int64_t lds) {
  __m512 r[16], t[16];
  for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_ps(src + k * lds);
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
    t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {
    r[k] = _mm512_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 1] = _mm512_shuffle_ps(t[k], t[k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[k + 2] = _mm512_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[k + 3] = _mm512_shuffle_ps(t[k + 1], t[k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int h = 0; h < 16; h += 8) {
    for (int k = 0; k < 4; ++k) {
      t[h + k] = _mm512_shuffle_f32x4(r[h + k], r[h + k + 4], 0x88);
      t[h + k + 4] = _mm512_shuffle_f32x4(r[h + k], r[h + k + 4], 0xdd);
    }
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xdd);
  }
  for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * ldd, r[k]);
}

__attribute__((target("avx512f"))) inline void transpose_avx512(float* dst, int64_t ldd, const float* src,
                                                                int64_t rows, int64_t cols, int64_t ld) {
  const int64_t rows16 = rows / 16 * 16, cols16 = cols / 16 * 16;
  for (int64_t i0 = 0; i0 < rows16; i0 += 16) {
    for (int64_t j0 = 0; j0 < cols16; j0 += 16) transpose16_avx512(dst + i0 * ldd + j0, ldd, src + j0 * ld + i0, ld);
    transpose_tile_scalar(dst, src, i0, i0 + 16, cols16, cols, ldd, ld);
  }
  transpose_tile_scalar(dst, src, rows16, rows, 0, cols, ldd, ld);
}
#pragma GCC diagnostic pop
#endif

// The whole transpose element by element, in 16×16 tiles (what transpose_into does without AVX-512).
inline void transpose_scalar(float* dst, int64_t ldd, const float* src, int64_t rows, int64_t cols, int64_t ld) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      transpose_tile_scalar(dst, src, i0, std::min(i0 + kTile, rows), j0, std::min(j0 + kTile, cols), ldd, ld);
    }
  }
}

inline bool have_avx512() {
#if APO_X86_AVX512_TRANSPOSE
  static const bool yes = __builtin_cpu_supports("avx512f");
  return yes;
#else
  return false;
#endif
}

// dst (rows×cols, row-major, row stride ldd) = the matrix whose (i, j) is src[j·ld + i]: 16×16
// tiles, each in AVX-512 registers where the CPU has them (4× the scalar loop's 0.23 ns per element,
// which cost a 64×64 layer's forward a quarter of its GEMMs' time), the edges element by element.
inline void transpose_into(float* dst, int64_t ldd, const float* src, int64_t rows, int64_t cols, int64_t ld) {
#if APO_X86_AVX512_TRANSPOSE
  if (have_avx512()) return transpose_avx512(dst, ldd, src, rows, cols, ld);
#endif
  transpose_scalar(dst, ldd, src, rows, cols, ld);
}
inline void transpose_into(float* dst, const float* src, int64_t rows, int64_t cols, int64_t ld) {
  transpose_into(dst, cols, src, rows, cols, ld);
}

// ---- a width just past a multiple of 16: the last columns in vectors of rows
//
// The micro-kernel writes C in 16-float vectors; a width of 16·w + r ends in a masked vector column
// with r live floats, computed like a full one at a narrower register block: on Zen 4 (one thread) a
// 256×257·257×257 product ran at 106 GFLOP/s against 115 for its first 256 columns alone, and a
// Linear layer with a bias has such a width (in_features + 1) in all four of the op's GEMMs. So for
// r ≤ kMaxTail the micro-kernel takes the 16·w columns and the last r are formed here: a vector per
// column whose lanes are 16 rows of C, fed by X's 16×16 tiles transposed. Each element is one chain
// of FMAs from 0, k in order, then + C where add_c, which is how the micro-kernel forms every element
// (csrc/test/brgemm_rates.cpp checks it bit for bit), so a product has the same bits however it is
// cut into columns or rows (a thread's share, the transposed form of a product, a padded width).
// One thread, Zen 4, against the micro-kernel alone (37–256 rows, depth 33–260): at r = 1 0.67–0.94×
// the time (256×257·257×257 0.93×), r = 2–5 0.69–0.99×; with the limit raised, r = 6–8 lost on
// shallow products (37×38·38×38 1.10×, 37×40·40×40 1.13×).

constexpr int64_t kLanes = 16;
constexpr int64_t kMaxTail = 5;

#if APO_X86_AVX512_TRANSPOSE
// c[q·ldc + j] (+)= Σ_k x[q·ldx + k] · y[k·ldy + j] for C columns j and the first `rows` ≤ 16 of the
// 16 rows of X at x: a vector per column, a lane per row, X's 16×16 tiles transposed (a vector per
// k), each lane's FMAs in k order.
template <int C>
__attribute__((target("avx512f"))) inline void tail_16_rows(int64_t K, const float* x, int64_t ldx, const float* y,
                                                            int64_t ldy, float* c, int64_t ldc, bool add_c,
                                                            int64_t rows) {
  alignas(64) float tile[kLanes * kLanes];
  __m512 acc[C];
  for (int j = 0; j < C; ++j) acc[j] = _mm512_setzero_ps();
  const int64_t k16 = K / kLanes * kLanes;
  for (int64_t k0 = 0; k0 < k16; k0 += kLanes) {
    transpose16_avx512(tile, kLanes, x + k0, ldx);  // tile row t: x[q·ldx + k0 + t], q = 0..15
    for (int t = 0; t < kLanes; ++t) {
      const __m512 xt = _mm512_load_ps(tile + t * kLanes);
      const float* yk = y + (k0 + t) * ldy;
      for (int j = 0; j < C; ++j) acc[j] = _mm512_fmadd_ps(xt, _mm512_set1_ps(yk[j]), acc[j]);
    }
  }
  for (int64_t k = k16; k < K; ++k) {
    for (int q = 0; q < kLanes; ++q) tile[q] = x[q * ldx + k];
    const __m512 xk = _mm512_load_ps(tile);
    for (int j = 0; j < C; ++j) acc[j] = _mm512_fmadd_ps(xk, _mm512_set1_ps(y[k * ldy + j]), acc[j]);
  }
  for (int j = 0; j < C; ++j) {
    _mm512_store_ps(tile, acc[j]);
    for (int64_t q = 0; q < rows; ++q) {
      float& out = c[q * ldc + j];
      out = add_c ? out + tile[q] : tile[q];
    }
  }
}

template <int C>
inline void tail_columns_of(int64_t M, int64_t K, const float* x, int64_t ldx, const float* y, int64_t ldy, float* c,
                            int64_t ldc, bool add_c) {
  const int64_t whole = M / kLanes * kLanes, rest = M - whole;
  for (int64_t i = 0; i < whole; i += kLanes) {
    tail_16_rows<C>(K, x + i * ldx, ldx, y, ldy, c + i * ldc, ldc, add_c, kLanes);
  }
  if (rest == 0) return;
  // the last rows, copied into a block of 16 (the rows past M are zeros, never stored)
  Scratch<float, 5> block(static_cast<size_t>(kLanes * K));
  for (int64_t q = 0; q < kLanes; ++q) {
    float* row = block.data() + q * K;
    if (q < rest) {
      std::memcpy(row, x + (whole + q) * ldx, static_cast<size_t>(K) * sizeof(float));
    } else {
      std::fill(row, row + K, 0.f);
    }
  }
  tail_16_rows<C>(K, block.data(), K, y, ldy, c + whole * ldc, ldc, add_c, rest);
}

// C's first r columns at c (+)= X (M×K) · Y's r columns at y (row stride ldy), 1 ≤ r ≤ kMaxTail.
inline void tail_columns(int64_t M, int64_t r, int64_t K, const float* x, int64_t ldx, const float* y, int64_t ldy,
                         float* c, int64_t ldc, bool add_c) {
  switch (r) {
    case 1: return tail_columns_of<1>(M, K, x, ldx, y, ldy, c, ldc, add_c);
    case 2: return tail_columns_of<2>(M, K, x, ldx, y, ldy, c, ldc, add_c);
    case 3: return tail_columns_of<3>(M, K, x, ldx, y, ldy, c, ldc, add_c);
    case 4: return tail_columns_of<4>(M, K, x, ldx, y, ldy, c, ldc, add_c);
    default: return tail_columns_of<5>(M, K, x, ldx, y, ldy, c, ldc, add_c);
  }
}
#endif

// C (M×N, ldc) = X (M×K) · Y (K×N) on row-major operands, the micro-kernel on this thread or, outside
// a parallel region, C's rows split over the intra-op threads (one contiguous block each; a GEMM under
// kSplitWork multiply-adds is not worth a thread's start). Above kPanel columns or depth the product
// is blocked: a kPanel-wide panel of C at a time, kRowBlock rows of it, K in kPanel chunks summed into
// C, so that the chunk of Y and the block of C stay in cache (one micro-kernel call over a 2048²
// product streamed all of Y per call: 135–166 GFLOP/s against 250 at 512³).
constexpr int64_t kRowBlock = 128;  // (also the kron op's largest block of rows)

// Whether an N-wide product's last N mod 16 columns are formed in vectors of rows (above).
inline bool splits_tail(int64_t N) {
  return APO_X86_AVX512_TRANSPOSE && N > kLanes && N % kLanes >= 1 && N % kLanes <= kMaxTail && have_avx512();
}

// One micro-kernel product (a width of 16·w + r, r ≤ kMaxTail: its last r columns as above).
inline void brgemm_call(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* y, int64_t ldy,
                        float* c, int64_t ldc, bool add_c) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
#if APO_X86_AVX512_TRANSPOSE
  if (splits_tail(N)) {
    const int64_t r = N % kLanes, whole = N - r;
    at::native::cpublas::brgemm(M, whole, K, ldx, ldy, ldc, add_c, x, y, c, /*is_vnni=*/false);
    return tail_columns(M, r, K, x, ldx, y + whole, ldy, c + whole, ldc, add_c);
  }
#endif
  at::native::cpublas::brgemm(M, N, K, ldx, ldy, ldc, add_c, x, y, c, /*is_vnni=*/false);
#else
  TORCH_CHECK(false, "apo-kernels: no fp32 brgemm in this torch");
#endif
}

inline void brgemm_block(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* y, int64_t ldy,
                         float* c, int64_t ldc, bool add_c) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  constexpr int64_t kPanel = 256, kBlockAbove = 512;
  if (N <= kBlockAbove && K <= kBlockAbove) return brgemm_call(M, N, K, x, ldx, y, ldy, c, ldc, add_c);
  for (int64_t n0 = 0; n0 < N; n0 += kPanel) {
    const int64_t nb = std::min(kPanel, N - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t mb = std::min(kRowBlock, M - m0);
      for (int64_t k0 = 0; k0 < K; k0 += kPanel) {
        const int64_t kb = std::min(kPanel, K - k0);
        brgemm_call(mb, nb, kb, x + m0 * ldx + k0, ldx, y + k0 * ldy + n0, ldy, c + m0 * ldc + n0, ldc,
                    add_c || k0 > 0);
      }
    }
  }
#else
  TORCH_CHECK(false, "apo-kernels: no fp32 brgemm in this torch");
#endif
}

constexpr int64_t kSplitWork = int64_t(1) << 18, kMinRows = 16;

// Whether an M×N×K product is worth splitting by rows over threads.
inline bool worth_splitting(int64_t M, int64_t N, int64_t K) { return M >= 2 * kMinRows && M * N * K >= kSplitWork; }

inline void brgemm_rows(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, const float* y, int64_t ldy,
                        float* c, int64_t ldc, bool add_c) {
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (threads > 1 && worth_splitting(M, N, K)) {
    const int64_t rows = std::max(kMinRows, (M + threads - 1) / threads);
    at::parallel_for(0, M, rows, [&](int64_t r0, int64_t r1) {
      brgemm_block(r1 - r0, N, K, x + r0 * ldx, ldx, y, ldy, c + r0 * ldc, ldc, add_c);
    });
    return;
  }
  brgemm_block(M, N, K, x, ldx, y, ldy, c, ldc, add_c);
}

// A row-major copy of a transposed operand (element (i, j) at p[j·ld + i]) into `into`.
template <int Slot>
inline const float* row_major_copy(Scratch<float, Slot>& into, const float* p, int64_t rows, int64_t cols, int64_t ld) {
  transpose_into(into.data(), p, rows, cols, ld);
  return into.data();
}

// C (M×N, ldc) = X (M×K) · Y (K×N) + [C], X and Y row-major at (x, ldx), (y, ldy) or, when xt / yt,
// stored transposed. The micro-kernel reads row-major operands only, so a transposed one is copied,
// or the product is formed as Cᵀ = Yᵀ·Xᵀ and copied back, whichever moves fewer elements: for a
// 10×257 layer's last product, M·Bᵀ copies 2·10·257 elements that way instead of B's 257².
inline void onednn_gemm(int64_t M, int64_t N, int64_t K, const float* x, int64_t ldx, bool xt, const float* y,
                        int64_t ldy, bool yt, float* c, int64_t ldc, bool add_c) {
  const int64_t direct = (xt ? M * K : 0) + (yt ? K * N : 0);
  const int64_t flipped = (xt ? 0 : M * K) + (yt ? 0 : K * N) + M * N;
  const auto elems = [](int64_t r, int64_t c) { return static_cast<size_t>(r * c); };
  if (direct <= flipped) {
    Scratch<float, 0> xs(xt ? elems(M, K) : 0);
    Scratch<float, 1> ys(yt ? elems(K, N) : 0);
    if (xt) x = row_major_copy(xs, x, M, K, ldx), ldx = K;
    if (yt) y = row_major_copy(ys, y, K, N, ldy), ldy = N;
    return brgemm_rows(M, N, K, x, ldx, y, ldy, c, ldc, add_c);
  }
  // Yᵀ (N×K) is row-major where Y was stored transposed, likewise Xᵀ (K×M).
  Scratch<float, 0> xs(xt ? 0 : elems(K, M));
  Scratch<float, 1> ys(yt ? 0 : elems(N, K));
  Scratch<float, 2> cs(elems(N, M));
  const float* yT = yt ? y : row_major_copy(ys, y, N, K, ldy);
  const int64_t ld_yT = yt ? ldy : K;
  const float* xT = xt ? x : row_major_copy(xs, x, K, M, ldx);
  const int64_t ld_xT = xt ? ldx : M;
  float* cT = cs.data();
  brgemm_rows(N, M, K, yT, ld_yT, xT, ld_xT, cT, M, false);
  if (!add_c) return transpose_into(c, ldc, cT, M, N, M);  // C = (Cᵀ)ᵀ in 16×16 tiles
  for (int64_t i = 0; i < M; ++i) {  // C += (Cᵀ)ᵀ
    float* row = c + i * ldc;
    for (int64_t j = 0; j < N; ++j) row[j] += cT[j * M + i];
  }
}

}  // namespace cpu_gemm
}  // namespace apo
