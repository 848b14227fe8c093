// apo-kernels: the device code of csrc/cuda/precondition.cu (host code and op registration live there).
//
// Kept free of CUDA-only headers so that csrc/cuda/host_emulation.cpp can compile these exact
// kernels as plain C++ and run them on the CPU, one thread per block (every kernel here is correct
// for any blockDim, and __syncthreads is then a no-op): that is how the indexing of the kernels is
// tested on a machine without a GPU (tests/test_cuda.py::test_kernels_emulated_on_host).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace apo {
namespace kernels {

constexpr int64_t kSmallMaxDim = 64;  // fused small-layer kernel when m, n <= this
constexpr int kSmallThreads = 256;    // threads per block of the small-layer kernels

// A strided 2-D input matrix in global memory: element (i, j) is at p[i * s0 + j * s1].
struct StridedIn {
  const void* p;
  int64_t s0, s1;
};

// One layer (or one element of a 3-D batch) for the small-layer kernels. Outputs are contiguous
// (row-major, leading dimension = number of columns); a nullptr output is not computed.
struct LayerDesc {
  StridedIn g, dy, a, s, b;  // dy unused in the forward
  void* y;                   // forward: Y (m×n); backward: d_grad (m×n)
  void* da;                  // backward: dA (m×m)
  void* ds;                  // backward: dS (m×n)
  void* db;                  // backward: dB (n×n)
  int32_t m, n;
};

// Leading dimension of a shared-memory matrix with `cols` columns: made odd, so that walking a
// column (a transposed operand, stride = ld) hits 32 different banks.
inline constexpr int64_t smem_ld(int64_t cols) { return cols | 1; }

// Dynamic shared memory of one small-layer block, in elements of the compute type.
// Forward: A (m×m), B (n×n) + three m×n buffers (S, X, T).
// Backward: A, B + seven m×n buffers (S, G, dY, GB, dYB, H, D).
inline int64_t small_smem_elems(int64_t m, int64_t n, bool backward) {
  return m * smem_ld(m) + n * smem_ld(n) + (backward ? 7 : 3) * m * smem_ld(n);
}

// A read-only view of a shared-memory matrix: element (i, j) at p[i * s0 + j * s1]; a transpose
// is the same buffer with the strides swapped.
template <typename acc_t>
struct SmemView {
  const acc_t* p;
  int s0, s1;
  __device__ acc_t operator()(int i, int j) const { return p[i * s0 + j * s1]; }
};

// View of a row-major buffer with leading dimension ld, or of its transpose.
template <typename acc_t>
__device__ SmemView<acc_t> rowmajor(const acc_t* p, int ld) { return {p, ld, 1}; }
template <typename acc_t>
__device__ SmemView<acc_t> transposed(const acc_t* p, int ld) { return {p, 1, ld}; }

// Epilogue writing to a row-major shared-memory matrix, optionally multiplied elementwise by
// `scale` (same layout): this is where ⊙S is fused into the product that yields H.
template <typename acc_t>
struct StoreSmem {
  acc_t* out;
  int ld;
  const acc_t* scale;  // nullptr: no scaling
  __device__ void operator()(int i, int j, acc_t v) const {
    const int k = i * ld + j;
    out[k] = scale != nullptr ? v * scale[k] : v;
  }
};

// Epilogue writing to a contiguous global output, rounding once to the output dtype.
template <typename scalar_t, typename acc_t>
struct StoreGlobal {
  scalar_t* out;
  int ld;
  __device__ void operator()(int i, int j, acc_t v) const {
    out[static_cast<int64_t>(i) * ld + j] = static_cast<scalar_t>(v);
  }
};

// out(i, j) = Σ_k a1(i,k)·b1(k,j) [+ Σ_k a2(i,k)·b2(k,j)] for a rows×cols result, summed over
// `inner`; the second product is skipped when a2.p is nullptr. Each thread computes whole output
// elements; ends with a barrier so the next stage may read what was written. Must be called by
// every thread of the block (all callers branch only on block-uniform conditions).
template <typename acc_t, typename Store>
__device__ void block_gemm(int rows, int cols, int inner, SmemView<acc_t> a1, SmemView<acc_t> b1,
                           SmemView<acc_t> a2, SmemView<acc_t> b2, Store store) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int i = idx / cols;
    const int j = idx % cols;
    acc_t acc = 0;
    for (int k = 0; k < inner; ++k) acc += a1(i, k) * b1(k, j);
    if (a2.p != nullptr) {
      for (int k = 0; k < inner; ++k) acc += a2(i, k) * b2(k, j);
    }
    store(i, j, acc);
  }
  __syncthreads();
}

template <typename acc_t, typename Store>
__device__ void block_gemm(int rows, int cols, int inner, SmemView<acc_t> a, SmemView<acc_t> b,
                           Store store) {
  block_gemm(rows, cols, inner, a, b, SmemView<acc_t>{nullptr, 0, 0}, SmemView<acc_t>{nullptr, 0, 0},
             store);
}

// Copies a strided rows×cols global matrix into a row-major shared buffer with leading dimension
// ld, converting to acc_t. No barrier: callers issue one after all their loads.
template <typename scalar_t, typename acc_t>
__device__ void load_tile(acc_t* dst, int ld, StridedIn src, int rows, int cols) {
  const scalar_t* p = static_cast<const scalar_t*>(src.p);
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int i = idx / cols;
    const int j = idx % cols;
    dst[i * ld + j] = static_cast<acc_t>(p[i * src.s0 + j * src.s1]);
  }
}

// Dynamic shared memory, raw bytes: one name shared by every instantiation, cast per type.
// (The host emulation provides its own buffer of this name.)
#ifndef APO_HOST_EMULATION
extern __shared__ __align__(16) unsigned char apo_smem[];
#endif

// Forward of one small layer per block: Y = A (S ⊙ (Aᵀ (G B))) Bᵀ.
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallThreads) small_forward_kernel(const LayerDesc* layers) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDesc& L = layers[blockIdx.x];
  const int m = L.m, n = L.n;
  const int lm = static_cast<int>(smem_ld(m)), ln = static_cast<int>(smem_ld(n));
  acc_t* sA = reinterpret_cast<acc_t*>(apo_smem);  // m×m
  acc_t* sB = sA + m * lm;                          // n×n
  acc_t* sS = sB + n * ln;                          // m×n
  acc_t* sX = sS + m * ln;                          // m×n: G, then M
  acc_t* sT = sX + m * ln;                          // m×n: G B, then A M

  load_tile<scalar_t>(sA, lm, L.a, m, m);
  load_tile<scalar_t>(sB, ln, L.b, n, n);
  load_tile<scalar_t>(sS, ln, L.s, m, n);
  load_tile<scalar_t>(sX, ln, L.g, m, n);
  __syncthreads();

  block_gemm(m, n, n, rowmajor(sX, ln), rowmajor(sB, ln), StoreSmem<acc_t>{sT, ln, nullptr});  // T = G B
  block_gemm(m, n, m, transposed(sA, lm), rowmajor(sT, ln), StoreSmem<acc_t>{sX, ln, sS});     // X = S⊙(AᵀT) = M
  block_gemm(m, n, m, rowmajor(sA, lm), rowmajor(sX, ln), StoreSmem<acc_t>{sT, ln, nullptr});  // T = A M
  block_gemm(m, n, n, rowmajor(sT, ln), transposed(sB, ln),                                   // Y = T Bᵀ
             StoreGlobal<scalar_t, acc_t>{static_cast<scalar_t*>(L.y), n});
}

// Backward of one small layer per block; computes the outputs whose pointers are non-null.
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallThreads) small_backward_kernel(const LayerDesc* layers) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDesc& L = layers[blockIdx.x];
  const int m = L.m, n = L.n;
  const int lm = static_cast<int>(smem_ld(m)), ln = static_cast<int>(smem_ld(n));
  acc_t* sA = reinterpret_cast<acc_t*>(apo_smem);  // m×m
  acc_t* sB = sA + m * lm;                          // n×n
  acc_t* sS = sB + n * ln;                          // m×n: S, then A E
  acc_t* sG = sS + m * ln;                          // m×n
  acc_t* sdY = sG + m * ln;                         // m×n
  acc_t* sGB = sdY + m * ln;                        // m×n: G B, then A M
  acc_t* sdYB = sGB + m * ln;                       // m×n: dY B
  acc_t* sH = sdYB + m * ln;                        // m×n: H, then M
  acc_t* sD = sH + m * ln;                          // m×n: D, then E

  load_tile<scalar_t>(sA, lm, L.a, m, m);
  load_tile<scalar_t>(sB, ln, L.b, n, n);
  load_tile<scalar_t>(sS, ln, L.s, m, n);
  load_tile<scalar_t>(sG, ln, L.g, m, n);
  load_tile<scalar_t>(sdY, ln, L.dy, m, n);
  __syncthreads();

  block_gemm(m, n, n, rowmajor(sG, ln), rowmajor(sB, ln), StoreSmem<acc_t>{sGB, ln, nullptr});     // GB = G B
  block_gemm(m, n, n, rowmajor(sdY, ln), rowmajor(sB, ln), StoreSmem<acc_t>{sdYB, ln, nullptr});   // dYB = dY B
  block_gemm(m, n, m, transposed(sA, lm), rowmajor(sGB, ln), StoreSmem<acc_t>{sH, ln, nullptr});   // H = Aᵀ GB
  block_gemm(m, n, m, transposed(sA, lm), rowmajor(sdYB, ln), StoreSmem<acc_t>{sD, ln, nullptr});  // D = Aᵀ dYB

  // One pass over D, H, S: dS = D⊙H to global; M = S⊙H and E = S⊙D in place.
  scalar_t* ds = static_cast<scalar_t*>(L.ds);
  for (int idx = threadIdx.x; idx < m * n; idx += blockDim.x) {
    const int k = (idx / n) * ln + idx % n;
    const acc_t d = sD[k], h = sH[k], s = sS[k];
    if (ds != nullptr) ds[idx] = static_cast<scalar_t>(d * h);
    sH[k] = s * h;
    sD[k] = s * d;
  }
  __syncthreads();
  const acc_t* sM = sH;
  const acc_t* sE = sD;

  if (L.da != nullptr) {  // dA = dYB Mᵀ + GB Eᵀ  (m×m, summed over n)
    block_gemm(m, m, n, rowmajor(sdYB, ln), transposed(sM, ln), rowmajor(sGB, ln), transposed(sE, ln),
               StoreGlobal<scalar_t, acc_t>{static_cast<scalar_t*>(L.da), m});
  }
  // S is no longer needed: its buffer takes A E (used by both d_grad and dB).
  acc_t* sAE = sS;
  if (L.y != nullptr || L.db != nullptr) {
    block_gemm(m, n, m, rowmajor(sA, lm), rowmajor(sE, ln), StoreSmem<acc_t>{sAE, ln, nullptr});
  }
  if (L.y != nullptr) {  // d_grad = (A E) Bᵀ
    block_gemm(m, n, n, rowmajor(sAE, ln), transposed(sB, ln),
               StoreGlobal<scalar_t, acc_t>{static_cast<scalar_t*>(L.y), n});
  }
  if (L.db != nullptr) {  // dB = dYᵀ (A M) + Gᵀ (A E)  (n×n, summed over m)
    acc_t* sAM = sGB;  // GB was last read by dA, which has finished (barrier in block_gemm)
    block_gemm(m, n, m, rowmajor(sA, lm), rowmajor(sM, ln), StoreSmem<acc_t>{sAM, ln, nullptr});
    block_gemm(n, n, m, transposed(sdY, ln), rowmajor(sAM, ln), transposed(sG, ln), rowmajor(sAE, ln),
               StoreGlobal<scalar_t, acc_t>{static_cast<scalar_t*>(L.db), n});
  }
}

// Large-layer path's elementwise pass, over numel contiguous elements, reading S and (if non-null)
// H and D once each:  dS = D⊙H (if dS),  E = S⊙D (if E),  M = S⊙H (if M). H is null when only E is
// wanted (d_grad alone needs no H); M and dS then are null too.
// Computes in opmath (fp32 for half types) and rounds once on store. M may alias H and E may alias
// D (each element is read before it is written, by the same thread), so no __restrict__.
template <typename scalar_t>
__global__ void elementwise_kernel(int64_t numel, const scalar_t* S, const scalar_t* H,
                                   const scalar_t* D, scalar_t* M, scalar_t* E, scalar_t* dS) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const acc_t s = static_cast<acc_t>(S[i]);
    const acc_t h = H != nullptr ? static_cast<acc_t>(H[i]) : acc_t(0);
    const acc_t d = D != nullptr ? static_cast<acc_t>(D[i]) : acc_t(0);
    if (dS != nullptr) dS[i] = static_cast<scalar_t>(d * h);
    if (E != nullptr) E[i] = static_cast<scalar_t>(s * d);
    if (M != nullptr) M[i] = static_cast<scalar_t>(s * h);
  }
}

}  // namespace kernels
}  // namespace apo
