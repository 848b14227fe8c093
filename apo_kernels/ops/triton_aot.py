"""Ahead-of-time compile check of every Triton kernel variant, for sm_80 and sm_90, without a GPU.

    python -m apo_kernels.ops.triton_aot                   # CI: every kernel × dtype, sm_80 + sm_90
    python -m apo_kernels.ops.triton_aot --level smoke     # a fast subset (what tests/ run)
    python -m apo_kernels.ops.triton_aot --level full --jobs 8 --arch 90 -v

The variants are not listed by hand: the launchers of ``triton_kernels`` run in recording mode on
``meta`` tensors (fused and tiled layers, batched, grouped, backward output masks, float32 /
float16 / bfloat16, fp32 dots in "tf32x3" and "tf32"), and each recorded launch is specialized
exactly as Triton's runtime specializes it (its own binder: an integer argument equal to 1 becomes
a constant, multiples of 16 and 16-byte-aligned pointers get the divisibility attribute) and
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.

The command exits non-zero, printing the offending variant, on
  * a compile error;
  * shared memory above the arch's limit (the launch would fail);
  * a register spill: any per-thread stack frame (local memory) in the cubin, read with
    ``cuobjdump -res-usage`` (the STACK the runtime reports as ``n_spills``). Spills of these
    programs cost kilobytes of local memory per thread, reserved for every resident thread.
Registers, stack and shared memory are printed per kernel (``-v``: per variant).

Must run with TRITON_INTERPRET unset (interpreted kernels cannot be compiled). Needs no GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import sys
import time

from . import triton_kernels as tk

# Max dynamic shared memory per block (bytes), per compute capability.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_VARIANTS: list = []


class _Recorder(tk.Launcher):
    """Records launches instead of running them (see :func:`recording`)."""

    def __init__(self):
        self.launches: list = []

    def check_device(self, t, what):
        pass  # meta tensors: nothing runs

    def run(self, kernel, grid, args, constexprs, options):
        self.launches.append((kernel, dict(args), dict(constexprs), dict(options)))

    def run_gemm(self, grid, args, constexprs):
        for bm, bn, bk, gm, w, st in tk.gemm_configs(args, constexprs):  # every autotune candidate
            self.run(tk._gemm_kernel, None, args, dict(constexprs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm),
                     dict(num_warps=w, num_stages=st))


@contextlib.contextmanager
def recording():
    """Record the launches of ``triton_kernels``' launchers instead of running them (tensors may be
    on the ``meta`` device).

    Yields a list that fills with ``(kernel, args, constexprs, options)`` tuples, one per launch
    and, for the autotuned GEMM, one per config: the launch's own argument values (tensors, ints),
    so that each variant can be specialized and compiled exactly as the runtime would (integer 1 →
    constant, multiples of 16 and 16-byte-aligned pointers → divisibility).
    """
    recorder = _Recorder()
    prev, tk.LAUNCHER = tk.LAUNCHER, recorder
    try:
        yield recorder.launches
    finally:
        tk.LAUNCHER = prev


LEVELS = ("smoke", "default", "full")
# (A is the identity, B is the identity): every combination the op accepts
IDENTITY_PATTERNS = tuple(itertools.product((False, True), repeat=2))


def collect_variants(level: str = "default") -> list:
    """Run every launcher path in recording mode; return unique (kernel, sig, constexprs, options).

    smoke:   float32 + bfloat16, one fused block shape, tiled layers, masks (all) and
             (False, True, True, True), one small GEMM config — what the tests run.
    default: every dtype and fp32 precision; the largest fused block (at FUSED_MAX_DIM, with
             dimensions that are and are not multiples of 16: the runtime specializes on that) and
             the smallest; four masks; every autotune config — what CI runs.
    full:    default + every output mask.

    Identity factors (A, B or both None): the fused programs are compiled per pattern, and the
    tiled path launches other GEMM operand and epilogue combinations. Each pattern runs with the
    first two masks on the tiled layer and on the fused blocks: at default level the two largest
    only (an identity pattern runs a subset of the full program's products, with fewer values live
    at once; the smaller blocks and other masks run with both factors given), at full every one.
    """
    import torch

    if type(tk._fused_fwd_kernel).__name__ == "InterpretedFunction":
        raise RuntimeError("TRITON_INTERPRET=1 is set: interpreted kernels cannot be compiled; unset it")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")

    meta = dict(device="meta")
    tiled_shapes = [(129, 200)]
    main_masks = [(True,) * 4, (False, True, True, True)]
    if level == "smoke":
        dtypes, precs, fused_shapes = (torch.float32, torch.bfloat16), (False,), [(1, 1)]
        identity_shapes = fused_shapes + tiled_shapes
    else:
        dtypes, precs = (torch.float32, torch.float16, torch.bfloat16), (False, True)
        top = tk.FUSED_MAX_DIM
        fused_shapes = [(1, 1), (top, top), (top - 1, top - 31), (top // 4 + 1, top)]
        main_masks += [(False, False, True, False), (True, False, False, False)]
        identity_shapes = (fused_shapes[1:3] if level == "default" else fused_shapes) + tiled_shapes
    extra_masks = [m for m in itertools.product((False, True), repeat=4) if any(m) and m not in main_masks]

    def layer(m, n, dtype, L=None, identity=(False, False)):
        b = () if L is None else (L,)
        dy, g, a, s, b = (torch.empty(*b, *sh, dtype=dtype, **meta) for sh in ((m, n), (m, n), (m, m), (m, n), (n, n)))
        return [dy, g, None if identity[0] else a, s, None if identity[1] else b]

    seen, out = set(), []
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for dtype in dtypes:
            for tf32 in (precs if dtype == torch.float32 else (False,)):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                with recording() as rec:
                    for (m, n), identity in itertools.product(fused_shapes + tiled_shapes, IDENTITY_PATTERNS):
                        if identity != (False, False) and (m, n) not in identity_shapes:
                            continue
                        dy, g, a, s, b = layer(m, n, dtype, identity=identity)
                        tk.triton_precondition(g, a, s, b)
                        tk.triton_precondition(*layer(m, n, dtype, L=2, identity=identity)[1:])
                        masks = main_masks if identity == (False, False) else main_masks[:2]
                        masks = masks + (extra_masks if level == "full" and (m, n) == (1, 1) else [])
                        for mask in masks:
                            tk.triton_precondition_backward(dy, g, a, s, b, mask)
                    for identity in IDENTITY_PATTERNS:
                        shapes = fused_shapes + tiled_shapes if identity == (False, False) else identity_shapes
                        layers = [layer(m, n, dtype, identity=identity) for m, n in shapes]
                        cols = list(zip(*layers))
                        tk.triton_precondition_grouped(*cols[1:])
                        for mask in main_masks if identity == (False, False) else main_masks[:2]:
                            tk.triton_precondition_grouped_backward(*cols, mask)
                for kernel, args, consts, opts in rec:
                    if level == "smoke" and kernel is tk._gemm_kernel:
                        # one autotune config, the smallest, for a fast smoke run
                        smallest = min(tk.GEMM_CONFIGS, key=lambda c: c[0] * c[1])
                        if (consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"]) != smallest[:3]:
                            continue
                    sig, cx, attrs, options = runtime_specialization(kernel, args, consts, opts, 90)
                    key = (kernel.__name__, tuple(sig.items()), repr(sorted(cx.items())),
                           repr(sorted(attrs.items())), tuple(sorted(opts.items())))
                    if key not in seen:
                        seen.add(key)
                        out.append((kernel, args, consts, opts))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return out


def runtime_specialization(kernel, args: dict, consts: dict, opts: dict, arch: int):
    """(signature, constexprs, attrs, options) of ``kernel[grid](**args, **consts, **opts)`` on sm_<arch>,
    computed by Triton's own launch-time binder (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(consts, **opts)
    bound, specialization, options = binder(**args, **kwargs)
    options, sig, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return sig, constexprs, attrs, options.__dict__


def _cuobjdump() -> str:
    import shutil

    import triton

    try:
        return triton.knobs.nvidia.cuobjdump.path  # the one Triton ships
    except AttributeError:  # older Triton
        path = shutil.which("cuobjdump")
        if path is None:
            raise RuntimeError("cuobjdump not found: cannot read register and stack usage") from None
        return path


def resource_usage(cubin: bytes) -> dict:
    """{"REG", "STACK", "SHARED", "LOCAL", ...} of the one kernel in ``cubin`` (cuobjdump -res-usage)."""
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "REG:" in line]
    if len(lines) != 1:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{out}")
    fields = (kv.split(":", 1) for kv in lines[0].split() if ":" in kv)
    return {k: int(v) for k, v in fields if v.isdigit()}


def _describe(kernel, consts, opts) -> str:
    cs = ",".join(f"{k}={v}" for k, v in consts.items())
    return f"{kernel.__name__}[{cs}; warps={opts['num_warps']} stages={opts['num_stages']}]"


def _compile_one(job):
    """(idx, arch, error or None, usage dict, seconds) for one variant on one arch."""
    idx, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, args, consts, opts = _VARIANTS[idx]
    t0 = time.perf_counter()
    try:
        sig, cx, attrs, options = runtime_specialization(kernel, args, consts, opts, arch)
        ck = triton.compile(ASTSource(kernel, sig, cx, attrs), target=GPUTarget("cuda", arch, 32), options=options)
        usage = resource_usage(ck.asm["cubin"])
        usage["SMEM"] = int(getattr(ck.metadata, "shared", 0))
        err = None
        if usage["SMEM"] > SMEM_LIMIT.get(arch, 101376):
            err = f"needs {usage['SMEM']} B shared memory > {SMEM_LIMIT.get(arch)} B on sm_{arch}"
        elif usage.get("STACK", 0) > 0 or usage.get("LOCAL", 0) > 0:
            err = (f"register spill: {usage.get('STACK', 0)} B stack, {usage.get('LOCAL', 0)} B local memory "
                   f"per thread ({usage['REG']} registers)")
        return idx, arch, err, usage, time.perf_counter() - t0
    except Exception as exc:  # report every failure, not just the first
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return idx, arch, "\n    ".join(msg[-15:]), {}, time.perf_counter() - t0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability (repeatable); default 80 and 90")
    parser.add_argument("--level", choices=LEVELS, default="default",
                        help="smoke (seconds; tests), default (CI), full (every mask and autotune config)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per variant (registers, stack, smem)")
    parser.add_argument("--json", help="write every variant's registers, stack and shared memory to this file")
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
    rows = []
    for idx, arch, err, usage, secs in results:
        kernel, _, consts, opts = _VARIANTS[idx]
        rows.append(dict(kernel=kernel.__name__, arch=arch, constexprs=consts, error=err, seconds=round(secs, 2),
                         **opts, **usage))
        stat = per_kernel.setdefault((kernel.__name__, arch), dict(n=0, REG=0, STACK=0, SMEM=0, secs=0.0))
        stat["n"] += 1
        stat["secs"] += secs
        for k in ("REG", "STACK", "SMEM"):
            stat[k] = max(stat[k], usage.get(k, 0))
        if err is not None:
            failures += 1
            print(f"FAILED sm_{arch} {_describe(kernel, consts, opts)}\n    {err}", file=sys.stderr)
        elif args.verbose:
            print(f"ok sm_{arch} {secs:5.2f}s regs={usage['REG']:3d} stack={usage.get('STACK', 0)} "
                  f"smem={usage['SMEM']:6d} {_describe(kernel, consts, opts)}")
    for (name, arch), st in sorted(per_kernel.items()):
        print(f"  sm_{arch} {name:20s} {st['n']:4d} variants  max regs {st['REG']:3d}  max stack {st['STACK']:5d} B"
              f"  max smem {st['SMEM']:6d} B  {st['secs']:6.1f} s")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    print(f"{len(jobs) - failures}/{len(jobs)} compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    if failures:
        print(f"triton_aot: {failures} compile(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
