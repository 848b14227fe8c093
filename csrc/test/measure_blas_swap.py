"""Would another BLAS make the CPU op faster? The op calls the Fortran ``sgemm_`` that torch's library
exports (MKL). This measurement routes those calls, at run time, to the OpenBLAS that numpy's wheel
bundles instead, and times in one process, round-robin:

- the grouped forward and backward over apo-bench's 64 small layers (32–128), with MKL and with
  OpenBLAS, against the per-layer loop of torch chains with MKL (apo-bench's ratio);
- the op's forward on the MNIST-1D MLP's three layers (256×41, 256×257, 10×257), with each BLAS.

How: a preloaded shim (built here with the C compiler) defines ``sgemm_`` and passes each call to
OpenBLAS's ``scipy_sgemm_64_`` (64-bit integers) or to the ``sgemm_`` of torch's library (MKL;
the script hands the shim its address), by a flag the script sets between calls; the shim counts
the calls each BLAS gets, so a run where the op did not go through it stops with an error. The op's
GEMM engine is set to BLAS for the run (``APO_KERNELS_CPU_GEMM=blas``; on CPUs where it would pick
oneDNN, that is not the op users get).
torch.mm goes through ``sgemm_`` as well, so the loop is timed with the flag on MKL. OpenBLAS runs
one thread per call (``OPENBLAS_NUM_THREADS=1``): the op's parallel loop supplies the threads for
small layers, and a layer large enough to run alone loses MKL's own threading with OpenBLAS (the
MLP's 256×257 layer is one).

    python csrc/test/measure_blas_swap.py [--threads 2] [--rounds 40]

Needs numpy's OpenBLAS (the numpy wheel's ``numpy.libs/libscipy_openblas64_*.so``) and a C compiler.
"""
import argparse
import ctypes
import glob
import os
import subprocess
import sys
import tempfile

SHIM = r"""
#include <stdint.h>
typedef int64_t i64;
typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                        const int*, const float*, const int*, const float*, float*, const int*);
void scipy_sgemm_64_(const char*, const char*, const i64*, const i64*, const i64*, const float*, const float*,
                     const i64*, const float*, const i64*, const float*, float*, const i64*, long, long);
static volatile int use_openblas = 0;
static long calls[2];  /* per BLAS: MKL, OpenBLAS (the op calls from several threads at once) */
long blas_swap_calls(int openblas) { return calls[openblas]; }
static sgemm_t mkl_sgemm = 0;  /* torch's own sgemm_, handed over by the script */
void blas_swap_use_openblas(int on) { use_openblas = on; }
void blas_swap_set_mkl(void* f) { mkl_sgemm = (sgemm_t)f; }
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) {
  __atomic_fetch_add(&calls[use_openblas], 1, __ATOMIC_RELAXED);
  if (use_openblas) {
    i64 M = *m, N = *n, K = *k, LA = *lda, LB = *ldb, LC = *ldc;
    scipy_sgemm_64_(ta, tb, &M, &N, &K, alpha, a, &LA, b, &LB, beta, c, &LC, 1, 1);
    return;
  }
  mkl_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""
MARK = "APO_BLAS_SWAP_SHIM"


def find_openblas():
    """The path of the OpenBLAS numpy's wheel bundles, or None (no numpy, or a numpy without it)."""
    try:
        import numpy
    except ImportError:
        return None
    libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs", "libscipy_openblas64_*.so"))
    return os.path.realpath(libs[0]) if libs else None


def build_and_reexec() -> None:
    lib = find_openblas()
    if lib is None:
        sys.exit("numpy's bundled OpenBLAS (numpy.libs/libscipy_openblas64_*.so) was not found")
    out = tempfile.mkdtemp(prefix="blas_swap_")
    src, shim = os.path.join(out, "shim.c"), os.path.join(out, "libblas_swap.so")
    with open(src, "w") as f:
        f.write(SHIM)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", src, "-o", shim, lib,
                    f"-Wl,-rpath,{os.path.dirname(lib)}"], check=True)
    # APO_KERNELS_CPU_GEMM=blas: the op's fp32 GEMMs go through sgemm_ (not oneDNN) on every CPU
    env = dict(os.environ, LD_PRELOAD=shim, OPENBLAS_NUM_THREADS="1", APO_KERNELS_CPU_GEMM="blas", **{MARK: shim})
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def measure(args) -> None:
    import torch

    import apo_kernels
    from apo_kernels.bench import op_bench
    from apo_kernels.bench.shapes import small_layers
    from apo_kernels.bench.timing import Timer

    torch.set_num_threads(args.threads)
    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''}"
    shim = ctypes.CDLL(os.environ[MARK])
    # torch's library is loaded already: this is its handle, and its sgemm_ is MKL's, not the shim's
    torch_cpu = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    shim.blas_swap_set_mkl(ctypes.cast(torch_cpu.sgemm_, ctypes.c_void_p))
    swap = shim.blas_swap_use_openblas
    gen = torch.Generator().manual_seed(0)

    def with_blas(openblas: bool, fn):
        def run():
            swap(int(openblas))
            return fn()
        return run

    small = [op_bench._inputs(m, n, torch.float32, "cpu", gen) for m, n in small_layers(64)]  # apo-bench's
    Gs, As, Ss, Bs, dYs = (list(t) for t in zip(*small))
    forward = lambda: apo_kernels.precondition_grouped(Gs, As, Ss, Bs)
    backward = lambda: apo_kernels.precondition_grouped_backward(dYs, Gs, As, Ss, Bs, output_mask=op_bench.MASK)
    loop = lambda: [op_bench.chain(g, a, s, b) for g, a, s, b in zip(Gs, As, Ss, Bs)]

    outs = {}
    for blas in (False, True):  # each BLAS gets the op's calls when asked for
        before = shim.blas_swap_calls(int(blas))
        swap(int(blas))
        outs[blas] = forward()
        if shim.blas_swap_calls(int(blas)) == before:
            sys.exit(f"the op made no sgemm_ call through the shim with {'OpenBLAS' if blas else 'MKL'}")
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(outs[True], outs[False]))
    print(f"forward, OpenBLAS against MKL: max relative difference {err:.1e}")
    timer = Timer(torch.device("cpu"))
    res = timer.interleaved({
        "loop of torch chains, MKL": with_blas(False, loop),
        "grouped forward, MKL": with_blas(False, forward),
        "grouped forward, OpenBLAS": with_blas(True, forward),
        "grouped backward, MKL": with_blas(False, backward),
        "grouped backward, OpenBLAS": with_blas(True, backward),
    }, rounds=args.rounds)
    med = {name: r["median_ms"] for name, r in res.items()}
    print(f"\n64 small layers (32–128), {threads}, {args.rounds} rounds round-robin: median ms [p20–p80]")
    for name, r in res.items():
        print(f"  {name:28s} {r['median_ms']:7.3f} [{r['p20_ms']:.3f}–{r['p80_ms']:.3f}]")
    loop_ms = med["loop of torch chains, MKL"]
    print(f"  grouped forward / loop (apo-bench's ratio): MKL {med['grouped forward, MKL'] / loop_ms:.3f}, "
          f"OpenBLAS {med['grouped forward, OpenBLAS'] / loop_ms:.3f}")
    print(f"  OpenBLAS / MKL: forward {med['grouped forward, OpenBLAS'] / med['grouped forward, MKL']:.3f}, "
          f"backward {med['grouped backward, OpenBLAS'] / med['grouped backward, MKL']:.3f}")

    mlp = [op_bench._inputs(m, n, torch.float32, "cpu", gen) for m, n in ((256, 41), (256, 257), (10, 257))]
    Gs, As, Ss, Bs, _ = (list(t) for t in zip(*mlp))
    fwd = lambda: apo_kernels.precondition_grouped(Gs, As, Ss, Bs)
    res = timer.interleaved({"MKL": with_blas(False, fwd), "OpenBLAS": with_blas(True, fwd)}, rounds=args.rounds * 5)
    print(f"\nthe op's forward on the MNIST-1D MLP's layers (256×41, 256×257, 10×257), {threads}:")
    for name, r in res.items():
        print(f"  {name:10s} {r['median_ms']:7.3f} ms [{r['p20_ms']:.3f}–{r['p80_ms']:.3f}]")
    swap(0)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()
    if MARK not in os.environ:
        build_and_reexec()
    measure(args)


if __name__ == "__main__":
    main()
