// The CPU's fp32 FMA peak, on one thread and on every thread at once (a measurement, not a test).
//
//     g++ -O3 -march=native -std=c++17 -pthread csrc/test/fma_peak.cpp -o build/fma_peak && build/fma_peak
//
// Twelve independent accumulator chains per thread hide the FMA latency, so the loop runs at the
// FMA ports' throughput: the ceiling against which a GEMM's GFLOP/s is read. When the all-thread
// figure is less than (threads × the one-thread figure), the hardware threads share FMA units
// (SMT siblings), and no split of work over them can scale linearly.
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 12;
constexpr long kIters = 100000000;
// One vector register of floats (12 chains + 2 operands fit the 16 AVX2 or 32 AVX-512 registers);
// GCC contracts a * x + y into one FMA by default.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(4 * kLanes)));

inline Vec splat(float x) { return Vec{} + x; }

// The FMA chains of one thread; writes a value the compiler cannot drop.
void chains(float* sink) {
  Vec acc[kChains];
  for (auto& a : acc) a = splat(1.0f);
  const Vec x = splat(1e-7f), y = splat(1.0f);
  for (long i = 0; i < kIters; ++i)
    for (auto& a : acc) a = a * x + y;
  float s = 0;
  for (auto& a : acc) s += a[0];
  *sink = s;
}

constexpr double kGflopPerThread = 2.0 * kLanes * kChains * kIters / 1e9;  // an FMA is 2 flops

double gflops(int threads) {
  std::vector<float> sinks(threads);
  std::vector<std::thread> pool;
  const auto t0 = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) pool.emplace_back([&sinks, t] { chains(&sinks[t]); });
  for (auto& th : pool) th.join();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return threads * kGflopPerThread / s;
}

}  // namespace

int main() {
  const int threads = static_cast<int>(std::thread::hardware_concurrency());
  const double one = gflops(1), all = gflops(threads);
  std::printf("fp32 FMA peak (%d-float vectors): one thread %.1f GFLOP/s; %d threads %.1f GFLOP/s (%.2fx one)\n",
              kLanes, one, threads, all, all / one);
}
