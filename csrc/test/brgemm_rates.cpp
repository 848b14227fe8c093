// The rates behind csrc/cpu_gemm.h's engine choice, on this machine, one thread:
//
//  1. fp32 C = A·B (row-major) through MKL's Fortran sgemm_ (what torch links) and through oneDNN's
//     brgemm micro-kernel as torch exports it (at::native::cpublas::brgemm), with the largest
//     difference between the two results;
//  2. the same product with bf16 A and B through the bf16 micro-kernel, B packed by hand into its
//     pair-interleaved (VNNI) layout, against an fp32 GEMM of the same bf16 inputs;
//  3. the transposing copy of cpu_gemm.h (AVX-512 register tiles where the CPU has them) against the
//     scalar tile loop, ns per element;
//  4. products of width 16·w + r through cpu_gemm.h (the last r columns in vectors of rows where
//     r ≤ kMaxTail) against the micro-kernel alone: the time of each, and whether the two give the
//     same bits, overwriting C and adding to it.
//
// Build and run (any x86-64 torch with oneDNN; the include and library folders are torch's; -O3 as the
// extension is built: at -O2 GCC keeps the transposing copy's 32 vectors on the stack):
//   TORCH_DIR=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -std=c++20 csrc/test/brgemm_rates.cpp -Icsrc -I$TORCH_DIR/include -o build/brgemm_rates \
//       -L$TORCH_DIR/lib -ltorch_cpu -lc10 -Wl,-rpath,$TORCH_DIR/lib
//   build/brgemm_rates [seconds per measurement, default 0.2]
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include "cpu_gemm.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                       const int*, const float*, const int*, const float*, float*, const int*);

namespace {

double budget = 0.2;

// Seconds per call: the best of 5 blocks, each about budget / 5 long.
template <typename F>
double time_call(F&& f) {
  f();
  auto t0 = std::chrono::steady_clock::now();
  f();
  const double once = std::max(1e-7, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  const int reps = std::max(1, static_cast<int>(budget / 5 / once));
  double best = 1e30;
  for (int b = 0; b < 5; ++b) {
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  return best;
}

void fp32_and_bf16(int64_t M, int64_t N, int64_t K) {
  const at::Tensor A = at::randn({M, K}), B = at::randn({K, N});
  at::Tensor C_mkl = at::zeros({M, N}), C_brg = at::zeros({M, N}), C_bf = at::zeros({M, N});
  const float one = 1.f, zero = 0.f;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  const float *a = A.data_ptr<float>(), *b = B.data_ptr<float>();
  // row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ
  const double t_mkl = time_call([&] { sgemm_("N", "N", &n, &m, &k, &one, b, &n, a, &k, &zero, C_mkl.data_ptr<float>(), &n); });
  const double t_brg = time_call([&] {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, b, C_brg.data_ptr<float>(), false);
  });
  const double diff = (C_mkl - C_brg).abs().max().item<double>();

  // bf16: the micro-kernel needs an AVX-512 CPU (torch refuses the packed layout otherwise)
  char bf16[96] = "bf16 brgemm   n/a (torch refused the packed layout on this CPU)";
  try {
    const at::Tensor Ab = A.to(at::kBFloat16), Bb = B.to(at::kBFloat16);
    std::vector<at::BFloat16> packed((K + 1) / 2 * N * 2, at::BFloat16(0.f));
    const at::BFloat16* bb = Bb.data_ptr<at::BFloat16>();
    for (int64_t r = 0; r < K; ++r) {  // pairs of rows interleaved: (r/2, column, r%2)
      for (int64_t c = 0; c < N; ++c) packed[(r / 2) * N * 2 + c * 2 + (r % 2)] = bb[r * N + c];
    }
    const double t_bf = time_call([&] {
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, Ab.data_ptr<at::BFloat16>(), packed.data(),
                                  C_bf.data_ptr<float>(), true);
    });
    const at::Tensor want = at::mm(Ab.to(at::kFloat), Bb.to(at::kFloat));
    const double bf_err = ((C_bf - want).abs().max() / want.abs().max()).item<double>();
    std::snprintf(bf16, sizeof(bf16), "bf16 brgemm %5.0f (rel. diff %.1e)", 2.0 * M * N * K / t_bf / 1e9, bf_err);
  } catch (const c10::Error&) {
  }
  const double flop = 2.0 * M * N * K;
  std::printf("%5lld×%-5lld×%-5lld  fp32 MKL %5.0f  brgemm %5.0f GFLOP/s (max diff %.1e)  %s\n",
              static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K), flop / t_mkl / 1e9,
              flop / t_brg / 1e9, diff, bf16);
}

void transposes(int64_t n) {
  const at::Tensor X = at::randn({n, n});
  std::vector<float> fast(n * n), slow(n * n);
  const float* x = X.data_ptr<float>();
  const double t_fast = time_call([&] { apo::cpu_gemm::transpose_into(fast.data(), x, n, n, n); });
  const double t_slow = time_call([&] { apo::cpu_gemm::transpose_scalar(slow.data(), n, x, n, n, n); });
  std::printf("transpose %4lld²  cpu_gemm.h %.3f ns/element, scalar tiles %.3f (same: %s)\n", static_cast<long long>(n),
              t_fast / (n * n) * 1e9, t_slow / (n * n) * 1e9, fast == slow ? "yes" : "NO");
}

void ragged_width(int64_t M, int64_t N, int64_t K) {
  const at::Tensor X = at::randn({M, K}), Y = at::randn({K, N}), C0 = at::randn({M, N});
  at::Tensor alone = at::empty({M, N}), split = at::empty({M, N});
  const float *x = X.data_ptr<float>(), *y = Y.data_ptr<float>();
  const double t_alone = time_call([&] {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, x, y, alone.data_ptr<float>(), false);
  });
  const double t_split = time_call([&] {
    apo::cpu_gemm::brgemm_call(M, N, K, x, K, y, N, split.data_ptr<float>(), N, false);
  });
  bool same = at::equal(alone, split);
  at::Tensor alone_add = C0.clone(), split_add = C0.clone();
  at::native::cpublas::brgemm(M, N, K, K, N, N, true, x, y, alone_add.data_ptr<float>(), false);
  apo::cpu_gemm::brgemm_call(M, N, K, x, K, y, N, split_add.data_ptr<float>(), N, true);
  same = same && at::equal(alone_add, split_add);
  std::printf("width %lld×%lld·%lld×%lld (r = %lld)  cpu_gemm.h %.2f µs, micro-kernel alone %.2f µs: %.3f× "
              "(same bits: %s)\n",
              static_cast<long long>(M), static_cast<long long>(K), static_cast<long long>(K),
              static_cast<long long>(N), static_cast<long long>(N % 16), t_split * 1e6, t_alone * 1e6,
              t_split / t_alone, same ? "yes" : "NO");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) budget = std::max(0.01, std::atof(argv[1]));
  at::set_num_threads(1);
  at::manual_seed(0);
  std::printf("cpu_gemm.h's engine here: %s\n", apo::cpu_gemm::description().c_str());
  for (const auto& s : std::vector<std::array<int64_t, 3>>{
           {32, 32, 32}, {64, 64, 64}, {128, 128, 128}, {256, 257, 256}, {100, 256, 256}, {512, 512, 512}}) {
    fp32_and_bf16(s[0], s[1], s[2]);
  }
  for (int64_t n : {32, 64, 128, 256}) transposes(n);
  for (const auto& s : std::vector<std::array<int64_t, 3>>{{256, 257, 257}, {256, 65, 65}, {100, 33, 33}, {37, 99, 99},
                                                           {37, 261, 261}, {37, 38, 38}, {37, 40, 40}}) {
    ragged_width(s[0], s[1], s[2]);
  }
  return 0;
}
