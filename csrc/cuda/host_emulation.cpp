// Test harness, not part of the extension (setup.py and CMake compile only csrc/cuda/*.cu).
//
// Compiles the CUDA kernels of precondition_kernels.cuh as plain C++ and runs them on the CPU:
// blocks one after another, and within a block every CUDA thread as a fiber (ucontext) with its own
// stack, all of them in lockstep: each runs until its next __syncthreads, then the next thread
// runs, and once every thread has arrived the next round begins. That is a legal execution of the
// same source with the block size the op launches (small_class_threads of the layer's size class),
// so the register tiling, the thread-to-tile maps, the K-chunk staging and the buffer reuse are all
// checked. Barriers are checked too: a block in which some threads exit while others wait at a
// __syncthreads fails. Races are partly visible: even blocks run their threads in increasing order,
// odd blocks in decreasing order, so a read of another thread's write with no barrier in between
// reads a different value in one of the two (a 3-D batch of two layers covers both). Device limits
// and timing are not emulated.
// Shared memory and outputs start filled with NaN (0xFF bytes), and a canary after each block's
// shared memory catches writes past its end.
//
// Used by tests/test_cuda.py::test_kernels_emulated_on_host via torch.utils.cpp_extension.load;
// registers CPU ops under torch.ops.apo_cuda_emu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <ucontext.h>

#include <array>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#define APO_HOST_EMULATION 1
#define __global__
#define __device__
#define __launch_bounds__(...)

namespace apo {
namespace kernels {
struct EmuDim3 {
  unsigned int x, y, z;
};
inline EmuDim3 threadIdx{0, 0, 0};
inline EmuDim3 blockIdx{0, 0, 0};
inline EmuDim3 blockDim{1, 1, 1};
inline EmuDim3 gridDim{1, 1, 1};
void __syncthreads();  // below: hands over to the next emulated thread of the block
inline unsigned char* apo_smem = nullptr;
}  // namespace kernels
}  // namespace apo

#include "precondition_kernels.cuh"

namespace {

using at::Tensor;
using namespace apo::kernels;

constexpr size_t kCanaryBytes = 256;
constexpr size_t kFiberStackBytes = 256 * 1024;

// ---- one block of emulated threads ------------------------------------------------------------

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  bool finished = false;
};

ucontext_t g_scheduler;
std::vector<Fiber> g_fibers;
int g_running = -1;  // the fiber now running, -1 in the scheduler
void (*g_kernel)(const LayerDesc*) = nullptr;
const LayerDesc* g_table = nullptr;

void fiber_main() {
  g_kernel(g_table);
  g_fibers[g_running].finished = true;  // returning resumes uc_link, the scheduler
}

// Runs block blockIdx.x of `kernel` with `threads` threads in lockstep (see the top of the file).
void run_block(void (*kernel)(const LayerDesc*), const LayerDesc* table, int threads, bool reverse) {
  if (g_fibers.size() < static_cast<size_t>(threads)) g_fibers.resize(threads);
  g_kernel = kernel;
  g_table = table;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = g_fibers[t];
    if (!f.stack) f.stack = std::make_unique<char[]>(kFiberStackBytes);
    f.finished = false;
    TORCH_CHECK(getcontext(&f.ctx) == 0, "getcontext failed");
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kFiberStackBytes;
    f.ctx.uc_link = &g_scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  blockDim = {static_cast<unsigned int>(threads), 1, 1};
  for (int round = 0;; ++round) {
    int finished = 0;
    for (int s = 0; s < threads; ++s) {
      const int t = reverse ? threads - 1 - s : s;
      g_running = t;
      threadIdx = {static_cast<unsigned int>(t), 0, 0};
      TORCH_CHECK(swapcontext(&g_scheduler, &g_fibers[t].ctx) == 0, "swapcontext failed");
      finished += g_fibers[t].finished ? 1 : 0;
    }
    g_running = -1;
    if (finished == threads) break;
    TORCH_CHECK(finished == 0, "block ", blockIdx.x, ", barrier round ", round, ": ", finished, " of ", threads,
                " threads exited while the others wait at __syncthreads (a barrier in non-uniform control flow)");
  }
  threadIdx = {0, 0, 0};
  blockDim = {1, 1, 1};
}

}  // namespace

void apo::kernels::__syncthreads() {
  if (g_running < 0) return;  // a kernel run directly on the host thread (one thread, no barrier needed)
  TORCH_CHECK(swapcontext(&g_fibers[g_running].ctx, &g_scheduler) == 0, "swapcontext failed");
}

namespace {

// ---- the ops ----------------------------------------------------------------------------------

StridedIn strided_in(const Tensor& t, int64_t batch) {
  if (!t.defined()) return {nullptr, 0, 0};  // an identity factor
  const auto* base = static_cast<const char*>(t.data_ptr());
  if (t.dim() == 3) base += batch * t.stride(0) * static_cast<int64_t>(t.element_size());
  return {base, t.stride(-2), t.stride(-1)};
}

void* out_ptr(const Tensor& t, int64_t batch) {
  if (!t.defined()) return nullptr;
  auto* base = static_cast<char*>(t.data_ptr());
  if (t.dim() == 3) base += batch * t.stride(0) * static_cast<int64_t>(t.element_size());
  return base;
}

std::vector<LayerDesc> make_table(const Tensor& g, const Tensor& dy, const Tensor& a, const Tensor& s,
                                  const Tensor& b, const std::array<Tensor, 4>& outs) {
  std::vector<LayerDesc> table;
  const int64_t batch = g.dim() == 3 ? g.size(0) : 1;
  for (int64_t l = 0; l < batch; ++l) {
    LayerDesc d{};
    d.g = strided_in(g, l);
    d.dy = strided_in(dy, l);
    d.a = strided_in(a, l);
    d.s = strided_in(s, l);
    d.b = strided_in(b, l);
    d.y = out_ptr(outs[0], l);
    d.da = out_ptr(outs[1], l);
    d.ds = out_ptr(outs[2], l);
    d.db = out_ptr(outs[3], l);
    d.m = static_cast<int32_t>(g.size(-2));
    d.n = static_cast<int32_t>(g.size(-1));
    table.push_back(d);
  }
  return table;
}

// Every block with the thread count and the shared memory the op launches its size class with.
template <typename scalar_t>
void run_blocks(void (*kernel)(const LayerDesc*), const std::vector<LayerDesc>& table, bool backward) {
  using acc_t = at::opmath_type<scalar_t>;
  gridDim = {static_cast<unsigned int>(table.size()), 1, 1};
  for (size_t blk = 0; blk < table.size(); ++blk) {
    const LayerDesc& d = table[blk];
    const size_t bytes = small_smem_elems(d.m, d.n, backward) * sizeof(acc_t);
    std::vector<unsigned char> smem(bytes + kCanaryBytes, 0xFF);  // NaN for float and double
    apo_smem = smem.data();
    blockIdx = {static_cast<unsigned int>(blk), 0, 0};
    run_block(kernel, table.data(), small_class_threads(small_size_class(d.m, d.n)), blk % 2 == 1);
    for (size_t i = bytes; i < smem.size(); ++i) {
      TORCH_CHECK(smem[i] == 0xFF, "block ", blk, " wrote past its shared memory (byte ", i, " of ", bytes, ")");
    }
  }
  apo_smem = nullptr;
  blockIdx = {0, 0, 0};
  gridDim = {1, 1, 1};
}

Tensor nan_like_shape(const Tensor& g, int64_t r, int64_t c) {
  std::vector<int64_t> shape = g.dim() == 3 ? std::vector<int64_t>{g.size(0), r, c} : std::vector<int64_t>{r, c};
  return at::full(shape, std::numeric_limits<double>::quiet_NaN(), g.options());
}

Tensor factor(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// A or B None: the identity (a null factor in the descriptor).
Tensor small_forward(const Tensor& g, const std::optional<Tensor>& a, const Tensor& s,
                     const std::optional<Tensor>& b) {
  TORCH_CHECK(g.size(-2) <= kSmallMaxDim && g.size(-1) <= kSmallMaxDim, "not a small layer");
  Tensor y = nan_like_shape(g, g.size(-2), g.size(-1));
  const auto table = make_table(g, Tensor(), factor(a), s, factor(b), {y, Tensor(), Tensor(), Tensor()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "emu_forward", [&] {
    run_blocks<scalar_t>(&small_forward_kernel<scalar_t>, table, false);
  });
  return y;
}

// As the op: an output masked off, or the gradient of an identity factor, is an empty (0,) tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor> small_backward(const Tensor& dy, const Tensor& g,
                                                          const std::optional<Tensor>& a, const Tensor& s,
                                                          const std::optional<Tensor>& b, std::array<bool, 4> mask) {
  TORCH_CHECK(g.size(-2) <= kSmallMaxDim && g.size(-1) <= kSmallMaxDim, "not a small layer");
  const int64_t m = g.size(-2), n = g.size(-1);
  const std::array<std::array<int64_t, 2>, 4> shapes = {{{m, n}, {m, m}, {m, n}, {n, n}}};
  const std::array<bool, 4> exists = {true, a.has_value(), true, b.has_value()};
  std::array<Tensor, 4> outs;
  for (int k = 0; k < 4; ++k) {
    if (mask[k] && exists[k]) outs[k] = nan_like_shape(g, shapes[k][0], shapes[k][1]);
  }
  const auto table = make_table(g, dy, factor(a), s, factor(b), outs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "emu_backward", [&] {
    run_blocks<scalar_t>(&small_backward_kernel<scalar_t>, table, true);
  });
  for (Tensor& t : outs) {
    if (!t.defined()) t = at::empty({0}, g.options());
  }
  return {outs[0], outs[1], outs[2], outs[3]};
}

// The large path's elementwise pass as the op uses it in backward: M over H and E over D in place
// (on copies), dS separate. Returns (M, E, dS). One thread walks every element (no barriers).
std::tuple<Tensor, Tensor, Tensor> elementwise(const Tensor& s, const Tensor& h, const Tensor& d) {
  Tensor S = s.contiguous(), M = h.contiguous().clone(), E = d.contiguous().clone();
  Tensor dS = at::full(S.sizes(), std::numeric_limits<double>::quiet_NaN(), S.options());
  blockIdx.x = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "emu_elementwise", [&] {
    elementwise_kernel<scalar_t>(S.numel(), S.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(),
                                 E.data_ptr<scalar_t>(), M.data_ptr<scalar_t>(), E.data_ptr<scalar_t>(),
                                 dS.data_ptr<scalar_t>());
  });
  return {M, E, dS};
}

// The same pass as the op uses it for d_grad alone: no H (so no M, no dS), E over D in place.
Tensor elementwise_e_only(const Tensor& s, const Tensor& d) {
  Tensor S = s.contiguous(), E = d.contiguous().clone();
  blockIdx.x = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, S.scalar_type(), "emu_elementwise_e", [&] {
    elementwise_kernel<scalar_t>(S.numel(), S.data_ptr<scalar_t>(), nullptr, E.data_ptr<scalar_t>(), nullptr,
                                 E.data_ptr<scalar_t>(), nullptr);
  });
  return E;
}

// (size class, threads per block, shared-memory bytes of the compute type) of an m×n layer, as
// the op launches it.
std::tuple<int64_t, int64_t, int64_t> launch_shape(int64_t m, int64_t n, bool backward, at::ScalarType dtype) {
  const int64_t cls = small_size_class(m, n);
  const auto bytes = small_smem_elems(m, n, backward) * static_cast<int64_t>(c10::elementSize(at::toOpMathType(dtype)));
  return {cls, small_class_threads(cls), bytes};
}

}  // namespace

TORCH_LIBRARY(apo_cuda_emu, m) {
  m.def("small_forward(Tensor grad, Tensor? A, Tensor S, Tensor? B) -> Tensor");
  m.def("small_backward(Tensor grad_out, Tensor grad, Tensor? A, Tensor S, Tensor? B, bool[4] output_mask)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("elementwise(Tensor S, Tensor H, Tensor D) -> (Tensor, Tensor, Tensor)");
  m.def("elementwise_e_only(Tensor S, Tensor D) -> Tensor");
  m.def("launch_shape(int m, int n, bool backward, ScalarType dtype) -> (int, int, int)", &launch_shape);
}

TORCH_LIBRARY_IMPL(apo_cuda_emu, CPU, m) {
  m.impl("small_forward", &small_forward);
  m.impl("small_backward", &small_backward);
  m.impl("elementwise", &elementwise);
  m.impl("elementwise_e_only", &elementwise_e_only);
}
