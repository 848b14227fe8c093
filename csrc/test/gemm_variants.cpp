// Two ways the CPU op's GEMMs could be run differently, timed against how it runs them now, with the
// BLAS torch links (MKL's Fortran interface, exported by libtorch_cpu):
//
//  1. packed:  A and B stay fixed between meta-steps, so each GEMM of a plain step could take its
//              fixed operand pre-packed (sgemm_pack_ once, sgemm_compute_ every step) instead of
//              letting sgemm_ pack it on every call. Timed per GEMM shape of the MNIST-1D MLP's
//              layers (40-256-256-10 with biases: 256×41, 256×257, 10×257) and of small layers.
//  2. split:   Y = A·(S ⊙ (Aᵀ·G·B))·Bᵀ on two threads with single-threaded GEMMs: the first three
//              GEMMs split by columns (a column of Aᵀ·G·B needs only that column of B), one barrier,
//              the last split by rows; against the chain of four GEMMs on MKL's own threads (what
//              the op does for one layer this size). The two results are compared.
//
// Build and run (any torch with MKL; the library folder is torch's lib/):
//   TORCH_LIB=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
//   g++ -O2 -fopenmp csrc/test/gemm_variants.cpp -o build/gemm_variants -L$TORCH_LIB -ltorch_cpu -lc10 -Wl,-rpath,$TORCH_LIB
//   build/gemm_variants [threads for (1), default 1] [m n for (2), default 256 257]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
size_t sgemm_pack_get_size_(const char*, const int*, const int*, const int*);
void sgemm_pack_(const char*, const char*, const int*, const int*, const int*, const float*,
                 const float*, const int*, float*);
void sgemm_compute_(const char*, const char*, const int*, const int*, const int*, const float*,
                    const int*, const float*, const int*, const float*, float*, const int*);
int MKL_Set_Num_Threads_Local(int);
}

namespace {

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The median over 15 rounds of the mean time of `reps` calls.
template <typename F>
double median_time(F f, int reps) {
  std::vector<double> ts;
  for (int r = 0; r < 15; ++r) {
    const double t = now();
    for (int i = 0; i < reps; ++i) f();
    ts.push_back((now() - t) / reps);
  }
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

std::vector<float> random_matrix(size_t n) {
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(rand()) / RAND_MAX - 0.5f;
  return v;
}

const float kOne = 1.f, kZero = 0.f;

// 1. C (m×n) = F (m×k) · X (k×n) and C = X (m×k) · F (k×n), column-major, F the fixed operand.
void packed(int m, int k, int n) {
  const std::vector<float> F_left = random_matrix(size_t(m) * k), X_right = random_matrix(size_t(k) * n);
  const std::vector<float> X_left = random_matrix(size_t(m) * k), F_right = random_matrix(size_t(k) * n);
  std::vector<float> C(size_t(m) * n);
  std::vector<float> PA(sgemm_pack_get_size_("A", &m, &n, &k) / sizeof(float) + 16);
  std::vector<float> PB(sgemm_pack_get_size_("B", &m, &n, &k) / sizeof(float) + 16);
  sgemm_pack_("A", "N", &m, &n, &k, &kOne, F_left.data(), &m, PA.data());
  sgemm_pack_("B", "N", &m, &n, &k, &kOne, F_right.data(), &k, PB.data());
  const double flops = 2.0 * m * n * k;
  const int reps = std::max(20, int(2e9 / flops));
  const double a = median_time([&] { sgemm_("N", "N", &m, &n, &k, &kOne, F_left.data(), &m, X_right.data(), &k, &kZero, C.data(), &m); }, reps);
  const double ap = median_time([&] { sgemm_compute_("P", "N", &m, &n, &k, PA.data(), &m, X_right.data(), &k, &kZero, C.data(), &m); }, reps);
  const double b = median_time([&] { sgemm_("N", "N", &m, &n, &k, &kOne, X_left.data(), &m, F_right.data(), &k, &kZero, C.data(), &m); }, reps);
  const double bp = median_time([&] { sgemm_compute_("N", "P", &m, &n, &k, X_left.data(), &m, PB.data(), &k, &kZero, C.data(), &m); }, reps);
  std::printf("  %4d×%4d×%4d  left fixed: %7.1f µs (%4.0f GFLOP/s), packed %7.1f (%4.0f), ratio %.3f | "
              "right fixed: %7.1f (%4.0f), packed %7.1f (%4.0f), ratio %.3f\n",
              m, k, n, a * 1e6, flops / a / 1e9, ap * 1e6, flops / ap / 1e9, ap / a,
              b * 1e6, flops / b / 1e9, bp * 1e6, flops / bp / 1e9, bp / b);
}

// Row-major C (r×c, ldc) = op(X) (r×k) · op(Y) (k×c), as the column-major product Cᵀ = op(Y)ᵀ·op(X)ᵀ.
void gemm_row_major(bool tx, bool ty, int r, int c, int k, const float* X, int ldx, const float* Y, int ldy,
                    float* C, int ldc) {
  const char a = ty ? 'T' : 'N', b = tx ? 'T' : 'N';
  sgemm_(&a, &b, &c, &r, &k, &kOne, Y, &ldy, X, &ldx, &kZero, C, &ldc);
}

// 2. The op's forward on one layer, two ways.
void split(int m, int n) {
  const std::vector<float> G = random_matrix(size_t(m) * n), A = random_matrix(size_t(m) * m),
                           B = random_matrix(size_t(n) * n), S = random_matrix(size_t(m) * n);
  std::vector<float> w1(size_t(m) * n), w2(size_t(m) * n), y_chain(size_t(m) * n), y_split(size_t(m) * n);
  std::vector<float> X(size_t(m) * n), H(size_t(m) * n), N(size_t(m) * n);
  auto chain = [&] {  // every GEMM on MKL's threads
    MKL_Set_Num_Threads_Local(0);
    gemm_row_major(false, false, m, n, n, G.data(), n, B.data(), n, w1.data(), n);
    gemm_row_major(true, false, m, n, m, A.data(), m, w1.data(), n, w2.data(), n);
    for (size_t i = 0; i < w2.size(); ++i) w2[i] *= S[i];
    gemm_row_major(false, false, m, n, m, A.data(), m, w2.data(), n, w1.data(), n);
    gemm_row_major(false, true, m, n, n, w1.data(), n, B.data(), n, y_chain.data(), n);
  };
  const int half = ((n + 1) / 2 + 15) / 16 * 16;  // a whole number of 16-float vectors
  auto two_halves = [&] {
#pragma omp parallel num_threads(2)
    {
      MKL_Set_Num_Threads_Local(1);
      const int t = omp_get_thread_num();
      const int c0 = t == 0 ? 0 : half, c = t == 0 ? std::min(half, n) : n - half;
      gemm_row_major(false, false, m, c, n, G.data(), n, B.data() + c0, n, X.data() + c0, n);
      gemm_row_major(true, false, m, c, m, A.data(), m, X.data() + c0, n, H.data() + c0, n);
      for (int i = 0; i < m; ++i)
        for (int j = c0; j < c0 + c; ++j) H[size_t(i) * n + j] *= S[size_t(i) * n + j];
      gemm_row_major(false, false, m, c, m, A.data(), m, H.data() + c0, n, N.data() + c0, n);
#pragma omp barrier
      const int rows = (m + 1) / 2, r0 = t == 0 ? 0 : rows, r = t == 0 ? rows : m - rows;
      gemm_row_major(false, true, r, n, n, N.data() + size_t(r0) * n, n, B.data(), n, y_split.data() + size_t(r0) * n, n);
      MKL_Set_Num_Threads_Local(0);
    }
  };
  const double flops = 4.0 * m * n * (m + n);
  for (int round = 0; round < 3; ++round) {
    const double tc = median_time(chain, 50), ts = median_time(two_halves, 50);
    double diff = 0.0;
    for (size_t i = 0; i < y_chain.size(); ++i) diff = std::max(diff, double(std::fabs(y_chain[i] - y_split[i])));
    std::printf("  %d×%d: chain on MKL's threads %.1f µs (%.0f GFLOP/s), split %.1f µs (%.0f), "
                "split/chain %.3f, max |difference| %.1e\n",
                m, n, tc * 1e6, flops / tc / 1e9, ts * 1e6, flops / ts / 1e9, ts / tc, diff);
  }
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const int m = argc > 3 ? std::atoi(argv[2]) : 256, n = argc > 3 ? std::atoi(argv[3]) : 257;
  std::printf("1. sgemm_ against sgemm_compute_ with the fixed operand packed once, %d thread(s):\n", threads);
  MKL_Set_Num_Threads_Local(threads);
  const int shapes[][3] = {{256, 256, 257}, {256, 257, 257}, {256, 256, 41}, {256, 41, 41}, {10, 10, 257},
                           {10, 257, 257}, {32, 32, 32}, {64, 64, 64}, {128, 128, 128}};
  for (const auto& s : shapes) packed(s[0], s[1], s[2]);
  MKL_Set_Num_Threads_Local(0);
  std::printf("2. the op's four GEMMs on one layer, 2 threads:\n");
  split(m, n);
  return 0;
}
