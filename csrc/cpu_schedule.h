// apo-kernels: the grouped CPU op's schedule (csrc/ops.cpp), a pure function of the layers' costs
// and the thread count, so that the C++ test can check its decisions.
//
// A layer runs either alone, with its GEMMs on all intra-op threads, or inside one parallel loop
// shared by the other layers, one layer per thread at a time with single-threaded GEMMs. The loop is
// the better use of small layers (no per-GEMM thread start, no idle threads in small GEMMs), but
// within it a layer occupies one thread for its whole cost: a layer larger than the loop's even
// share per thread would be its critical path, and runs alone first where its GEMMs gain enough
// from the threads to finish the work sooner that way.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace apo {
namespace schedule {

// Rough GEMM work of a layer of `numel` elements whose matrices are m×n: ∝ numel·(m+n).
inline double layer_cost(double numel, double m, double n) { return numel * (m + n); }

// At or above this cost (two 256×256 layers' worth) a layer always runs alone: its own GEMMs use
// the intra-op threads well.
constexpr double kBigLayerCost = 2.0 * 256.0 * 256.0 * 512.0;

// The cost at which a layer alone gains half the speed-up that `threads` threads could give it.
constexpr double kHalfSpeedupCost = 12.0e6;

// How much faster a layer runs alone on `threads` threads than on one: small GEMMs gain little from
// more threads. The op alone, 2 threads against 1 on 2 cores of an Intel Xeon (interleaved, medians):
// 64×64 0.85×, 10×257 0.96×, 256×41 1.0–1.36×, 128×128 1.34×, 192×192 1.49×, 256×257 1.55×,
// 256×256 1.64×; this curve gives 1.04, 1.05, 1.21, 1.26, 1.54, 1.74, 1.74. Beyond 2 threads it is
// an extrapolation (not measured here). Against the previous rule (alone whenever above an even
// share), on the MNIST-1D MLP's layers at 2 threads, alternately in one process (40 rounds, paired
// medians): forward 0.92–0.95×, backward 0.96× the time; its 256×41 and 10×257 alone 0.81–0.87×.
inline double threaded_speedup(double cost, int64_t threads) {
  return 1.0 + static_cast<double>(threads - 1) * cost / (cost + kHalfSpeedupCost);
}

struct Plan {
  std::vector<int64_t> order;  // layer indices, largest cost first (ties keep their order)
  int64_t alone = 0;           // order[0, alone) run one after another, each on all threads;
                               // order[alone, end) share one parallel loop
};

// Layers are taken largest first; each runs alone while it is big, or while that finishes the work
// still left sooner than sharing the loop. In the loop the work takes at least the largest layer's
// cost and at least an even share per thread; alone, the layer takes its cost over its threaded
// speed-up, and then the rest share the loop. (A layer within an even share never gains from running
// alone: that would take a speed-up above the thread count.)
inline Plan plan(const std::vector<double>& cost, int64_t threads) {
  const auto n = static_cast<int64_t>(cost.size());
  threads = std::max<int64_t>(threads, 1);
  const auto P = static_cast<double>(threads);
  Plan p;
  p.order.resize(n);
  std::iota(p.order.begin(), p.order.end(), 0);
  std::stable_sort(p.order.begin(), p.order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  double left = std::accumulate(cost.begin(), cost.end(), 0.0);
  for (; p.alone < n; ++p.alone) {
    const double c = cost[p.order[p.alone]];
    if (c < kBigLayerCost) {
      const double next = p.alone + 1 < n ? cost[p.order[p.alone + 1]] : 0.0;
      const double shared = std::max(c, left / P);
      const double alone_first = c / threaded_speedup(c, threads) + std::max(next, (left - c) / P);
      if (!(alone_first < shared)) break;
    }
    left -= c;
  }
  return p;
}

}  // namespace schedule
}  // namespace apo
