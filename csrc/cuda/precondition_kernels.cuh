// apo-kernels: the device code of csrc/cuda/precondition.cu (host code and op registration live there).
//
// Kept free of CUDA-only headers so that csrc/cuda/host_emulation.cpp can compile these exact
// kernels as plain C++ and run them on the CPU: each CUDA thread of a block runs as a fiber, the
// threads of a block in lockstep from one __syncthreads to the next (tests/test_cuda.py::
// test_kernels_emulated_on_host). That checks indexing, shared-memory layout and buffer reuse, and
// that every barrier is reached by the whole block; running odd blocks' threads in reverse order
// also exposes a read of another thread's write that lacks a barrier in between.
//
// Small-layer kernels: one block per layer (a table of descriptors, so a grouped call or a 3-D
// batch is one launch per shared-memory size class). Every product is register-tiled: a thread
// computes a kTile×kTile micro-tile, reading kTile values of each operand per step of the inner
// dimension (kTile² FMAs per 2·kTile shared-memory loads; one output per thread needed 2 loads per
// FMA). Intermediates live in shared memory; the factors A, B (and in the backward's last product
// G, dY) are read from global memory in K-chunks of kChunk through a small staging buffer, so only
// 2 (forward) or 4 (backward) m×n buffers are resident. A factor with a null pointer is the
// identity: its products are skipped (the other operand is taken as the result).
//
// Resources per kernel (nvcc 13.0, -O3, `-Xptxas -v`, sm_80 and sm_90 alike unless noted: registers
// per thread, no spills, no stack; dynamic shared memory at 64×64 in KiB, fp32 compute for
// fp32/fp16/bf16; blocks per SM allowed by shared memory (A100 164 KiB, H100 228 KiB per SM, 1 KiB
// reserved per block), and by registers where they allow fewer):
//                        registers           shared memory    blocks per SM
//   forward fp32/half    64                  36.8             A100 4, H100 6 (registers: 4)
//   backward fp32/half   80                  73.5             A100 2, H100 3
//   forward fp64         105 (sm_90: 108)    73.5             A100 2, H100 3 (registers: 2)
//   backward fp64        184                 147              1
// The one-output-per-thread kernels they replace held A, B and 3 (forward) or 7 (backward) m×n
// buffers: 146 KB for the fp32 backward at 64×64 (one block per SM), 292 KB in fp64 (did not fit).
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace apo {
namespace kernels {

constexpr int64_t kSmallMaxDim = 64;  // fused small-layer kernel when m, n <= this
constexpr int kTile = 4;              // a thread computes kTile×kTile outputs of a product
constexpr int kChunk = 16;            // K-chunk of an operand staged from global memory
constexpr int kChunkLd = kChunk + 1;  // leading dimension of a staged rows×kChunk chunk (odd: no bank conflicts)

// Shared-memory size classes of the small-layer path: a layer belongs to the smallest class bound
// >= max(m, n). The host launches once per class, with that class's thread count and the shared
// memory of its largest layer, so small layers are not sized (or threaded) for a 64×64 one.
constexpr int64_t kSmallClasses[] = {16, 32, 64};

inline int64_t small_size_class(int64_t m, int64_t n) {
  const int64_t d = m > n ? m : n;
  for (int64_t c : kSmallClasses) {
    if (d <= c) return c;
  }
  return kSmallMaxDim;
}

// Threads per block for a size class: one per micro-tile of the largest product (bound×bound),
// rounded up to whole warps. The kernels require blockDim.x >= the micro-tiles of every product
// of the layer, i.e. at least this many threads for the layer's class.
inline constexpr int small_class_threads(int64_t bound) {
  const int64_t side = (bound + kTile - 1) / kTile;
  return static_cast<int>((side * side + 31) / 32 * 32);
}
constexpr int kSmallThreads = small_class_threads(kSmallMaxDim);  // 256: the largest class

// Blocks of 256 threads per SM that the registers must allow (__launch_bounds__: at most 64
// registers a thread for 4 blocks, 80 for 3, 128 for 2), close to what shared memory admits at
// 64×64 on an H100 (table at the top): fp32 compute 4 forward and 3 backward; fp64 2 and 1.
template <typename acc_t>
constexpr int small_min_blocks(bool backward) {
  return sizeof(acc_t) <= 4 ? (backward ? 3 : 4) : (backward ? 1 : 2);
}

// A strided 2-D input matrix in global memory: element (i, j) is at p[i * s0 + j * s1].
// For the factors A and B, p == nullptr means the identity.
struct StridedIn {
  const void* p;
  int64_t s0, s1;
};

// One layer (or one element of a 3-D batch) for the small-layer kernels. Outputs are contiguous
// (row-major, leading dimension = number of columns); a nullptr output is not computed. With an
// identity A (a.p == nullptr) dA is never computed, nor dB with an identity B.
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

// Dynamic shared memory of one small-layer block, in elements of the compute type: the resident
// m×n buffers (forward 2, backward 4) and one staging area for K-chunks of global operands (a
// left operand's chunk is rows×kChunkLd, a right operand's kChunk×smem_ld(cols); the backward's
// last product stages two n×kChunkLd chunks, of dYᵀ and Gᵀ).
inline int64_t small_smem_elems(int64_t m, int64_t n, bool backward) {
  const int64_t buffer = m * smem_ld(n);
  const int64_t left = m * kChunkLd, right = kChunk * smem_ld(n), two_left_t = 2 * n * kChunkLd;
  int64_t staging = left > right ? left : right;
  if (backward && two_left_t > staging) staging = two_left_t;
  return (backward ? 4 : 2) * buffer + staging;
}

__device__ inline int imin(int a, int b) { return a < b ? a : b; }

// A read-only view of a shared-memory matrix: element (i, j) at p[i * s0 + j * s1]; a transpose
// is the same buffer with the strides swapped. p == nullptr: the identity.
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

// The transpose of a global matrix (the same memory, strides swapped); the identity stays itself.
__device__ inline StridedIn transposed(StridedIn m) { return {m.p, m.s1, m.s0}; }

// Element (i, j) of a global matrix, converted to the compute type.
template <typename scalar_t, typename acc_t>
__device__ acc_t global_at(StridedIn m, int i, int j) {
  return static_cast<acc_t>(static_cast<const scalar_t*>(m.p)[i * m.s0 + j * m.s1]);
}

// Copies a strided rows×cols global matrix, starting at element (i0, j0), into a row-major shared
// buffer with leading dimension ld, converting to acc_t. Consecutive threads walk the smaller of
// the two global strides (coalesced for either layout; the odd ld keeps the shared stores free of
// bank conflicts both ways). No barrier: callers issue one after all their loads.
template <typename scalar_t, typename acc_t>
__device__ void load_tile(acc_t* dst, int ld, StridedIn src, int i0, int j0, int rows, int cols) {
  const scalar_t* p = static_cast<const scalar_t*>(src.p) + i0 * src.s0 + j0 * src.s1;
  const bool along_rows = (src.s1 < 0 ? -src.s1 : src.s1) <= (src.s0 < 0 ? -src.s0 : src.s0);
  for (int idx = threadIdx.x; idx < rows * cols; idx += blockDim.x) {
    const int i = along_rows ? idx / cols : idx % rows;
    const int j = along_rows ? idx % cols : idx / rows;
    dst[i * ld + j] = static_cast<acc_t>(p[i * src.s0 + j * src.s1]);
  }
}

// The micro-tile of a rows×cols product that this thread computes: rows i0 + r·rs, columns
// j0 + c·cs (r, c < kTile), with rs = ceil(rows / kTile), cs = ceil(cols / kTile). Strided, so that
// the threads of a warp read consecutive columns of the right operand (and broadcast the left).
// Threads beyond rs·cs hold no tile. Out-of-range rows/columns of a tile are clamped for loads
// (computed, never stored).
struct TileMap {
  int rows, cols, rs, cs, i0, j0;
  bool active;
  __device__ int row(int r) const { return imin(i0 + r * rs, rows - 1); }
  __device__ int col(int c) const { return imin(j0 + c * cs, cols - 1); }
};

__device__ inline TileMap tile_map(int rows, int cols) {
  TileMap t;
  t.rows = rows;
  t.cols = cols;
  t.rs = (rows + kTile - 1) / kTile;
  t.cs = (cols + kTile - 1) / kTile;
  const int tid = static_cast<int>(threadIdx.x);
  t.active = tid < t.rs * t.cs;
  t.i0 = t.active ? tid / t.cs : 0;
  t.j0 = t.active ? tid % t.cs : 0;
  return t;
}

// One thread's accumulators (registers: every index is a compile-time constant after unrolling).
template <typename acc_t>
struct Acc {
  acc_t v[kTile][kTile];
  __device__ void zero() {
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
#pragma unroll
      for (int c = 0; c < kTile; ++c) v[r][c] = acc_t(0);
    }
  }
};

// Calls f(r, c, i, j) for each output (i, j) = (i0 + r·rs, j0 + c·cs) that this thread owns.
template <typename F>
__device__ void for_owned(const TileMap& t, F f) {
  if (!t.active) return;
#pragma unroll
  for (int r = 0; r < kTile; ++r) {
#pragma unroll
    for (int c = 0; c < kTile; ++c) {
      const int i = t.i0 + r * t.rs, j = t.j0 + c * t.cs;
      if (i < t.rows && j < t.cols) f(r, c, i, j);
    }
  }
}

// acc(i, j) += Σ_{k < kc} a(i, k)·b(k, j) over this thread's tile, for one K-chunk starting at k0
// (a and b are views of the chunk: k counts from k0). An identity operand (p == nullptr) is
// a(i, k) = [i == k0 + k] (or b(k, j) = [k0 + k == j]): then the other operand is added, no FMAs.
template <typename acc_t>
__device__ void fma_chunk(Acc<acc_t>& acc, const TileMap& t, SmemView<acc_t> a, SmemView<acc_t> b, int k0,
                          int kc) {
  if (!t.active) return;
  if (a.p == nullptr || b.p == nullptr) {
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
#pragma unroll
      for (int c = 0; c < kTile; ++c) {
        const int i = t.i0 + r * t.rs, j = t.j0 + c * t.cs;
        if (a.p == nullptr && i >= k0 && i < k0 + kc) acc.v[r][c] += b(i - k0, t.col(c));
        if (b.p == nullptr && j >= k0 && j < k0 + kc) acc.v[r][c] += a(t.row(r), j - k0);
      }
    }
    return;
  }
  for (int k = 0; k < kc; ++k) {
    acc_t av[kTile], bv[kTile];
#pragma unroll
    for (int r = 0; r < kTile; ++r) av[r] = a(t.row(r), k);
#pragma unroll
    for (int c = 0; c < kTile; ++c) bv[c] = b(k, t.col(c));
#pragma unroll
    for (int r = 0; r < kTile; ++r) {
#pragma unroll
      for (int c = 0; c < kTile; ++c) acc.v[r][c] += av[r] * bv[c];
    }
  }
}

// An operand of a product: resident in shared memory (`smem`), or a global matrix (`global`)
// read through `staging` one K-chunk at a time, or, with both null, the identity. The left
// operand of a rows×cols product over `inner` is rows×inner, the right one inner×cols.
template <typename acc_t>
struct Operand {
  SmemView<acc_t> smem;
  StridedIn global;
  acc_t* staging;
};

template <typename acc_t>
__device__ Operand<acc_t> resident(SmemView<acc_t> v) { return {v, {nullptr, 0, 0}, nullptr}; }
// A global matrix (a factor: nullptr stays the identity) staged through `staging`.
template <typename acc_t>
__device__ Operand<acc_t> staged(StridedIn m, acc_t* staging) { return {{nullptr, 0, 0}, m, staging}; }

// Loads the chunk [k0, k0 + kc) of a staged operand into its staging area; false if not staged.
template <typename scalar_t, typename acc_t>
__device__ bool stage_left(const Operand<acc_t>& a, int rows, int k0, int kc) {
  if (a.global.p == nullptr) return false;
  load_tile<scalar_t>(a.staging, kChunkLd, a.global, 0, k0, rows, kc);
  return true;
}
template <typename scalar_t, typename acc_t>
__device__ bool stage_right(const Operand<acc_t>& b, int cols, int k0, int kc) {
  if (b.global.p == nullptr) return false;
  load_tile<scalar_t>(b.staging, static_cast<int>(smem_ld(cols)), b.global, k0, 0, kc, cols);
  return true;
}

// Views of the chunk starting at k0 (identity: a null view).
template <typename acc_t>
__device__ SmemView<acc_t> chunk_left(const Operand<acc_t>& a, int k0) {
  if (a.smem.p != nullptr) return {a.smem.p + k0 * a.smem.s1, a.smem.s0, a.smem.s1};
  if (a.global.p != nullptr) return rowmajor<acc_t>(a.staging, kChunkLd);
  return {nullptr, 0, 0};
}
template <typename acc_t>
__device__ SmemView<acc_t> chunk_right(const Operand<acc_t>& b, int k0, int cols) {
  if (b.smem.p != nullptr) return {b.smem.p + k0 * b.smem.s0, b.smem.s0, b.smem.s1};
  if (b.global.p != nullptr) return rowmajor<acc_t>(b.staging, static_cast<int>(smem_ld(cols)));
  return {nullptr, 0, 0};
}

// acc1 += a1·b1 and, when acc2 is given, acc2 += a2·b2 (acc2 may be &acc1: a sum of two products),
// for the tile `t` of a product over `inner`, in K-chunks. Staged operands are loaded once per
// chunk, between two barriers; an operand of the second product with the same staging area as
// one of the first is the same operand, loaded once. Must be reached by every thread of the block
// with the same operands (a thread without a tile computes nothing but joins the barriers).
template <typename scalar_t, typename acc_t>
__device__ void tile_products(const TileMap& t, int inner, const Operand<acc_t>& a1, const Operand<acc_t>& b1,
                              Acc<acc_t>& acc1, const Operand<acc_t>* a2 = nullptr,
                              const Operand<acc_t>* b2 = nullptr, Acc<acc_t>* acc2 = nullptr) {
  for (int k0 = 0; k0 < inner; k0 += kChunk) {
    const int kc = imin(kChunk, inner - k0);
    bool staged_any = stage_left<scalar_t>(a1, t.rows, k0, kc);
    staged_any |= stage_right<scalar_t>(b1, t.cols, k0, kc);
    if (acc2 != nullptr) {
      if (a2->staging != a1.staging) staged_any |= stage_left<scalar_t>(*a2, t.rows, k0, kc);
      if (b2->staging != b1.staging) staged_any |= stage_right<scalar_t>(*b2, t.cols, k0, kc);
    }
    if (staged_any) __syncthreads();
    fma_chunk(acc1, t, chunk_left(a1, k0), chunk_right(b1, k0, t.cols), k0, kc);
    if (acc2 != nullptr) fma_chunk(*acc2, t, chunk_left(*a2, k0), chunk_right(*b2, k0, t.cols), k0, kc);
    if (staged_any) __syncthreads();  // the next chunk overwrites the staging area
  }
}

// Dynamic shared memory, raw bytes: one name shared by every instantiation, cast per type.
// (The host emulation provides its own buffer of this name.)
#ifndef APO_HOST_EMULATION
extern __shared__ __align__(16) unsigned char apo_smem[];
#endif

// Forward of one small layer per block: Y = A (S ⊙ (Aᵀ (G B))) Bᵀ, in four register-tiled
// products through two resident buffers.
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallThreads, small_min_blocks<at::opmath_type<scalar_t>>(false))
    small_forward_kernel(const LayerDesc* layers) {
  using acc_t = at::opmath_type<scalar_t>;
  const LayerDesc& L = layers[blockIdx.x];
  const int m = L.m, n = L.n;
  const int ln = static_cast<int>(smem_ld(n));
  acc_t* p0 = reinterpret_cast<acc_t*>(apo_smem);  // G, then M
  acc_t* p1 = p0 + m * ln;                          // G B, then A M
  acc_t* stage = p1 + m * ln;                       // K-chunks of A or B
  const TileMap t = tile_map(m, n);
  Acc<acc_t> acc;
  auto store_to = [&](acc_t* dst, const Acc<acc_t>& from) {
    for_owned(t, [&](int r, int c, int i, int j) { dst[i * ln + j] = from.v[r][c]; });
  };

  load_tile<scalar_t>(p0, ln, L.g, 0, 0, m, n);
  __syncthreads();
  acc.zero();  // p1 = G B
  tile_products<scalar_t>(t, n, resident(rowmajor<acc_t>(p0, ln)), staged(L.b, stage), acc);
  store_to(p1, acc);
  __syncthreads();
  acc.zero();  // p0 = M = S ⊙ (Aᵀ p1)
  tile_products<scalar_t>(t, m, staged(transposed(L.a), stage), resident(rowmajor<acc_t>(p1, ln)), acc);
  for_owned(t, [&](int r, int c, int i, int j) {
    p0[i * ln + j] = acc.v[r][c] * global_at<scalar_t, acc_t>(L.s, i, j);
  });
  __syncthreads();
  acc.zero();  // p1 = A M
  tile_products<scalar_t>(t, m, staged(L.a, stage), resident(rowmajor<acc_t>(p0, ln)), acc);
  store_to(p1, acc);
  __syncthreads();
  acc.zero();  // Y = p1 Bᵀ
  tile_products<scalar_t>(t, n, resident(rowmajor<acc_t>(p1, ln)), staged(transposed(L.b), stage), acc);
  scalar_t* y = static_cast<scalar_t*>(L.y);
  for_owned(t, [&](int r, int c, int i, int j) { y[i * n + j] = static_cast<scalar_t>(acc.v[r][c]); });
}

// Backward of one small layer per block; computes the outputs whose pointers are non-null.
//   GB = G B, dYB = dY B;  H = Aᵀ GB, D = Aᵀ dYB;  dS = D⊙H, M = S⊙H, E = S⊙D;
//   dA = dYB Mᵀ + GB Eᵀ;  AE = A E, AM = A M;  d_grad = AE Bᵀ;  dB = dYᵀ AM + Gᵀ AE.
// Products that share an operand run together (one load of it feeds both accumulators).
template <typename scalar_t>
__global__ void __launch_bounds__(kSmallThreads, small_min_blocks<at::opmath_type<scalar_t>>(true))
    small_backward_kernel(const LayerDesc* layers) {
  using acc_t = at::opmath_type<scalar_t>;
  using Op = Operand<acc_t>;
  const LayerDesc& L = layers[blockIdx.x];
  const int m = L.m, n = L.n;
  const int ln = static_cast<int>(smem_ld(n));
  acc_t* p0 = reinterpret_cast<acc_t*>(apo_smem);  // G B, then A E
  acc_t* p1 = p0 + m * ln;                          // dY B, then A M
  acc_t* p2 = p1 + m * ln;                          // G, then M
  acc_t* p3 = p2 + m * ln;                          // dY, then E
  acc_t* stage = p3 + m * ln;                       // K-chunks of A, B, dYᵀ and Gᵀ

  scalar_t* d_grad = static_cast<scalar_t*>(L.y);
  scalar_t* dA = L.a.p != nullptr ? static_cast<scalar_t*>(L.da) : nullptr;
  scalar_t* dS = static_cast<scalar_t*>(L.ds);
  scalar_t* dB = L.b.p != nullptr ? static_cast<scalar_t*>(L.db) : nullptr;
  const bool need_h = dA != nullptr || dS != nullptr || dB != nullptr;  // d_grad alone: no G B, no H
  const TileMap t = tile_map(m, n);
  Acc<acc_t> x, z;
  auto store_to = [&](acc_t* dst, const Acc<acc_t>& acc) {
    for_owned(t, [&](int r, int c, int i, int j) { dst[i * ln + j] = acc.v[r][c]; });
  };
  auto view = [&](const acc_t* p) { return resident(rowmajor<acc_t>(p, ln)); };
  auto view_t = [&](const acc_t* p) { return resident(transposed<acc_t>(p, ln)); };

  if (need_h) load_tile<scalar_t>(p2, ln, L.g, 0, 0, m, n);
  load_tile<scalar_t>(p3, ln, L.dy, 0, 0, m, n);
  __syncthreads();
  {  // p1 = dY B, p0 = G B
    x.zero();
    z.zero();
    const Op b = staged(L.b, stage), dy = view(p3), g = view(p2);
    if (need_h) {
      tile_products<scalar_t>(t, n, dy, b, z, &g, &b, &x);
      store_to(p0, x);
    } else {
      tile_products<scalar_t>(t, n, dy, b, z);
    }
    store_to(p1, z);
    __syncthreads();
  }
  {  // D = Aᵀ dYB, H = Aᵀ GB; dS = D⊙H, p2 = M = S⊙H, p3 = E = S⊙D
    x.zero();
    z.zero();
    const Op at = staged(transposed(L.a), stage), dyb = view(p1), gb = view(p0);
    if (need_h) {
      tile_products<scalar_t>(t, m, at, dyb, z, &at, &gb, &x);
    } else {
      tile_products<scalar_t>(t, m, at, dyb, z);
    }
    for_owned(t, [&](int r, int c, int i, int j) {
      const acc_t h = x.v[r][c], d = z.v[r][c], s = global_at<scalar_t, acc_t>(L.s, i, j);
      if (dS != nullptr) dS[i * n + j] = static_cast<scalar_t>(d * h);
      p2[i * ln + j] = s * h;
      p3[i * ln + j] = s * d;
    });
    __syncthreads();
  }
  if (dA != nullptr) {  // dA = dYB Mᵀ + GB Eᵀ  (m×m over n)
    const TileMap ta = tile_map(m, m);
    x.zero();
    const Op dyb = view(p1), mt = view_t(p2), gb = view(p0), et = view_t(p3);
    tile_products<scalar_t>(ta, n, dyb, mt, x, &gb, &et, &x);
    for_owned(ta, [&](int r, int c, int i, int j) { dA[i * m + j] = static_cast<scalar_t>(x.v[r][c]); });
    __syncthreads();  // p0, p1 are overwritten next
  }
  if (d_grad != nullptr || dB != nullptr) {  // p0 = A E, p1 = A M (for dB)
    x.zero();
    z.zero();
    const Op a = staged(L.a, stage), e = view(p3), mm = view(p2);
    if (dB != nullptr) {
      tile_products<scalar_t>(t, m, a, e, x, &a, &mm, &z);
      store_to(p1, z);
    } else {
      tile_products<scalar_t>(t, m, a, e, x);
    }
    store_to(p0, x);
    __syncthreads();
  }
  if (d_grad != nullptr) {  // d_grad = AE Bᵀ
    x.zero();
    tile_products<scalar_t>(t, n, view(p0), staged(transposed(L.b), stage), x);
    for_owned(t, [&](int r, int c, int i, int j) { d_grad[i * n + j] = static_cast<scalar_t>(x.v[r][c]); });
    __syncthreads();  // the staging area is reused by dB
  }
  if (dB != nullptr) {  // dB = dYᵀ AM + Gᵀ AE  (n×n over m; dYᵀ and Gᵀ staged side by side)
    const TileMap tb = tile_map(n, n);
    x.zero();
    const Op dyt = staged(transposed(L.dy), stage), am = view(p1);
    const Op gt = staged(transposed(L.g), stage + n * kChunkLd), ae = view(p0);
    tile_products<scalar_t>(tb, m, dyt, am, x, &gt, &ae, &x);
    for_owned(tb, [&](int r, int c, int i, int j) { dB[i * n + j] = static_cast<scalar_t>(x.v[r][c]); });
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
