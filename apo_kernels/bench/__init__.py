"""apo-bench: the micro-benchmarks of apo-kernels (console script ``apo-bench`` and
``python -m apo_kernels.bench``). See ``apo_kernels.bench.__main__`` for the flags.

Sections (each returns plain rows, every timing with a ratio to its baseline of the same run):
    op_bench       the op per backend vs the torch chain; grouped vs per-layer loop
    precond_bench  APO vs KFAC vs EKFAC preconditioner cost per step vs width
    train_bench    end-to-end step time of SGD, Adam, KFAC, EKFAC, APO-LR, APO-Precond
    lowprec        bf16/fp16 inv / cholesky / eigh tried for real
"""


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)


__all__ = ["main"]
