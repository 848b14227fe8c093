// apo-kernels: the input rules of the registered ops, shared by the CPU (ops.cpp) and CUDA
// (cuda/precondition.cu) kernels.
//
// The same rules as apo_kernels/ops/_validate.py, with the same messages, so that a direct call of
// torch.ops.apo.* fails like the public API does: TypeError (TORCH_CHECK_TYPE) for a wrong dtype,
// ValueError (TORCH_CHECK_VALUE) for layout, ndim, shape, device or size, each naming the argument.
//   - every input is a dense (strided) tensor of float32, float64, float16 or bfloat16;
//   - grad is 2-D (m, n) or 3-D (L, m, n); A, S, B (and grad_out) have its ndim, dtype and device;
//   - A is (…, m, m), S and grad_out are grad's shape, B is (…, n, n), one batch size L;
//   - grouped: lists of one length, 2-D layers, one dtype and device for all layers;
//   - the result (the backward's: the outputs its mask asks for) fits in the device's memory; it is
//     refused before anything is allocated.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <iomanip>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace apo {
namespace checks {

using at::Tensor;
using at::TensorList;
using Mask = std::array<bool, 4>;  // (d_grad, dA, dS, dB)

// --------------------------------------------------------------------------------------------
// Printing as Python does: shapes as tuples, dtypes and layouts as torch.<name>

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << (s.size() == 1 ? ",)" : ")");
  return out.str();
}

inline std::string dtype_str(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

inline std::string layout_str(at::Layout l) {
  switch (l) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    default: return c10::str(l);
  }
}

inline bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// --------------------------------------------------------------------------------------------
// One layer

inline void check_tensor(const Tensor& t, const std::string& name) {
  TORCH_CHECK_TYPE(t.defined(), name, " must be a torch.Tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got layout ",
                    layout_str(t.layout()));
  TORCH_CHECK_TYPE(supported_dtype(t.scalar_type()), name, " has dtype ", dtype_str(t.scalar_type()),
                   "; supported dtypes are float32, float64, float16, bfloat16");
}

inline void check_layer(const Tensor& G, const Tensor& A, const Tensor& S, const Tensor& B,
                        const std::string& prefix = "") {
  const std::array<const char*, 4> names = {"grad", "A", "S", "B"};
  const std::array<const Tensor*, 4> tensors = {&G, &A, &S, &B};
  for (size_t k = 0; k < 4; ++k) check_tensor(*tensors[k], prefix + names[k]);
  const int64_t d = G.dim();
  TORCH_CHECK_VALUE(d == 2 || d == 3, prefix, "grad must be 2-D (m, n) or 3-D (L, m, n), got shape ",
                    shape_str(G.sizes()));
  for (size_t k = 1; k < 4; ++k) {
    const Tensor& t = *tensors[k];
    TORCH_CHECK_VALUE(t.dim() == d, prefix, names[k], " must have ", d, " dims like grad, got shape ",
                      shape_str(t.sizes()));
    TORCH_CHECK_TYPE(t.scalar_type() == G.scalar_type(), prefix, names[k], " has dtype ",
                     dtype_str(t.scalar_type()), " but grad has ", dtype_str(G.scalar_type()));
    TORCH_CHECK_VALUE(t.device() == G.device(), prefix, names[k], " is on ", t.device(),
                      " but grad is on ", G.device());
  }
  const int64_t m = G.size(-2), n = G.size(-1);
  std::vector<int64_t> lead(G.sizes().begin(), G.sizes().end() - 2);
  auto with_lead = [&](int64_t r, int64_t c) {
    std::vector<int64_t> s = lead;
    s.push_back(r);
    s.push_back(c);
    return s;
  };
  const std::array<std::vector<int64_t>, 4> expected = {with_lead(m, n), with_lead(m, m), with_lead(m, n),
                                                        with_lead(n, n)};
  for (size_t k = 1; k < 4; ++k) {
    const Tensor& t = *tensors[k];
    const bool batch_differs = d == 3 && t.size(0) != G.size(0);
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected[k]), prefix, names[k], " must have shape ",
                      shape_str(expected[k]), " for grad of shape ", shape_str(G.sizes()), " (mismatched ",
                      batch_differs ? "batch size" : "shape", "), got ", shape_str(t.sizes()));
  }
}

inline void check_grad_out(const Tensor& dY, const Tensor& G, const std::string& prefix = "") {
  check_tensor(dY, prefix + "grad_out");
  TORCH_CHECK_VALUE(dY.sizes() == G.sizes(), prefix, "grad_out must have the shape of grad ",
                    shape_str(G.sizes()), ", got ", shape_str(dY.sizes()));
  TORCH_CHECK_TYPE(dY.scalar_type() == G.scalar_type(), prefix, "grad_out has dtype ",
                   dtype_str(dY.scalar_type()), " but grad has ", dtype_str(G.scalar_type()));
  TORCH_CHECK_VALUE(dY.device() == G.device(), prefix, "grad_out is on ", dY.device(),
                    " but grad is on ", G.device());
}

// --------------------------------------------------------------------------------------------
// Grouped: the lists, then every layer

inline void check_group(TensorList Gs, TensorList As, TensorList Ss, TensorList Bs,
                        const TensorList* dYs = nullptr) {
  std::vector<std::pair<const char*, size_t>> lengths = {
      {"grads", Gs.size()}, {"As", As.size()}, {"Ss", Ss.size()}, {"Bs", Bs.size()}};
  if (dYs != nullptr) lengths.emplace_back("grad_outs", dYs->size());
  bool same = true;
  std::ostringstream got;
  got << "{";
  for (size_t k = 0; k < lengths.size(); ++k) {
    same = same && lengths[k].second == lengths[0].second;
    got << (k ? ", " : "") << "'" << lengths[k].first << "': " << lengths[k].second;
  }
  got << "}";
  TORCH_CHECK_VALUE(same, "grads, As, Ss, Bs must have the same length, got ", got.str());
  for (size_t i = 0; i < Gs.size(); ++i) {
    const std::string prefix = "layer " + std::to_string(i) + ": ";
    check_layer(Gs[i], As[i], Ss[i], Bs[i], prefix);
    TORCH_CHECK_VALUE(Gs[i].dim() == 2, prefix, "grouped layers must be 2-D (m, n), got shape ",
                      shape_str(Gs[i].sizes()));
    TORCH_CHECK_TYPE(Gs[i].scalar_type() == Gs[0].scalar_type(), prefix, "dtype ",
                     dtype_str(Gs[i].scalar_type()), " differs from layer 0's ", dtype_str(Gs[0].scalar_type()));
    TORCH_CHECK_VALUE(Gs[i].device() == Gs[0].device(), prefix, "device ", Gs[i].device(),
                      " differs from layer 0's ", Gs[0].device());
    if (dYs != nullptr) check_grad_out((*dYs)[i], Gs[i], prefix);
  }
}

// --------------------------------------------------------------------------------------------
// Size: the result must fit in the device's memory (checked after the rules above)

// Elements of one layer's result: the forward's (mask == nullptr) or the backward's outputs that
// `mask` asks for. In double: sizes of expanded tensors can overflow int64 when multiplied.
inline double result_elems(const Tensor& G, const Mask* mask) {
  const double lead = G.dim() == 3 ? static_cast<double>(G.size(0)) : 1.0;
  const double m = static_cast<double>(G.size(-2)), n = static_cast<double>(G.size(-1));
  if (mask == nullptr) return lead * m * n;
  const std::array<double, 4> per_output = {m * n, m * m, m * n, n * n};
  double sum = 0;
  for (size_t k = 0; k < 4; ++k) sum += (*mask)[k] ? per_output[k] : 0.0;
  return lead * sum;
}

// `memory_bytes` <= 0: unknown, nothing is refused.
inline void check_result_fits(TensorList grads, const Mask* mask, double memory_bytes) {
  if (grads.empty() || memory_bytes <= 0) return;
  double total = 0;
  for (const Tensor& g : grads) total += result_elems(g, mask) * static_cast<double>(g.element_size());
  if (total <= memory_bytes) return;
  std::ostringstream who, what;
  if (grads.size() == 1) {
    who << "grad of shape " << shape_str(grads[0].sizes());
  } else {
    who << "grads (" << grads.size() << " layers)";
  }
  what << "result";
  if (mask != nullptr) {
    what << " for output_mask=[";
    for (size_t k = 0; k < 4; ++k) what << (k ? ", " : "") << ((*mask)[k] ? "True" : "False");
    what << "]";
  }
  auto integer = [](double v) {
    std::ostringstream out;
    out << std::fixed << std::setprecision(0) << v;
    return out.str();
  };
  TORCH_CHECK_VALUE(false, who.str(), ": the ", what.str(), " needs ", integer(total),
                    " bytes, more than the ", integer(memory_bytes), " bytes of memory of ",
                    grads[0].device());
}

// Physical memory of this machine (asked once), or 0 where it cannot be asked.
inline double host_memory_bytes() {
  static const double bytes = [] {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) return static_cast<double>(pages) * static_cast<double>(page);
#endif
    return 0.0;
  }();
  return bytes;
}

}  // namespace checks
}  // namespace apo
