// apo-kernels: how long two of torch's intra-op threads take to pass a cache line back and forth,
// registered as apo::cpu_thread_handoff_ns (csrc/ops.cpp). A diagnosis for timings; no op uses it.
//
// Every parallel region hands work and results between the threads, so this round trip is a cost
// of each one. On a virtual machine the host decides where the vCPUs run: on the 2-vCPU AMD EPYC
// machines it was 60–110 ns on some runs and 300–380 ns on others (the two cores near each other, or
// far apart), and it switched within a process. At 340 ns a small model's step on two threads took
// 1.5× its time at 80 ns, longer than on one thread. At times it read 500 ns to several µs: the host
// took the second vCPU away part of the time, and 2-thread regions stalled. apo-bench records it
// around each section and training problem.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace apo {
namespace handoff {

constexpr int64_t kMaxRounds = 1'000'000;

// A probe that outlasts this ends (NaN): a thread descheduled for that long says nothing about the
// handoff, and no wait may hang. (kMaxRounds at 380 ns take 0.43 s.)
constexpr double kGiveUpSeconds = 5.0;

// The mean round trip in ns over `rounds` (after rounds / 8 untimed): thread 0 writes an odd count
// and waits for thread 1 to write the next even one. NaN where there is no second thread: one
// intra-op thread, a call from inside a parallel region, or a build without OpenMP.
inline double round_trip_ns(int64_t rounds) {
  TORCH_CHECK_VALUE(rounds >= 1 && rounds <= kMaxRounds, "rounds must be in [1, ", kMaxRounds, "], got ", rounds);
  double ns = std::numeric_limits<double>::quiet_NaN();
#ifdef _OPENMP
  if (at::get_num_threads() < 2 || at::in_parallel_region()) return ns;
  struct alignas(64) Line {
    std::atomic<int64_t> count{0};
  } line;
  std::atomic<bool> gave_up{false};
  const int64_t warm = rounds / 8, total = warm + rounds;
#pragma omp parallel num_threads(2)
  {
    if (omp_get_num_threads() == 2) {  // (both threads see the same team: both take part, or neither)
      using clock = std::chrono::steady_clock;
      const int me = omp_get_thread_num();
      const auto deadline = clock::now() + std::chrono::duration<double>(kGiveUpSeconds);
      auto wait_for = [&](int64_t value) {
        for (int64_t spins = 0; line.count.load(std::memory_order_acquire) != value; ++spins) {
          if ((spins & 1023) == 1023 && (gave_up.load(std::memory_order_relaxed) || clock::now() > deadline)) {
            gave_up.store(true, std::memory_order_relaxed);
            return false;
          }
        }
        return true;
      };
      clock::time_point t0;
      for (int64_t k = 0; k < total; ++k) {
        if (me == 0) {
          if (k == warm) t0 = clock::now();
          line.count.store(2 * k + 1, std::memory_order_release);
          if (!wait_for(2 * k + 2)) break;
        } else {
          if (!wait_for(2 * k + 1)) break;
          line.count.store(2 * k + 2, std::memory_order_release);
        }
      }
      if (me == 0 && !gave_up.load()) {
        ns = std::chrono::duration<double, std::nano>(clock::now() - t0).count() / static_cast<double>(rounds);
      }
    }
  }
  if (gave_up.load()) ns = std::numeric_limits<double>::quiet_NaN();
#endif
  return ns;
}

}  // namespace handoff
}  // namespace apo
