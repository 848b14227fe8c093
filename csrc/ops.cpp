// apo-kernels: op schemas (TORCH_LIBRARY) and the CPU implementation of the structured preconditioner
//
//     Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ          G (m×n), A (m×m), S (m×n), B (n×n); A or B None = identity
//
// The maths (forward, backward, identity factors) and the input rules are in apo_checks.h, shared
// with the CUDA large-layer path; which layers of a grouped call run alone is cpu_schedule.h. This
// file adds the direct path (2-D fp32/fp64 layers that are small or row-blocked: the same maths on
// BLAS calls and plain loops), the ATen path for the rest with its ⊙S pass, the grouped loop, the
// momentum step (v = μ·m + g and Y(v) in one pass, an optimizer's plain step), the finiteness check,
// the lookahead write (θ' = θ + Δ with ‖Δ‖², a meta-step's), the kron structure's step (L·G·R) and
// the registration (the schemas of every apo:: op, also of discrepancy.cpp's FSD kernel).
//
// Light headers only (no torch/extension.h, no pybind11): the module registers ops on load and
// exposes no Python functions. The CUDA implementations live in csrc/cuda/*.cu.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ScalarOps.h>
#include <torch/library.h>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
// ATen's OpenMP backend opens the parallel region of at::parallel_for inline in its header: built
// without OpenMP, every "parallel" loop here would run on the calling thread alone.
#error "apo-kernels: torch uses OpenMP for at::parallel_for; compile csrc/ops.cpp with -fopenmp"
#endif

#include "apo_checks.h"
#include "cpu_gemm.h"
#include "cpu_handoff.h"
#include "cpu_schedule.h"
#include "cpu_simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// The Fortran BLAS that torch's own CPU GEMMs call (MKL or OpenBLAS, linked into libtorch_cpu),
// declared weak: where torch exports none, they resolve to null and every layer takes the ATen path.
#if defined(__linux__) && defined(__GNUC__)
#define APO_DIRECT_BLAS 1
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));  // MKL only (C interface)
}
#else
#define APO_DIRECT_BLAS 0
#endif

#ifdef APO_KERNELS_PYTHON_MODULE
#include <Python.h>
// `import apo_kernels._C` only has to load this library so the static TORCH_LIBRARY registrars run;
// an empty module is enough (the extension-cpp pattern). Defined only by setup.py, so the CMake
// build (a plain shared library + C++ test) needs no Python.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace apo {
namespace {

using at::Tensor;
using at::TensorList;
using layer::Mask;
using OptionalTensorList = c10::List<std::optional<Tensor>>;
using TensorVec = std::vector<Tensor>;

// ---------------------------------------------------------------------------------------------
// Direct path: 2-D float32/float64 layers that are small (in the grouped loop, ATen's per-op
// dispatch, allocations and dtype/layout round trips cost as much as the GEMMs themselves) or have an
// identity A and at most kRowBlockMaxWidth columns (a tall layer such as an embedding's: processed in
// blocks of rows in parallel, so G and S are read once and Y written once, with no m×n temporary),
// and, on the oneDNN engine, every other fp32 layer with a learnt A (one block, blocked GEMMs).
// GEMMs go straight to torch's BLAS (fp32 to oneDNN's brgemm where cpu_gemm.h picks that engine);
// intermediates live in a per-thread workspace; ⊙S is a plain loop.
namespace direct {

// Widest layer (columns) that the row-blocked path takes, and the elements of one block's buffer.
constexpr int64_t kRowBlockMaxWidth = 512;
constexpr int64_t kBlockElems = 32768;

// A row-major matrix view: (i, j) at p[i·ld + j]; when `t`, the transpose of one: (i, j) at p[j·ld + i].
// Invariant: ld ≥ cols (≥ rows when t), as BLAS requires.
template <typename T>
struct Mat {
  T* p;
  int64_t rows, cols, ld;
  bool t;
  Mat transposed() const { return {p, cols, rows, ld, !t}; }
  Mat row_block(int64_t r0, int64_t r) const { return {p + r0 * ld, r, cols, ld, false}; }  // !t only
};

template <typename T>
Mat<T> buffer(T* p, int64_t rows, int64_t cols) { return {p, rows, cols, cols, false}; }

// A 2-D tensor's strides as BLAS may read them. A size-1 dimension's stride is meaningless (torch
// calls a (7, 1) tensor with strides (1, 7) contiguous): it is replaced by the value that lets the
// other dimension read as unit-stride rows, so such a tensor is never taken for a transposed one.
inline std::pair<int64_t, int64_t> blas_strides(const Tensor& x) {
  const int64_t r = x.size(0), c = x.size(1);
  return {r <= 1 ? std::max<int64_t>(c, 1) : x.stride(0), c <= 1 ? 1 : x.stride(1)};
}

// The view of a 2-D tensor, if BLAS can read it as it is (a unit stride in one dimension, the other
// within BLAS's int).
template <typename T>
std::optional<Mat<T>> view(const Tensor& x) {
  const int64_t r = x.size(0), c = x.size(1);
  const auto [s0, s1] = blas_strides(x);
  if (s0 > INT_MAX || s1 > INT_MAX) return std::nullopt;
  T* p = x.data_ptr<T>();
  if (s1 == 1 && s0 >= c) return Mat<T>{p, r, c, std::max<int64_t>(s0, 1), false};
  if (s0 == 1 && s1 >= r) return Mat<T>{p, r, c, std::max<int64_t>(s1, 1), true};
  return std::nullopt;
}

// Inputs as views: G, S, grad_out row-major (the ⊙ loops and row blocks read them by rows), A and B
// either way round; anything else is copied once.
inline bool is_row_major(const Tensor& x) {
  const auto [s0, s1] = blas_strides(x);
  return s1 == 1 && s0 >= x.size(1) && s0 <= INT_MAX;
}
inline Tensor row_major(const Tensor& x) { return is_row_major(x) ? x : x.contiguous(); }
template <typename T>
Mat<T> row_major_view(const Tensor& x) { return *view<T>(x); }  // x from row_major()
template <typename T>
std::optional<Mat<T>> factor_view(Tensor& x) {
  if (!x.defined()) return std::nullopt;
  if (!view<T>(x)) x = x.contiguous();
  return view<T>(x);
}

inline void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                      const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                      const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// C = X·Y + beta·C on row-major views (C not transposed). BLAS is column-major: it computes
// Cᵀ = Yᵀ·Xᵀ, and a row-major view is its transpose in column-major.
// fp32 goes to oneDNN's brgemm where cpu_gemm.h chooses it (beta is 0 or 1 here).
template <typename T>
void gemm(const Mat<T>& C, const Mat<T>& X, const Mat<T>& Y, T beta = T(0)) {
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_gemm::engine() == cpu_gemm::Engine::onednn) {
      return cpu_gemm::onednn_gemm(C.rows, C.cols, X.cols, X.p, X.ld, X.t, Y.p, Y.ld, Y.t, C.p, C.ld, beta != 0.f);
    }
  }
  blas_gemm(Y.t ? 'T' : 'N', X.t ? 'T' : 'N', static_cast<int>(C.cols), static_cast<int>(C.rows),
            static_cast<int>(X.cols), T(1), Y.p, static_cast<int>(Y.ld), X.p, static_cast<int>(X.ld), beta,
            C.p, static_cast<int>(C.ld));
}

// ---- elementwise loops over blocks of rows (cpu_simd.h: one call per block, not per row).

namespace loops {

template <typename T>
APO_INLINE void mul(const Mat<T>& out, const Mat<T>& x, const Mat<T>& y) {
  for (int64_t i = 0; i < out.rows; ++i) {
    T* o = out.p + i * out.ld;
    const T* a = x.p + i * x.ld;
    const T* b = y.p + i * y.ld;
    for (int64_t j = 0; j < out.cols; ++j) o[j] = a[j] * b[j];
  }
}

// v = μ·m + g with torch.optim.SGD's rounding: the product, then the sum (kept two operations by
// -ffp-contract=off), so v is bit for bit buf.mul_(μ).add_(g).
template <typename T>
APO_INLINE void momentum(const Mat<T>& V, const Mat<T>& M, const Mat<T>& G, T mu) {
  for (int64_t i = 0; i < V.rows; ++i) {
    T* v = V.p + i * V.ld;
    const T* m = M.p + i * M.ld;
    const T* g = G.p + i * G.ld;
    for (int64_t j = 0; j < V.cols; ++j) {
      const T scaled = mu * m[j];
      v[j] = scaled + g[j];
    }
  }
}

// Whether every value is finite: an all-ones exponent is inf or NaN (an integer test, which
// vectorizes where a floating-point reduction would not).
template <typename T>
APO_INLINE bool finite(const Mat<T>& X) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr Bits kExponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  Bits bad = 0;
  for (int64_t i = 0; i < X.rows; ++i) {
    const T* x = X.p + i * X.ld;
    for (int64_t j = 0; j < X.cols; ++j) {
      Bits b;
      std::memcpy(&b, x + j, sizeof b);
      bad |= Bits((b & kExponent) == kExponent);
    }
  }
  return bad == 0;
}

// y = μ·y
template <typename T>
APO_INLINE void scale(const Mat<T>& Y, T mu) {
  for (int64_t i = 0; i < Y.rows; ++i) {
    T* y = Y.p + i * Y.ld;
    for (int64_t j = 0; j < Y.cols; ++j) y[j] = mu * y[j];
  }
}

// Whether every value of one row is ±0 (an integer test on the bits without the sign).
template <typename T>
APO_INLINE bool zero_row(const T* x, int64_t n) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits any = 0;
  for (int64_t j = 0; j < n; ++j) {
    Bits b;
    std::memcpy(&b, x + j, sizeof b);
    any |= b << 1;
  }
  return any == 0;
}

// out = θ + Δ (torch.add's rounding), returning Σ Δ² in double (a norm: summed in SIMD lanes, in no fixed order).
template <typename T>
APO_INLINE double add_sumsq(T* out, const T* theta, const T* delta, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    out[j] = theta[j] + delta[j];
    const double d = static_cast<double>(delta[j]);
    sum += d * d;
  }
  return sum;
}

// Σ x·y in double (each product exact in double for float inputs; summed in SIMD lanes, in no fixed order).
template <typename T>
APO_INLINE double dot(const T* x, const T* y, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += static_cast<double>(x[j]) * static_cast<double>(y[j]);
  return sum;
}

// Δ = a·g + b·m + c·θ (each product and sum rounded, in this order: the terms torch.optim.SGD's step
// at lr = 1 adds up), out = θ + Δ, returning Σ Δ² in double. M: a momentum term; C: a decay term.
template <bool M, bool C, typename T>
APO_INLINE double sgd_lookahead(T* out, T* delta, const T* theta, const T* grad, const T* mom, T a, T b, T c,
                                int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    T d = grad[j] * a;
    if constexpr (M) d = d + mom[j] * b;
    if constexpr (C) d = d + theta[j] * c;
    delta[j] = d;
    out[j] = theta[j] + d;
    const double w = static_cast<double>(d);
    sum += w * w;
  }
  return sum;
}

// torch.optim.SGD's per-tensor step on one parameter, rounded as torch rounds it (its add with alpha
// is one fused multiply-add, its mul_ one rounded product), in its order: g = ±grad; with a decay term
// (W) g = fma(θ, wd, g); with a momentum (M) buf = fma(g, 1 − τ, round(buf·μ)) and g = nesterov ?
// fma(buf, μ, g) : buf; then θ = fma(g, −lr, θ). sign is ±1 (maximize), so g·sign is exact.
template <bool M, bool W, typename T>
APO_INLINE void sgd_step(T* theta, T* mom, const T* grad, T sign, T wd, T mu, T damp1, bool nesterov, T neg_lr,
                         int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T g = grad[j] * sign;
    if constexpr (W) g = std::fma(theta[j], wd, g);
    if constexpr (M) {
      const T b = std::fma(g, damp1, mom[j] * mu);
      mom[j] = b;
      g = nesterov ? std::fma(b, mu, g) : b;
    }
    theta[j] = std::fma(g, neg_lr, theta[j]);
  }
}

APO_SIMD_CLONES void mul_f32(const Mat<float>& o, const Mat<float>& x, const Mat<float>& y) { mul(o, x, y); }
APO_SIMD_CLONES void mul_f64(const Mat<double>& o, const Mat<double>& x, const Mat<double>& y) { mul(o, x, y); }
APO_SIMD_CLONES void momentum_f32(const Mat<float>& v, const Mat<float>& m, const Mat<float>& g, float mu) {
  momentum(v, m, g, mu);
}
APO_SIMD_CLONES void momentum_f64(const Mat<double>& v, const Mat<double>& m, const Mat<double>& g, double mu) {
  momentum(v, m, g, mu);
}
APO_SIMD_CLONES void scale_f32(const Mat<float>& y, float mu) { scale(y, mu); }
APO_SIMD_CLONES void scale_f64(const Mat<double>& y, double mu) { scale(y, mu); }
APO_SIMD_CLONES bool zero_row_f32(const float* x, int64_t n) { return zero_row(x, n); }
APO_SIMD_CLONES bool zero_row_f64(const double* x, int64_t n) { return zero_row(x, n); }
APO_SIMD_CLONES double add_sumsq_f32(float* o, const float* t, const float* d, int64_t n) {
  return add_sumsq(o, t, d, n);
}
APO_SIMD_CLONES double add_sumsq_f64(double* o, const double* t, const double* d, int64_t n) {
  return add_sumsq(o, t, d, n);
}
APO_SIMD_CLONES double dot_f32(const float* x, const float* y, int64_t n) { return dot(x, y, n); }
APO_SIMD_CLONES double dot_f64(const double* x, const double* y, int64_t n) { return dot(x, y, n); }
#define APO_SGD_LOOKAHEAD_CLONE(T, M, C, name)                                                             \
  APO_SIMD_CLONES double name(T* o, T* d, const T* t, const T* g, const T* m, T a, T b, T c, int64_t n) { \
    return sgd_lookahead<M, C>(o, d, t, g, m, a, b, c, n);                                                \
  }
APO_SGD_LOOKAHEAD_CLONE(float, false, false, sgd_lookahead_f32)
APO_SGD_LOOKAHEAD_CLONE(float, true, false, sgd_lookahead_f32_m)
APO_SGD_LOOKAHEAD_CLONE(float, false, true, sgd_lookahead_f32_c)
APO_SGD_LOOKAHEAD_CLONE(float, true, true, sgd_lookahead_f32_mc)
APO_SGD_LOOKAHEAD_CLONE(double, false, false, sgd_lookahead_f64)
APO_SGD_LOOKAHEAD_CLONE(double, true, false, sgd_lookahead_f64_m)
APO_SGD_LOOKAHEAD_CLONE(double, false, true, sgd_lookahead_f64_c)
APO_SGD_LOOKAHEAD_CLONE(double, true, true, sgd_lookahead_f64_mc)
#undef APO_SGD_LOOKAHEAD_CLONE
#define APO_SGD_STEP_CLONE(T, M, W, name)                                                                   \
  APO_SIMD_CLONES void name(T* t, T* m, const T* g, T sign, T wd, T mu, T damp1, bool nesterov, T neg_lr, \
                            int64_t n) {                                                                  \
    sgd_step<M, W>(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);                                   \
  }
APO_SGD_STEP_CLONE(float, false, false, sgd_step_f32)
APO_SGD_STEP_CLONE(float, true, false, sgd_step_f32_m)
APO_SGD_STEP_CLONE(float, false, true, sgd_step_f32_w)
APO_SGD_STEP_CLONE(float, true, true, sgd_step_f32_mw)
APO_SGD_STEP_CLONE(double, false, false, sgd_step_f64)
APO_SGD_STEP_CLONE(double, true, false, sgd_step_f64_m)
APO_SGD_STEP_CLONE(double, false, true, sgd_step_f64_w)
APO_SGD_STEP_CLONE(double, true, true, sgd_step_f64_mw)
#undef APO_SGD_STEP_CLONE
APO_SIMD_CLONES bool finite_f32(const Mat<float>& x) { return finite(x); }
APO_SIMD_CLONES bool finite_f64(const Mat<double>& x) { return finite(x); }

}  // namespace loops

inline void mul_rows(const Mat<float>& o, const Mat<float>& x, const Mat<float>& y) { loops::mul_f32(o, x, y); }
inline void mul_rows(const Mat<double>& o, const Mat<double>& x, const Mat<double>& y) { loops::mul_f64(o, x, y); }
inline void momentum_rows(const Mat<float>& v, const Mat<float>& m, const Mat<float>& g, float mu) {
  loops::momentum_f32(v, m, g, mu);
}
inline void momentum_rows(const Mat<double>& v, const Mat<double>& m, const Mat<double>& g, double mu) {
  loops::momentum_f64(v, m, g, mu);
}
inline void scale_rows(const Mat<float>& y, float mu) { loops::scale_f32(y, mu); }
inline void scale_rows(const Mat<double>& y, double mu) { loops::scale_f64(y, mu); }
inline bool zero_row(const float* x, int64_t n) { return loops::zero_row_f32(x, n); }
inline bool zero_row(const double* x, int64_t n) { return loops::zero_row_f64(x, n); }
inline bool finite_rows(const Mat<float>& x) { return loops::finite_f32(x); }
inline bool finite_rows(const Mat<double>& x) { return loops::finite_f64(x); }
inline double add_sumsq(float* o, const float* t, const float* d, int64_t n) { return loops::add_sumsq_f32(o, t, d, n); }
inline double add_sumsq(double* o, const double* t, const double* d, int64_t n) {
  return loops::add_sumsq_f64(o, t, d, n);
}
inline double dot_rows(const float* x, const float* y, int64_t n) { return loops::dot_f32(x, y, n); }
inline double dot_rows(const double* x, const double* y, int64_t n) { return loops::dot_f64(x, y, n); }

// sgd_lookahead's loop for the terms present (m null: no momentum term; c = 0: no decay term)
inline double sgd_lookahead_rows(float* o, float* d, const float* t, const float* g, const float* m, float a,
                                 float b, float c, int64_t n) {
  if (m != nullptr && c != 0.0f) return loops::sgd_lookahead_f32_mc(o, d, t, g, m, a, b, c, n);
  if (m != nullptr) return loops::sgd_lookahead_f32_m(o, d, t, g, m, a, b, c, n);
  if (c != 0.0f) return loops::sgd_lookahead_f32_c(o, d, t, g, m, a, b, c, n);
  return loops::sgd_lookahead_f32(o, d, t, g, m, a, b, c, n);
}
inline double sgd_lookahead_rows(double* o, double* d, const double* t, const double* g, const double* m, double a,
                                 double b, double c, int64_t n) {
  if (m != nullptr && c != 0.0) return loops::sgd_lookahead_f64_mc(o, d, t, g, m, a, b, c, n);
  if (m != nullptr) return loops::sgd_lookahead_f64_m(o, d, t, g, m, a, b, c, n);
  if (c != 0.0) return loops::sgd_lookahead_f64_c(o, d, t, g, m, a, b, c, n);
  return loops::sgd_lookahead_f64(o, d, t, g, m, a, b, c, n);
}

// sgd_step's loop for the terms present (m null: no momentum; wd = 0: no decay term)
inline void sgd_step_rows(float* t, float* m, const float* g, float sign, float wd, float mu, float damp1,
                          bool nesterov, float neg_lr, int64_t n) {
  if (m != nullptr && wd != 0.0f) return loops::sgd_step_f32_mw(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);
  if (m != nullptr) return loops::sgd_step_f32_m(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);
  if (wd != 0.0f) return loops::sgd_step_f32_w(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);
  return loops::sgd_step_f32(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);
}
inline void sgd_step_rows(double* t, double* m, const double* g, double sign, double wd, double mu, double damp1,
                          bool nesterov, double neg_lr, int64_t n) {
  if (m != nullptr && wd != 0.0) return loops::sgd_step_f64_mw(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);
  if (m != nullptr) return loops::sgd_step_f64_m(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);
  if (wd != 0.0) return loops::sgd_step_f64_w(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);
  return loops::sgd_step_f64(t, m, g, sign, wd, mu, damp1, nesterov, neg_lr, n);
}

// out = x ⊙ y (row-major views; out may be x or y). Split over rows on the intra-op threads when big
// enough, and outside a parallel region (a layer that runs alone); inline otherwise.
template <typename T>
void mul(const Mat<T>& out, const Mat<T>& x, const Mat<T>& y) {
  const int64_t grain = std::max<int64_t>(1, kBlockElems / std::max<int64_t>(out.cols, 1));
  at::parallel_for(0, out.rows, grain, [&](int64_t begin, int64_t end) {
    mul_rows(out.row_block(begin, end - begin), x.row_block(begin, end - begin), y.row_block(begin, end - begin));
  });
}

// dst = src, row by row (same shape, both row-major).
template <typename T>
void copy_rows(const Mat<T>& dst, const Mat<T>& src) {
  for (int64_t i = 0; i < dst.rows; ++i) std::memcpy(dst.p + i * dst.ld, src.p + i * src.ld, dst.cols * sizeof(T));
}


// Scratch memory for a block's intermediates (cpu_gemm.h's Scratch: kept per thread for small layers
// and row blocks, owned by the call for a big layer).
template <typename T>
using Workspace = cpu_gemm::Scratch<T, 3>;

// Makes this thread's BLAS calls plain single-threaded ones while it works inside a parallel region,
// for the guard's lifetime. torch turns MKL's dynamic threading off (at::set_num_threads), so there
// MKL would open a nested OpenMP team for every GEMM: serialized to one thread, but its start-up per
// call made 64 small layers' GEMMs ~30 % slower on each of 2 threads. Outside a region: no change.
class SerialBlasInRegion {
 public:
  SerialBlasInRegion() {
#if APO_DIRECT_BLAS
    if (MKL_Set_Num_Threads_Local && at::in_parallel_region()) prev_ = MKL_Set_Num_Threads_Local(1);
#endif
  }
  ~SerialBlasInRegion() {
#if APO_DIRECT_BLAS
    if (prev_ >= 0) MKL_Set_Num_Threads_Local(prev_);  // 0: back to the global setting
#endif
  }
  SerialBlasInRegion(const SerialBlasInRegion&) = delete;
  SerialBlasInRegion& operator=(const SerialBlasInRegion&) = delete;

 private:
  int prev_ = -1;
};

template <typename T>
bool have_blas() {
#if APO_DIRECT_BLAS
  return std::is_same_v<T, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
#else
  return false;
#endif
}

// Whether a layer takes this path (decided by the grad's shape and which factors are identity).
inline bool applies(const Tensor& G, const Tensor& A) {
  if (G.dim() != 2 || G.numel() == 0) return false;
  const at::ScalarType t = G.scalar_type();
  if (!(t == at::kFloat ? have_blas<float>() : t == at::kDouble && have_blas<double>())) return false;
  const int64_t m = G.size(0), n = G.size(1);
  if (m > INT_MAX || n > INT_MAX) return false;
  const bool small = schedule::layer_cost(double(m) * double(n), double(m), double(n)) < schedule::kBigLayerCost;
  // A big fp32 layer with a learnt A is one block of oneDNN GEMMs (cpu_gemm.h blocks and threads
  // them) where the engine takes big layers; elsewhere it stays on the ATen path.
  const bool big_onednn = t == at::kFloat && A.defined() && cpu_gemm::big_layers_on_engine();
  return small || (!A.defined() && n <= kRowBlockMaxWidth) || big_onednn;
}

// Rows per block when A is the identity (rows are then independent); the whole layer otherwise.
inline int64_t block_rows(int64_t m, int64_t n, bool has_a) {
  return has_a ? m : std::clamp<int64_t>(kBlockElems / std::max<int64_t>(n, 1), 1, m);
}

// ---- forward: Y = A (S ⊙ (Aᵀ G B)) Bᵀ on views (A, B null: identity)

// BLAS's small GEMMs slow down when the rows they write are not a whole number of SIMD vectors: MKL
// wrote a 95-wide row-major result at 63 GFLOP/s and a 96-wide one at 96 (one thread, Zen 4). Every
// GEMM of the forward writes rows of the layer's width n, so a layer with both factors (one block of
// rows, so B is padded once) computes its first three GEMMs at the width n' = ceil(n / kPadTo)·kPadTo:
// B gets n' − n zero columns and the intermediates are n' wide. The last GEMM writes Y itself, n wide:
// padding it too would mean copying Y's first n columns out of an n'-wide result, which cost more than
// it gained on an Intel Xeon (the bare BLAS chains of 64 layers of 32–128, one thread, interleaved:
// all four padded + the copy 2.56–2.72 ms, the first three 2.49–2.57, none 2.45–2.65). Output columns
// are independent sums: the padding changes what BLAS computes only in columns that are never read
// (the three give the same bits there).
// Only where the GEMMs run on one thread (in the grouped op's shared loop, or with one intra-op
// thread): where MKL splits them over threads the extra columns cost more than the alignment gains.
// The op alone on 256×257 (the MNIST-1D MLP's middle layer), 2 threads on 2 cores of an Intel Xeon,
// padded and unpadded alternately in one process: unpadded 0.89× the time; 64 layers of 32–128 in
// the shared loop: unpadded 1.03×. On the oneDNN engine a width of 16·w + 1 to 5 is not padded: its
// GEMMs form those last columns apart (cpu_gemm.h), cheaper than 11–15 padded ones, same bits.
constexpr int64_t kPadTo = 16;

// The threads that work started here gets: one inside a parallel region (nested regions run
// serially), else the intra-op thread count.
inline int64_t threads_here() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

inline bool blas_on_one_thread() { return threads_here() == 1; }

// (a width of 16·w + r, r ≤ cpu_gemm::kMaxTail, on the oneDNN engine: its last r columns cost less
// formed as the engine forms them than padded to a whole vector, with the same bits)
inline bool onednn_splits_tail(int64_t n) {
  return cpu_gemm::engine() == cpu_gemm::Engine::onednn && cpu_gemm::splits_tail(n);
}

template <typename T>
inline int64_t padded_width(int64_t n, bool has_a, bool has_b) {
  if (!blas_on_one_thread() || (std::is_same_v<T, float> && onednn_splits_tail(n))) return n;
  return has_a && has_b && n % kPadTo != 0 ? (n + kPadTo - 1) / kPadTo * kPadTo : n;
}

// The elements of forward_block's workspace for a block of `rows` rows.
template <typename T>
inline int64_t forward_workspace(int64_t rows, int64_t n, bool has_a, bool has_b) {
  const int64_t np = padded_width<T>(n, has_a, has_b);
  return 2 * rows * np + (np == n ? 0 : n * np);
}


template <typename T>
void forward_block(const Mat<T>& G, const Mat<T>* A, const Mat<T>& S, const Mat<T>* B, const Mat<T>& Y, T* w) {
  if (!A && !B) return mul(Y, S, G);
  const int64_t r = G.rows, n = G.cols, np = padded_width<T>(n, A != nullptr, B != nullptr);
  const Mat<T> w1 = buffer(w, r, np), w2 = buffer(w + r * np, r, np);
  // B as the first GEMM reads it (n×n'): B itself, or B with n' − n zero columns appended
  // (a column-major B, e.g. from torch.linalg.qr or eigh, is padded as it is stored: Bᵀ's rows copied
  // whole and n' − n zero rows appended, read transposed; a transposing copy, element by element,
  // made 64 layers of 32–128 with such factors 5 % slower on one and on two threads, paired in one
  // process)
  Mat<T> b_in{};
  if (B && np != n) {
    T* bp = w + 2 * r * np;
    if (B->t) {
      copy_rows(Mat<T>{bp, n, n, n, false}, B->transposed());
      std::fill(bp + n * n, bp + np * n, T(0));
      b_in = Mat<T>{bp, np, n, n, false}.transposed();
    } else {
      std::fill(bp, bp + n * np, T(0));
      copy_rows(Mat<T>{bp, n, n, np, false}, *B);
      b_in = {bp, n, np, np, false};
    }
  } else if (B) {
    b_in = *B;
  }
  const auto cols_n = [n](Mat<T> x) { return x.cols = n, x; };  // x's first n columns
  Mat<T> H = G;
  if (B) gemm(w1, G, b_in), H = w1;
  if (A) gemm(w2, A->transposed(), H), H = w2;
  mul(cols_n(H), S, cols_n(H));  // M = S ⊙ H in place: H is ours
  if (A) {
    const Mat<T> AM = B ? w1 : Y;
    gemm(AM, *A, H), H = AM;
  }
  if (!B) return;
  gemm(Y, cols_n(H), B->transposed());
}

// ---- a layer with a learnt A that runs alone, fp32 on the oneDNN engine: one parallel region
//
// Run through forward_block, each of its GEMMs splits its rows over the threads in a region of its
// own, while the transposed copies of A and B, a momentum step's v = μ·m + g and the finiteness reads
// run on the calling thread as the others wait: on the MNIST-1D MLP's 256×257 layer (Zen 5, 2
// threads) that waiting was 10 % of the threads' time. Here the threads run the whole chain in one
// region and meet only where a product reads results another thread made (forward_one_region and
// backward_one_region say how each shares its work out). Each product element is still one
// thread's whole sum, as in forward_block: the same bits on any thread count.
// (OpenMP directly, as ATen's at::parallel_for does: a barrier needs every thread of the team.)

// The first exception thrown by any thread of one parallel region, rethrown after it: a thread that
// throws still meets the others at every barrier (its later work is skipped), so none waits forever.
class RegionErrors {
 public:
  template <typename Work>
  void guarded(const Work& work) {
    if (failed_.load()) return;
    try {
      work();
    } catch (...) {
      if (!failed_.exchange(true)) error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

// Thread t's share of Bᵀ (n×n, row-major at bt) from a row-major B: its rows [c0, c0 + c) of the
// copy, which every thread reads after the next barrier.
inline void copy_bt_share(const Mat<float>& bt, const Mat<float>& B, int64_t t, int64_t threads) {
  const int64_t n = B.rows, c0 = n * t / threads, c = n * (t + 1) / threads - c0;
  cpu_gemm::transpose_into(bt.p + c0 * n, B.p + c0, c, n, B.ld);
}

// (for a layer whose GEMMs the engine would split over the threads; a smaller one stays on one)
inline bool one_region(bool has_a, int64_t m, int64_t n) {
  return AT_PARALLEL_OPENMP && has_a && cpu_gemm::engine() == cpu_gemm::Engine::onednn &&
         !at::in_parallel_region() && at::get_num_threads() > 1 && cpu_gemm::worth_splitting(m, n, std::min(m, n));
}

// Rows [r0, r0 + r) of X, a row-major or a transposed view.
template <typename T>
Mat<T> rows_of(const Mat<T>& X, int64_t r0, int64_t r) {
  return X.t ? Mat<T>{X.p + r0, r, X.cols, X.ld, true} : X.row_block(r0, r);
}

// Whether the threads share one transposed copy of a row-major k×k factor, each thread copying its
// share of the rows before a barrier (copy_bt_share), rather than each thread copying it whole where
// its product needs it: for a factor above 512² that the product with a thread's `share` rows of
// the other operand would copy whole (cpu_gemm::onednn_gemm does where k ≤ 2·share, else it copies
// the other operand). Bᵀ copied by each thread against one copy shared out, 2 threads on Zen 4
// (oneDNN forced for big layers, the two taking turns in one process): 256×257 alike (0.63 ms with
// the threads near, 0.75 far apart); 512² 5.20–5.42 against 5.49–5.63 ms far apart, alike near;
// 1024² 44.4–45.8 against 41.9–43.8 ms far apart, 43.8 against 40.4 near; 2048² within 2 %.
constexpr int64_t kOwnCopiesMaxElems = int64_t(512) * 512;
inline bool shared_copy(int64_t k, int64_t share) { return k * k > kOwnCopiesMaxElems && k <= 2 * share; }

constexpr int64_t kLine = 16;  // floats per 64-byte cache line

// n floats rounded up to whole cache lines; the first float at or after p that starts a line (a
// buffer of kLine floats more than it holds has room for the shift)
inline int64_t whole_lines(int64_t n) { return (n + kLine - 1) / kLine * kLine; }
inline float* line_start(float* p) {
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// Y = A (S ⊙ (Aᵀ G B)) Bᵀ; before(r0, r) runs first on each thread's rows (a momentum step forms
// them in G there), after(r0, r) last, on the same rows of Y.
//
// Each thread keeps one share of the rows through the whole chain: T = G·B, M = S ⊙ (Aᵀ·T),
// Z = A·M, Y = Z·Bᵀ. The threads meet where a product reads every row of the one before (Aᵀ·T and
// A·M), and there read lines another core wrote. Every such line costs a round trip, more where the
// host runs the two vCPUs far apart (csrc/cpu_handoff.h), so nothing else crosses: each thread
// makes its own transposed copies (its rows of Aᵀ, and Bᵀ where B is stored row-major) except of a
// big factor (shared_copy above); Z has its own buffer, so no thread overwrites lines another has
// read in the same call; and the intermediates' rows are padded to whole cache lines, so no line
// is written by two threads. Against one Bᵀ copy shared out, Z written over T and unpadded rows, 2
// threads on Zen 4, the op alone, the two builds taking turns: the MNIST-1D MLP's 256×257 layer
// 0.73–0.75 against 0.85–0.90 ms with the threads far apart, 0.63 against 0.66–0.67 ms with them
// near; 128×128 110–117 against 126–145 µs and 88–89 against 93–95 µs; 64×512 0.40–0.41 against
// 0.68–0.85 ms and 0.35 against 0.41–0.43 ms.
template <typename Before, typename After>
void forward_one_region(const Mat<float>& G, const Mat<float>& A, const Mat<float>& S, const Mat<float>* B,
                        const Mat<float>& Y, const Before& before, const After& after) {
#if AT_PARALLEL_OPENMP
  const int64_t m = G.rows, n = G.cols, ld = whole_lines(n);
  const int64_t most = at::get_num_threads();  // the region's team size at most
  const bool copy_bt = B && !B->t && shared_copy(n, (m + most - 1) / most);
  const Workspace<float> ws(3 * m * ld + (copy_bt ? n * n : 0) + kLine);
  float* p = line_start(ws.data());
  const Mat<float> T{p, m, n, ld, false}, M{p + m * ld, m, n, ld, false}, Z{p + 2 * m * ld, m, n, ld, false};
  const Mat<float> bt = copy_bt ? buffer(p + 3 * m * ld, n, n) : B ? B->transposed() : Mat<float>{};
  const Mat<float> X = B ? T : G;  // what Aᵀ multiplies
  RegionErrors errors;
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t r0 = m * t / threads, r = m * (t + 1) / threads - r0;  // (r = 0 when m < threads)
    errors.guarded([&] {
      if (r > 0) before(r0, r);
      if (r > 0 && B) gemm(T.row_block(r0, r), G.row_block(r0, r), *B);
      if (copy_bt) copy_bt_share(bt, *B, t, threads);
    });
#pragma omp barrier
    errors.guarded([&] {
      if (r == 0) return;
      const Mat<float> h = M.row_block(r0, r);
      gemm(h, rows_of(A.transposed(), r0, r), X);
      mul_rows(h, S.row_block(r0, r), h);
    });
#pragma omp barrier
    errors.guarded([&] {
      if (r == 0) return;
      const Mat<float> z = B ? Z.row_block(r0, r) : Y.row_block(r0, r);
      gemm(z, rows_of(A, r0, r), M);
      if (B) gemm(Y.row_block(r0, r), z, bt);
      after(r0, r);
    });
  }
  errors.rethrow();
#else
  TORCH_CHECK(false, "apo-kernels: forward_one_region needs ATen's OpenMP backend");
#endif
}

template <typename T>
Tensor forward(const Tensor& G_, Tensor A_, const Tensor& S_, Tensor B_) {
  const Tensor G = row_major(G_), S = row_major(S_);
  const std::optional<Mat<T>> A = factor_view<T>(A_), B = factor_view<T>(B_);
  const int64_t m = G.size(0), n = G.size(1), rows = block_rows(m, n, A.has_value());
  Tensor Y = at::empty({m, n}, G.options());
  const Mat<T> g = row_major_view<T>(G), s = row_major_view<T>(S), y = row_major_view<T>(Y);
  const Mat<T>* a = A ? &*A : nullptr;
  const Mat<T>* b = B ? &*B : nullptr;
  if constexpr (std::is_same_v<T, float>) {
    if (one_region(a != nullptr, m, n)) {
      const auto none = [](int64_t, int64_t) {};
      forward_one_region(g, *a, s, b, y, none, none);
      return Y;
    }
  }
  at::parallel_for(0, (m + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    const SerialBlasInRegion serial;
    const Workspace<T> ws(forward_workspace<T>(rows, n, a != nullptr, b != nullptr));
    T* w = ws.data();
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows, r = std::min(rows, m - r0);
      forward_block(g.row_block(r0, r), a, s.row_block(r0, r), b, y.row_block(r0, r), w);
    }
  });
  return Y;
}

// ---- backward (apo_checks.h's formulas) on views. Outputs that are null are not asked for; dG, dS
// are the block's rows, dA (A only) the whole m×m, dB gets dYᵀ·A·M + Gᵀ·A·E added (beta = 1).
// w holds 6·rows·cols.

template <typename T>
struct Grads {
  const Mat<T>*dG, *dA, *dS, *dB;
};

template <typename T>
void backward_block(const Mat<T>& dY, const Mat<T>& G, const Mat<T>* A, const Mat<T>& S, const Mat<T>* B,
                    const Grads<T>& out, T* w) {
  const bool need_a = out.dA != nullptr, need_b = out.dB != nullptr;
  const bool need_h = need_a || out.dS != nullptr || need_b, need_m = need_a || need_b;
  const bool need_e = out.dG != nullptr || need_a || need_b;
  const int64_t r = G.rows, c = G.cols;
  Mat<T> ws[6];
  for (int k = 0; k < 6; ++k) ws[k] = buffer(w + k * r * c, r, c);
  Mat<T> dYB = dY, D = dY, GB = G, H = G;
  if (B) gemm(ws[0], dY, *B), dYB = D = ws[0];
  if (A) gemm(ws[1], A->transposed(), dYB), D = ws[1];
  if (need_h) {
    if (B) gemm(ws[2], G, *B), GB = H = ws[2];
    if (A) gemm(ws[3], A->transposed(), GB), H = ws[3];
  }
  const Mat<T> M = ws[4], E = ws[5];
  if (out.dS) mul(*out.dS, D, H);
  if (need_m) mul(M, S, H);
  if (need_e) mul(E, S, D);
  if (need_a) gemm(*out.dA, dYB, M.transposed()), gemm(*out.dA, GB, E.transposed(), T(1));
  if (!(out.dG || need_b)) return;
  Mat<T> AE = E;
  if (A) gemm(ws[1], *A, E), AE = ws[1];  // D is dead
  if (out.dG) {
    if (B) {
      gemm(*out.dG, AE, B->transposed());
    } else {
      copy_rows(*out.dG, AE);
    }
  }
  if (need_b) {
    Mat<T> AM = M;
    if (A) gemm(ws[3], *A, M), AM = ws[3];  // H is dead
    gemm(*out.dB, dY.transposed(), AM, T(1));
    gemm(*out.dB, G.transposed(), AE, T(1));
  }
}

// The backward of a layer with a learnt A that runs alone (fp32, oneDNN engine), in one parallel
// region for the reasons forward_one_region gives: run as backward_block, its ten GEMMs each opened a
// region of their own while the transposed copies of Aᵀ, Mᵀ, Eᵀ, dYᵀ and Gᵀ and the ⊙ passes ran on
// the calling thread as the others waited (on the MNIST-1D MLP's 256×257 layer, Zen 5, 2 threads:
// the copies 9 % and the waiting 14 % of the samples). Here each thread keeps a share of the rows
// (stages 1–3) and then a share of dB's rows (stage 4), makes only its own rows of each transposed
// operand, and writes its rows of M and E transposed as well, so dA's products read Mᵀ and Eᵀ
// row-major. The threads meet where a product reads every row of the one before: before Aᵀ·(dY B),
// before A·E and the products with Mᵀ, Eᵀ, and before dB. Each product element is still one thread's
// whole sum in backward_block's order: the same bits as the block path on any thread count.
// (up to 2^19 elements per layer: its workspace, up to 8·m·n floats, then stays under 16 MiB, which
// malloc serves from memory it keeps; the 1024² layer's 32 MiB came from fresh pages on every call,
// whose faults cost it 20 % over the block path. A layer that big is ruled by its GEMMs anyway.)
constexpr int64_t kBackwardOneRegionMaxElems = int64_t(1) << 19;

void backward_one_region(const Mat<float>& dY, const Mat<float>& G, const Mat<float>& A, const Mat<float>& S,
                         const Mat<float>* B, const Grads<float>& out) {
#if AT_PARALLEL_OPENMP
  const int64_t m = G.rows, n = G.cols;
  const bool need_a = out.dA != nullptr, need_b = out.dB != nullptr;
  const bool need_h = need_a || out.dS != nullptr || need_b, need_m = need_a || need_b;
  const bool need_e = out.dG != nullptr || need_a || need_b;
  const bool copy_bt = out.dG && B && !B->t;  // (a column-major B's transpose is row-major as it is)
  // Where needed: dY·B, G·B, D (then A·E), H (then A·M), M, E (m×n each), Mᵀ, Eᵀ (n×m), Bᵀ (n×n)
  const std::array<std::pair<bool, int64_t>, 9> parts{{{B != nullptr, m * n}, {B && need_h, m * n}, {true, m * n},
                                                       {need_h, m * n}, {need_m, m * n}, {need_e, m * n},
                                                       {need_a, n * m}, {need_a, n * m}, {copy_bt, n * n}}};
  // each part starts on a cache line, so that where a thread's share starts on one too (Mᵀ's and
  // Eᵀ's columns r0.., written by columns) no line is written by two threads: a meta-step's backward
  // on 2 threads of Zen 4, against parts packed end to end, the builds taking turns: 128×128 318
  // against 362–364 µs with the threads far apart (214–218 against 225–227 near), 256×257 2.03
  // against 2.09–2.10 ms (1.61–1.63 against 1.63–1.64)
  int64_t total = kLine;
  for (const auto& [need, elems] : parts) total += need ? whole_lines(elems) : 0;
  const Workspace<float> ws(total);
  float* next = line_start(ws.data());
  const auto take = [&](int k, int64_t rows, int64_t cols) {
    if (!parts[k].first) return Mat<float>{};
    const Mat<float> x = buffer(next, rows, cols);
    next += whole_lines(parts[k].second);
    return x;
  };
  const Mat<float> dyb = B ? take(0, m, n) : dY, gb = B ? take(1, m, n) : G;
  const Mat<float> D = take(2, m, n), H = take(3, m, n), M = take(4, m, n), E = take(5, m, n);
  const Mat<float> MT = take(6, n, m), ET = take(7, n, m);
  const Mat<float> bt = copy_bt ? take(8, n, n) : B ? B->transposed() : Mat<float>{};
  const Mat<float>&AE = D, &AM = H;  // D and H are dead after stage 2
  RegionErrors errors;
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t r0 = m * t / threads, r = m * (t + 1) / threads - r0;  // (r = 0 when m < threads)
    const int64_t c0 = n * t / threads, c = n * (t + 1) / threads - c0;
    errors.guarded([&] {
      if (r > 0 && B) gemm(dyb.row_block(r0, r), dY.row_block(r0, r), *B);
      if (r > 0 && B && need_h) gemm(gb.row_block(r0, r), G.row_block(r0, r), *B);
      if (copy_bt) copy_bt_share(bt, *B, t, threads);
    });
#pragma omp barrier
    errors.guarded([&] {
      if (r == 0) return;
      // this thread's rows of Aᵀ, copied once for both products
      Mat<float> at = rows_of(A.transposed(), r0, r);
      const cpu_gemm::Scratch<float, 4> at_copy(at.t ? static_cast<size_t>(r * m) : 0);
      if (at.t) cpu_gemm::transpose_into(at_copy.data(), A.p + r0, r, m, A.ld), at = buffer(at_copy.data(), r, m);
      const Mat<float> d = D.row_block(r0, r), h = H.row_block(r0, r), sr = S.row_block(r0, r);
      gemm(d, at, dyb);
      if (need_h) gemm(h, at, gb);
      if (out.dS) mul_rows(out.dS->row_block(r0, r), d, h);
      if (need_m) mul_rows(M.row_block(r0, r), sr, h);
      if (need_e) mul_rows(E.row_block(r0, r), sr, d);
      if (need_a) {  // (Mᵀ's columns r0.. from M's rows r0..)
        cpu_gemm::transpose_into(MT.p + r0, m, M.p + r0 * n, n, r, n);
        cpu_gemm::transpose_into(ET.p + r0, m, E.p + r0 * n, n, r, n);
      }
    });
#pragma omp barrier
    errors.guarded([&] {
      if (r == 0) return;
      if (need_a) {
        const Mat<float> da = out.dA->row_block(r0, r);
        gemm(da, dyb.row_block(r0, r), MT), gemm(da, gb.row_block(r0, r), ET, 1.f);
      }
      if (!(out.dG || need_b)) return;
      const Mat<float> ae = AE.row_block(r0, r), a_rows = rows_of(A, r0, r);
      gemm(ae, a_rows, E);
      if (out.dG) {
        if (B) {
          gemm(out.dG->row_block(r0, r), ae, bt);
        } else {
          copy_rows(out.dG->row_block(r0, r), ae);
        }
      }
      if (need_b) gemm(AM.row_block(r0, r), a_rows, M);
    });
    if (need_b) {
#pragma omp barrier
      errors.guarded([&] {
        if (c == 0) return;
        const Mat<float> db = out.dB->row_block(c0, c);
        gemm(db, rows_of(dY.transposed(), c0, c), AM, 1.f);
        gemm(db, rows_of(G.transposed(), c0, c), AE, 1.f);
      });
    }
  }
  errors.rethrow();
#else
  TORCH_CHECK(false, "apo-kernels: backward_one_region needs ATen's OpenMP backend");
#endif
}

// Outputs (dG, dA, dS, dB), undefined where not computed (masked off or an identity's gradient).
template <typename T>
std::array<Tensor, 4> backward(const Tensor& dY_, const Tensor& G_, Tensor A_, const Tensor& S_, Tensor B_,
                               Mask mask) {
  const Tensor dY = row_major(dY_), G = row_major(G_), S = row_major(S_);
  const std::optional<Mat<T>> A = factor_view<T>(A_), B = factor_view<T>(B_);
  const int64_t m = G.size(0), n = G.size(1), rows = block_rows(m, n, A.has_value());
  const int64_t blocks = (m + rows - 1) / rows;
  std::array<Tensor, 4> out;
  if (mask[0]) out[0] = at::empty({m, n}, G.options());
  if (mask[1] && A) out[1] = at::empty({m, m}, G.options());
  if (mask[2]) out[2] = at::empty({m, n}, G.options());
  if (mask[3] && B) out[3] = at::zeros({n, n}, G.options());
  if (!(out[0].defined() || out[1].defined() || out[2].defined() || out[3].defined())) return out;
  const Mat<T> dy = row_major_view<T>(dY), g = row_major_view<T>(G), s = row_major_view<T>(S);
  const Mat<T>* a = A ? &*A : nullptr;
  const Mat<T>* b = B ? &*B : nullptr;
  std::optional<Mat<T>> dG, dA, dS, dB;
  if (out[0].defined()) dG = row_major_view<T>(out[0]);
  if (out[1].defined()) dA = row_major_view<T>(out[1]);
  if (out[2].defined()) dS = row_major_view<T>(out[2]);
  if (out[3].defined()) dB = row_major_view<T>(out[3]);
  if constexpr (std::is_same_v<T, float>) {
    if (one_region(a != nullptr, m, n) && m * n <= kBackwardOneRegionMaxElems) {
      backward_one_region(dy, g, *a, s, b, {dG ? &*dG : nullptr, dA ? &*dA : nullptr, dS ? &*dS : nullptr,
                                            dB ? &*dB : nullptr});
      return out;
    }
  }

  // dB sums over all rows: a fixed split of the blocks into chunks (one per thread), each summing
  // into its own n×n, added in chunk order afterwards (the same result on every run).
  const int64_t chunks = std::clamp<int64_t>(at::get_num_threads(), 1, blocks);
  std::vector<T> partial(dB && chunks > 1 ? (chunks - 1) * n * n : 0, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const SerialBlasInRegion serial;
    const Workspace<T> ws(6 * rows * n);
    T* w = ws.data();
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::optional<Mat<T>> acc;
      if (dB) acc = chunk == 0 ? *dB : buffer(partial.data() + (chunk - 1) * n * n, n, n);
      for (int64_t k = blocks * chunk / chunks; k < blocks * (chunk + 1) / chunks; ++k) {
        const int64_t r0 = k * rows, r = std::min(rows, m - r0);
        std::optional<Mat<T>> bG, bS;
        if (dG) bG = dG->row_block(r0, r);
        if (dS) bS = dS->row_block(r0, r);
        const Grads<T> blk{bG ? &*bG : nullptr, dA ? &*dA : nullptr, bS ? &*bS : nullptr, acc ? &*acc : nullptr};
        backward_block(dy.row_block(r0, r), g.row_block(r0, r), a, s.row_block(r0, r), b, blk, w);
      }
    }
  });
  if (dB) {
    for (int64_t chunk = 1; chunk < chunks; ++chunk) {
      const T* p = partial.data() + (chunk - 1) * n * n;
      for (int64_t i = 0; i < n * n; ++i) dB->p[i] += p[i];
    }
  }
  return out;
}

// ---- momentum step: v = μ·m + g, then Y(v), one block of rows at a time (the block's v is still in
// cache when the op reads it); the finiteness of v and of Y is read on the way.

// (v finite, Y finite) for one layer on this path; V and Y are row-major (is_row_major: written in
// place). Gb defined: the layer's matrix is [G | Gb] (a bias gradient as its last column), its v
// formed column block by column block with the same rounding.
template <typename T>
std::pair<bool, bool> momentum_step(const Tensor& G_, const Tensor& Gb, const Tensor& M_, double momentum,
                                    Tensor A_, const Tensor& S_, Tensor B_, const Tensor& V_, const Tensor& Y_) {
  const Tensor G = row_major(G_), M = row_major(M_), S = row_major(S_);
  const std::optional<Mat<T>> A = factor_view<T>(A_), B = factor_view<T>(B_);
  const int64_t m = M.size(0), n = M.size(1), rows = block_rows(m, n, A.has_value());
  const Mat<T> mm = row_major_view<T>(M), s = row_major_view<T>(S);
  const Mat<T> v = row_major_view<T>(V_), y = row_major_view<T>(Y_);
  const Mat<T>* a = A ? &*A : nullptr;
  const Mat<T>* b = B ? &*B : nullptr;
  const T mu = static_cast<T>(momentum);
  // the columns G gives (all, or all but the bias column), and the bias column as an (m, 1) matrix
  const int64_t cols = Gb.defined() ? n - 1 : n;
  const std::optional<Mat<T>> g = cols > 0 ? std::optional<Mat<T>>(row_major_view<T>(G)) : std::nullopt;
  const std::optional<Mat<T>> gb =
      Gb.defined() ? std::optional<Mat<T>>(Mat<T>{Gb.data_ptr<T>(), m, 1, Gb.stride(0), false})
                   : std::nullopt;
  std::atomic<bool> v_finite{true}, y_finite{true};
  // v = μ·m + g on rows [r0, r0 + r) and its finiteness; then, after Y's rows, theirs
  const auto form_v = [&](int64_t r0, int64_t r) {
    const Mat<T> vb = v.row_block(r0, r), mb = mm.row_block(r0, r);
    if (g) {
      momentum_rows(Mat<T>{vb.p, r, cols, vb.ld, false}, Mat<T>{mb.p, r, cols, mb.ld, false}, g->row_block(r0, r),
                    mu);
    }
    if (gb) {
      momentum_rows(Mat<T>{vb.p + cols, r, 1, vb.ld, false}, Mat<T>{mb.p + cols, r, 1, mb.ld, false},
                    gb->row_block(r0, r), mu);
    }
    if (!finite_rows(vb)) v_finite.store(false, std::memory_order_relaxed);
  };
  const auto check_y = [&](int64_t r0, int64_t r) {
    if (!finite_rows(y.row_block(r0, r))) y_finite.store(false, std::memory_order_relaxed);
  };
  if constexpr (std::is_same_v<T, float>) {
    if (one_region(a != nullptr, m, n)) {
      forward_one_region(v, *a, s, b, y, form_v, check_y);
      return {v_finite.load(), y_finite.load()};
    }
  }
  at::parallel_for(0, (m + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    const SerialBlasInRegion serial;
    const Workspace<T> ws(forward_workspace<T>(rows, n, a != nullptr, b != nullptr));
    T* w = ws.data();
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows, r = std::min(rows, m - r0);
      form_v(r0, r);
      forward_block(v.row_block(r0, r), a, s.row_block(r0, r), b, y.row_block(r0, r), w);
      check_y(r0, r);
    }
  });
  return {v_finite.load(), y_finite.load()};
}

// The carried step of a layer with an identity A (rows independent): v = μ·m + g, then
// out = μ·out + Y(g), where out held Y(m). Y(g) is formed only on g's nonzero rows (an embedding's
// gradient is zero on every row the batch did not touch), gathered per block: the step then costs
// elementwise passes plus GEMMs on the touched rows, where Y(v) would cost GEMMs on every row.
// (v finite, out finite); V and Y row-major.
template <typename T>
std::pair<bool, bool> momentum_carry_step(const Tensor& G_, const Tensor& M_, double momentum, const Tensor& S_,
                                          Tensor B_, const Tensor& V_, const Tensor& Y_) {
  const Tensor G = row_major(G_), M = row_major(M_), S = row_major(S_);
  const std::optional<Mat<T>> B = factor_view<T>(B_);
  const int64_t m = G.size(0), n = G.size(1), rows = block_rows(m, n, false);
  const Mat<T> g = row_major_view<T>(G), mm = row_major_view<T>(M), s = row_major_view<T>(S);
  const Mat<T> v = row_major_view<T>(V_), y = row_major_view<T>(Y_);
  const Mat<T>* b = B ? &*B : nullptr;
  const T mu = static_cast<T>(momentum);
  std::atomic<bool> v_finite{true}, y_finite{true};
  at::parallel_for(0, (m + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    const SerialBlasInRegion serial;
    // gathered g, S and Y(g) rows, then forward_block's own workspace
    const Workspace<T> ws(3 * rows * n + forward_workspace<T>(rows, n, false, b != nullptr));
    T* w = ws.data();
    std::vector<int64_t> touched;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows, r = std::min(rows, m - r0);
      const Mat<T> gb = g.row_block(r0, r), vb = v.row_block(r0, r), yb = y.row_block(r0, r);
      momentum_rows(vb, mm.row_block(r0, r), gb, mu);
      if (!finite_rows(vb)) v_finite.store(false, std::memory_order_relaxed);
      touched.clear();
      for (int64_t i = 0; i < r; ++i) {
        if (!zero_row(gb.p + i * gb.ld, n)) touched.push_back(i);
      }
      scale_rows(yb, mu);
      if (!touched.empty()) {
        const int64_t t = static_cast<int64_t>(touched.size());
        const Mat<T> gt = buffer(w, t, n), st = buffer(w + t * n, t, n), yt = buffer(w + 2 * t * n, t, n);
        for (int64_t i = 0; i < t; ++i) {
          std::memcpy(gt.p + i * n, gb.p + touched[i] * gb.ld, n * sizeof(T));
          std::memcpy(st.p + i * n, s.p + (r0 + touched[i]) * s.ld, n * sizeof(T));
        }
        forward_block(gt, static_cast<const Mat<T>*>(nullptr), st, b, yt, w + 3 * rows * n);
        for (int64_t i = 0; i < t; ++i) {  // out = μ·out + Y(g): the product rounded, then the sum
          T* row = yb.p + touched[i] * yb.ld;
          const T* add = yt.p + i * n;
          for (int64_t j = 0; j < n; ++j) row[j] += add[j];
        }
      }
      if (!finite_rows(yb)) y_finite.store(false, std::memory_order_relaxed);
    }
  });
  return {v_finite.load(), y_finite.load()};
}

}  // namespace direct

// ---------------------------------------------------------------------------------------------
// One layer (2-D, or 3-D with the batch handled by bmm): the shared maths of apo_checks.h with
// ⊙S as in-place ATen multiplies (while H or D is still hot in cache). Undefined A/B = identity.

// Whether a layer's GEMMs take its bf16 operands themselves (cpu_gemm.h), forward and backward: a bf16
// layer big enough for them to pay, where this process feeds bf16 operands to torch's GEMMs; a batched
// layer by one matrix's size.
inline bool takes_bf16_operands(const Tensor& G) {
  if (G.scalar_type() != at::kBFloat16 || !cpu_gemm::bf16_operands()) return false;
  const double m = double(G.size(-2)), n = double(G.size(-1));
  return schedule::layer_cost(m * n, m, n) >= cpu_gemm::kBf16OperandsMinCost;
}

Tensor forward_layer(const Tensor& G_, const Tensor& A_, const Tensor& S_, const Tensor& B_) {
  // The op's autograd (registered from Python) wraps this kernel; its internal GEMMs must not
  // record a graph, in this thread or in a parallel_for worker.
  at::AutoDispatchBelowADInplaceOrView guard;
  if (direct::applies(G_, A_)) {
    return G_.scalar_type() == at::kFloat ? direct::forward<float>(G_, A_, S_, B_)
                                          : direct::forward<double>(G_, A_, S_, B_);
  }
  auto scale = [](const Tensor& H, const Tensor& S, bool own_h) {
    return own_h ? Tensor(H).mul_(S) : at::mul(H, S);
  };
  if (takes_bf16_operands(G_)) {
    return layer::finish(layer::forward(G_, A_, S_, B_, scale), G_.scalar_type());
  }
  return layer::finish(layer::forward(layer::up(G_), layer::up(A_), layer::up(S_), layer::up(B_), scale),
                       G_.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_layer(const Tensor& dY_, const Tensor& G_,
                                                          const Tensor& A_, const Tensor& S_,
                                                          const Tensor& B_, Mask mask) {
  at::AutoDispatchBelowADInplaceOrView guard;
  std::array<Tensor, 4> out;
  if (direct::applies(G_, A_)) {
    out = G_.scalar_type() == at::kFloat ? direct::backward<float>(dY_, G_, A_, S_, B_, mask)
                                         : direct::backward<double>(dY_, G_, A_, S_, B_, mask);
    for (Tensor& t : out) t = t.defined() ? t : layer::empty_slot(G_);
    return {out[0], out[1], out[2], out[3]};
  }
  auto elementwise = [](const Tensor& S, const Tensor& H, const Tensor& D, bool need_m, bool need_e,
                        bool need_s, bool own) {
    layer::ElementwiseOut e;
    if (need_s) e.dS = at::mul(D, H);  // before H and D are overwritten
    if (need_m) e.M = own ? Tensor(H).mul_(S) : at::mul(H, S);
    if (need_e) e.E = own ? Tensor(D).mul_(S) : at::mul(D, S);
    return e;
  };
  out = takes_bf16_operands(G_)
            ? layer::backward(dY_, G_, A_, S_, B_, mask, elementwise)
            : layer::backward(layer::up(dY_), layer::up(G_), layer::up(A_), layer::up(S_), layer::up(B_), mask,
                              elementwise);
  for (Tensor& t : out) t = t.defined() ? layer::finish(t, G_.scalar_type()) : layer::empty_slot(G_);
  return {out[0], out[1], out[2], out[3]};
}

// ---------------------------------------------------------------------------------------------
// Grouped: many layers of different shapes in one parallel loop

// Runs fn(i) for every layer i in the order of schedule::plan (cpu_schedule.h): first the layers
// that run alone, one after another with multithreaded GEMMs; then the rest inside one
// at::parallel_for, where nested ATen parallelism is off, so each layer's GEMMs are single-threaded
// and the threads work on different layers, taken largest first from a shared counter (a dynamic
// longest-job-first schedule, so uneven widths still balance across threads).
template <typename Fn>
void for_each_layer(const TensorList& grads, const Fn& fn) {
  const auto n = static_cast<int64_t>(grads.size());
  std::vector<double> cost(n);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& G = grads[i];
    cost[i] = schedule::layer_cost(static_cast<double>(G.numel()), static_cast<double>(G.size(-2)),
                                   static_cast<double>(G.size(-1)));
  }
  const int64_t threads = direct::threads_here();
  const schedule::Plan plan = schedule::plan(cost, threads);
  const std::vector<int64_t>& order = plan.order;

  int64_t k = 0;
  for (; k < plan.alone; ++k) fn(order[k]);

  const int64_t workers = std::min<int64_t>(threads, n - k);
  if (workers <= 1) {
    for (; k < n; ++k) fn(order[k]);
    return;
  }
  std::atomic<int64_t> next{k};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    const direct::SerialBlasInRegion serial;  // the ATen path's GEMMs too
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t j = next++; j < n; j = next++) fn(order[j]);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points (CPU)

// Every entry point applies the input rules of apo_checks.h first (a direct call of torch.ops.apo.*
// fails like the public API), then refuses a result bigger than the machine's memory.

Tensor precondition_cpu(const Tensor& G, const std::optional<Tensor>& A_, const Tensor& S,
                        const std::optional<Tensor>& B_) {
  const Tensor A = layer::factor(A_), B = layer::factor(B_);
  checks::check_layer(G, A, S, B);
  checks::check_result_fits({G}, {A}, {B}, nullptr, checks::host_memory_bytes());
  return forward_layer(G, A, S, B);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> precondition_backward_cpu(
    const Tensor& dY, const Tensor& G, const std::optional<Tensor>& A_, const Tensor& S,
    const std::optional<Tensor>& B_, Mask mask) {
  const Tensor A = layer::factor(A_), B = layer::factor(B_);
  checks::check_layer(G, A, S, B);
  checks::check_grad_out(dY, G);
  checks::check_result_fits({G}, {A}, {B}, &mask, checks::host_memory_bytes());
  return backward_layer(dY, G, A, S, B, mask);
}

TensorVec precondition_grouped_cpu(TensorList Gs, const OptionalTensorList& As_, TensorList Ss,
                                   const OptionalTensorList& Bs_) {
  const TensorVec As = layer::factors(As_), Bs = layer::factors(Bs_);
  checks::check_group(Gs, As, Ss, Bs);
  checks::check_result_fits(Gs, As, Bs, nullptr, checks::host_memory_bytes());
  TensorVec out(Gs.size());
  for_each_layer(Gs, [&](int64_t i) { out[i] = forward_layer(Gs[i], As[i], Ss[i], Bs[i]); });
  return out;
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> precondition_grouped_backward_cpu(
    TensorList dYs, TensorList Gs, const OptionalTensorList& As_, TensorList Ss,
    const OptionalTensorList& Bs_, Mask mask) {
  const TensorVec As = layer::factors(As_), Bs = layer::factors(Bs_);
  checks::check_group(Gs, As, Ss, Bs, &dYs);
  checks::check_result_fits(Gs, As, Bs, &mask, checks::host_memory_bytes());
  const size_t n = Gs.size();
  std::array<TensorVec, 4> out;
  for (int k = 0; k < 4; ++k) out[k].resize(mask[k] ? n : 0);  // masked off: empty list
  for_each_layer(Gs, [&](int64_t i) {
    auto grads = backward_layer(dYs[i], Gs[i], As[i], Ss[i], Bs[i], mask);
    if (mask[0]) out[0][i] = std::move(std::get<0>(grads));
    if (mask[1]) out[1][i] = std::move(std::get<1>(grads));
    if (mask[2]) out[2][i] = std::move(std::get<2>(grads));
    if (mask[3]) out[3][i] = std::move(std::get<3>(grads));
  });
  return {std::move(out[0]), std::move(out[1]), std::move(out[2]), std::move(out[3])};
}

// ---------------------------------------------------------------------------------------------
// Momentum step: per layer v = μ·m + g into vs, Y(v) into out. With `carry`, out holds on entry
// the direction of m at these factors (the previous step's out) and becomes μ·out + Y(g): Y(v) in
// exact arithmetic, for the price of Y(g), which is cheap where g is zero on most rows (an
// embedding's). Returns a bool tensor (2,) on the inputs' device, (every v finite, every out finite):
// a device tensor, so a GPU caller syncs only when it reads the flags.

Tensor cpu_flags(bool v_finite, bool y_finite) {
  Tensor flags = at::empty({2}, at::kBool);
  flags.data_ptr<bool>()[0] = v_finite;
  flags.data_ptr<bool>()[1] = y_finite;
  return flags;
}

// v = μ·m + g into V (torch.optim.SGD's buf.mul_(μ).add_(g)), with ATen's elementwise ops: every
// device, and the CPU kernel's layers off the direct path.
void momentum_generic(const Tensor& G, const Tensor& M, double momentum, const Tensor& V) {
  at::AutoDispatchBelowADInplaceOrView guard;
  // μ as Python passes it, a wrapped number: a half-precision m is multiplied by μ in fp32, not by μ
  // rounded to half (what the Scalar overload would do)
  Tensor v = V;  // (a handle: the schema's output is written through it)
  at::mul_out(v, M, at::native::wrapped_scalar_tensor(momentum)).add_(G);
}

// Whether every value of every tensor is finite, as a 0-d bool tensor on their device (no sync).
Tensor all_finite(TensorList ts) {
  std::vector<Tensor> each;
  each.reserve(ts.size());
  for (const Tensor& t : ts) each.push_back(at::isfinite(t).all());
  return at::stack(each).all();
}

// ---------------------------------------------------------------------------------------------
// apo::all_finite: whether every value of every tensor is finite, as a 0-d bool tensor on their
// device. The optimizers' guard on each step's gradients: one call instead of a reduction per tensor
// (on a small model the per-op cost of those reductions, not their memory traffic, is what a step
// pays). Read-only; integer and bool tensors are finite.

void check_one_device(TensorList ts) {
  for (const Tensor& t : ts) {
    TORCH_CHECK_VALUE(t.device() == ts[0].device(), "tensors: every tensor must be on one device, got ",
                      ts[0].device(), " and ", t.device());
  }
}

// Elements above which the check is split over threads (96 Ki, 384 KiB of float32). On Zen 4 at 2
// threads the split of a 2^17-element read took 9.2 → 6.8 µs with the threads near each other and
// 9.6 → 8.0 far apart; of a 65792-element read 5.7 → 5.2 near but 5.7 → 6.5 far: break-even far
// apart lies between the two.
constexpr int64_t kFiniteGrain = int64_t(3) << 15;

template <typename T>
bool finite_contiguous(const T* p, int64_t n, int64_t grain) {
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    const direct::Mat<T> chunk{const_cast<T*>(p) + begin, 1, end - begin, end - begin, false};
    if (!direct::finite_rows(chunk)) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

// bf16 and fp16: a value is not finite exactly when its exponent bits are all ones (`exponent`, the
// mask of those bits), read as integers. Blocks of 4096 values, each one vectorized loop with no exit,
// then a look at its result: a bad value stops the thread's share at the end of its block. ATen's
// isfinite(t).all() took 4.3 ms on a bf16 MLP's 2.4 M gradients (four passes and two temporaries).
bool finite_half_contiguous(const uint16_t* p, int64_t n, uint16_t exponent, int64_t grain) {
  constexpr int64_t kBlock = 4096;
  std::atomic<bool> ok{true};
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end && ok.load(std::memory_order_relaxed); b += kBlock) {
      const int64_t stop = std::min(end, b + kBlock);
      uint16_t bad = 0;
      for (int64_t i = b; i < stop; ++i) bad |= static_cast<uint16_t>((p[i] & exponent) == exponent);
      if (bad) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

// grain: elements one thread reads before the check is split (a pass that follows over the same
// elements with the same grain finds each share in the cache of the thread that checked it; a
// half-precision tensor is split at the same bytes, twice the elements).
bool finite_cpu(const Tensor& t, int64_t grain = kFiniteGrain) {
  if (!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type())) return true;
  if (t.numel() == 0) return true;
  if (t.is_contiguous() && t.scalar_type() == at::kFloat) return finite_contiguous(t.const_data_ptr<float>(), t.numel(), grain);
  if (t.is_contiguous() && t.scalar_type() == at::kDouble) return finite_contiguous(t.const_data_ptr<double>(), t.numel(), grain);
  if (t.is_contiguous() && (t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf)) {
    const uint16_t exponent = t.scalar_type() == at::kBFloat16 ? 0x7F80 : 0x7C00;
    return finite_half_contiguous(static_cast<const uint16_t*>(t.const_data_ptr()), t.numel(), exponent, 2 * grain);
  }
  return at::isfinite(t).all().item<bool>();
}

Tensor all_finite_cpu(TensorList ts) {
  check_one_device(ts);
  at::AutoDispatchBelowADInplaceOrView guard;
  bool ok = true;
  for (const Tensor& t : ts) ok = ok && finite_cpu(t);
  return at::scalar_tensor(ok, at::kBool);
}

// Any other device: ATen's ops, no sync.
Tensor all_finite_any(TensorList ts) {
  check_one_device(ts);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (ts.empty()) return at::scalar_tensor(true, at::kBool);
  return all_finite(ts);
}

// ---------------------------------------------------------------------------------------------
// apo::lookahead_write: out = params + deltas per parameter (formed in the delta's dtype and rounded
// once to the parameter's; torch.add(θ, Δ) when the dtypes agree), returning Σ‖Δ‖² as a 0-d float64
// tensor on their device. A meta-step's lookahead θ' = θ + Δ in one pass over θ and Δ, which also
// yields the proximity term ½‖Δ‖² and, by that sum's finiteness, the check that Δ is finite: a NaN or
// inf in Δ makes the sum NaN or inf (as do float64 deltas whose squares overflow). out's values are
// then unspecified.

// Elements one thread takes before the pass is split over threads (256 KiB of float32).
constexpr int64_t kLookaheadGrain = int64_t(1) << 16;
// Elements one thread takes in the elementwise passes of APO-LR's steps (sgd_step, sgd_lookahead, dot_sum:
// 64 KiB of float32). Each reads two or three tensors and writes up to two: a 65536-element layer is
// worth a second thread (the small MLP's SGD step, 2 threads: 29.8 → 23.6 µs), a smaller one is not.
constexpr int64_t kStepGrain = int64_t(1) << 14;

// Whether one loop over memory can take these tensors: `first` float32 or float64 and dense, every
// other (null: absent) of its dtype and strides, so element k of each is the k-th in memory
// (contiguous, channels-last, any permutation of the dimensions).
bool dense_alike(const Tensor& first, std::initializer_list<const Tensor*> others) {
  const auto type = first.scalar_type();
  if ((type != at::kFloat && type != at::kDouble) || !first.is_non_overlapping_and_dense()) return false;
  for (const Tensor* t : others) {
    if (t != nullptr && (t->scalar_type() != type || t->strides() != first.strides())) return false;
  }
  return true;
}

// out, theta and delta dense with one layout: element k of each is the k-th in memory.
template <typename T>
double lookahead_dense(const Tensor& out, const Tensor& theta, const Tensor& delta) {
  T* o = out.data_ptr<T>();
  const T* t = theta.const_data_ptr<T>();
  const T* d = delta.const_data_ptr<T>();
  return at::parallel_reduce(
      0, out.numel(), kLookaheadGrain, 0.0,
      [&](int64_t begin, int64_t end, double sum) {
        return sum + direct::add_sumsq(o + begin, t + begin, d + begin, end - begin);
      },
      std::plus<double>());
}

// out = θ + Δ with ATen's ops (any device, dtype and layout).
void lookahead_generic(const Tensor& Out, const Tensor& theta, const Tensor& delta) {
  Tensor out = Out;  // (a handle: the schema's output is written through it)
  if (theta.scalar_type() == delta.scalar_type()) {
    at::add_out(out, theta, delta);
  } else {
    out.copy_(theta.to(delta.scalar_type()) + delta);
  }
}

Tensor sum_of_squares(TensorList deltas) {
  return at::stack(at::_foreach_norm(deltas, 2, at::kDouble)).square().sum();
}

Tensor lookahead_write_cpu(TensorList params, TensorList deltas, TensorList out) {
  checks::check_lookahead(params, deltas, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  double sum = 0.0;
  std::vector<Tensor> rest;  // deltas of the parameters written by ATen's ops
  for (size_t i = 0; i < params.size(); ++i) {
    const bool direct = dense_alike(params[i], {&deltas[i], &out[i]});
    if (direct && params[i].scalar_type() == at::kFloat) {
      sum += lookahead_dense<float>(out[i], params[i], deltas[i]);
    } else if (direct) {
      sum += lookahead_dense<double>(out[i], params[i], deltas[i]);
    } else {
      lookahead_generic(out[i], params[i], deltas[i]);
      rest.push_back(deltas[i]);
    }
  }
  if (!rest.empty()) sum += sum_of_squares(rest).item<double>();
  return at::scalar_tensor(sum, at::kDouble);
}

// Any other device: ATen's ops, no sync.
Tensor lookahead_write_any(TensorList params, TensorList deltas, TensorList out) {
  checks::check_lookahead(params, deltas, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (params.empty()) return at::scalar_tensor(0.0, at::kDouble);
  for (size_t i = 0; i < params.size(); ++i) lookahead_generic(out[i], params[i], deltas[i]);
  return sum_of_squares(deltas);
}

// ---------------------------------------------------------------------------------------------
// apo::sgd_lookahead: APO-LR's lookahead for torch.optim.SGD in one pass. Per parameter
// Δ = grad_coef·g + momentum_coef·m + decay_coef·θ into deltas (formed in the delta's dtype, each
// product and sum rounded in that order: the terms of SGD's step at lr = 1, scaled) and θ' = θ + Δ
// into out (rounded once to θ's dtype), returning Σ‖Δ‖² as a 0-d float64 tensor on their device.
// momenta is empty (no momentum term) or one per parameter; decay_coef = 0 adds no term (SGD
// without weight decay). Where the lookahead formed Δ in one pass and wrote θ' in another, this
// reads g, m and θ once and writes Δ and θ' once. A Δ that is not finite (or a coefficient that is
// not) makes the sum not finite; Δ and out are then unspecified.

// Everything dense with one layout and one dtype, float32 or float64: element k of each tensor is
// the k-th in memory.
template <typename T>
double sgd_lookahead_dense(const Tensor& out, const Tensor& delta, const Tensor& theta, const Tensor& grad,
                           const Tensor* mom, double a, double b, double c) {
  T* o = out.data_ptr<T>();
  T* d = delta.data_ptr<T>();
  const T* t = theta.const_data_ptr<T>();
  const T* g = grad.const_data_ptr<T>();
  const T* m = mom != nullptr ? mom->const_data_ptr<T>() : nullptr;
  return at::parallel_reduce(
      0, out.numel(), kStepGrain, 0.0,
      [&](int64_t begin, int64_t end, double sum) {
        return sum + direct::sgd_lookahead_rows(o + begin, d + begin, t + begin, g + begin,
                                                m != nullptr ? m + begin : nullptr, T(a), T(b), T(c),
                                                end - begin);
      },
      std::plus<double>());
}

// The same with ATen's ops (any device, dtype and layout): Δ in the delta's dtype, then θ + Δ.
void sgd_lookahead_generic(const Tensor& Out, const Tensor& Delta, const Tensor& theta, const Tensor& grad,
                           const Tensor* mom, double a, double b, double c) {
  Tensor delta = Delta;  // (a handle: the schema's output is written through it)
  // the scalars as Python passes them, wrapped numbers: a half-precision g is upcast first, and the
  // products are formed in Δ's dtype
  delta.copy_(grad).mul_(at::native::wrapped_scalar_tensor(a));
  if (mom != nullptr) delta.add_(*mom, b);
  if (c != 0.0) delta.add_(theta, c);
  lookahead_generic(Out, theta, delta);
}

Tensor sgd_lookahead_cpu(TensorList params, TensorList grads, TensorList momenta, double grad_coef,
                         double momentum_coef, double decay_coef, TensorList deltas, TensorList out) {
  checks::check_sgd_lookahead(params, grads, momenta, deltas, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  double sum = 0.0;
  std::vector<Tensor> rest;  // deltas formed by ATen's ops
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor* mom = momenta.empty() ? nullptr : &momenta[i];
    if (!dense_alike(params[i], {&out[i], &deltas[i], &grads[i], mom})) {
      sgd_lookahead_generic(out[i], deltas[i], params[i], grads[i], mom, grad_coef, momentum_coef, decay_coef);
      rest.push_back(deltas[i]);
    } else if (params[i].scalar_type() == at::kFloat) {
      sum += sgd_lookahead_dense<float>(out[i], deltas[i], params[i], grads[i], mom, grad_coef, momentum_coef,
                                        decay_coef);
    } else {
      sum += sgd_lookahead_dense<double>(out[i], deltas[i], params[i], grads[i], mom, grad_coef, momentum_coef,
                                         decay_coef);
    }
  }
  if (!rest.empty()) sum += sum_of_squares(rest).item<double>();
  return at::scalar_tensor(sum, at::kDouble);
}

// Any other device: ATen's ops, no sync.
Tensor sgd_lookahead_any(TensorList params, TensorList grads, TensorList momenta, double grad_coef,
                         double momentum_coef, double decay_coef, TensorList deltas, TensorList out) {
  checks::check_sgd_lookahead(params, grads, momenta, deltas, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (params.empty()) return at::scalar_tensor(0.0, at::kDouble);
  for (size_t i = 0; i < params.size(); ++i) {
    sgd_lookahead_generic(out[i], deltas[i], params[i], grads[i], momenta.empty() ? nullptr : &momenta[i],
                          grad_coef, momentum_coef, decay_coef);
  }
  return sum_of_squares(deltas);
}

// ---------------------------------------------------------------------------------------------
// apo::kron_precondition: out = L·G·R, the step of APO-Precond's kron structure (P = L ⊗ R, with
// L = A·diag(u)·Aᵀ and R = B·diag(v)·Bᵀ cached between meta-steps): two GEMMs; L or R None is an
// identity side (the caller scales by a fixed side's diag(u) or diag(v) itself). fp32 on the oneDNN
// engine takes the engine's GEMMs, as the op's layers do: a block of out's rows is (rows of L)·G,
// then that times R, so the intermediate is a block's (kept per thread) and the blocks are split over
// the threads with nothing shared; each element is one GEMM's whole sum, the same bits on any thread
// count. Everything else: ATen's mm, (L·G)·R.

void kron_generic(const Tensor& G, const Tensor& L, const Tensor& R, const Tensor& Out) {
  Tensor out = Out;  // (a handle: the schema's output is written through it)
  const Tensor LG = L.defined() ? at::mm(L, G) : G;
  if (R.defined()) {
    at::mm_out(out, LG, R);
  } else {
    out.copy_(LG);
  }
}

void kron_precondition_cpu(const Tensor& G_, const std::optional<Tensor>& L_, const std::optional<Tensor>& R_,
                           const Tensor& out) {
  const Tensor L0 = layer::factor(L_), R0 = layer::factor(R_);
  checks::check_kron(G_, L0, R0, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t m = G_.size(0), n = G_.size(1);
  if (m == 0 || n == 0) return;
  const bool engine = G_.scalar_type() == at::kFloat && cpu_gemm::engine() == cpu_gemm::Engine::onednn &&
                      m <= INT_MAX && n <= INT_MAX && direct::is_row_major(out) && (L0.defined() || R0.defined());
  if (!engine) return kron_generic(G_, L0, R0, out);
  // (R row-major once: every block reads all of it; a block's rows of L are copied per block if L is
  // stored transposed)
  Tensor L = L0;
  const Tensor G = direct::row_major(G_), R = R0.defined() ? direct::row_major(R0) : R0;
  const std::optional<direct::Mat<float>> l = direct::factor_view<float>(L);
  const std::optional<direct::Mat<float>> r = R.defined() ? std::optional(direct::row_major_view<float>(R)) : std::nullopt;
  const direct::Mat<float> g = direct::row_major_view<float>(G), y = direct::row_major_view<float>(out);
  const int64_t threads = at::get_num_threads();
  const int64_t rows = std::clamp<int64_t>((m + threads - 1) / threads, 1, cpu_gemm::kRowBlock);
  at::parallel_for(0, (m + rows - 1) / rows, 1, [&](int64_t begin, int64_t end) {
    const direct::Workspace<float> ws(l && r ? static_cast<size_t>(rows * n) : 0);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * rows, rb = std::min(rows, m - r0);
      const direct::Mat<float> yb = y.row_block(r0, rb);
      if (!r) {
        direct::gemm(yb, direct::rows_of(*l, r0, rb), g);
      } else if (!l) {
        direct::gemm(yb, g.row_block(r0, rb), *r);
      } else {
        const direct::Mat<float> lg = direct::buffer(ws.data(), rb, n);
        direct::gemm(lg, direct::rows_of(*l, r0, rb), g);
        direct::gemm(yb, lg, *r);
      }
    }
  });
}

void kron_precondition_any(const Tensor& G, const std::optional<Tensor>& L_, const std::optional<Tensor>& R_,
                           const Tensor& out) {
  const Tensor L = layer::factor(L_), R = layer::factor(R_);
  checks::check_kron(G, L, R, out);
  at::AutoDispatchBelowADInplaceOrView guard;
  kron_generic(G, L, R, out);
}

// out = μ·out + Y: the carried direction (out.mul_(μ).add_(Y), μ a wrapped number as above).
void carry_generic(const Tensor& Y, double momentum, const Tensor& Out) {
  at::AutoDispatchBelowADInplaceOrView guard;
  Tensor out = Out;
  out.mul_(at::native::wrapped_scalar_tensor(momentum)).add_(Y);
}

// Any device: the elementwise ops above and the device's grouped op through the dispatcher.
// A layer's whole gradient matrix: G, or [G | Gb] with a bias gradient Gb (a copy).
Tensor with_bias_column(const Tensor& G, const Tensor& Gb) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return Gb.defined() ? at::cat({G, Gb.unsqueeze(1)}, 1) : G;
}

// bias_grads as a list with an undefined tensor for each layer without one (none given: `layers`
// undefined tensors; a given list keeps its length, for the checks to name a wrong one)
TensorVec bias_list(const std::optional<OptionalTensorList>& Gbs, size_t layers) {
  return Gbs.has_value() ? layer::factors(*Gbs) : TensorVec(layers);
}

Tensor precondition_momentum_grouped_any(TensorList Gs_, TensorList Ms, double momentum,
                                         const OptionalTensorList& As_, TensorList Ss,
                                         const OptionalTensorList& Bs_, TensorList Vs, TensorList Outs,
                                         bool carry, const std::optional<OptionalTensorList>& Gbs_) {
  const TensorVec As = layer::factors(As_), Bs = layer::factors(Bs_), Gbs = bias_list(Gbs_, Gs_.size());
  checks::check_momentum_group(Gs_, Ms, As, Ss, Bs, Vs, Outs, momentum, Gbs);
  if (Gs_.empty()) return at::ones({2}, at::kBool);  // (no tensor to dispatch the grouped op on)
  TensorVec whole(Gs_.begin(), Gs_.end());
  for (size_t i = 0; i < Gbs.size(); ++i) whole[i] = with_bias_column(Gs_[i], Gbs[i]);
  const TensorList Gs(whole);
  for (size_t i = 0; i < Gs.size(); ++i) momentum_generic(Gs[i], Ms[i], momentum, Vs[i]);
  static const auto grouped =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("apo::precondition_grouped", "")
          .typed<TensorVec(TensorList, const OptionalTensorList&, TensorList, const OptionalTensorList&)>();
  const TensorVec Ys = grouped.call(carry ? Gs : TensorList(Vs), As_, Ss, Bs_);
  for (size_t i = 0; i < Ys.size(); ++i) {
    if (carry) {
      carry_generic(Ys[i], momentum, Outs[i]);
    } else {
      Outs[i].copy_(Ys[i]);
    }
  }
  return at::stack({all_finite(Vs), all_finite(Outs)});
}

std::pair<bool, bool> momentum_layer(const Tensor& G_, const Tensor& Gb, const Tensor& M, double momentum,
                                     const Tensor& A, const Tensor& S, const Tensor& B, const Tensor& V,
                                     const Tensor& Y, bool carry) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool direct = direct::applies(M, A) && direct::is_row_major(V) && direct::is_row_major(Y);
  const bool f32 = G_.scalar_type() == at::kFloat;
  if (direct && !carry) {  // a bias column read where v is formed
    return f32 ? direct::momentum_step<float>(G_, Gb, M, momentum, A, S, B, V, Y)
               : direct::momentum_step<double>(G_, Gb, M, momentum, A, S, B, V, Y);
  }
  const Tensor G = with_bias_column(G_, Gb);
  if (direct && carry && !A.defined()) {
    return f32 ? direct::momentum_carry_step<float>(G, M, momentum, S, B, V, Y)
               : direct::momentum_carry_step<double>(G, M, momentum, S, B, V, Y);
  }
  momentum_generic(G, M, momentum, V);
  if (carry) {
    carry_generic(forward_layer(G, A, S, B), momentum, Y);
  } else {
    Y.copy_(forward_layer(V, A, S, B));
  }
  return {finite_cpu(V), finite_cpu(Y)};
}

Tensor precondition_momentum_grouped_cpu(TensorList Gs, TensorList Ms, double momentum,
                                         const OptionalTensorList& As_, TensorList Ss,
                                         const OptionalTensorList& Bs_, TensorList Vs, TensorList Outs,
                                         bool carry, const std::optional<OptionalTensorList>& Gbs_) {
  const TensorVec As = layer::factors(As_), Bs = layer::factors(Bs_), Gbs = bias_list(Gbs_, Gs.size());
  checks::check_momentum_group(Gs, Ms, As, Ss, Bs, Vs, Outs, momentum, Gbs);
  std::atomic<bool> v_finite{true}, y_finite{true};  // (an empty call: both true)
  for_each_layer(Ms, [&](int64_t i) {  // (momenta: every layer's whole matrix)
    const auto [v_ok, y_ok] =
        momentum_layer(Gs[i], Gbs[i], Ms[i], momentum, As[i], Ss[i], Bs[i], Vs[i], Outs[i], carry);
    if (!v_ok) v_finite.store(false, std::memory_order_relaxed);
    if (!y_ok) y_finite.store(false, std::memory_order_relaxed);
  });
  return cpu_flags(v_finite.load(), y_finite.load());
}

// ---------------------------------------------------------------------------------------------
// apo::dot_sum: Σ_i ⟨a_i, b_i⟩ as a 0-d float64 tensor on their device, every product and sum in
// float64. APO-LR's meta-gradient, Σ over a group's parameters of ⟨∇θ'Q, Δ⟩: one call where it was a
// dot per parameter, their stack and its read-back.

template <typename T>
double dot_dense(const Tensor& a, const Tensor& b) {
  const T* x = a.const_data_ptr<T>();
  const T* y = b.const_data_ptr<T>();
  return at::parallel_reduce(
      0, a.numel(), kStepGrain, 0.0,
      [&](int64_t begin, int64_t end, double sum) { return sum + direct::dot_rows(x + begin, y + begin, end - begin); },
      std::plus<double>());
}

Tensor dot_sum_generic(TensorList a, TensorList b) {
  std::vector<Tensor> each;
  each.reserve(a.size());
  for (size_t i = 0; i < a.size(); ++i) each.push_back(at::mul(a[i].to(at::kDouble), b[i].to(at::kDouble)).sum());
  return at::stack(each).sum();  // (callers pass at least one pair)
}

// Σ_i ⟨a_i, b_i⟩ in float64 on the CPU (the caller checked the pairs and set the dispatch guard).
double dots_cpu(TensorList a, TensorList b) {
  double sum = 0.0;
  std::vector<Tensor> rest_a, rest_b;  // pairs off the direct loop: ATen's ops
  for (size_t i = 0; i < a.size(); ++i) {
    const bool direct = dense_alike(a[i], {&b[i]});
    if (direct && a[i].scalar_type() == at::kFloat) {
      sum += dot_dense<float>(a[i], b[i]);
    } else if (direct) {
      sum += dot_dense<double>(a[i], b[i]);
    } else {
      rest_a.push_back(a[i]);
      rest_b.push_back(b[i]);
    }
  }
  if (!rest_a.empty()) sum += dot_sum_generic(rest_a, rest_b).item<double>();
  return sum;
}

Tensor dot_sum_cpu(TensorList a, TensorList b) {
  checks::check_dot_sum(a, b);
  at::AutoDispatchBelowADInplaceOrView guard;
  return at::scalar_tensor(dots_cpu(a, b), at::kDouble);
}

// Any other device: ATen's ops, no sync.
Tensor dot_sum_any(TensorList a, TensorList b) {
  checks::check_dot_sum(a, b);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (a.empty()) return at::scalar_tensor(0.0, at::kDouble);
  return dot_sum_generic(a, b);
}

// ---------------------------------------------------------------------------------------------
// apo::dot_adam_step: one step of torch.optim.Adam (fused; no weight decay, amsgrad or maximize) on a
// 1-D param whose gradient entry e is Σ ⟨a_i, b_i⟩ in float64 over the e-th run of `segments[e]`
// consecutive pairs. APO-LR's meta-step: ∂Q/∂log lr per group and φ's step in one call, where they
// were a dot_sum, a tensor from its floats, the step counter's increment and torch's kernel, each a
// cold call after the lookahead's backward. The step is torch's own: the counter incremented as
// torch.optim.Adam increments it, then at::_fused_adam_ with these hyperparameters (the same kernel and
// arguments: the same bits). Returns the gradient, float64 on param's device; when an entry is not
// finite nothing is written. Off the CPU the sums are read back before the step (one sync).

Tensor dot_adam_step(TensorList a, TensorList b, at::IntArrayRef segments, const Tensor& param,
                     const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& step, double lr, double beta1,
                     double beta2, double eps) {
  checks::check_dot_adam_step(a, b, segments, param, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps);
  at::AutoDispatchBelowADInplaceOrView guard;
  Tensor sums = at::empty({static_cast<int64_t>(segments.size())}, at::kDouble);
  double* g = sums.data_ptr<double>();
  bool finite = true;
  size_t k = 0;
  for (size_t e = 0; e < segments.size(); ++e) {
    const size_t n = static_cast<size_t>(segments[e]);
    const TensorList run_a = a.slice(k, n), run_b = b.slice(k, n);
    g[e] = run_a.empty() || run_a[0].is_cpu() ? dots_cpu(run_a, run_b) : dot_sum_generic(run_a, run_b).item<double>();
    finite = finite && std::isfinite(g[e]);
    k += n;
  }
  Tensor grad = sums.to(param.device());
  if (finite) {
    step.add_(1);  // torch.optim.Adam's count, before its kernel reads it
    at::_fused_adam_({param}, {grad.to(param.scalar_type())}, {exp_avg}, {exp_avg_sq}, {}, {step}, lr, beta1,
                     beta2, /*weight_decay=*/0.0, eps, /*amsgrad=*/false, /*maximize=*/false);
  }
  return grad;
}

// ---------------------------------------------------------------------------------------------
// apo::sgd_step: torch.optim.SGD's step (its per-tensor step, the CPU default) on every parameter,
// taken only when every gradient is finite. Returns a 0-d bool tensor on their device: true when the
// step was taken; false (a NaN or inf in some gradient) leaves params and momenta as they were. APO-LR's
// plain step over SGD: the guard that keeps a non-finite gradient out of the momentum, and the step, in
// one call where they were a check and three ATen ops per parameter. momenta: the momentum buffers,
// one per parameter (none at momentum = 0), all existing (the step that creates them is torch's).
// Bit for bit torch's step, whose adds with alpha are fused multiply-adds and whose mul_ is one
// rounded product, in its order (direct::sgd_step).

struct SGDHyper {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// theta, grad and the momentum dense with one layout, float32 or float64: element k of each is the
// k-th in memory.
template <typename T>
void sgd_step_dense(const Tensor& theta, const Tensor* mom, const Tensor& grad, const SGDHyper& h) {
  T* t = theta.data_ptr<T>();
  T* m = mom != nullptr ? mom->data_ptr<T>() : nullptr;
  const T* g = grad.const_data_ptr<T>();
  at::parallel_for(0, theta.numel(), kStepGrain, [&](int64_t begin, int64_t end) {
    direct::sgd_step_rows(t + begin, m != nullptr ? m + begin : nullptr, g + begin, h.maximize ? T(-1) : T(1),
                          T(h.weight_decay), T(h.momentum), T(1.0 - h.dampening), h.nesterov, T(-h.lr), end - begin);
  });
}

// The same with the ATen ops torch.optim.SGD's per-tensor step calls (any device, dtype and layout).
void sgd_step_generic(const Tensor& Theta, const Tensor* Mom, const Tensor& grad, const SGDHyper& h) {
  Tensor theta = Theta;  // (handles: the schema's outputs are written through them)
  Tensor g = h.maximize ? grad.neg() : grad;
  if (h.weight_decay != 0.0) g = g.add(theta, h.weight_decay);
  if (Mom != nullptr) {
    Tensor buf = *Mom;
    // μ as Python passes it, a wrapped number (a half-precision buffer is multiplied in fp32)
    buf.mul_(at::native::wrapped_scalar_tensor(h.momentum)).add_(g, 1.0 - h.dampening);
    g = h.nesterov ? g.add(buf, h.momentum) : buf;
  }
  theta.add_(g, -h.lr);
}

Tensor sgd_step_cpu(TensorList params, TensorList grads, TensorList momenta, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize) {
  checks::check_sgd_step(params, grads, momenta, lr, momentum, dampening, weight_decay, nesterov);
  at::AutoDispatchBelowADInplaceOrView guard;
  // split as the step below is: each thread checks the gradients it then reads for its share of the step
  for (const Tensor& g : grads) {
    if (!finite_cpu(g, kStepGrain)) return at::scalar_tensor(false, at::kBool);
  }
  const SGDHyper h{lr, momentum, dampening, weight_decay, nesterov, maximize};
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor* mom = momenta.empty() ? nullptr : &momenta[i];
    if (!dense_alike(params[i], {&grads[i], mom})) {
      sgd_step_generic(params[i], mom, grads[i], h);
    } else if (params[i].scalar_type() == at::kFloat) {
      sgd_step_dense<float>(params[i], mom, grads[i], h);
    } else {
      sgd_step_dense<double>(params[i], mom, grads[i], h);
    }
  }
  return at::scalar_tensor(true, at::kBool);
}

// Any other device: ATen's ops, after one sync on the gradients' finiteness (nothing may be written
// before it is known).
Tensor sgd_step_any(TensorList params, TensorList grads, TensorList momenta, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize) {
  checks::check_sgd_step(params, grads, momenta, lr, momentum, dampening, weight_decay, nesterov);
  at::AutoDispatchBelowADInplaceOrView guard;
  if (params.empty()) return at::scalar_tensor(true, at::kBool);
  const auto flag = at::TensorOptions().dtype(at::kBool).device(params[0].device());
  if (!all_finite(grads).item<bool>()) return at::scalar_tensor(false, flag);
  const SGDHyper h{lr, momentum, dampening, weight_decay, nesterov, maximize};
  for (size_t i = 0; i < params.size(); ++i) {
    sgd_step_generic(params[i], momenta.empty() ? nullptr : &momenta[i], grads[i], h);
  }
  return at::scalar_tensor(true, flag);
}

}  // namespace
}  // namespace apo

// Schemas: the single definition (docs/ARCHITECTURE.md). A or B None: an identity factor. Fake
// kernels and autograd are registered from Python (apo_kernels/ops/dispatch.py).
TORCH_LIBRARY(apo, m) {
  m.def("precondition(Tensor grad, Tensor? A, Tensor S, Tensor? B) -> Tensor");
  m.def(
      "precondition_backward(Tensor grad_out, Tensor grad, Tensor? A, Tensor S, Tensor? B, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("precondition_grouped(Tensor[] grads, Tensor?[] As, Tensor[] Ss, Tensor?[] Bs) -> Tensor[]");
  m.def(
      "precondition_grouped_backward(Tensor[] grad_outs, Tensor[] grads, Tensor?[] As, "
      "Tensor[] Ss, Tensor?[] Bs, bool[4] output_mask) -> (Tensor[], Tensor[], Tensor[], Tensor[])");
  m.def(
      "precondition_momentum_grouped(Tensor[] grads, Tensor[] momenta, float momentum, Tensor?[] As, "
      "Tensor[] Ss, Tensor?[] Bs, Tensor(a!)[] vs, Tensor(b!)[] out, bool carry=False, "
      "Tensor?[]? bias_grads=None) -> Tensor");
  m.def("all_finite(Tensor[] tensors) -> Tensor");
  m.def("lookahead_write(Tensor[] params, Tensor[] deltas, Tensor(a!)[] out) -> Tensor");
  m.def(
      "sgd_lookahead(Tensor[] params, Tensor[] grads, Tensor[] momenta, float grad_coef, float momentum_coef, "
      "float decay_coef, Tensor(a!)[] deltas, Tensor(b!)[] out) -> Tensor");
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momenta, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize) -> Tensor");
  m.def("dot_sum(Tensor[] a, Tensor[] b) -> Tensor");
  m.def(
      "dot_adam_step(Tensor[] a, Tensor[] b, int[] segments, Tensor(a!) param, Tensor(b!) exp_avg, "
      "Tensor(c!) exp_avg_sq, Tensor(d!) step, float lr, float beta1, float beta2, float eps) -> Tensor");
  m.def("kron_precondition(Tensor grad, Tensor? L, Tensor? R, Tensor(a!) out) -> ()");
  m.def("kl_value_and_grad(Tensor new_out, Tensor old_out, float scale) -> (Tensor, Tensor)");  // discrepancy.cpp
  // The GEMM engine of the CPU direct path's fp32 layers in this process (cpu_gemm.h): "blas", "onednn" or
  // "onednn (big layers: torch matmul)".
  m.def("cpu_gemm_engine() -> str", [] { return apo::cpu_gemm::description(); });
  // What the CPU op does with a bf16 layer from 128·128·256 of cost up (cpu_gemm.h), forward and
  // backward: "bf16" (bf16 GEMM operands, as the torch chain in bf16) or "fp32" (in fp32, rounded once).
  m.def("cpu_bf16_gemm() -> str", [] { return apo::cpu_gemm::bf16_description(); });
  // Two intra-op threads' cache-line round trip in ns, NaN without a second thread (cpu_handoff.h).
  m.def("cpu_thread_handoff_ns(int rounds) -> float", &apo::handoff::round_trip_ns);
}

TORCH_LIBRARY_IMPL(apo, CPU, m) {
  m.impl("precondition", &apo::precondition_cpu);
  m.impl("precondition_backward", &apo::precondition_backward_cpu);
  m.impl("precondition_grouped", &apo::precondition_grouped_cpu);
  m.impl("precondition_grouped_backward", &apo::precondition_grouped_backward_cpu);
  m.impl("precondition_momentum_grouped", &apo::precondition_momentum_grouped_cpu);
  m.impl("all_finite", &apo::all_finite_cpu);
  m.impl("lookahead_write", &apo::lookahead_write_cpu);
  m.impl("sgd_lookahead", &apo::sgd_lookahead_cpu);
  m.impl("sgd_step", &apo::sgd_step_cpu);
  m.impl("dot_sum", &apo::dot_sum_cpu);
  m.impl("kron_precondition", &apo::kron_precondition_cpu);
}

// Every other device: the composition of ATen ops and the device's grouped op.
TORCH_LIBRARY_IMPL(apo, CompositeExplicitAutograd, m) {
  m.impl("precondition_momentum_grouped", &apo::precondition_momentum_grouped_any);
  m.impl("all_finite", &apo::all_finite_any);
  m.impl("lookahead_write", &apo::lookahead_write_any);
  m.impl("sgd_lookahead", &apo::sgd_lookahead_any);
  m.impl("sgd_step", &apo::sgd_step_any);
  m.impl("dot_sum", &apo::dot_sum_any);
  m.impl("dot_adam_step", &apo::dot_adam_step);  // (one kernel for every device: its CPU sums are direct)
  m.impl("kron_precondition", &apo::kron_precondition_any);
}
