// apo-kernels: what the CPU (ops.cpp) and CUDA (cuda/precondition.cu) kernels share: the input
// rules of the registered ops, and the op's maths on ATen GEMMs (identity factors included).
//
// Input rules: the same as apo_kernels/ops/_validate.py, with the same messages, so that a direct
// call of torch.ops.apo.* fails like the public API does: TypeError (TORCH_CHECK_TYPE) for a wrong
// dtype, ValueError (TORCH_CHECK_VALUE) for layout, ndim, shape, device or size, each naming the
// argument.
//   - every input is a dense (strided) tensor of float32, float64, float16 or bfloat16;
//   - A and B may be None (an identity factor; never materialized);
//   - grad is 2-D (m, n) or 3-D (L, m, n); A, S, B (and grad_out) have its ndim, dtype and device;
//   - A is (…, m, m), S and grad_out are grad's shape, B is (…, n, n), one batch size L;
//   - grouped: lists of one length, 2-D layers, one dtype and device for all layers;
//   - the result (the backward's: the outputs its mask asks for) fits in the device's memory; it is
//     refused before anything is allocated.
//   - lookahead_write: lists of one length, per parameter a delta and an out of its shape, out of its
//     dtype, all on one device, out sharing no element with any argument.
//   - sgd_lookahead: lists of one length (momenta empty or of that length), per parameter a gradient,
//     a delta and an out of its shape, out of its dtype, all on one device, deltas and out sharing no
//     element with any argument.
//   - sgd_step: lists of one length (momenta: one per parameter with a momentum, none without),
//     per parameter a gradient and a momentum of its shape and dtype, all on one device, params and
//     momenta sharing no element with any argument; lr, momentum, weight_decay finite and >= 0,
//     dampening finite, nesterov only with a momentum and no dampening (torch.optim.SGD's rules).
//   - dot_sum: lists of one length, per pair one shape, all on one device.
//   - dot_adam_step: a and b as dot_sum's; one segment length (>= 0) per entry of param, summing to
//     the number of pairs; param 1-D, exp_avg and exp_avg_sq of its shape, float32 or float64 and
//     contiguous, step 0-D, all on param's device, the four written apart from every argument; lr and
//     eps finite and >= 0, betas in [0, 1).
//   - kron_precondition: grad 2-D (m, n), L (m, m) or None, R (n, n) or None and out (m, n) of its
//     dtype and device, out sharing no element with grad, L or R.
//   - kl_value_and_grad: new_out and old_out of one shape, dtype and device, at least 1-D and not
//     empty; a finite scale.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <iomanip>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
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

// A or B undefined: an identity factor (None from Python), which has nothing to check.
inline void check_layer(const Tensor& G, const Tensor& A, const Tensor& S, const Tensor& B,
                        const std::string& prefix = "") {
  const std::array<const char*, 4> names = {"grad", "A", "S", "B"};
  const std::array<const Tensor*, 4> tensors = {&G, &A, &S, &B};
  auto identity = [&](size_t k) { return (k == 1 || k == 3) && !tensors[k]->defined(); };
  for (size_t k = 0; k < 4; ++k) {
    if (!identity(k)) check_tensor(*tensors[k], prefix + names[k]);
  }
  const int64_t d = G.dim();
  TORCH_CHECK_VALUE(d == 2 || d == 3, prefix, "grad must be 2-D (m, n) or 3-D (L, m, n), got shape ",
                    shape_str(G.sizes()));
  for (size_t k = 1; k < 4; ++k) {
    if (identity(k)) continue;
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
    if (identity(k)) continue;
    const Tensor& t = *tensors[k];
    const bool batch_differs = d == 3 && t.size(0) != G.size(0);
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(expected[k]), prefix, names[k], " must have shape ",
                      shape_str(expected[k]), " for grad of shape ", shape_str(G.sizes()), " (mismatched ",
                      batch_differs ? "batch size" : "shape", "), got ", shape_str(t.sizes()));
  }
}

// A tensor that must be like grad: its shape, dtype and device (grad_out; the momentum step's
// momenta, vs and out).
inline void check_like_grad(const Tensor& t, const Tensor& G, const char* name, const std::string& prefix = "") {
  check_tensor(t, prefix + name);
  TORCH_CHECK_VALUE(t.sizes() == G.sizes(), prefix, name, " must have the shape of grad ",
                    shape_str(G.sizes()), ", got ", shape_str(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == G.scalar_type(), prefix, name, " has dtype ",
                   dtype_str(t.scalar_type()), " but grad has ", dtype_str(G.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == G.device(), prefix, name, " is on ", t.device(), " but grad is on ",
                    G.device());
}

inline void check_grad_out(const Tensor& dY, const Tensor& G, const std::string& prefix = "") {
  check_like_grad(dY, G, "grad_out", prefix);
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
// The momentum step (precondition_momentum_grouped): per layer momenta, vs and out like grad, and
// the written tensors (vs, out) sharing no element with any other argument.

namespace overlap {

// [first, last) byte addresses a tensor's elements span.
inline std::pair<uintptr_t, uintptr_t> span(const Tensor& t) {
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  intptr_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const intptr_t reach = static_cast<intptr_t>(t.stride(d)) * (t.size(d) - 1);
    (reach < 0 ? lo : hi) += reach;
  }
  const intptr_t size = static_cast<intptr_t>(t.element_size());
  return {base + lo * size, base + (hi + 1) * size};
}

// A 2-D view whose rows are unit-stride runs no longer than the row stride: (row stride, storage
// offset, rows, columns).
inline std::optional<std::array<int64_t, 4>> rows(const Tensor& t) {
  if (t.dim() != 2 || (t.stride(1) != 1 && t.size(1) > 1) || t.stride(0) < t.size(1)) return std::nullopt;
  return std::array<int64_t, 4>{std::max<int64_t>(t.stride(0), 1), t.storage_offset(), t.size(0), t.size(1)};
}

inline int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }  // b > 0

// Whether two non-empty tensors may share an element: disjoint byte spans never do, and two row views
// with one row stride (blocks of one row-major matrix: tiles of a flat buffer, column blocks) exactly
// when some element of each lies on the other; anything else that spans the same bytes is taken to.
inline bool may_share(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.is_alias_of(b)) return false;
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  if (a1 <= b0 || b1 <= a0) return false;
  const auto ra = rows(a), rb = rows(b);
  if (!ra || !rb || (*ra)[0] != (*rb)[0] || a.element_size() != b.element_size()) return true;
  // a's row r + k and b's row r meet where k·ld − d (d = b's offset − a's) is a column difference,
  // −columns_a < k·ld − d < columns_b, for a row shift k both row ranges allow (exact wherever the
  // views start, e.g. blocks of a matrix that does not start at a multiple of ld)
  const int64_t ld = (*ra)[0], d = (*rb)[1] - (*ra)[1];
  const int64_t k_lo = std::max(floor_div(d - (*ra)[3], ld) + 1, 1 - (*rb)[2]);
  const int64_t k_hi = std::min(-floor_div(-(d + (*rb)[3]), ld) - 1, (*ra)[2] - 1);
  return k_lo <= k_hi;
}

// Refuses any element shared by a written tensor (those of the lists from `first_written` on) and
// another argument, naming the first such pair in argument order (written list, its index, the other
// list, its index). Only tensors whose byte spans intersect are compared (a sweep over the spans
// sorted by start), so an optimizer's disjoint tiles of a few flat buffers cost O(n log n), not n².
template <size_t K>
void check_written_apart(const std::array<std::pair<const char*, TensorList>, K>& lists, size_t first_written) {
  struct Item {
    uintptr_t lo, hi;
    size_t k, j;
  };
  std::vector<Item> items;
  for (size_t k = 0; k < K; ++k) {
    for (size_t j = 0; j < lists[k].second.size(); ++j) {
      const Tensor& t = lists[k].second[j];
      if (!t.defined() || t.numel() == 0) continue;
      const auto [lo, hi] = span(t);
      items.push_back({lo, hi, k, j});
    }
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.lo < b.lo; });
  std::optional<std::array<size_t, 4>> first;  // (written list, index, other list, index)
  std::vector<const Item*> open;               // items whose span reaches past the current start
  for (const Item& q : items) {
    open.erase(std::remove_if(open.begin(), open.end(), [&](const Item* p) { return p->hi <= q.lo; }), open.end());
    for (const Item* p : open) {
      if (p->k < first_written && q.k < first_written) continue;
      if (!may_share(lists[p->k].second[p->j], lists[q.k].second[q.j])) continue;
      for (const auto& [w, o] : {std::pair<const Item*, const Item*>{p, &q}, {&q, p}}) {
        const std::array<size_t, 4> key = {w->k, w->j, o->k, o->j};
        if (w->k >= first_written && (!first || key < *first)) first = key;
      }
    }
    open.push_back(&q);
  }
  if (first) {
    const auto& [w, i, k, j] = *first;
    TORCH_CHECK_VALUE(false, lists[w].first, "[", i, "] shares memory with ", lists[k].first, "[", j,
                      "]; the outputs must not overlap the inputs or each other");
  }
}

}  // namespace overlap

// A tensor the op writes must not hold one element at two indices (an expanded tensor).
inline void check_not_expanded(const Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
                    " has elements that share memory (an expanded tensor); it is written");
}

// A layer with a bias gradient (bias_grads[i] defined; an empty list or an undefined entry: none)
// has the matrix [grads[i] | bias_grads[i]]: grads[i] its first n − 1 columns (m, n − 1),
// bias_grads[i] (m,) its last, and momenta, vs, out that whole (m, n) matrix. Its momenta then stand
// for its grad in the rules below, once checked against grads[i] and bias_grads[i] here.
inline std::vector<Tensor> layer_grads(TensorList Gs, TensorList Gbs, TensorList Ms) {
  std::vector<Tensor> layers(Gs.begin(), Gs.end());
  if (Gbs.empty()) return layers;
  TORCH_CHECK_VALUE(Gbs.size() == Gs.size(), "bias_grads must have one entry per layer (", Gs.size(), "), got ",
                    Gbs.size());
  TORCH_CHECK_VALUE(Ms.size() == Gs.size(), "momenta must have one tensor per layer (", Gs.size(), "), got ",
                    Ms.size());
  for (size_t i = 0; i < Gs.size(); ++i) {
    if (!Gbs[i].defined()) continue;
    const std::string prefix = "layer " + std::to_string(i) + ": ";
    check_tensor(Gs[i], prefix + "grad");
    check_tensor(Gbs[i], prefix + "bias_grad");
    TORCH_CHECK_VALUE(Gs[i].dim() == 2, prefix, "grad with a bias_grad must be 2-D (m, n - 1), got shape ",
                      shape_str(Gs[i].sizes()));
    const int64_t m = Gs[i].size(0), n = Gs[i].size(1) + 1;
    TORCH_CHECK_VALUE(Gbs[i].dim() == 1 && Gbs[i].size(0) == m, prefix,
                      "bias_grad must have shape (m,), one value per row of grad (", m, "), got shape ",
                      shape_str(Gbs[i].sizes()));
    TORCH_CHECK_TYPE(Gbs[i].scalar_type() == Gs[i].scalar_type(), prefix, "bias_grad has dtype ",
                     dtype_str(Gbs[i].scalar_type()), " but grad has ", dtype_str(Gs[i].scalar_type()));
    TORCH_CHECK_VALUE(Gbs[i].device() == Gs[i].device(), prefix, "bias_grad is on ", Gbs[i].device(),
                      " but grad is on ", Gs[i].device());
    check_tensor(Ms[i], prefix + "momenta");
    TORCH_CHECK_VALUE(Ms[i].dim() == 2 && Ms[i].size(0) == m && Ms[i].size(1) == n, prefix,
                      "momenta must have the shape of the matrix [grad | bias_grad] (", m, ", ", n, "), got shape ",
                      shape_str(Ms[i].sizes()));
    TORCH_CHECK_TYPE(Ms[i].scalar_type() == Gs[i].scalar_type(), prefix, "momenta has dtype ",
                     dtype_str(Ms[i].scalar_type()), " but grad has ", dtype_str(Gs[i].scalar_type()));
    TORCH_CHECK_VALUE(Ms[i].device() == Gs[i].device(), prefix, "momenta is on ", Ms[i].device(),
                      " but grad is on ", Gs[i].device());
    layers[i] = Ms[i];
  }
  return layers;
}

inline void check_momentum_group(TensorList Gs_, TensorList Ms, TensorList As, TensorList Ss, TensorList Bs,
                                 TensorList Vs, TensorList Outs, double momentum, TensorList Gbs = {}) {
  const std::vector<Tensor> layers = layer_grads(Gs_, Gbs, Ms);
  const TensorList Gs(layers);
  check_group(Gs, As, Ss, Bs);
  const std::array<std::pair<const char*, TensorList>, 3> likes = {
      std::pair<const char*, TensorList>{"momenta", Ms}, {"vs", Vs}, {"out", Outs}};
  for (const auto& [name, list] : likes) {
    TORCH_CHECK_VALUE(list.size() == Gs.size(), name, " must have one tensor per layer (", Gs.size(),
                      "), got ", list.size());
  }
  TORCH_CHECK_VALUE(std::isfinite(momentum), "momentum must be a finite number, got ", momentum);
  for (size_t i = 0; i < Gs.size(); ++i) {
    const std::string prefix = "layer " + std::to_string(i) + ": ";
    for (const auto& [name, list] : likes) check_like_grad(list[i], Gs[i], name, prefix);
    for (const auto& [name, list] : {likes[1], likes[2]}) check_not_expanded(list[i], prefix + name);
  }
  // every written tensor (vs, out) against every argument
  const std::array<std::pair<const char*, TensorList>, 8> all = {
      std::pair<const char*, TensorList>{"grads", Gs_}, {"bias_grads", Gbs}, {"momenta", Ms}, {"As", As},
      {"Ss", Ss}, {"Bs", Bs}, {"vs", Vs}, {"out", Outs}};
  overlap::check_written_apart(all, 6);
}

// --------------------------------------------------------------------------------------------
// The lookahead write (lookahead_write): per parameter a delta of its shape (any float dtype) and an
// out of its shape and dtype, all on one device; out shares no element with any argument.

inline void check_lookahead(TensorList params, TensorList deltas, TensorList out) {
  TORCH_CHECK_VALUE(deltas.size() == params.size() && out.size() == params.size(),
                    "params, deltas, out must have the same length, got {'params': ", params.size(),
                    ", 'deltas': ", deltas.size(), ", 'out': ", out.size(), "}");
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string at_i = "[" + std::to_string(i) + "]";
    check_tensor(params[i], "params" + at_i);
    check_tensor(deltas[i], "deltas" + at_i);
    check_tensor(out[i], "out" + at_i);
    for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"deltas", &deltas[i]}, {"out", &out[i]}}) {
      TORCH_CHECK_VALUE(t->sizes() == params[i].sizes(), name, at_i, " must have the shape of params", at_i, " ",
                        shape_str(params[i].sizes()), ", got ", shape_str(t->sizes()));
      TORCH_CHECK_VALUE(t->device() == params[0].device(), name, at_i, " is on ", t->device(),
                        " but params[0] is on ", params[0].device());
    }
    TORCH_CHECK_VALUE(params[i].device() == params[0].device(), "params", at_i, " is on ", params[i].device(),
                      " but params[0] is on ", params[0].device());
    TORCH_CHECK_TYPE(out[i].scalar_type() == params[i].scalar_type(), "out", at_i, " has dtype ",
                     dtype_str(out[i].scalar_type()), " but params", at_i, " has ",
                     dtype_str(params[i].scalar_type()));
    check_not_expanded(out[i], "out" + at_i);
  }
  const std::array<std::pair<const char*, TensorList>, 3> all = {
      std::pair<const char*, TensorList>{"params", params}, {"deltas", deltas}, {"out", out}};
  overlap::check_written_apart(all, 2);
}

// name[i] of a per-parameter list: a tensor of params[i]'s shape on params[0]'s device.
inline void check_per_param(const Tensor& t, const char* name, size_t i, TensorList params) {
  const std::string at_i = "[" + std::to_string(i) + "]";
  check_tensor(t, name + at_i);
  TORCH_CHECK_VALUE(t.sizes() == params[i].sizes(), name, at_i, " must have the shape of params", at_i, " ",
                    shape_str(params[i].sizes()), ", got ", shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.device() == params[0].device(), name, at_i, " is on ", t.device(), " but params[0] is on ",
                    params[0].device());
}

// APO-LR's SGD lookahead (sgd_lookahead): per parameter a gradient, a delta and an out of its shape
// (momenta: none, or one of its shape per parameter), any float dtype, out of the parameter's dtype,
// all on one device; deltas and out share no element with any argument.

inline void check_sgd_lookahead(TensorList params, TensorList grads, TensorList momenta, TensorList deltas,
                                TensorList out) {
  TORCH_CHECK_VALUE(grads.size() == params.size() && deltas.size() == params.size() && out.size() == params.size() &&
                        (momenta.empty() || momenta.size() == params.size()),
                    "params, grads, deltas, out (and momenta, unless empty) must have the same length, got "
                    "{'params': ", params.size(), ", 'grads': ", grads.size(), ", 'momenta': ", momenta.size(),
                    ", 'deltas': ", deltas.size(), ", 'out': ", out.size(), "}");
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string at_i = "[" + std::to_string(i) + "]";
    check_per_param(params[i], "params", i, params);
    std::vector<std::pair<const char*, const Tensor*>> others = {{"grads", &grads[i]}, {"deltas", &deltas[i]},
                                                                 {"out", &out[i]}};
    if (!momenta.empty()) others.push_back({"momenta", &momenta[i]});
    for (const auto& [name, t] : others) check_per_param(*t, name, i, params);
    TORCH_CHECK_TYPE(out[i].scalar_type() == params[i].scalar_type(), "out", at_i, " has dtype ",
                     dtype_str(out[i].scalar_type()), " but params", at_i, " has ",
                     dtype_str(params[i].scalar_type()));
    check_not_expanded(deltas[i], "deltas" + at_i);
    check_not_expanded(out[i], "out" + at_i);
  }
  const std::array<std::pair<const char*, TensorList>, 5> all = {
      std::pair<const char*, TensorList>{"params", params}, {"grads", grads}, {"momenta", momenta},
      {"deltas", deltas}, {"out", out}};
  overlap::check_written_apart(all, 3);
}

// torch.optim.SGD's step (sgd_step): per parameter a gradient and (with a momentum) a momentum buffer
// of its shape and dtype, all on one device; params and momenta are written, so they share no element
// with any argument; the hyperparameters follow torch.optim.SGD's rules.

inline void check_sgd_step(TensorList params, TensorList grads, TensorList momenta, double lr, double momentum,
                           double dampening, double weight_decay, bool nesterov) {
  for (const auto& [name, v] : {std::pair<const char*, double>{"lr", lr}, {"momentum", momentum},
                                {"weight_decay", weight_decay}}) {
    TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, name, " must be a finite number >= 0, got ", v);
  }
  TORCH_CHECK_VALUE(std::isfinite(dampening), "dampening must be a finite number, got ", dampening);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0),
                    "nesterov requires momentum > 0 and dampening = 0, got momentum=", momentum,
                    ", dampening=", dampening);
  const size_t n_momenta = momentum != 0.0 ? params.size() : 0;
  TORCH_CHECK_VALUE(grads.size() == params.size() && momenta.size() == n_momenta,
                    "params and grads must have the same length and momenta one tensor per parameter with a "
                    "momentum (none without), got {'params': ", params.size(), ", 'grads': ", grads.size(),
                    ", 'momenta': ", momenta.size(), "} at momentum=", momentum);
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string at_i = "[" + std::to_string(i) + "]";
    check_per_param(params[i], "params", i, params);
    std::vector<std::pair<const char*, const Tensor*>> others = {{"grads", &grads[i]}};
    if (n_momenta != 0) others.push_back({"momenta", &momenta[i]});
    for (const auto& [name, t] : others) {
      check_per_param(*t, name, i, params);
      TORCH_CHECK_TYPE(t->scalar_type() == params[i].scalar_type(), name, at_i, " has dtype ",
                       dtype_str(t->scalar_type()), " but params", at_i, " has ", dtype_str(params[i].scalar_type()));
    }
    check_not_expanded(params[i], "params" + at_i);
    if (n_momenta != 0) check_not_expanded(momenta[i], "momenta" + at_i);
  }
  const std::array<std::pair<const char*, TensorList>, 3> all = {
      std::pair<const char*, TensorList>{"grads", grads}, {"params", params}, {"momenta", momenta}};
  overlap::check_written_apart(all, 1);
}

// The sum of dot products (dot_sum): per pair one shape (any float dtypes), all on one device.

inline void check_dot_sum(TensorList a, TensorList b) {
  TORCH_CHECK_VALUE(a.size() == b.size(), "a and b must have the same length, got {'a': ", a.size(), ", 'b': ",
                    b.size(), "}");
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string at_i = "[" + std::to_string(i) + "]";
    check_tensor(a[i], "a" + at_i);
    check_tensor(b[i], "b" + at_i);
    TORCH_CHECK_VALUE(b[i].sizes() == a[i].sizes(), "b", at_i, " must have the shape of a", at_i, " ",
                      shape_str(a[i].sizes()), ", got ", shape_str(b[i].sizes()));
    for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"a", &a[i]}, {"b", &b[i]}}) {
      TORCH_CHECK_VALUE(t->device() == a[0].device(), name, at_i, " is on ", t->device(), " but a[0] is on ",
                        a[0].device());
    }
  }
}

// One step of torch.optim.Adam on a sum of dot products (dot_adam_step): a and b as dot_sum's, on
// param's device; segments one non-negative length per entry of param, summing to the number of pairs;
// param 1-D float32 or float64 and contiguous, exp_avg and exp_avg_sq of its shape, dtype and device
// (contiguous too: torch's kernel walks them as flat arrays), step a 0-d float32 or float64 on its
// device; the four are written, so they share no element with any argument; lr and eps finite and
// >= 0, betas in [0, 1) (torch.optim.Adam's rules).

inline void check_dot_adam_step(TensorList a, TensorList b, at::IntArrayRef segments, const Tensor& param,
                                const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& step, double lr,
                                double beta1, double beta2, double eps) {
  check_dot_sum(a, b);
  for (const auto& [name, v] : {std::pair<const char*, double>{"lr", lr}, {"eps", eps}}) {
    TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, name, " must be a finite number >= 0, got ", v);
  }
  for (const auto& [name, v] : {std::pair<const char*, double>{"beta1", beta1}, {"beta2", beta2}}) {
    TORCH_CHECK_VALUE(v >= 0.0 && v < 1.0, name, " must be in [0, 1), got ", v);
  }
  const std::array<std::pair<const char*, const Tensor*>, 3> state = {
      std::pair<const char*, const Tensor*>{"param", &param}, {"exp_avg", &exp_avg}, {"exp_avg_sq", &exp_avg_sq}};
  for (const auto& [name, t] : state) {
    check_tensor(*t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, name, " has dtype ",
                     dtype_str(t->scalar_type()), "; supported dtypes are float32, float64");
    TORCH_CHECK_VALUE(t->sizes() == param.sizes(), name, " must have param's shape ", shape_str(param.sizes()),
                      ", got ", shape_str(t->sizes()));
    TORCH_CHECK_TYPE(t->scalar_type() == param.scalar_type(), name, " has dtype ", dtype_str(t->scalar_type()),
                     " but param has ", dtype_str(param.scalar_type()));
    TORCH_CHECK_VALUE(t->device() == param.device(), name, " is on ", t->device(), " but param is on ",
                      param.device());
    TORCH_CHECK_VALUE(t->is_contiguous(), name, " must be contiguous");
  }
  TORCH_CHECK_VALUE(param.dim() == 1, "param must be 1-D, got shape ", shape_str(param.sizes()));
  check_tensor(step, "step");
  TORCH_CHECK_TYPE(step.scalar_type() == at::kFloat || step.scalar_type() == at::kDouble, "step has dtype ",
                   dtype_str(step.scalar_type()), "; supported dtypes are float32, float64");
  TORCH_CHECK_VALUE(step.dim() == 0, "step must be 0-D, got shape ", shape_str(step.sizes()));
  TORCH_CHECK_VALUE(step.device() == param.device(), "step is on ", step.device(), " but param is on ",
                    param.device());
  TORCH_CHECK_VALUE(a.empty() || a[0].device() == param.device(), "a[0] is on ", a.empty() ? param.device() : a[0].device(),
                    " but param is on ", param.device());
  TORCH_CHECK_VALUE(static_cast<int64_t>(segments.size()) == param.numel(),
                    "segments must have one length per entry of param (", param.numel(), "), got ", segments.size());
  int64_t total = 0;
  for (size_t e = 0; e < segments.size(); ++e) {
    TORCH_CHECK_VALUE(segments[e] >= 0, "segments[", e, "] must be >= 0, got ", segments[e]);
    total += segments[e];
  }
  TORCH_CHECK_VALUE(total == static_cast<int64_t>(a.size()), "segments must sum to the number of pairs (", a.size(),
                    "), got ", total);
  const std::array<std::pair<const char*, TensorList>, 6> all = {
      std::pair<const char*, TensorList>{"a", a}, {"b", b}, {"param", TensorList(param)},
      {"exp_avg", TensorList(exp_avg)}, {"exp_avg_sq", TensorList(exp_avg_sq)}, {"step", TensorList(step)}};
  overlap::check_written_apart(all, 2);
}

// The kron structure's step (kron_precondition): grad 2-D (m, n); L (m, m) or None, R (n, n) or None
// (an identity side) and out (m, n) of its dtype and device; out written, so sharing no element with
// grad, L or R.

inline void check_kron(const Tensor& G, const Tensor& L, const Tensor& R, const Tensor& out) {
  check_tensor(G, "grad");
  TORCH_CHECK_VALUE(G.dim() == 2, "grad must be 2-D (m, n), got shape ", shape_str(G.sizes()));
  const int64_t m = G.size(0), n = G.size(1);
  for (const auto& [name, t, rows] : {std::tuple<const char*, const Tensor*, int64_t>{"L", &L, m}, {"R", &R, n}}) {
    if (!t->defined()) continue;  // None: an identity side
    check_tensor(*t, name);
    TORCH_CHECK_TYPE(t->scalar_type() == G.scalar_type(), name, " has dtype ", dtype_str(t->scalar_type()),
                     " but grad has ", dtype_str(G.scalar_type()));
    TORCH_CHECK_VALUE(t->device() == G.device(), name, " is on ", t->device(), " but grad is on ", G.device());
    const std::array<int64_t, 2> want = {rows, rows};
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(want), name, " must have shape ", shape_str(want),
                      " for grad of shape ", shape_str(G.sizes()), ", got ", shape_str(t->sizes()));
  }
  check_like_grad(out, G, "out");
  check_not_expanded(out, "out");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"grad", &G}, {"L", &L}, {"R", &R}}) {
    TORCH_CHECK_VALUE(!t->defined() || !overlap::may_share(out, *t), "out shares memory with ", name,
                      "; the output must not overlap the inputs");
  }
}

// The FSD term's KL (kl_value_and_grad): new_out and old_out of one shape, dtype and device, at
// least 1-D and not empty; a finite scale.

inline void check_kl(const Tensor& new_out, const Tensor& old_out, double scale) {
  check_tensor(new_out, "new_out");
  check_tensor(old_out, "old_out");
  TORCH_CHECK_VALUE(old_out.sizes() == new_out.sizes(), "old_out must have the shape of new_out ",
                    shape_str(new_out.sizes()), ", got ", shape_str(old_out.sizes()));
  TORCH_CHECK_TYPE(old_out.scalar_type() == new_out.scalar_type(), "old_out has dtype ",
                   dtype_str(old_out.scalar_type()), " but new_out has ",
                   dtype_str(new_out.scalar_type()));
  TORCH_CHECK_VALUE(old_out.device() == new_out.device(), "old_out is on ", old_out.device(),
                    " but new_out is on ", new_out.device());
  TORCH_CHECK_VALUE(new_out.dim() >= 1 && new_out.numel() > 0,
                    "new_out must have at least one dimension and one element (rows × classes), got shape ",
                    shape_str(new_out.sizes()));
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be a finite number, got ", scale);
}

// --------------------------------------------------------------------------------------------
// Size: the result must fit in the device's memory (checked after the rules above)

// Elements of one layer's result: the forward's (mask == nullptr) or the backward's outputs that
// `mask` asks for; an identity factor's gradient is an empty tensor. In double: sizes of expanded
// tensors can overflow int64 when multiplied.
inline double result_elems(const Tensor& G, const Mask* mask, bool has_a, bool has_b) {
  const double lead = G.dim() == 3 ? static_cast<double>(G.size(0)) : 1.0;
  const double m = static_cast<double>(G.size(-2)), n = static_cast<double>(G.size(-1));
  if (mask == nullptr) return lead * m * n;
  const std::array<double, 4> per_output = {m * n, has_a ? m * m : 0.0, m * n, has_b ? n * n : 0.0};
  double sum = 0;
  for (size_t k = 0; k < 4; ++k) sum += (*mask)[k] ? per_output[k] : 0.0;
  return lead * sum;
}

// `memory_bytes` <= 0: unknown, nothing is refused. `As`, `Bs`: the layers' factors (undefined =
// identity), read for the backward only (mask != nullptr).
inline void check_result_fits(TensorList grads, TensorList As, TensorList Bs, const Mask* mask,
                              double memory_bytes) {
  if (grads.empty() || memory_bytes <= 0) return;
  double total = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const bool has_a = mask == nullptr || As[i].defined(), has_b = mask == nullptr || Bs[i].defined();
    total += result_elems(grads[i], mask, has_a, has_b) * static_cast<double>(grads[i].element_size());
  }
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

// ==============================================================================================
// The op's maths on ATen GEMMs, shared by the CPU kernels and the CUDA large-layer path
//
//     Y = A · (S ⊙ (Aᵀ G B)) · Bᵀ          G (m×n), A (m×m), S (m×n), B (n×n); 2-D or batched 3-D
//
// Backward with upstream dY, H = AᵀGB, M = S⊙H:
//     D = Aᵀ dY B,  E = S ⊙ D,  dS = D ⊙ H,  dG = A E Bᵀ,
//     dA = dY B Mᵀ + G B Eᵀ,    dB = dYᵀ A M + Gᵀ A E
//
// An undefined A or B is an identity factor: every product with it is skipped (H = G B, Aᵀ G or G),
// and its gradient is an empty (0,) tensor. Inputs must already be in the compute type (fp32 for
// fp16/bf16: intermediates stay fp32; the caller rounds each output once). Each backend supplies the
// elementwise ⊙S pass. Transposed views go to BLAS as transposes, not copies.
// ==============================================================================================

namespace layer {

using at::Tensor;
using checks::Mask;

// A factor from the schema's `Tensor?`: undefined = identity.
inline Tensor factor(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

inline std::vector<Tensor> factors(const c10::List<std::optional<Tensor>>& ts) {
  std::vector<Tensor> out;
  out.reserve(ts.size());
  for (const std::optional<Tensor>& t : ts) out.push_back(factor(t));
  return out;
}

// fp16/bf16 are computed in fp32 and rounded once when a result is stored.
inline at::ScalarType compute_type(at::ScalarType t) {
  return at::isReducedFloatingType(t) ? at::kFloat : t;
}
inline Tensor up(const Tensor& x) { return x.defined() ? x.to(compute_type(x.scalar_type())) : x; }

// A result in the caller's dtype, contiguous (no-ops when it already is).
inline Tensor finish(const Tensor& x, at::ScalarType dtype) { return x.to(dtype).contiguous(); }

// The gradient slot of a masked-off output or of an identity factor: a fresh empty (0,) tensor
// (outputs must not alias each other).
inline Tensor empty_slot(const Tensor& like) { return at::empty({0}, like.options()); }

inline Tensor mT(const Tensor& x) { return x.transpose(-2, -1); }

inline Tensor gemm(const Tensor& a, const Tensor& b) {
  return a.dim() == 2 ? at::mm(a, b) : at::bmm(a, b);
}

// c += a @ b in place: the beta = 1 of one GEMM call (c is a product of ours, not an input)
inline Tensor add_product(Tensor c, const Tensor& a, const Tensor& b) {
  if (a.dim() == 2) {
    c.addmm_(a, b);
  } else {
    c.baddbmm_(a, b);
  }
  return c;
}

// x·B, x·Bᵀ, A·x, Aᵀ·x; x itself when the factor is the identity. `into`, when defined, is a dead
// product of ours of the result's shape, reused instead of allocating a new one.
inline Tensor times_b(const Tensor& x, const Tensor& B) { return B.defined() ? gemm(x, B) : x; }
inline Tensor times_bt(const Tensor& x, const Tensor& B) { return B.defined() ? gemm(x, mT(B)) : x; }
inline Tensor at_times(const Tensor& A, const Tensor& x) { return A.defined() ? gemm(mT(A), x) : x; }
inline Tensor a_times(const Tensor& A, const Tensor& x, const Tensor& into = Tensor()) {
  if (!A.defined()) return x;
  if (!into.defined()) return gemm(A, x);
  Tensor out = into;
  if (x.dim() == 2) {
    at::mm_out(out, A, x);
  } else {
    at::bmm_out(out, A, x);
  }
  return out;
}

// Forward in the compute type. `scale(H, S, own_h)` returns M = S⊙H; it may overwrite H when
// `own_h` (H is then a product of ours, not the input grad itself).
template <typename Scale>
Tensor forward(const Tensor& G, const Tensor& A, const Tensor& S, const Tensor& B, const Scale& scale) {
  const bool own_h = A.defined() || B.defined();
  Tensor GB = times_b(G, B);
  Tensor M = scale(at_times(A, GB), S, own_h);
  // GB is dead: its buffer takes A·M when it is a product of ours (A, B both present).
  return times_bt(a_times(A, M, A.defined() && B.defined() ? GB : Tensor()), B);
}

// What the backward's elementwise pass computes from D, H, S (each only if asked for):
// dS = D⊙H, M = S⊙H, E = S⊙D.
struct ElementwiseOut {
  Tensor M, E, dS;
};

// Backward in the compute type; outputs undefined where not computed (masked off or an identity
// factor's gradient). `elementwise(S, H, D, need_m, need_e, need_s, own)` returns M, E, dS, and may
// overwrite H with M and D with E when `own` (products of ours, not grad / grad_out themselves).
// H is undefined when no output needs it (d_grad alone).
template <typename Elementwise>
std::array<Tensor, 4> backward(const Tensor& dY, const Tensor& G, const Tensor& A, const Tensor& S,
                               const Tensor& B, Mask mask, const Elementwise& elementwise) {
  const bool need_g = mask[0], need_a = mask[1] && A.defined(), need_s = mask[2],
             need_b = mask[3] && B.defined();
  std::array<Tensor, 4> out;
  if (!(need_g || need_a || need_s || need_b)) return out;
  const bool need_h = need_a || need_s || need_b;  // H (and so GB) feeds dS, and M for dA/dB
  const bool need_m = need_a || need_b;
  const bool need_e = need_g || need_a || need_b;
  const bool own = A.defined() || B.defined();

  // Without A, D is dYB and H is GB (the same tensors): M and E then overwrite them, which only dA
  // (which needs A) would read again.
  const Tensor dYB = times_b(dY, B);
  const Tensor D = at_times(A, dYB);
  const Tensor GB = need_h ? times_b(G, B) : Tensor();
  const Tensor H = need_h ? at_times(A, GB) : Tensor();
  const ElementwiseOut e = elementwise(S, H, D, need_m, need_e, need_s, own);
  out[2] = e.dS;
  if (need_a) out[1] = add_product(gemm(dYB, mT(e.M)), GB, mT(e.E));  // dY B Mᵀ + G B Eᵀ
  if (need_g || need_b) {
    // dYB and GB are dead once dA is done: with both factors present they take A·E and A·M.
    const bool reuse = A.defined() && B.defined();
    const Tensor AE = a_times(A, e.E, reuse ? dYB : Tensor());
    if (need_g) out[0] = times_bt(AE, B);                                            // A E Bᵀ
    if (need_b) out[3] = add_product(gemm(mT(dY), a_times(A, e.M, reuse ? GB : Tensor())), mT(G), AE);
  }
  return out;
}

}  // namespace layer
}  // namespace apo
