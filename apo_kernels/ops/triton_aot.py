"""Ahead-of-time compile check of every Triton kernel variant, for sm_80 and sm_90, without a GPU.

    python -m apo_kernels.ops.triton_aot                   # CI: every kernel × dtype, sm_80 + sm_90
    python -m apo_kernels.ops.triton_aot --level smoke     # a fast subset (what tests/ run)
    python -m apo_kernels.ops.triton_aot --level full --jobs 8 --arch 90

The variants are not listed by hand: the launchers of ``triton_kernels`` run in recording mode on
``meta`` tensors (fused and tiled layers, batched, grouped, every backward output mask, float32 /
float16 / bfloat16, fp32 dots in "ieee" and "tf32"), and each recorded launch — kernel,
signature, constexprs, num_warps/num_stages — is compiled with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32))``.
A compile error, or a kernel whose shared memory exceeds the arch's limit (it would fail at
launch), makes the command exit non-zero with the offending variant printed.

Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled). Needs no GPU.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import time

# Max dynamic shared memory per block (bytes), per compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_VARIANTS: list = []


LEVELS = ("smoke", "default", "full")


def collect_variants(level: str = "default") -> list:
    """Run every launcher path in recording mode; return unique (kernel, sig, constexprs, options).

    smoke:   float32 + bfloat16, one fused block shape, tiled layers, masks (all) and
             (False, True, True, True), one small GEMM config — what the tests run.
    default: every dtype and fp32 precision, the largest fused block shapes of each direction,
             four masks, first autotune config — what CI runs.
    full:    default + every output mask (on the smallest block) + every autotune config.
    """
    import torch

    from . import triton_kernels as tk

    if type(tk._fused_fwd_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    meta = dict(device="meta")
    tiled_shapes = [(129, 200)]
    main_masks = [(True,) * 4, (False, True, True, True)]
    if level == "smoke":
        dtypes, precs, fused_shapes = (torch.float32, torch.bfloat16), (False,), [(1, 1)]
    else:
        dtypes, precs = (torch.float32, torch.float16, torch.bfloat16), (False, True)
        fused_shapes = [(1, 1), (64, 64), (64, 128), (128, 64), (128, 128)]
        main_masks += [(False, False, True, False), (True, False, False, False)]
    extra_masks = [m for m in itertools.product((False, True), repeat=4) if any(m) and m not in main_masks]
    all_configs = level == "full"

    def layer(m, n, dtype, L=None):
        b = () if L is None else (L,)
        return [torch.empty(*b, *sh, dtype=dtype, **meta) for sh in ((m, n), (m, n), (m, m), (m, n), (n, n))]

    seen, out = set(), []
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for dtype in dtypes:
            for tf32 in (precs if dtype == torch.float32 else (False,)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                with tk.recording() as rec:
                    for m, n in fused_shapes + tiled_shapes:
                        dy, g, a, s, b = layer(m, n, dtype)
                        tk.triton_precondition(g, a, s, b)
                        tk.triton_precondition(*layer(m, n, dtype, L=2)[1:])
                        masks = main_masks + (extra_masks if level == "full" and (m, n) == (1, 1) else [])
                        for mask in masks:
                            tk.triton_precondition_backward(dy, g, a, s, b, mask)
                    layers = [layer(m, n, dtype) for m, n in fused_shapes + tiled_shapes]
                    cols = list(zip(*layers))
                    tk.triton_precondition_grouped(*cols[1:])
                    for mask in main_masks:
                        tk.triton_precondition_grouped_backward(*cols, mask)
                for kernel, sig, consts, opts in rec:
                    if not all_configs and kernel is tk._gemm_kernel:
                        # one autotune config: the first (largest), or a small one for a fast smoke run
                        cfg = (64, 64, 32) if level == "smoke" else tk.GEMM_CONFIGS[0][:3]
                        if (consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]) != cfg:
                            continue
                    key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())),
                           tuple(sorted(opts.items())))
                    if key not in seen:
                        seen.add(key)
                        out.append((kernel, sig, consts, opts))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return out


def _describe(kernel, sig, consts, opts) -> str:
    ptrs = ",".join(f"{k}:{v[1:]}" for k, v in sig.items() if v.startswith("*"))
    cs = ",".join(f"{k}={v}" for k, v in consts.items())
    return f"{kernel.__name__}[{cs}; warps={opts['num_warps']} stages={opts['num_stages']}]({ptrs})"


def _compile_one(job):
    idx, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, sig, consts, opts = _VARIANTS[idx]
    t0 = time.perf_counter()
    try:
        src = ASTSource(kernel, sig, consts)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(opts))
        shared = int(getattr(ck.metadata, "shared", 0))
        if shared > SMEM_LIMIT.get(arch, 101376):
            return idx, arch, f"needs {shared} B shared memory > {SMEM_LIMIT.get(arch)} B on sm_{arch}", shared, time.perf_counter() - t0
        return idx, arch, None, shared, time.perf_counter() - t0
    except Exception as exc:  # report every failure, not just the first
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return idx, arch, "\n    ".join(msg[-15:]), -1, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (repeatable); default 80 and 90")
    parser.add_argument("--level", choices=LEVELS, default="default",
                        help="smoke (seconds; tests), default (CI), full (every mask and autotune config)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("triton_aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    import triton

    archs = args.arch or [80, 90]
    t0 = time.perf_counter()
    _VARIANTS[:] = collect_variants(args.level)
    jobs = [(i, a) for a in archs for i in range(len(_VARIANTS))]
    print(f"triton {triton.__version__}: compiling {len(_VARIANTS)} kernel variants for "
          f"{', '.join(f'sm_{a}' for a in archs)} ({len(jobs)} compiles, {args.jobs} jobs)", flush=True)
    if args.jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_compile_one, jobs, chunksize=4)
    else:
        results = [_compile_one(j) for j in jobs]
    failures = 0
    per_kernel: dict = {}
    for idx, arch, err, shared, secs in results:
        kernel, sig, consts, opts = _VARIANTS[idx]
        stat = per_kernel.setdefault((kernel.__name__, arch), [0, 0, 0.0])
        stat[0] += 1
        stat[1] = max(stat[1], shared)
        stat[2] += secs
        if err is not None:
            failures += 1
            print(f"FAILED sm_{arch} {_describe(kernel, sig, consts, opts)}\n    {err}", file=sys.stderr)
        elif args.verbose:
            print(f"ok sm_{arch} {secs:.2f}s smem={shared} {_describe(kernel, sig, consts, opts)}")
    for (name, arch), (count, smem, secs) in sorted(per_kernel.items()):
        print(f"  sm_{arch} {name:22s} {count:4d} variants  max smem {smem:7d} B  {secs:6.1f} s")
    print(f"{len(jobs) - failures}/{len(jobs)} compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    if failures:
        print(f"triton_aot: {failures} compile(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
