// apo-kernels: the grouped CPU op's schedule (csrc/ops.cpp), a pure function of the layers' costs
// and the thread count, so that the C++ test can check its decisions.
//
// A layer runs either alone, with its GEMMs on all intra-op threads, or inside one parallel loop
// shared by the other layers, one layer per thread at a time with single-threaded GEMMs. The loop is
// the better use of small layers (no per-GEMM thread start, no idle threads in small GEMMs), but
// within it a layer occupies one thread for its whole cost: a layer larger than the loop's even
// share per thread would be the critical path, and runs alone first.
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

struct Plan {
  std::vector<int64_t> order;  // layer indices, largest cost first (ties keep their order)
  int64_t alone = 0;           // order[0, alone) run one after another, each on all threads;
                               // order[alone, end) share one parallel loop
};

// Layers are taken largest first; each runs alone while it is big, or while its cost is more than
// an even share per thread of the work still left (itself included).
inline Plan plan(const std::vector<double>& cost, int64_t threads) {
  const auto n = static_cast<int64_t>(cost.size());
  threads = std::max<int64_t>(threads, 1);
  Plan p;
  p.order.resize(n);
  std::iota(p.order.begin(), p.order.end(), 0);
  std::stable_sort(p.order.begin(), p.order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  double left = std::accumulate(cost.begin(), cost.end(), 0.0);
  for (; p.alone < n; ++p.alone) {
    const double c = cost[p.order[p.alone]];
    if (c < kBigLayerCost && c * static_cast<double>(threads) <= left) break;
    left -= c;
  }
  return p;
}

}  // namespace schedule
}  // namespace apo
