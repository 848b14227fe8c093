"""Micro-measure of the C++ CPU op against the torch chain a user would write (not a test).

    .venv/bin/python csrc/test/measure_cpu.py [--layers 64] [--big 1024]

Prints the best (and median) time of alternating runs of (1) the grouped op over 64 layers of random widths 32-128 vs a Python
per-layer loop of the chain (4 matmuls + mul), and (2) one big layer vs the chain, forward and the
meta-gradient backward (dA, dS, dB). Target: grouped ≤ 0.5x the loop; big layer ≤ 1.0x the chain.
The full benchmark is `apo-bench`; this only guards the native kernel.
"""
import argparse
import statistics
import time

import torch

import apo_kernels._C  # noqa: F401  (registers torch.ops.apo.*)
from apo_kernels.ops import reference as ref

op = torch.ops.apo


def best_times(f_op, f_chain, reps, warmup=3):
    """(op, chain) seconds: the best of `reps` alternating runs (robust to a busy machine)."""
    for _ in range(warmup):
        f_op(), f_chain()
    t_op, t_chain = [], []
    for _ in range(reps):
        for f, ts in ((f_op, t_op), (f_chain, t_chain)):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return min(t_op), min(t_chain), statistics.median(t_op), statistics.median(t_chain)


def layer(m, n):
    return (torch.randn(m, n), torch.randn(m, m) / m**0.5, torch.randn(m, n),
            torch.randn(n, n) / n**0.5, torch.randn(m, n))


def report(name, times):
    b_op, b_chain, m_op, m_chain = times
    print(f"{name:<38} best: op {b_op * 1e3:8.2f} ms  chain {b_chain * 1e3:8.2f} ms  "
          f"ratio {b_op / b_chain:5.2f}   (median ratio {m_op / m_chain:5.2f})")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=64)
    p.add_argument("--big", type=int, default=1024)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    mask = (False, True, True, True)

    widths = torch.randint(32, 129, (args.layers, 2)).tolist()
    G, A, S, B, DY = [list(x) for x in zip(*(layer(m, n) for m, n in widths))]
    report(f"grouped fwd, {args.layers} layers 32-128",
           best_times(lambda: op.precondition_grouped(G, A, S, B),
                      lambda: ref.precondition_grouped(G, A, S, B), args.reps))
    report(f"grouped bwd (dA,dS,dB), {args.layers} layers",
           best_times(lambda: op.precondition_grouped_backward(DY, G, A, S, B, mask),
                      lambda: ref.precondition_grouped_backward(DY, G, A, S, B, mask), args.reps))

    g, a, s, b, dy = layer(args.big, args.big)
    reps = max(5, args.reps // 3)
    report(f"single fwd {args.big}x{args.big}",
           best_times(lambda: op.precondition(g, a, s, b),
                      lambda: ref.precondition(g, a, s, b), reps))
    report(f"single bwd (dA,dS,dB) {args.big}x{args.big}",
           best_times(lambda: op.precondition_backward(dy, g, a, s, b, mask),
                      lambda: ref.precondition_backward(dy, g, a, s, b, mask), reps))


if __name__ == "__main__":
    main()
