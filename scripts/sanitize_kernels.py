"""A small, deterministic workload of the GPU kernels, for NVIDIA compute-sanitizer.

    compute-sanitizer --tool racecheck --error-exitcode 99 python scripts/sanitize_kernels.py
    python scripts/sanitize_kernels.py --backend cuda          # without the sanitizer: a quick check
    python scripts/sanitize_kernels.py --backend cpu           # the same workload on the CPU kernels

Runs, for each GPU backend (cuda, triton): fp32 64×64 forward and backward (every output), the same
batched with L = 3, and a grouped call mixing small (fused) layers of every shared-memory size class
(max(m, n) ≤ 16, ≤ 32, ≤ 64: one CUDA launch each) with large (tiled / cuBLAS) layers, some with
identity factors (None), forward and backward. Every result is compared with the float64 reference, so a run that the
sanitizer lets through still fails on wrong numbers. Exit status: 0 ok, 1 wrong result, 2 no GPU
or a backend missing. Sizes are small: under memcheck every kernel runs 10-100x slower.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

# Small (fused) and large (tiled / cuBLAS) layers in one grouped call: both backends fuse m, n <= 64.
# (m, n, identity factors): "A" / "B" / "AB" pass None for those factors.
GROUP_MIX = [(1, 1, ""), (7, 3, "A"), (20, 32, ""), (20, 32, "B"), (33, 17, ""), (64, 64, ""), (64, 64, "AB"),
             (65, 10, ""), (130, 70, "A")]
FP32_TOL = 1e-4  # relative Frobenius error vs float64 (TF32 is switched off below)


def make(m, n, device, L=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = () if L is None else (L,)

    def r(*shape, scale=1.0):
        return (torch.randn(*lead, *shape, generator=gen, dtype=torch.float64) * scale).float().to(device)

    return r(m, n), r(m, n), r(m, m, scale=m ** -0.5), r(m, n), r(n, n, scale=n ** -0.5)


def rel_err(x, ref):
    ref = ref.double().cpu()
    return ((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(name, outs, refs, failures):
    for k, (o, r) in enumerate(zip(outs, refs)):
        if r is None or o is None:  # the gradient of an identity factor: None from both
            if not (r is None and o is None):
                failures.append(f"{name}[{k}]: {'None' if o is None else 'a tensor'} where the reference has "
                                f"{'None' if r is None else 'a tensor'}")
            continue
        err = rel_err(o, r)
        if not err <= FP32_TOL:
            failures.append(f"{name}[{k}]: relative error {err:.2e} > {FP32_TOL:.0e}")


def run_backend(backend: str, failures: list) -> None:
    import apo_kernels
    from apo_kernels.ops import reference as ref

    def d64(ts):
        return [None if t is None else t.double() for t in ts]

    device = "cpu" if backend == "cpu" else "cuda"
    every = (True, True, True, True)
    for L in (None, 3):
        dy, g, a, s, b = make(64, 64, device, L)
        tag = f"{backend} 64x64 L={L}"
        y = apo_kernels.precondition(g, a, s, b, backend=backend)
        check(f"{tag} forward", [y], [ref.precondition(*d64((g, a, s, b)))], failures)
        outs = apo_kernels.precondition_backward(dy, g, a, s, b, output_mask=every, backend=backend)
        check(f"{tag} backward", outs, ref.precondition_backward(*d64((dy, g, a, s, b)), every), failures)
    layers = []
    for i, (m, n, identity) in enumerate(GROUP_MIX):
        dy, g, a, s, b = make(m, n, device, seed=i)
        layers.append((dy, g, None if "A" in identity else a, s, None if "B" in identity else b))
    dys, gs, as_, ss, bs = (list(c) for c in zip(*layers))
    ys = apo_kernels.precondition_grouped(gs, as_, ss, bs, backend=backend)
    check(f"{backend} grouped forward", ys, ref.precondition_grouped(d64(gs), d64(as_), d64(ss), d64(bs)), failures)
    outs = apo_kernels.precondition_grouped_backward(dys, gs, as_, ss, bs, output_mask=every, backend=backend)
    refs = ref.precondition_grouped_backward(d64(dys), d64(gs), d64(as_), d64(ss), d64(bs), every)
    for k in range(4):
        check(f"{backend} grouped backward output {k}", outs[k], refs[k], failures)
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", action="append", choices=("cuda", "triton", "cpu"),
                        help="backend to run (repeatable); default both")
    args = parser.parse_args(argv)
    backends = args.backend or ["cuda", "triton"]
    if not torch.cuda.is_available() and backends != ["cpu"]:
        print("sanitize_kernels: no CUDA device", file=sys.stderr)
        return 2
    import apo_kernels

    status = apo_kernels.backends()
    missing = {b: status[b] for b in backends if not status[b].startswith("available")}
    if missing:
        print(f"sanitize_kernels: backend(s) not available: {missing}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    failures: list = []
    for backend in backends:
        t0 = time.perf_counter()
        run_backend(backend, failures)
        print(f"sanitize_kernels: {backend} done in {time.perf_counter() - t0:.1f} s", flush=True)
    for f in failures:
        print(f"WRONG {f}", file=sys.stderr)
    print(f"sanitize_kernels: {'FAILED' if failures else 'ok'} ({len(failures)} wrong result(s))")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
