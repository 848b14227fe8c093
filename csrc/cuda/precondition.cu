// apo-kernels: CUDA implementation of the structured-preconditioner op (TORCH_LIBRARY_IMPL(apo, CUDA)).
//
//     Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ            G, S (m×n), A (m×m), B (n×n); 2-D or batched 3-D
//
// Backward with upstream dY, H = AᵀGB, M = S⊙H:
//     D = Aᵀ dY B,  E = S⊙D,  dS = D⊙H,  dG = A E Bᵀ,
//     dA = dY B Mᵀ + G B Eᵀ,  dB = dYᵀ A M + Gᵀ A E
// Schemas, masks and output conventions: docs/CONTRACT.md. Every entry point first applies the input
// rules of ../apo_checks.h (shared with the CPU kernels, the same as the Python API's). The kernels
// themselves are in precondition_kernels.cuh (host-compilable, so host_emulation.cpp can run them on
// a CPU in tests).
//
// Two paths, chosen per layer (a 3-D batch counts as L layers of one shape):
//
// 1. Small layers (m, n <= kSmallMaxDim = 64, and the layer's fp32 working set fits in shared memory):
//    ONE fused kernel per call and stage (forward, or backward). One thread block per layer walks a
//    device-side table of layer descriptors (pointers, strides, m, n), so a whole grouped call of
//    small layers — or a 3-D batch — is a single launch (plus the one H2D copy of the table). The block
//    loads A, B, S, G (and dY) into shared memory as fp32 (fp64 for double), reading arbitrary
//    strides (no .contiguous() copies; odd leading dimensions in shared memory against bank
//    conflicts), and does every product there; ⊙S is fused into the epilogue
//    of the product that yields H, and dS, E, M come from one pass over D and H. Results are rounded
//    once, on the store to global memory. The products are plain fp32 CUDA-core dot products (no
//    tensor cores): at these sizes the work is launch- and latency-bound, not FLOP-bound.
//
// 2. Large layers: the GEMMs go through cuBLAS via ATen (at::matmul / addmm / baddbmm; tensor cores
//    for fp16/bf16, and for fp32 only if the user enabled TF32 with torch.backends.cuda.matmul —
//    this op follows that global setting like torch.matmul does). Transposes are cuBLAS flags, not
//    copies; the "+" of dA and dB is the beta=1 of a second GEMM. The elementwise parts are ONE
//    custom kernel per stage: M = S⊙H in place (forward), and dS = D⊙H, E = S⊙D, M = S⊙H from a
//    single read of D, H, S (backward, only what the mask needs). What is NOT fused: ⊙S is not in a
//    GEMM epilogue on this path (that would need a custom CUTLASS GEMM); it costs one extra pass over
//    the m×n intermediates, small next to the 4 (forward) to 10 (backward) GEMMs of O(mn(m+n)).
//    Large layers of a grouped call are processed one after another on this path (each is GEMM-bound,
//    so the per-layer launches are not the bottleneck).
//
// Precision on the large path (fp16/bf16 inputs):
//  - max(m, n) <= kUpcastMaxDim (256): inputs are upcast to fp32 and everything runs in fp32, rounding
//    once on store (the contract's "compute in fp32, round once"). Cheap at these sizes.
//  - larger: GEMMs run in the input dtype on tensor cores with fp32 accumulation (cuBLAS
//    CUBLAS_COMPUTE_32F; torch's allow_{fp16,bf16}_reduced_precision_reduction flags apply), and each
//    GEMM's output — the intermediates GB, H, dYB, D, AM, AE — is rounded to the input dtype; the
//    elementwise kernel computes in fp32 and rounds once. Simulated on CPU this gives ~3e-3 (bf16) and
//    ~4e-4 (fp16) relative error vs float64, the same as the plain torch chain in that dtype. Keeping
//    fp32 intermediates would force fp32 GEMMs (no bf16/fp16 tensor cores), ~10x slower on H100.
//    fp16 intermediates can overflow where the torch chain would too.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../apo_checks.h"
#include "precondition_kernels.cuh"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

namespace apo {
namespace {

using at::Tensor;
using at::TensorList;
using Mask = std::array<bool, 4>;  // (d_grad, dA, dS, dB)
using TensorVec = std::vector<Tensor>;

constexpr int64_t kUpcastMaxDim = 256;  // large path: fp16/bf16 computed in fp32 up to this size
constexpr int kElementwiseThreads = 256;

using kernels::elementwise_kernel;
using kernels::kSmallMaxDim;
using kernels::kSmallThreads;
using kernels::LayerDesc;
using kernels::small_backward_kernel;
using kernels::small_forward_kernel;
using kernels::small_smem_elems;
using kernels::StridedIn;

// ------------------------------------------------------------------------------------------------
// Small-layer path: descriptor table + one launch (kernels in precondition_kernels.cuh)
// ------------------------------------------------------------------------------------------------

size_t compute_elem_size(at::ScalarType dtype) {
  return c10::elementSize(at::toOpMathType(dtype));
}

// Whether a layer of this shape takes the fused small-layer kernel on the current device.
bool use_small_path(int64_t m, int64_t n, bool backward, at::ScalarType dtype) {
  if (m > kSmallMaxDim || n > kSmallMaxDim) return false;
  const size_t bytes = small_smem_elems(m, n, backward) * compute_elem_size(dtype);
  return bytes <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

StridedIn strided_in(const Tensor& t, int64_t batch) {
  const auto* base = static_cast<const char*>(t.data_ptr());
  if (t.dim() == 3) base += batch * t.stride(0) * static_cast<int64_t>(t.element_size());
  return {base, t.stride(-2), t.stride(-1)};
}

// Pointer to batch element `batch` of a contiguous output, or nullptr when it is not requested.
void* out_ptr(const Tensor& t, int64_t batch) {
  if (!t.defined()) return nullptr;
  auto* base = static_cast<char*>(t.data_ptr());
  if (t.dim() == 3) base += batch * t.stride(0) * static_cast<int64_t>(t.element_size());
  return base;
}

// Appends one descriptor per layer of a 2-D or 3-D layer. `dy`, and any output, may be undefined.
void append_layer(std::vector<LayerDesc>& table, const Tensor& g, const Tensor& dy, const Tensor& a,
                  const Tensor& s, const Tensor& b, const Tensor& y, const Tensor& da,
                  const Tensor& ds, const Tensor& db) {
  const int64_t batch = g.dim() == 3 ? g.size(0) : 1;
  for (int64_t l = 0; l < batch; ++l) {
    LayerDesc d{};
    d.g = strided_in(g, l);
    d.dy = dy.defined() ? strided_in(dy, l) : StridedIn{nullptr, 0, 0};
    d.a = strided_in(a, l);
    d.s = strided_in(s, l);
    d.b = strided_in(b, l);
    d.y = out_ptr(y, l);
    d.da = out_ptr(da, l);
    d.ds = out_ptr(ds, l);
    d.db = out_ptr(db, l);
    d.m = static_cast<int32_t>(g.size(-2));
    d.n = static_cast<int32_t>(g.size(-1));
    table.push_back(d);
  }
}

// Pinned host memory for the descriptor tables copied while a CUDA graph is being captured. A
// captured host-to-device copy is replayed from the same host address, so that memory must stay
// put and unchanged for as long as the graph may be replayed: parts of this arena are handed out
// once and never reused. (Outside capture a table comes from the caching host allocator, which
// keeps a block until the copy that reads it has run, then reuses it: fine for one launch, wrong
// for a replayed graph.) The arena is pinned on the first small-layer launch, which precedes any
// capture of it (capture needs a warm-up call).
class CapturedTableArena {
 public:
  static constexpr int64_t kBytes = int64_t{4} << 20;  // ~25k layers of captured descriptors

  void reserve() {
    std::lock_guard<std::mutex> lock(mu_);
    if (buf_ == nullptr) {
      // Deliberately never freed (a static destructor would run after CUDA is torn down).
      buf_ = new Tensor(at::empty({kBytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
    }
  }

  // A never-reused pinned part of `bytes` bytes (16-byte aligned).
  Tensor take(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t start = (used_ + 15) / 16 * 16;
    TORCH_CHECK(buf_ != nullptr && start + bytes <= kBytes,
                "apo (CUDA): no pinned memory left for descriptor tables captured into CUDA graphs (",
                kBytes >> 20, " MiB per process); call the op once outside capture first");
    used_ = start + bytes;
    return buf_->narrow(0, start, bytes);
  }

 private:
  std::mutex mu_;
  Tensor* buf_ = nullptr;
  int64_t used_ = 0;
};

CapturedTableArena& captured_tables() {
  static CapturedTableArena arena;
  return arena;
}

// Opts `kernel` in to the device's whole dynamic shared memory, once per kernel and device. The
// attribute belongs to the function, so setting it on every call to that call's size raced between
// host threads launching different sizes (one could launch under another's smaller limit).
void allow_max_dynamic_smem(void (*kernel)(const LayerDesc*)) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> lock(mu);
  const std::pair<const void*, int> key{reinterpret_cast<const void*>(kernel), device};
  if (done.count(key) != 0) return;
  const auto max_bytes = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(max_bytes)));
  done.insert(key);
}

// The small-layer kernel over every descriptor of `layers` (one block each): one launch per
// shared-memory size class (kernels::small_size_class), with that class's thread count and the
// shared memory of its largest layer, so small layers are not sized for the largest one of a
// grouped call. The table, ordered by class, goes to the device in a single non-blocking H2D copy
// from pinned memory on the current stream (from the captured-table arena while a CUDA graph is
// being captured).
void launch_small(const std::vector<LayerDesc>& layers_in, bool backward, at::ScalarType dtype,
                  const at::Device& device) {
  if (layers_in.empty()) return;
  TORCH_CHECK(layers_in.size() <= static_cast<size_t>(std::numeric_limits<int32_t>::max()),
              "apo: too many layers for one launch: ", layers_in.size());
  struct ClassLaunch {
    int64_t bound;
    size_t begin, count;
    int64_t elems;
  };
  std::vector<LayerDesc> table;
  table.reserve(layers_in.size());
  std::vector<ClassLaunch> launches;
  for (const int64_t bound : kernels::kSmallClasses) {
    ClassLaunch c{bound, table.size(), 0, 0};
    for (const LayerDesc& d : layers_in) {
      if (kernels::small_size_class(d.m, d.n) != bound) continue;
      table.push_back(d);
      c.elems = std::max(c.elems, small_smem_elems(d.m, d.n, backward));
    }
    c.count = table.size() - c.begin;
    if (c.count > 0) launches.push_back(c);
  }

  const int64_t table_bytes = static_cast<int64_t>(table.size() * sizeof(LayerDesc));
  captured_tables().reserve();
  const bool capturing =
      c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  Tensor host = capturing ? captured_tables().take(table_bytes)
                          : at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), table_bytes);
  Tensor dev = at::empty({table_bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  dev.copy_(host, /*non_blocking=*/true);
  const auto* layers = static_cast<const LayerDesc*>(dev.data_ptr());

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "apo_small_layers", [&] {
    void (*kernel)(const LayerDesc*) =
        backward ? small_backward_kernel<scalar_t> : small_forward_kernel<scalar_t>;
    // Above 48 KiB a kernel must opt in to more dynamic shared memory (use_small_path checked
    // that every layer fits the device limit).
    allow_max_dynamic_smem(kernel);
    for (const ClassLaunch& c : launches) {
      const size_t smem_bytes = c.elems * compute_elem_size(dtype);
      kernel<<<static_cast<unsigned int>(c.count), kernels::small_class_threads(c.bound), smem_bytes, stream>>>(
          layers + c.begin);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Large-layer path: cuBLAS GEMMs via ATen + one fused elementwise kernel
// ------------------------------------------------------------------------------------------------

// Launches elementwise_kernel; every defined tensor must be contiguous, of S's dtype and numel.
void launch_elementwise(const Tensor& S, const Tensor& H, const Tensor& D, const Tensor& M,
                        const Tensor& E, const Tensor& dS) {
  const int64_t numel = S.numel();
  for (const Tensor* t : {&S, &H, &D, &M, &E, &dS}) {
    if (!t->defined()) continue;
    TORCH_CHECK(t->is_contiguous() && t->numel() == numel && t->scalar_type() == S.scalar_type(),
                "apo: internal error: bad elementwise operand");
  }
  TORCH_CHECK(H.defined() || !(M.defined() || dS.defined()), "apo: internal error: M or dS without H");
  if (numel == 0) return;
  const int64_t blocks = std::min<int64_t>((numel + kElementwiseThreads - 1) / kElementwiseThreads,
                                           int64_t{1} << 16);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "apo_elementwise", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    elementwise_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kElementwiseThreads, 0, stream>>>(
        numel, ptr(S), ptr(H), ptr(D), ptr(M), ptr(E), ptr(dS));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

Tensor mT(const Tensor& t) { return t.transpose(-2, -1); }

// c + x @ y in one cuBLAS call (beta = 1); 2-D or batched 3-D.
Tensor matmul_add(const Tensor& c, const Tensor& x, const Tensor& y) {
  return c.dim() == 2 ? at::addmm(c, x, y) : at::baddbmm(c, x, y);
}

// dtype in which the large path runs its GEMMs (see the precision notes at the top).
at::ScalarType large_compute_dtype(at::ScalarType dtype, int64_t m, int64_t n) {
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  return half && std::max(m, n) <= kUpcastMaxDim ? at::kFloat : dtype;
}

// Result in the caller's dtype, contiguous (a no-op for GEMM outputs already in that dtype).
Tensor finish(const Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

Tensor large_forward(const Tensor& G, const Tensor& A, const Tensor& S, const Tensor& B) {
  const auto ct = large_compute_dtype(G.scalar_type(), G.size(-2), G.size(-1));
  const Tensor g = G.to(ct), a = A.to(ct), b = B.to(ct);  // strided views are fine for cuBLAS
  const Tensor s = S.to(ct).contiguous();
  Tensor H = at::matmul(mT(a), at::matmul(g, b)).contiguous();
  launch_elementwise(s, H, Tensor(), /*M=*/H, Tensor(), Tensor());  // H becomes M = S⊙H, in place
  const Tensor& M = H;
  return finish(at::matmul(at::matmul(a, M), mT(b)), G.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> large_backward(const Tensor& dY, const Tensor& G,
                                                          const Tensor& A, const Tensor& S,
                                                          const Tensor& B, Mask mask) {
  const auto [need_g, need_a, need_s, need_b] = mask;
  // Masked-off outputs are distinct empty (0,) tensors (outputs must not alias each other).
  auto empty = [&] { return at::empty({0}, G.options()); };
  if (!(need_g || need_a || need_s || need_b)) return {empty(), empty(), empty(), empty()};
  const auto dtype = G.scalar_type();
  const auto ct = large_compute_dtype(dtype, G.size(-2), G.size(-1));
  const Tensor g = G.to(ct), dy = dY.to(ct), a = A.to(ct), b = B.to(ct);
  const Tensor s = S.to(ct).contiguous();

  // GB and H = Aᵀ G B only feed dA, dS and dB: d_grad alone (mask 1,0,0,0) skips those 2 GEMMs.
  const bool need_h = need_a || need_s || need_b;
  const Tensor GB = need_h ? at::matmul(g, b) : Tensor();
  const Tensor dYB = at::matmul(dy, b);
  Tensor H = need_h ? at::matmul(mT(a), GB).contiguous() : Tensor();
  Tensor D = at::matmul(mT(a), dYB).contiguous();

  // One pass over D, H, S. M overwrites H and E overwrites D (read first, same element, same thread).
  const bool need_e = need_g || need_a || need_b;
  const bool need_m = need_a || need_b;
  const Tensor dS = need_s ? at::empty_like(H, at::MemoryFormat::Contiguous) : Tensor();
  launch_elementwise(s, H, D, need_m ? H : Tensor(), need_e ? D : Tensor(), dS);
  const Tensor& M = H;
  const Tensor& E = D;

  const Tensor AE = (need_g || need_b) ? at::matmul(a, E) : Tensor();
  Tensor d_grad = need_g ? finish(at::matmul(AE, mT(b)), dtype) : empty();
  Tensor dA = need_a ? finish(matmul_add(at::matmul(dYB, mT(M)), GB, mT(E)), dtype) : empty();
  Tensor dS_out = need_s ? finish(dS, dtype) : empty();
  Tensor dB = need_b ? finish(matmul_add(at::matmul(mT(dy), at::matmul(a, M)), mT(g), AE), dtype)
                     : empty();
  return {d_grad, dA, dS_out, dB};
}

// ------------------------------------------------------------------------------------------------
// Op entry points
// ------------------------------------------------------------------------------------------------

// Input rules: apo_checks.h (shared with the CPU kernels). Then the limits of this file's kernels.
double device_memory_bytes(const at::Device& device) {
  return static_cast<double>(at::cuda::getDeviceProperties(device.index())->totalGlobalMem);
}

// The layer descriptors of the small path hold m and n as int32.
void check_kernel_limits(const Tensor& g) {
  TORCH_CHECK_VALUE(g.size(-2) <= std::numeric_limits<int32_t>::max() &&
                        g.size(-1) <= std::numeric_limits<int32_t>::max(),
                    "grad of shape ", checks::shape_str(g.sizes()),
                    ": m and n must be below 2^31 on the CUDA backend");
}

void check_layer(const Tensor& g, const Tensor& a, const Tensor& s, const Tensor& b, const Tensor* dy,
                 const Mask* mask) {
  checks::check_layer(g, a, s, b);
  if (dy != nullptr) checks::check_grad_out(*dy, g);
  checks::check_result_fits({g}, mask, device_memory_bytes(g.device()));
  check_kernel_limits(g);
}

Tensor precondition_cuda(const Tensor& G, const Tensor& A, const Tensor& S, const Tensor& B) {
  check_layer(G, A, S, B, nullptr, nullptr);
  const c10::cuda::CUDAGuard guard(G.device());
  if (!use_small_path(G.size(-2), G.size(-1), /*backward=*/false, G.scalar_type())) {
    return large_forward(G, A, S, B);
  }
  Tensor Y = at::empty(G.sizes(), G.options());
  std::vector<LayerDesc> table;
  append_layer(table, G, Tensor(), A, S, B, Y, Tensor(), Tensor(), Tensor());
  launch_small(table, /*backward=*/false, G.scalar_type(), G.device());
  return Y;
}

// Outputs of the small path for one layer, allocated per the mask (undefined where masked off).
std::array<Tensor, 4> alloc_small_grads(const Tensor& G, Mask mask) {
  const bool batched = G.dim() == 3;
  const int64_t L = batched ? G.size(0) : 1, m = G.size(-2), n = G.size(-1);
  auto shape = [&](int64_t r, int64_t c) {
    return batched ? std::vector<int64_t>{L, r, c} : std::vector<int64_t>{r, c};
  };
  const std::array<std::vector<int64_t>, 4> shapes = {shape(m, n), shape(m, m), shape(m, n), shape(n, n)};
  std::array<Tensor, 4> out;
  for (int k = 0; k < 4; ++k) {
    if (mask[k]) out[k] = at::empty(shapes[k], G.options());
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> precondition_backward_cuda(
    const Tensor& dY, const Tensor& G, const Tensor& A, const Tensor& S, const Tensor& B, Mask mask) {
  check_layer(G, A, S, B, &dY, &mask);
  const c10::cuda::CUDAGuard guard(G.device());
  if (!use_small_path(G.size(-2), G.size(-1), /*backward=*/true, G.scalar_type())) {
    return large_backward(dY, G, A, S, B, mask);
  }
  std::array<Tensor, 4> out = alloc_small_grads(G, mask);
  std::vector<LayerDesc> table;
  append_layer(table, G, dY, A, S, B, out[0], out[1], out[2], out[3]);
  if (mask[0] || mask[1] || mask[2] || mask[3]) {
    launch_small(table, /*backward=*/true, G.scalar_type(), G.device());
  }
  for (Tensor& t : out) {
    if (!t.defined()) t = at::empty({0}, G.options());
  }
  return {out[0], out[1], out[2], out[3]};
}

// The grouped rules (apo_checks.h), then the per-layer limits of this file's kernels.
void check_group(TensorList Gs, TensorList As, TensorList Ss, TensorList Bs, const TensorList* dYs,
                 const Mask* mask) {
  checks::check_group(Gs, As, Ss, Bs, dYs);
  if (Gs.empty()) return;
  checks::check_result_fits(Gs, mask, device_memory_bytes(Gs[0].device()));
  for (const Tensor& g : Gs) check_kernel_limits(g);
}

TensorVec precondition_grouped_cuda(TensorList Gs, TensorList As, TensorList Ss, TensorList Bs) {
  check_group(Gs, As, Ss, Bs, nullptr, nullptr);
  TensorVec Ys(Gs.size());
  if (Gs.empty()) return Ys;
  const c10::cuda::CUDAGuard guard(Gs[0].device());
  std::vector<LayerDesc> table;
  for (size_t i = 0; i < Gs.size(); ++i) {
    const Tensor& G = Gs[i];
    if (use_small_path(G.size(-2), G.size(-1), /*backward=*/false, G.scalar_type())) {
      Ys[i] = at::empty(G.sizes(), G.options());
      append_layer(table, G, Tensor(), As[i], Ss[i], Bs[i], Ys[i], Tensor(), Tensor(), Tensor());
    } else {
      Ys[i] = large_forward(G, As[i], Ss[i], Bs[i]);
    }
  }
  launch_small(table, /*backward=*/false, Gs[0].scalar_type(), Gs[0].device());
  return Ys;
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> precondition_grouped_backward_cuda(
    TensorList dYs, TensorList Gs, TensorList As, TensorList Ss, TensorList Bs, Mask mask) {
  check_group(Gs, As, Ss, Bs, &dYs, &mask);
  const size_t count = Gs.size();
  std::array<TensorVec, 4> out;
  for (int k = 0; k < 4; ++k) out[k].resize(mask[k] ? count : 0);  // masked off: empty list
  const bool any = mask[0] || mask[1] || mask[2] || mask[3];
  if (count == 0 || !any) return {out[0], out[1], out[2], out[3]};
  const c10::cuda::CUDAGuard guard(Gs[0].device());
  std::vector<LayerDesc> table;
  for (size_t i = 0; i < count; ++i) {
    const Tensor& G = Gs[i];
    std::array<Tensor, 4> grads;
    if (use_small_path(G.size(-2), G.size(-1), /*backward=*/true, G.scalar_type())) {
      grads = alloc_small_grads(G, mask);
      append_layer(table, G, dYs[i], As[i], Ss[i], Bs[i], grads[0], grads[1], grads[2], grads[3]);
    } else {
      std::tie(grads[0], grads[1], grads[2], grads[3]) =
          large_backward(dYs[i], G, As[i], Ss[i], Bs[i], mask);
    }
    for (int k = 0; k < 4; ++k) {
      if (mask[k]) out[k][i] = grads[k];
    }
  }
  launch_small(table, /*backward=*/true, Gs[0].scalar_type(), Gs[0].device());
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace
}  // namespace apo

TORCH_LIBRARY_IMPL(apo, CUDA, m) {
  m.impl("precondition", &apo::precondition_cuda);
  m.impl("precondition_backward", &apo::precondition_backward_cuda);
  m.impl("precondition_grouped", &apo::precondition_grouped_cuda);
  m.impl("precondition_grouped_backward", &apo::precondition_grouped_backward_cuda);
}
