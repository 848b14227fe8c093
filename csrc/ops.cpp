// apo-kernels: op schemas (TORCH_LIBRARY) and the CPU implementation of the structured preconditioner
//
//     Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ          G (m×n), A (m×m), S (m×n), B (n×n); A or B None = identity
//
// The maths (forward, backward, identity factors) and the input rules are in apo_checks.h, shared
// with the CUDA large-layer path; this file adds the CPU's ⊙S pass, the grouped schedule and the
// registration.
//
// Light headers only (no torch/extension.h, no pybind11): the module registers ops on load and
// exposes no Python functions. The CUDA implementations live in csrc/cuda/*.cu.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
// ATen's OpenMP backend opens the parallel region of at::parallel_for inline in its header: built
// without OpenMP, every "parallel" loop here would run on the calling thread alone.
#error "apo-kernels: torch uses OpenMP for at::parallel_for; compile csrc/ops.cpp with -fopenmp"
#endif

#include "apo_checks.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <numeric>
#include <tuple>
#include <vector>

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
// One layer (2-D, or 3-D with the batch handled by bmm): the shared maths of apo_checks.h with
// ⊙S as in-place ATen multiplies (while H or D is still hot in cache). Undefined A/B = identity.

Tensor forward_layer(const Tensor& G_, const Tensor& A_, const Tensor& S_, const Tensor& B_) {
  // The op's autograd (registered from Python) wraps this kernel; its internal GEMMs must not
  // record a graph, in this thread or in a parallel_for worker.
  at::AutoDispatchBelowADInplaceOrView guard;
  auto scale = [](const Tensor& H, const Tensor& S, bool own_h) {
    return own_h ? Tensor(H).mul_(S) : at::mul(H, S);
  };
  return layer::finish(layer::forward(layer::up(G_), layer::up(A_), layer::up(S_), layer::up(B_), scale),
                       G_.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_layer(const Tensor& dY_, const Tensor& G_,
                                                          const Tensor& A_, const Tensor& S_,
                                                          const Tensor& B_, Mask mask) {
  at::AutoDispatchBelowADInplaceOrView guard;
  auto elementwise = [](const Tensor& S, const Tensor& H, const Tensor& D, bool need_m, bool need_e,
                        bool need_s, bool own) {
    layer::ElementwiseOut e;
    if (need_s) e.dS = at::mul(D, H);  // before H and D are overwritten
    if (need_m) e.M = own ? Tensor(H).mul_(S) : at::mul(H, S);
    if (need_e) e.E = own ? Tensor(D).mul_(S) : at::mul(D, S);
    return e;
  };
  std::array<Tensor, 4> out = layer::backward(layer::up(dY_), layer::up(G_), layer::up(A_), layer::up(S_),
                                              layer::up(B_), mask, elementwise);
  for (Tensor& t : out) t = t.defined() ? layer::finish(t, G_.scalar_type()) : layer::empty_slot(G_);
  return {out[0], out[1], out[2], out[3]};
}

// ---------------------------------------------------------------------------------------------
// Grouped: many layers of different shapes in one parallel loop

// Rough GEMM work of a layer, ∝ numel·(m+n); used only for scheduling.
double layer_cost(const Tensor& G) {
  return static_cast<double>(G.numel()) * static_cast<double>(G.size(-2) + G.size(-1));
}

// Above this cost (two 256×256 layers' worth) a layer's own GEMMs use the intra-op threads better
// than a one-thread-per-layer schedule would.
constexpr double kBigLayerCost = 2.0 * 256.0 * 256.0 * 512.0;

// Runs fn(i) for every layer i. Big layers run one after another with multithreaded GEMMs; the
// small ones run inside one at::parallel_for, where nested ATen parallelism is off, so each layer's
// GEMMs are single-threaded and the threads work on different layers. Layers are taken largest
// first from a shared counter (a dynamic longest-job-first schedule), so uneven widths still
// balance across threads.
template <typename Fn>
void for_each_layer(const TensorList& grads, const Fn& fn) {
  const auto n = static_cast<int64_t>(grads.size());
  std::vector<double> cost(n);
  for (int64_t i = 0; i < n; ++i) cost[i] = layer_cost(grads[i]);
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });

  int64_t k = 0;
  for (; k < n && cost[order[k]] >= kBigLayerCost; ++k) fn(order[k]);

  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n - k);
  if (workers <= 1 || at::in_parallel_region()) {
    for (; k < n; ++k) fn(order[k]);
    return;
  }
  std::atomic<int64_t> next{k};
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
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
}

TORCH_LIBRARY_IMPL(apo, CPU, m) {
  m.impl("precondition", &apo::precondition_cpu);
  m.impl("precondition_backward", &apo::precondition_backward_cpu);
  m.impl("precondition_grouped", &apo::precondition_grouped_cpu);
  m.impl("precondition_grouped_backward", &apo::precondition_grouped_backward_cpu);
}
