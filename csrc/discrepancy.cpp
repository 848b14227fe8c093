// apo-kernels: apo::kl_value_and_grad, the FSD term's KL divergence and its gradient in one call.
//
//     value = mean over rows of KL(softmax(old) ‖ softmax(new)) = Σ p_old·(log p_old − log p_new) / rows
//             (a class with p_old = 0 adds 0: masked classes, −inf logits, keep it finite)
//     grad  = scale · (softmax(new) − softmax(old)) / rows          (∂value/∂new, times scale)
//
// rows = every leading dim (the softmax is over the last). A meta-step forms this once, on the
// model's output at θ' (batch × classes). There the torch expression (two log_softmax, four
// elementwise ops and a dot) costs its calls, not its arithmetic, and log_softmax over a short last
// dim takes ≈ 0.1 µs per row. Here, per row: the maxima, then exp of the shifted logits with their
// sums, then the value's terms and the gradient, three passes over the row in one call.
//
// float32, float16 and bfloat16 are computed in float32 on that path (sums in float64);
// float64 runs the same maths with ATen's ops. Value and grad come back in the compute dtype (the
// caller casts grad to its own). Input rules: apo_checks.h's check_kl (_validate.py's, same messages).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "apo_checks.h"
#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <vector>

namespace apo {
namespace {

using at::Tensor;

namespace loops {

// e^x for x ≤ 0 (a logit minus its row's maximum), or NaN. Cephes' expf: x = n·ln2 + r with
// |r| ≤ ln2/2, e^r by its degree-7 polynomial, times 2^n built in the exponent bits: within 1 ulp of
// the float64 exp (checked on every 8th float of [−87.3, 0]). Below −87.3 (where 2^n leaves the
// normal range) it returns 0, as e^x rounds to almost that; −inf gives 0 and NaN stays NaN.
// Branch-free, so a loop of it vectorizes.
APO_INLINE float exp_nonpositive(float x) {
  constexpr float kLow = -87.33654f;  // ln(2^−126)
  const float xc = x < kLow ? kLow : x;  // (NaN stays NaN)
  // n = round(xc·log2 e): adding 1.5·2^23 leaves the rounded value in the low mantissa bits
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;  // ln2 in two parts: n·ln2_hi is exact
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  // n ∈ [−126, 0]: a normal 2^n (a NaN's n is taken as −126; its p is NaN anyway)
  const int32_t n_int = static_cast<int32_t>(n >= -126.0f ? n : -126.0f);
  const int32_t bits = (n_int + 127) * (int32_t(1) << 23);
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  const float e = p * two_n;  // formed unconditionally: a select of two values vectorizes without masks
  return x < kLow ? 0.0f : e;
}

// v = exp_nonpositive(v), in place.
APO_INLINE void exp_in_place(float* v, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) v[k] = exp_nonpositive(v[k]);
}

// One block of rows: g = coef · (softmax(x) − softmax(y)) per row; returns Σ_rows KL(softmax(y) ‖
// softmax(x)), summed in float64 like the rows' Σ exp. Scratch: e_old (rows·c floats) and maxima
// (2·rows). The exp runs over the whole block, not per row, so short rows (a classifier's 10
// classes) fill whole SIMD vectors. A class with p_old = 0 adds nothing (0·log 0 = 0), so a masked
// class (a −inf logit, in old alone or in both) leaves the value finite; a NaN or a +inf maximum
// makes the row's terms NaN, as log_softmax's do.
APO_INLINE double kl_block(const float* x, const float* y, float* g, float* e_old, float* maxima, int64_t rows,
                           int64_t c, float coef) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * c;
    float mx = x[o], my = y[o];
#pragma omp simd reduction(max : mx, my)
    for (int64_t k = 0; k < c; ++k) {
      mx = x[o + k] > mx ? x[o + k] : mx;  // (not std::max: APO_NO_TRAPPING_MATH keeps it out of line)
      my = y[o + k] > my ? y[o + k] : my;
    }
    for (int64_t k = 0; k < c; ++k) {
      g[o + k] = x[o + k] - mx;
      e_old[o + k] = y[o + k] - my;
    }
    maxima[2 * r] = mx;
    maxima[2 * r + 1] = my;
  }
  exp_in_place(g, rows * c);
  exp_in_place(e_old, rows * c);
  double total = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * c;
    double zx = 0.0, zy = 0.0;  // in float64: a long row's sum stays exact to float32's rounding
#pragma omp simd reduction(+ : zx, zy)
    for (int64_t k = 0; k < c; ++k) {
      zx += static_cast<double>(g[o + k]);
      zy += static_cast<double>(e_old[o + k]);
    }
    // log p = logit − (max + log Σ exp(logit − max))
    const float lx = static_cast<float>(maxima[2 * r] + std::log(zx));
    const float ly = static_cast<float>(maxima[2 * r + 1] + std::log(zy));
    const auto rx = static_cast<float>(1.0 / zx), ry = static_cast<float>(1.0 / zy);
    double row = 0.0;
#pragma omp simd reduction(+ : row)
    for (int64_t k = 0; k < c; ++k) {
      const float p_old = e_old[o + k] * ry;
      const float term = p_old * ((y[o + k] - ly) - (x[o + k] - lx));
      row += static_cast<double>(p_old == 0.0f ? 0.0f : term);  // 0·log 0 = 0: a masked class (−inf)
      g[o + k] = (g[o + k] * rx - p_old) * coef;
    }
    total += row;
  }
  return total;
}

// No trapping math (cpu_simd.h): the exp's selects vectorize in every clone; no FP exception is read.
APO_SIMD_CLONES APO_NO_TRAPPING_MATH double kl_f32(
    const float* x, const float* y, float* g, float* e_old, float* maxima, int64_t rows, int64_t c, float coef) {
  return kl_block(x, y, g, e_old, maxima, rows, c, coef);
}

}  // namespace loops

// Rows one thread takes before the rows are split over threads, and the rows of one call of the
// loops: 32 Ki elements (at least one row).
int64_t row_grain(int64_t classes) { return std::max<int64_t>(1, (int64_t(1) << 15) / classes); }

std::tuple<Tensor, Tensor> kl_float32(const Tensor& new_out, const Tensor& old_out, double scale) {
  const Tensor x = new_out.to(at::kFloat).contiguous();
  const Tensor y = old_out.to(at::kFloat).contiguous();
  const int64_t c = x.size(-1);
  const int64_t rows = x.numel() / c;
  Tensor grad = at::empty(x.sizes(), x.options());
  const float* xp = x.const_data_ptr<float>();
  const float* yp = y.const_data_ptr<float>();
  float* g = grad.data_ptr<float>();
  const auto coef = static_cast<float>(scale / double(rows));
  const int64_t chunk = row_grain(c);  // rows per call of the loops: their scratch stays in cache
  const double total = at::parallel_reduce(
      0, rows, chunk, 0.0,
      [&](int64_t begin, int64_t end, double sum) {
        thread_local std::vector<float> scratch;  // e_old and the maxima of one chunk
        const auto need = static_cast<size_t>(chunk * (c + 2));
        if (scratch.size() < need) scratch.resize(need);
        for (int64_t r = begin; r < end; r += chunk) {
          const int64_t n = std::min(chunk, end - r);
          sum += loops::kl_f32(xp + r * c, yp + r * c, g + r * c, scratch.data(), scratch.data() + n * c, n, c,
                               coef);
        }
        return sum;
      },
      std::plus<double>());
  return {at::scalar_tensor(total / double(rows), x.options()), grad};
}

// The same maths with ATen's ops: float64 on the CPU, and every other device (no sync).
std::tuple<Tensor, Tensor> kl_aten(const Tensor& new_out, const Tensor& old_out, double scale) {
  const auto type = new_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor log_new = at::log_softmax(new_out.to(type), -1);
  Tensor log_old = at::log_softmax(old_out.to(type), -1);
  const Tensor p_old = log_old.exp();
  const double rows = double(new_out.numel() / new_out.size(-1));
  // 0·log 0 = 0: a class with p_old = 0 (a masked, −inf logit) adds nothing, not 0·(−inf − −inf)
  const Tensor value = log_old.sub_(log_new).mul_(p_old).masked_fill_(p_old == 0, 0).sum().div_(rows);
  return {value, log_new.exp_().sub_(p_old).mul_(scale / rows)};
}

std::tuple<Tensor, Tensor> kl_value_and_grad_cpu(const Tensor& new_out, const Tensor& old_out, double scale) {
  checks::check_kl(new_out, old_out, scale);
  at::AutoDispatchBelowADInplaceOrView guard;
  return new_out.scalar_type() == at::kDouble ? kl_aten(new_out, old_out, scale)
                                              : kl_float32(new_out, old_out, scale);
}

std::tuple<Tensor, Tensor> kl_value_and_grad_any(const Tensor& new_out, const Tensor& old_out, double scale) {
  checks::check_kl(new_out, old_out, scale);
  at::AutoDispatchBelowADInplaceOrView guard;
  return kl_aten(new_out, old_out, scale);
}

}  // namespace
}  // namespace apo

// The schema is defined with the others (ops.cpp's TORCH_LIBRARY).
TORCH_LIBRARY_IMPL(apo, CPU, m) { m.impl("kl_value_and_grad", &apo::kl_value_and_grad_cpu); }

TORCH_LIBRARY_IMPL(apo, CompositeExplicitAutograd, m) {
  m.impl("kl_value_and_grad", &apo::kl_value_and_grad_any);
}
