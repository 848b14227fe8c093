// C++ test of the CPU kernels, called through the dispatcher exactly as torch.ops.apo.* would be.
// Checks forward and backward against inline ATen formulas (docs/ARCHITECTURE.md) in float64, fp32
// and bf16, 2-D, batched and grouped, non-contiguous inputs, masked outputs, identity factors
// (undefined A/B against explicit eye, their gradient an empty (0,) tensor); and that bad input is
// refused by the rules of csrc/apo_checks.h (c10::TypeError / c10::ValueError naming the argument).
// Exit code 0 = pass.
//
// Built and run by CMakeLists.txt (ctest); links apo_ops, whose static registrars define the ops.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu_schedule.h"

#include <array>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

using at::Tensor;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Mask = std::array<bool, 4>;
using Factor = std::optional<Tensor>;  // std::nullopt: identity
using FactorList = c10::List<std::optional<Tensor>>;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// Relative Frobenius error of `got` against a float64 `want`.
void expect_close(const Tensor& got, const Tensor& want, double tol, const std::string& what) {
  if (got.sizes() != want.sizes()) {
    expect(false, what + ": shape " + c10::str(got.sizes()) + " != " + c10::str(want.sizes()));
    return;
  }
  const double err = (got.to(at::kDouble) - want).norm().item<double>() /
                     std::max(want.norm().item<double>(), 1e-300);
  expect(err <= tol && got.is_contiguous(), what + ": rel err " + std::to_string(err));
}

Tensor T(const Tensor& x) { return x.transpose(-2, -1); }

struct Layer {
  Tensor dY, G, A, S, B;
};

// Float64 inputs; `transposed` stores each matrix transposed so the kernel sees strided views.
Layer make_layer(std::vector<int64_t> batch, int64_t m, int64_t n, bool transposed) {
  auto r = [&](int64_t rows, int64_t cols) {
    auto sz = batch;
    if (transposed) {
      sz.insert(sz.end(), {cols, rows});
      return T(at::randn(sz, at::kDouble));
    }
    sz.insert(sz.end(), {rows, cols});
    return at::randn(sz, at::kDouble);
  };
  return {r(m, n), r(m, n), r(m, m), r(m, n), r(n, n)};
}

Layer cast(const Layer& l, at::ScalarType t) {
  return {l.dY.to(t), l.G.to(t), l.A.to(t), l.S.to(t), l.B.to(t)};
}

// The oracle: the contract's formulas, written out plainly.
Tensor ref_forward(const Layer& l) {
  return at::matmul(at::matmul(l.A, l.S * at::matmul(at::matmul(T(l.A), l.G), l.B)), T(l.B));
}

Grads ref_backward(const Layer& l) {
  const Tensor H = at::matmul(at::matmul(T(l.A), l.G), l.B), M = l.S * H;
  const Tensor D = at::matmul(at::matmul(T(l.A), l.dY), l.B), E = l.S * D;
  return {at::matmul(at::matmul(l.A, E), T(l.B)),
          at::matmul(at::matmul(l.dY, l.B), T(M)) + at::matmul(at::matmul(l.G, l.B), T(E)),
          D * H,
          at::matmul(T(l.dY), at::matmul(l.A, M)) + at::matmul(T(l.G), at::matmul(l.A, E))};
}

// `call` must throw c10::TypeError (type_error) or c10::ValueError whose message contains `needle`.
void expect_refused(const std::function<void()>& call, bool type_error, const std::string& needle,
                    const std::string& what) {
  try {
    call();
    expect(false, "refused: " + what + " (returned a result)");
  } catch (const c10::TypeError& e) {
    const std::string msg = e.what_without_backtrace();
    expect(type_error && msg.find(needle) != std::string::npos, "refused: " + what + ": TypeError " + msg);
  } catch (const c10::ValueError& e) {
    const std::string msg = e.what_without_backtrace();
    expect(!type_error && msg.find(needle) != std::string::npos, "refused: " + what + ": ValueError " + msg);
  } catch (const std::exception& e) {
    expect(false, "refused: " + what + ": wrong error type: " + e.what());
  }
}

// The grouped CPU op's schedule (cpu_schedule.h): which layers run alone on all threads.
void check_schedule() {
  using apo::schedule::layer_cost;
  auto costs = [](const std::vector<std::pair<int64_t, int64_t>>& shapes) {
    std::vector<double> c;
    for (const auto& [m, n] : shapes) c.push_back(layer_cost(double(m) * double(n), double(m), double(n)));
    return c;
  };
  auto plan = [](const std::vector<double>& c, int64_t threads) { return apo::schedule::plan(c, threads); };

  // The 40-256-256-10 MLP's layers (G: out × in+1): the 256×257 layer holds 90 % of the work; in a
  // shared loop it would run on one thread while the other finishes early, so it runs alone (and
  // first). Of the two left, 256×41 is more than half of their work, but its GEMMs gain too little
  // from a second thread to beat running beside 10×257: the two share the loop.
  const auto mlp = costs({{256, 41}, {256, 257}, {10, 257}});
  const auto p2 = plan(mlp, 2);
  expect(p2.order == std::vector<int64_t>({1, 0, 2}), "schedule: MLP layers largest first");
  expect(p2.alone == 1, "schedule: MLP at 2 threads: only the 256x257 layer runs alone, got " +
                            std::to_string(p2.alone));
  // One thread: no layer gains from running alone (the loop runs inline, one layer after another).
  expect(plan(mlp, 1).alone == 0, "schedule: one thread: nothing alone");

  // Many similar small layers share the loop; a single layer or a big one runs alone.
  std::vector<std::pair<int64_t, int64_t>> small;
  for (int i = 0; i < 64; ++i) small.push_back({32 + (37 * i) % 97, 32 + (53 * i) % 97});
  expect(plan(costs(small), 2).alone == 0, "schedule: 64 small layers share the loop (2 threads)");
  expect(plan(costs(small), 16).alone == 0, "schedule: 64 small layers share the loop (16 threads)");
  expect(plan(costs({{64, 64}, {64, 64}}), 2).alone == 0, "schedule: two equal layers, two threads: one each");
  expect(plan(costs({{64, 64}, {64, 64}, {64, 64}}), 4).alone == 0,
         "schedule: three equal small layers, four threads: one thread each in the loop");
  expect(plan(costs({{512, 512}, {512, 512}, {512, 512}}), 4).alone == 3,
         "schedule: three equal big layers, four threads: each alone");
  expect(plan(costs({{100, 30}}), 2).alone == 1, "schedule: a single layer runs alone");
  auto mixed = small;
  mixed.push_back({600, 300});  // cost above kBigLayerCost
  const auto pm = plan(costs(mixed), 1);
  expect(pm.alone == 1 && pm.order[0] == 64, "schedule: a big layer runs alone even on one thread");
  // Critical path among small layers: one 200×200 layer (cost 16 M) and 8 of 32×32 (0.5 M in all).
  std::vector<std::pair<int64_t, int64_t>> skew(8, {32, 32});
  skew.insert(skew.begin() + 3, {200, 200});
  const auto ps = plan(costs(skew), 2);
  expect(ps.alone == 1 && ps.order[0] == 3, "schedule: the critical-path layer runs alone, the rest share");
  expect(plan({}, 2).alone == 0 && plan({}, 2).order.empty(), "schedule: no layers");
  // The threaded speed-up model: none on one thread, growing with the cost, below the thread count.
  using apo::schedule::threaded_speedup;
  expect(threaded_speedup(1e9, 1) == 1.0, "schedule: one thread, no speed-up");
  expect(threaded_speedup(1e5, 2) < threaded_speedup(1e7, 2) && threaded_speedup(1e7, 2) < threaded_speedup(1e9, 2) &&
             threaded_speedup(1e9, 2) < 2.0,
         "schedule: speed-up grows with the cost, below the thread count");
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_schedule();
  auto& dispatcher = c10::Dispatcher::singleton();
  auto fwd = dispatcher.findSchemaOrThrow("apo::precondition", "")
                 .typed<Tensor(const Tensor&, const Factor&, const Tensor&, const Factor&)>();
  auto bwd = dispatcher.findSchemaOrThrow("apo::precondition_backward", "")
                 .typed<Grads(const Tensor&, const Tensor&, const Factor&, const Tensor&,
                              const Factor&, Mask)>();
  using List = std::vector<Tensor>;
  auto factors = [](const List& ts) {
    FactorList out;
    for (const Tensor& t : ts) out.push_back(t.defined() ? Factor(t) : Factor());
    return out;
  };
  auto gfwd_op = dispatcher.findSchemaOrThrow("apo::precondition_grouped", "")
                     .typed<List(at::TensorList, const FactorList&, at::TensorList, const FactorList&)>();
  auto gbwd_op = dispatcher.findSchemaOrThrow("apo::precondition_grouped_backward", "")
                     .typed<std::tuple<List, List, List, List>(at::TensorList, at::TensorList,
                                                               const FactorList&, at::TensorList,
                                                               const FactorList&, Mask)>();
  // The grouped ops with factor lists given as tensors (an undefined tensor: identity).
  auto gfwd = [&](const List& Gs, const List& As, const List& Ss, const List& Bs) {
    return gfwd_op.call(Gs, factors(As), Ss, factors(Bs));
  };
  auto gbwd = [&](const List& dYs, const List& Gs, const List& As, const List& Ss, const List& Bs, Mask mk) {
    return gbwd_op.call(dYs, Gs, factors(As), Ss, factors(Bs), mk);
  };

  const std::vector<std::tuple<at::ScalarType, double>> dtypes = {
      {at::kDouble, 1e-12}, {at::kFloat, 1e-5}, {at::kBFloat16, 1e-2}};
  const std::vector<std::tuple<std::vector<int64_t>, int64_t, int64_t>> shapes = {
      {{}, 1, 1}, {{}, 1, 7}, {{}, 17, 33}, {{3}, 5, 9}, {{}, 0, 4}};

  for (const auto& [dtype, tol] : dtypes) {
    for (const auto& [batch, m, n] : shapes) {
      for (bool transposed : {false, true}) {
        // The oracle sees the same rounded inputs the kernel sees.
        const Layer x = cast(make_layer(batch, m, n, transposed), dtype);
        const Layer x64 = cast(x, at::kDouble);
        const std::string tag = std::string(c10::toString(dtype)) + " " +
                                c10::str(x.G.sizes()) + (transposed ? " transposed" : "");
        expect_close(fwd.call(x.G, x.A, x.S, x.B), ref_forward(x64), tol, "forward " + tag);

        const auto want = ref_backward(x64);
        const auto got = bwd.call(x.dY, x.G, x.A, x.S, x.B, Mask{true, true, true, true});
        expect_close(std::get<0>(got), std::get<0>(want), tol, "dG " + tag);
        expect_close(std::get<1>(got), std::get<1>(want), tol, "dA " + tag);
        expect_close(std::get<2>(got), std::get<2>(want), tol, "dS " + tag);
        expect_close(std::get<3>(got), std::get<3>(want), tol, "dB " + tag);

        // The meta-gradient's mask: dG must come back as an empty (0,) tensor of the same dtype.
        const auto meta = bwd.call(x.dY, x.G, x.A, x.S, x.B, Mask{false, true, true, true});
        const Tensor& dG = std::get<0>(meta);
        expect(dG.dim() == 1 && dG.size(0) == 0 && dG.scalar_type() == dtype,
               "masked dG is empty (0,) " + tag);
        expect_close(std::get<1>(meta), std::get<1>(want), tol, "masked dA " + tag);
      }
    }
  }

  // Grouped: layers of mixed shapes (enough of them to take the parallel path) against the oracle.
  std::vector<Layer> layers;
  for (int i = 0; i < 12; ++i) {
    layers.push_back(cast(make_layer({}, 3 + 7 * i, 40 - 3 * i, i % 2 == 1), at::kFloat));
  }
  layers.push_back(cast(make_layer({}, 600, 300, false), at::kFloat));  // a "big" layer
  List dYs, Gs, As, Ss, Bs;
  for (const auto& l : layers) {
    dYs.push_back(l.dY), Gs.push_back(l.G), As.push_back(l.A), Ss.push_back(l.S), Bs.push_back(l.B);
  }
  const List ys = gfwd(Gs, As, Ss, Bs);
  const auto [dGs, dAs, dSs, dBs] = gbwd(dYs, Gs, As, Ss, Bs, Mask{false, true, true, true});
  expect(ys.size() == layers.size() && dGs.empty() && dAs.size() == layers.size(),
         "grouped list lengths (masked dG list is empty)");
  for (size_t i = 0; i < layers.size() && i < ys.size() && i < dAs.size(); ++i) {
    const Layer l64 = cast(layers[i], at::kDouble);
    const auto want = ref_backward(l64);
    const std::string tag = "grouped layer " + std::to_string(i);
    expect_close(ys[i], ref_forward(l64), 1e-5, tag + " forward");
    expect_close(dAs[i], std::get<1>(want), 1e-5, tag + " dA");
    expect_close(dSs[i], std::get<2>(want), 1e-5, tag + " dS");
    expect_close(dBs[i], std::get<3>(want), 1e-5, tag + " dB");
  }

  // Identity factors: an undefined A and/or B gives the result of an explicit eye, and an empty
  // (0,) tensor as its gradient; in the grouped op per layer, mixed with matrices.
  for (const auto& [dtype, tol] : dtypes) {
    for (int which = 1; which <= 3; ++which) {
      const bool no_a = which & 1, no_b = which & 2;
      const Layer x = cast(make_layer({2}, 6, 4, true), dtype);
      const Layer x64 = cast(x, at::kDouble);
      Layer eye64 = x64;
      if (no_a) eye64.A = at::eye(6, at::kDouble).expand({2, 6, 6});
      if (no_b) eye64.B = at::eye(4, at::kDouble).expand({2, 4, 4});
      const Factor A = no_a ? Factor() : Factor(x.A), B = no_b ? Factor() : Factor(x.B);
      const std::string tag = std::string(c10::toString(dtype)) + (no_a ? " A=None" : "") +
                              (no_b ? " B=None" : "");
      expect_close(fwd.call(x.G, A, x.S, B), ref_forward(eye64), tol, "identity forward " + tag);
      const auto want = ref_backward(eye64);
      const auto got = bwd.call(x.dY, x.G, A, x.S, B, Mask{true, true, true, true});
      expect_close(std::get<0>(got), std::get<0>(want), tol, "identity dG " + tag);
      expect_close(std::get<2>(got), std::get<2>(want), tol, "identity dS " + tag);
      const Tensor& dA = std::get<1>(got);
      const Tensor& dB = std::get<3>(got);
      if (no_a) {
        expect(dA.dim() == 1 && dA.size(0) == 0, "identity dA is empty (0,) " + tag);
      } else {
        expect_close(dA, std::get<1>(want), tol, "identity dA " + tag);
      }
      if (no_b) {
        expect(dB.dim() == 1 && dB.size(0) == 0, "identity dB is empty (0,) " + tag);
      } else {
        expect_close(dB, std::get<3>(want), tol, "identity dB " + tag);
      }
    }
  }
  {
    // A tall identity side is never materialized: an m×m identity of 2^20 rows would need 4 TiB.
    const int64_t tall = int64_t{1} << 20;
    const Tensor G = at::randn({tall, 2}), S = at::rand({tall, 2}), B = at::randn({2, 2});
    const Tensor Y = fwd.call(G, Factor(), S, Factor(B));
    const Tensor want = at::matmul(S.to(at::kDouble) * at::matmul(G.to(at::kDouble), B.to(at::kDouble)),
                                   T(B.to(at::kDouble)));
    expect_close(Y, want, 1e-5, "tall identity A forward");
    const auto got = bwd.call(G, G, Factor(), S, Factor(B), Mask{false, true, true, true});
    expect(std::get<1>(got).numel() == 0 && std::get<2>(got).sizes() == G.sizes() &&
               std::get<3>(got).sizes() == B.sizes(),
           "tall identity A backward: empty dA, dS and dB of their shapes");
  }
  {
    const Layer x = cast(make_layer({}, 5, 3, false), at::kFloat), y = cast(make_layer({}, 4, 4, true), at::kFloat);
    const List Gs = {x.G, y.G, x.G}, As = {Tensor(), y.A, x.A}, Ss = {x.S, y.S, x.S}, Bs = {x.B, Tensor(), Tensor()};
    const List dYs = {x.dY, y.dY, x.dY};
    const List ys = gfwd(Gs, As, Ss, Bs);
    const auto [gG, gA, gS, gB] = gbwd(dYs, Gs, As, Ss, Bs, Mask{true, true, true, true});
    for (size_t i = 0; i < Gs.size(); ++i) {
      Layer e{dYs[i], Gs[i], As[i], Ss[i], Bs[i]};
      if (!e.A.defined()) e.A = at::eye(Gs[i].size(0));
      if (!e.B.defined()) e.B = at::eye(Gs[i].size(1));
      const Layer e64 = cast(e, at::kDouble);
      const auto want = ref_backward(e64);
      const std::string tag = "grouped identity layer " + std::to_string(i);
      expect_close(ys[i], ref_forward(e64), 1e-5, tag + " forward");
      expect_close(gG[i], std::get<0>(want), 1e-5, tag + " dG");
      expect_close(gS[i], std::get<2>(want), 1e-5, tag + " dS");
      if (As[i].defined()) {
        expect_close(gA[i], std::get<1>(want), 1e-5, tag + " dA");
      } else {
        expect(gA[i].dim() == 1 && gA[i].numel() == 0, tag + " dA slot is empty (0,)");
      }
      if (Bs[i].defined()) {
        expect_close(gB[i], std::get<3>(want), 1e-5, tag + " dB");
      } else {
        expect(gB[i].dim() == 1 && gB[i].numel() == 0, tag + " dB slot is empty (0,)");
      }
    }
  }

  // Input rules: every op refuses bad input before computing, naming the argument.
  {
    const Layer x = cast(make_layer({}, 4, 3, false), at::kFloat);
    const Mask all{true, true, true, true};
    constexpr bool kType = true, kValue = false;
    expect_refused([&] { fwd.call(x.G, x.A.to(at::kLong), x.S, x.B); }, kType, "A has dtype torch.int64",
                   "integer A");
    expect_refused([&] { fwd.call(x.G, x.A, x.S.to(at::kDouble), x.B); }, kType,
                   "S has dtype torch.float64 but grad has torch.float32", "mixed dtypes");
    expect_refused([&] { fwd.call(x.G, x.A, x.S.narrow(0, 0, 1), x.B); }, kValue,
                   "S must have shape (4, 3) for grad of shape (4, 3)", "broadcastable S");
    expect_refused([&] { fwd.call(x.G.unsqueeze(0).unsqueeze(0), x.A, x.S, x.B); }, kValue,
                   "grad must be 2-D (m, n) or 3-D (L, m, n)", "4-D grad");
    expect_refused([&] { fwd.call(x.G, x.A.unsqueeze(0), x.S, x.B); }, kValue, "A must have 2 dims",
                   "3-D A");
    expect_refused([&] { bwd.call(x.dY.t(), x.G, x.A, x.S, x.B, all); }, kValue,
                   "grad_out must have the shape of grad (4, 3)", "transposed grad_out");
    const Tensor B3 = x.B.expand({2, 3, 3}), G3 = x.G.expand({3, 4, 3}), A3 = x.A.expand({3, 4, 4});
    const Tensor S3 = x.S.expand({3, 4, 3});
    expect_refused([&] { fwd.call(G3, A3, S3, B3); }, kValue, "(mismatched batch size)", "batch of B");
    // Expanded (stride-0) inputs of a valid shape whose backward result (dB: 2^22 x 2^22 floats,
    // 64 TiB) cannot fit in memory: refused before anything is allocated.
    const int64_t huge = int64_t{1} << 22;
    auto one = at::ones({1, 1});
    expect_refused(
        [&] {
          bwd.call(one.expand({1, huge}), one.expand({1, huge}), one, one.expand({1, huge}),
                   one.expand({huge, huge}), Mask{false, false, false, true});
        },
        kValue, "needs 70368744177664 bytes", "dB too big for memory");
    const Layer y = cast(make_layer({}, 2, 5, false), at::kFloat);
    expect_refused([&] { gfwd({x.G, y.G}, {x.A}, {x.S, y.S}, {x.B, y.B}); }, kValue,
                   "grads, As, Ss, Bs must have the same length, got {'grads': 2, 'As': 1", "list lengths");
    const Layer y64 = cast(y, at::kDouble);
    expect_refused([&] { gfwd({x.G, y64.G}, {x.A, y64.A}, {x.S, y64.S}, {x.B, y64.B}); }, kType,
                   "layer 1: dtype torch.float64 differs from layer 0's torch.float32", "mixed layer dtypes");
    expect_refused([&] { gfwd({G3}, {A3}, {S3}, {x.B.expand({3, 3, 3})}); }, kValue,
                   "layer 0: grouped layers must be 2-D", "3-D grouped layer");
    expect_refused(
        [&] { gbwd({x.dY, y.dY.t()}, {x.G, y.G}, {x.A, y.A}, {x.S, y.S}, {x.B, y.B}, all); }, kValue,
        "layer 1: grad_out must have the shape of grad (2, 5)", "grouped grad_out");
  }

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
