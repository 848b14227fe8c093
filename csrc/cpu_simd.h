// apo-kernels: how the CPU kernels' elementwise loops are compiled (ops.cpp, discrepancy.cpp).
//
// A loop is written once as an APO_INLINE template and instantiated in an APO_SIMD_CLONES function,
// which GCC compiles for AVX-512, AVX2 and the baseline x86-64 (the loader picks one for the CPU it
// runs on); callers make one call per block of rows, not per row. Reductions use
// `#pragma omp simd reduction(...)`, which lets them vectorize without -ffast-math.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define APO_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define APO_SIMD_CLONES
#endif
// A loop whose selects read values that may trap (x < a ? 0 : p·q) vectorizes under GCC's default
// -ftrapping-math only with AVX-512's masks; a function that reads no FP exception may turn it off.
#if defined(__GNUC__) && !defined(__clang__)
#define APO_NO_TRAPPING_MATH __attribute__((optimize("no-trapping-math")))
#else
#define APO_NO_TRAPPING_MATH
#endif
#define APO_INLINE inline __attribute__((always_inline))
