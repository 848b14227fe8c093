// apo-kernels: CUDA implementation of the structured-preconditioner op (TORCH_LIBRARY_IMPL(apo, CUDA)).
//
//     Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ            G, S (m×n), A (m×m), B (n×n); 2-D or batched 3-D
//
// A or B None is an identity factor: its GEMMs are skipped and its gradient is an empty (0,)
// tensor. Schemas, masks and output conventions: docs/ARCHITECTURE.md. Every entry point first
// applies the input rules of ../apo_checks.h (shared with the CPU kernels, the same as the Python
// API's). The kernels themselves are in precondition_kernels.cuh (host-compilable, so
// host_emulation.cpp can run them on a CPU in tests).
//
// Two paths, chosen per layer (a 3-D batch counts as L layers of one shape):
//
// 1. Small layers (m, n <= kSmallMaxDim = 64, and the layer's fp32 working set fits in shared memory):
//    ONE fused kernel per call and stage (forward, or backward). One thread block per layer walks a
//    device-side table of layer descriptors (pointers, strides, m, n), so a whole grouped call of
//    small layers — or a 3-D batch — is a single launch (plus the one H2D copy of the table). The
//    block computes in fp32 (fp64 for double) in shared memory, fuses ⊙S into the epilogue of the
//    product that yields H, and rounds each result once, on the store to global memory.
//    An identity factor is a null pointer in the descriptor: the kernels skip its products.
//
// 2. Large layers: the maths of ../apo_checks.h (the same code as the CPU kernels) on cuBLAS GEMMs
//    via ATen, plus ONE elementwise kernel per stage for ⊙S: M = S⊙H in place (forward), and
//    dS = D⊙H, E = S⊙D, M = S⊙H from a single read of D, H, S (backward, only what the mask needs).
//    Transposes are cuBLAS flags, not copies; the "+" of dA and dB is the beta=1 of a second GEMM.
//    In a grouped call, two or more large-path layers of one shape (and the same identity factors)
//    with max(m, n) <= kBatchMaxDim run as one 3-D batch: one strided-batched cuBLAS GEMM per
//    product instead of one per layer.
//
// Precision (one contract for every path and size): fp16/bf16 inputs are computed in fp32: the
// GEMMs are fp32 GEMMs, every intermediate (GB, H, M, dYB, D, E, A·E, A·M) is an fp32 tensor, the
// ⊙S pass reads and writes fp32, and each output is rounded once to the input dtype. The fp32 GEMMs
// follow torch.backends.cuda.matmul like torch.matmul: TF32 only if the user allowed it (then fp16
// keeps no more mantissa bits than TF32's, and "rounded once" holds for bf16 only). The price: the
// GEMMs of a half-precision layer run at fp32 speed, not on fp16/bf16 tensor cores (the Triton
// backend feeds half operands to tensor cores instead).

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
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

namespace apo {
namespace {

using at::Tensor;
using at::TensorList;
using layer::Mask;
using OptionalTensorList = c10::List<std::optional<Tensor>>;
using TensorVec = std::vector<Tensor>;

// Grouped calls: large-path layers up to this size are batched per shape (a 1024×1024 layer's
// GEMMs alone leave SMs idle on an H100-class GPU; above, one layer's GEMMs fill it).
constexpr int64_t kBatchMaxDim = 1024;
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

// Whether a layer takes the fused small-layer kernel on the current device. An identity factor
// (A or B undefined) is a null pointer in the descriptor; the kernels skip its products.
bool use_small_path(const Tensor& G, bool backward) {
  const int64_t m = G.size(-2), n = G.size(-1);
  const at::ScalarType dtype = G.scalar_type();
  if (m > kSmallMaxDim || n > kSmallMaxDim) return false;
  const size_t bytes = small_smem_elems(m, n, backward) * compute_elem_size(dtype);
  return bytes <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

// An undefined tensor (an identity factor, or no dY in the forward) is {nullptr, 0, 0}.
StridedIn strided_in(const Tensor& t, int64_t batch) {
  if (!t.defined()) return {nullptr, 0, 0};
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
    d.dy = strided_in(dy, l);
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

// Launches elementwise_kernel; every defined tensor must be contiguous, of S's dtype and numel. The
// large path runs it in the compute type only (fp32, or fp64 for double).
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
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "apo_elementwise", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    elementwise_kernel<scalar_t><<<static_cast<unsigned int>(blocks), kElementwiseThreads, 0, stream>>>(
        numel, ptr(S), ptr(H), ptr(D), ptr(M), ptr(E), ptr(dS));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// `x` contiguous, and whether the result may be overwritten: it may when `own` (a product of ours)
// or when making it contiguous copied it.
std::pair<Tensor, bool> contiguous_owned(const Tensor& x, bool own) {
  Tensor c = x.contiguous();
  const bool copied = !c.is_same(x);
  return {c, own || copied};
}

// Inputs of ours may be fp16/bf16: everything below runs in layer::compute_type (fp32), see the
// precision notes at the top.
Tensor large_forward(const Tensor& G, const Tensor& A, const Tensor& S, const Tensor& B) {
  auto scale = [](const Tensor& H, const Tensor& s, bool own_h) {
    const auto [h, writable] = contiguous_owned(H, own_h);
    Tensor M = writable ? h : at::empty_like(h, at::MemoryFormat::Contiguous);
    launch_elementwise(s, h, Tensor(), M, Tensor(), Tensor());  // M = S⊙H (in place when writable)
    return M;
  };
  const Tensor s = layer::up(S).contiguous();
  return layer::finish(layer::forward(layer::up(G), layer::up(A), s, layer::up(B), scale), G.scalar_type());
}

// Outputs in G's dtype; an empty (0,) tensor where masked off or for an identity factor's gradient.
std::array<Tensor, 4> large_backward(const Tensor& dY, const Tensor& G, const Tensor& A, const Tensor& S,
                                     const Tensor& B, Mask mask) {
  // One pass over D, H, S. M overwrites H and E overwrites D when ours (read first, same element,
  // same thread).
  auto elementwise = [](const Tensor& s, const Tensor& H, const Tensor& D, bool need_m, bool need_e,
                        bool need_s, bool own) {
    const auto [d, d_writable] = contiguous_owned(D, own);
    Tensor h;
    bool h_writable = false;
    if (H.defined()) std::tie(h, h_writable) = contiguous_owned(H, own);
    auto fresh = [](const Tensor& like) { return at::empty_like(like, at::MemoryFormat::Contiguous); };
    layer::ElementwiseOut e;
    if (need_s) e.dS = fresh(d);
    if (need_m) e.M = h_writable ? h : fresh(h);
    if (need_e) e.E = d_writable ? d : fresh(d);
    launch_elementwise(s, h, d, e.M, e.E, e.dS);
    return e;
  };
  const Tensor s = layer::up(S).contiguous();
  std::array<Tensor, 4> out = layer::backward(layer::up(dY), layer::up(G), layer::up(A), s, layer::up(B),
                                              mask, elementwise);
  for (Tensor& t : out) t = t.defined() ? layer::finish(t, G.scalar_type()) : layer::empty_slot(G);
  return out;
}

// ------------------------------------------------------------------------------------------------
// Grouped large-path layers: one 3-D batch per shape
// ------------------------------------------------------------------------------------------------

// Layers that can share one batched call: same (m, n) and the same identity factors.
using BatchKey = std::tuple<int64_t, int64_t, bool, bool>;

// The large-path layers of a grouped call (indices into the lists), bucketed by BatchKey when
// max(m, n) <= kBatchMaxDim; every other layer is a bucket of its own.
std::vector<std::vector<size_t>> large_buckets(TensorList Gs, const TensorVec& As, const TensorVec& Bs,
                                               const std::vector<size_t>& large) {
  std::map<BatchKey, std::vector<size_t>> by_shape;
  std::vector<std::vector<size_t>> buckets;
  for (size_t i : large) {
    const int64_t m = Gs[i].size(-2), n = Gs[i].size(-1);
    if (std::max(m, n) <= kBatchMaxDim) {
      by_shape[{m, n, As[i].defined(), Bs[i].defined()}].push_back(i);
    } else {
      buckets.push_back({i});
    }
  }
  for (auto& [key, idx] : by_shape) buckets.push_back(std::move(idx));
  return buckets;
}

// The bucket's layers of `ts` as one (L, ·, ·) tensor, or as the layer itself for a bucket of one;
// undefined for identity factors (a bucket shares them).
Tensor batch_of(const std::vector<Tensor>& ts, const std::vector<size_t>& bucket) {
  if (!ts[bucket[0]].defined()) return Tensor();
  if (bucket.size() == 1) return ts[bucket[0]];
  std::vector<Tensor> parts;
  parts.reserve(bucket.size());
  for (size_t i : bucket) parts.push_back(ts[i]);
  return at::stack(parts);
}

// Layer j of a bucket's result (a (0,) slot stays a fresh (0,) slot per layer).
Tensor layer_of(const Tensor& result, size_t j, size_t bucket_size, const Tensor& like) {
  if (result.numel() == 0 && result.dim() == 1) return layer::empty_slot(like);
  return bucket_size == 1 ? result : result.select(0, static_cast<int64_t>(j));
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
  checks::check_result_fits({g}, {a}, {b}, mask, device_memory_bytes(g.device()));
  check_kernel_limits(g);
}

Tensor precondition_cuda(const Tensor& G, const std::optional<Tensor>& A_, const Tensor& S,
                         const std::optional<Tensor>& B_) {
  const Tensor A = layer::factor(A_), B = layer::factor(B_);
  check_layer(G, A, S, B, nullptr, nullptr);
  const c10::cuda::CUDAGuard guard(G.device());
  if (!use_small_path(G, /*backward=*/false)) return large_forward(G, A, S, B);
  Tensor Y = at::empty(G.sizes(), G.options());
  std::vector<LayerDesc> table;
  append_layer(table, G, Tensor(), A, S, B, Y, Tensor(), Tensor(), Tensor());
  launch_small(table, /*backward=*/false, G.scalar_type(), G.device());
  return Y;
}

// Outputs of the small path for one layer, allocated per the mask (undefined where masked off, and
// for the gradient of an identity factor: the kernel does not compute it).
std::array<Tensor, 4> alloc_small_grads(const Tensor& G, const Tensor& A, const Tensor& B, Mask mask) {
  mask[1] = mask[1] && A.defined();
  mask[3] = mask[3] && B.defined();
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
    const Tensor& dY, const Tensor& G, const std::optional<Tensor>& A_, const Tensor& S,
    const std::optional<Tensor>& B_, Mask mask) {
  const Tensor A = layer::factor(A_), B = layer::factor(B_);
  check_layer(G, A, S, B, &dY, &mask);
  const c10::cuda::CUDAGuard guard(G.device());
  std::array<Tensor, 4> out;
  if (!use_small_path(G, /*backward=*/true)) {
    out = large_backward(dY, G, A, S, B, mask);
  } else {
    out = alloc_small_grads(G, A, B, mask);
    std::vector<LayerDesc> table;
    append_layer(table, G, dY, A, S, B, out[0], out[1], out[2], out[3]);
    if (mask[0] || mask[1] || mask[2] || mask[3]) {
      launch_small(table, /*backward=*/true, G.scalar_type(), G.device());
    }
    for (Tensor& t : out) {
      if (!t.defined()) t = layer::empty_slot(G);
    }
  }
  return {out[0], out[1], out[2], out[3]};
}

// The grouped rules (apo_checks.h), then the per-layer limits of this file's kernels.
void check_group(TensorList Gs, const TensorVec& As, TensorList Ss, const TensorVec& Bs,
                 const TensorList* dYs, const Mask* mask) {
  checks::check_group(Gs, As, Ss, Bs, dYs);
  if (Gs.empty()) return;
  checks::check_result_fits(Gs, As, Bs, mask, device_memory_bytes(Gs[0].device()));
  for (const Tensor& g : Gs) check_kernel_limits(g);
}

TensorVec precondition_grouped_cuda(TensorList Gs, const OptionalTensorList& As_, TensorList Ss,
                                    const OptionalTensorList& Bs_) {
  const TensorVec As = layer::factors(As_), Bs = layer::factors(Bs_);
  check_group(Gs, As, Ss, Bs, nullptr, nullptr);
  TensorVec Ys(Gs.size());
  if (Gs.empty()) return Ys;
  const c10::cuda::CUDAGuard guard(Gs[0].device());
  const TensorVec Gv(Gs.begin(), Gs.end()), Sv(Ss.begin(), Ss.end());
  std::vector<LayerDesc> table;
  std::vector<size_t> large;
  for (size_t i = 0; i < Gs.size(); ++i) {
    if (use_small_path(Gs[i], /*backward=*/false)) {
      Ys[i] = at::empty(Gs[i].sizes(), Gs[i].options());
      append_layer(table, Gs[i], Tensor(), As[i], Ss[i], Bs[i], Ys[i], Tensor(), Tensor(), Tensor());
    } else {
      large.push_back(i);
    }
  }
  launch_small(table, /*backward=*/false, Gs[0].scalar_type(), Gs[0].device());
  for (const std::vector<size_t>& bucket : large_buckets(Gs, As, Bs, large)) {
    const Tensor Y = large_forward(batch_of(Gv, bucket), batch_of(As, bucket), batch_of(Sv, bucket),
                                   batch_of(Bs, bucket));
    for (size_t j = 0; j < bucket.size(); ++j) Ys[bucket[j]] = layer_of(Y, j, bucket.size(), Gs[0]);
  }
  return Ys;
}

std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> precondition_grouped_backward_cuda(
    TensorList dYs, TensorList Gs, const OptionalTensorList& As_, TensorList Ss,
    const OptionalTensorList& Bs_, Mask mask) {
  const TensorVec As = layer::factors(As_), Bs = layer::factors(Bs_);
  check_group(Gs, As, Ss, Bs, &dYs, &mask);
  const size_t count = Gs.size();
  std::array<TensorVec, 4> out;
  for (int k = 0; k < 4; ++k) out[k].resize(mask[k] ? count : 0);  // masked off: empty list
  const bool any = mask[0] || mask[1] || mask[2] || mask[3];
  if (count == 0 || !any) return {out[0], out[1], out[2], out[3]};
  const c10::cuda::CUDAGuard guard(Gs[0].device());
  const TensorVec dYv(dYs.begin(), dYs.end()), Gv(Gs.begin(), Gs.end()), Sv(Ss.begin(), Ss.end());
  std::vector<LayerDesc> table;
  std::vector<size_t> large;
  for (size_t i = 0; i < count; ++i) {
    if (!use_small_path(Gs[i], /*backward=*/true)) {
      large.push_back(i);
      continue;
    }
    std::array<Tensor, 4> grads = alloc_small_grads(Gs[i], As[i], Bs[i], mask);
    append_layer(table, Gs[i], dYs[i], As[i], Ss[i], Bs[i], grads[0], grads[1], grads[2], grads[3]);
    for (int k = 0; k < 4; ++k) {
      if (mask[k]) out[k][i] = grads[k].defined() ? grads[k] : layer::empty_slot(Gs[i]);
    }
  }
  launch_small(table, /*backward=*/true, Gs[0].scalar_type(), Gs[0].device());
  for (const std::vector<size_t>& bucket : large_buckets(Gs, As, Bs, large)) {
    const std::array<Tensor, 4> grads =
        large_backward(batch_of(dYv, bucket), batch_of(Gv, bucket), batch_of(As, bucket),
                       batch_of(Sv, bucket), batch_of(Bs, bucket), mask);
    for (int k = 0; k < 4; ++k) {
      if (!mask[k]) continue;
      for (size_t j = 0; j < bucket.size(); ++j) out[k][bucket[j]] = layer_of(grads[k], j, bucket.size(), Gs[0]);
    }
  }
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
