// Test harness, not part of the extension (setup.py and CMake compile only csrc/cuda/*.cu).
//
// Compiles the CUDA kernels of precondition_kernels.cuh as plain C++ and runs them on the CPU with
// one thread per block and blocks one after another. Every kernel there is written for any
// blockDim, so this is a legal (if serial) execution of the same source: it checks the indexing,
// the shared-memory layout and buffer reuse, masks and strides on a machine without a GPU. It cannot
// see races (a missing __syncthreads) or device-limit problems; those need a GPU run.
// Shared memory and outputs start filled with NaN (0xFF bytes), and a canary after each block's
// shared memory catches writes past its end.
//
// Used by tests/test_cuda.py::test_kernels_emulated_on_host via torch.utils.cpp_extension.load;
// registers CPU ops under torch.ops.apo_cuda_emu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#define APO_HOST_EMULATION 1
#define __global__
#define __device__
#define __launch_bounds__(n)

namespace apo {
namespace kernels {
struct EmuDim3 {
  unsigned int x, y, z;
};
inline EmuDim3 threadIdx{0, 0, 0};
inline EmuDim3 blockIdx{0, 0, 0};
inline EmuDim3 blockDim{1, 1, 1};
inline EmuDim3 gridDim{1, 1, 1};
inline void __syncthreads() {}
inline unsigned char* apo_smem = nullptr;
}  // namespace kernels
}  // namespace apo

#include "precondition_kernels.cuh"

namespace {

using at::Tensor;
using namespace apo::kernels;

constexpr size_t kCanaryBytes = 256;

StridedIn strided_in(const Tensor& t, int64_t batch) {
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
    d.dy = dy.defined() ? strided_in(dy, l) : StridedIn{nullptr, 0, 0};
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

template <typename scalar_t>
void run_blocks(void (*kernel)(const LayerDesc*), const std::vector<LayerDesc>& table, bool backward) {
  using acc_t = at::opmath_type<scalar_t>;
  for (size_t blk = 0; blk < table.size(); ++blk) {
    const size_t bytes = small_smem_elems(table[blk].m, table[blk].n, backward) * sizeof(acc_t);
    std::vector<unsigned char> smem(bytes + kCanaryBytes, 0xFF);  // NaN for float and double
    apo_smem = smem.data();
    blockIdx.x = static_cast<unsigned int>(blk);
    kernel(table.data());
    for (size_t i = bytes; i < smem.size(); ++i) {
      TORCH_CHECK(smem[i] == 0xFF, "block ", blk, " wrote past its shared memory (byte ", i, " of ", bytes, ")");
    }
  }
  apo_smem = nullptr;
}

Tensor nan_like_shape(const Tensor& g, int64_t r, int64_t c) {
  std::vector<int64_t> shape = g.dim() == 3 ? std::vector<int64_t>{g.size(0), r, c} : std::vector<int64_t>{r, c};
  return at::full(shape, std::numeric_limits<double>::quiet_NaN(), g.options());
}

Tensor small_forward(const Tensor& g, const Tensor& a, const Tensor& s, const Tensor& b) {
  TORCH_CHECK(g.size(-2) <= kSmallMaxDim && g.size(-1) <= kSmallMaxDim, "not a small layer");
  Tensor y = nan_like_shape(g, g.size(-2), g.size(-1));
  const auto table = make_table(g, Tensor(), a, s, b, {y, Tensor(), Tensor(), Tensor()});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "emu_forward", [&] {
    run_blocks<scalar_t>(&small_forward_kernel<scalar_t>, table, false);
  });
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> small_backward(const Tensor& dy, const Tensor& g, const Tensor& a,
                                                          const Tensor& s, const Tensor& b,
                                                          std::array<bool, 4> mask) {
  TORCH_CHECK(g.size(-2) <= kSmallMaxDim && g.size(-1) <= kSmallMaxDim, "not a small layer");
  const int64_t m = g.size(-2), n = g.size(-1);
  const std::array<std::array<int64_t, 2>, 4> shapes = {{{m, n}, {m, m}, {m, n}, {n, n}}};
  std::array<Tensor, 4> outs;
  for (int k = 0; k < 4; ++k) {
    if (mask[k]) outs[k] = nan_like_shape(g, shapes[k][0], shapes[k][1]);
  }
  const auto table = make_table(g, dy, a, s, b, outs);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "emu_backward", [&] {
    run_blocks<scalar_t>(&small_backward_kernel<scalar_t>, table, true);
  });
  for (Tensor& t : outs) {
    if (!t.defined()) t = at::empty({0}, g.options());
  }
  return {outs[0], outs[1], outs[2], outs[3]};
}

// The large path's elementwise pass as the op uses it in backward: M over H and E over D in place
// (on copies), dS separate. Returns (M, E, dS).
std::tuple<Tensor, Tensor, Tensor> elementwise(const Tensor& s, const Tensor& h, const Tensor& d) {
  Tensor S = s.contiguous(), M = h.contiguous().clone(), E = d.contiguous().clone();
  Tensor dS = at::full(S.sizes(), std::numeric_limits<double>::quiet_NaN(), S.options());
  blockIdx.x = 0;  // one block of one thread walks every element
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

}  // namespace

TORCH_LIBRARY(apo_cuda_emu, m) {
  m.def("small_forward(Tensor grad, Tensor A, Tensor S, Tensor B) -> Tensor");
  m.def("small_backward(Tensor grad_out, Tensor grad, Tensor A, Tensor S, Tensor B, bool[4] output_mask)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("elementwise(Tensor S, Tensor H, Tensor D) -> (Tensor, Tensor, Tensor)");
  m.def("elementwise_e_only(Tensor S, Tensor D) -> Tensor");
}

TORCH_LIBRARY_IMPL(apo_cuda_emu, CPU, m) {
  m.impl("small_forward", &small_forward);
  m.impl("small_backward", &small_backward);
  m.impl("elementwise", &elementwise);
  m.impl("elementwise_e_only", &elementwise_e_only);
}
