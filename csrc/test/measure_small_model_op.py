"""Micro-measure of the CPU op on the MNIST-1D MLP's layers (not a test).

    .venv/bin/python csrc/test/measure_small_model_op.py [--threads 2] [--repeats 200] [--blocks 7]

The layers of APO-Precond's plain step on the 40-256-256-10 MLP (the bias a column: 256×41,
256×257, 10×257) with learnt A, S and B: the momentum step (``precondition_momentum_grouped``) over
the three layers in one call and over each layer alone, and the kron structure's step
(``kron_precondition``) against ``torch.mm(torch.mm(L, G), R)`` on the same shapes. Prints µs per
call, the best of ``--blocks`` blocks of ``--repeats`` calls. Compare builds by running this once per
build, alternating; absolute times move between runs on a shared machine.
"""
import argparse
import time

import torch

import apo_kernels  # noqa: F401  (registers torch.ops.apo.*)

SHAPES = [(256, 41), (256, 257), (10, 257)]


def best_us(fn, repeats, blocks):
    for _ in range(max(1, repeats // 10)):
        fn()
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--blocks", type=int, default=7)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    layers = []
    for m, n in SHAPES:
        layers.append(dict(G=torch.randn(m, n), M=torch.randn(m, n),
                           A=torch.linalg.qr(torch.randn(m, m))[0].contiguous(), S=torch.rand(m, n),
                           B=torch.linalg.qr(torch.randn(n, n))[0].contiguous(), V=torch.empty(m, n),
                           Y=torch.empty(m, n), L=torch.randn(m, m) / m**0.5, R=torch.randn(n, n) / n**0.5,
                           W=torch.empty(m, n)))
    op = torch.ops.apo

    def momentum(group):
        cols = {k: [ly[k] for ly in group] for k in "GMASBVY"}
        return lambda: op.precondition_momentum_grouped(cols["G"], cols["M"], 0.9, cols["A"], cols["S"], cols["B"],
                                                        cols["V"], cols["Y"], False)

    rows = [("momentum step, three layers grouped", best_us(momentum(layers), a.repeats, a.blocks))]
    for (m, n), ly in zip(SHAPES, layers):
        rows.append((f"momentum step, {m}x{n} alone", best_us(momentum([ly]), a.repeats, a.blocks)))
    for (m, n), ly in zip(SHAPES, layers):
        rows.append((f"kron step {m}x{n}: kron_precondition",
                     best_us(lambda ly=ly: op.kron_precondition(ly["G"], ly["L"], ly["R"], ly["Y"]), a.repeats, a.blocks)))
        rows.append((f"kron step {m}x{n}: torch.mm chain",
                     best_us(lambda ly=ly: torch.mm(torch.mm(ly["L"], ly["G"], out=ly["W"]), ly["R"], out=ly["Y"]),
                             a.repeats, a.blocks)))
    print(f"# {a.threads} threads, CPU GEMM engine: {op.cpu_gemm_engine()}")
    for name, us in rows:
        print(f"{name:45s} {us:9.1f} us")


if __name__ == "__main__":
    main()
