"""APO-Precond on a bf16 model: its step on φ's bf16 image against float32 φ, in time and in quality.

    python python/measure_bf16_model_step.py [--width 1024] [--repeats 8] [--threads 2] [--meta-interval K]
    python python/measure_bf16_model_step.py --quality [--seeds 3] [--steps 3000] [--hidden 256]

APO-Precond keeps φ in float32 for a bf16 model. Where the op runs bf16 operands faster than float32
(``apo_kernels.ops.backends.half_operands_pay``: the CPU op on AMX-BF16), the step of a bf16 layer
(its update, and a meta-step's lookahead) takes the bf16 gradient matrix and a bf16 image of φ, cast
once after each meta-step; the meta-gradient stays the float32 op's backward. Each run compares, in
one process, that step with the float32 one (the same optimizer with ``half_operands_pay`` answering
False on the instance's module: the op on float32 G and φ, the result rounded once into the
parameters, as before the image).

Time (default): SGD+momentum and APO-Precond ``full`` and ``kron``, each with the image and without,
on apo-bench's MLP (256-w-w-w-10, batch 256) in bf16; plain steps only (no meta-step in the timed
run), or with ``--meta-interval K`` a meta-step every K steps (λ_WSD 0.1; a block of 10 steps then
holds one at K = 10). Every variant trains its own copy in 10-step blocks, the blocks in a shuffled
order each round, each block after an untimed step of its own; prints per variant the median over
rounds of a block's mean step and its ratio to SGD's.

``--quality``: MNIST-1D (``mnist1d``'s ``make_dataset``, as the paper experiments), the MLP
40-256-256-10 in bf16, APO-Precond at the classification experiment's point (lr 0.1, λ_WSD 0.3,
λ_FSD 0.1 on another batch, K = 10, batch 100) with the image and without, on the same seeds: final
training loss and test accuracy, mean ± std. (At the paper's width 256 its 256×257 layer takes the
op's bf16 GEMMs, the 256×41 and 10×257 ones are computed in fp32 from their bf16 operands; at
``--hidden 512`` the first two layers take them.)
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from apo_kernels._args import cli_int
from apo_kernels.bench.train_bench import base_sgd, mlp, small_mlp
from apo_kernels.ops import backends
from apo_kernels.optim import APOPrecond

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python/paper

STEPS = 10
NO_META = 10**9  # the default meta_interval: longer than any run, so plain steps only
_HALF_OPERANDS_PAY = backends.half_operands_pay


def use_image(on: bool) -> None:
    """The step on φ's bf16 image where the op pays for it (on), or on float32 φ (off)."""
    backends.half_operands_pay = _HALF_OPERANDS_PAY if on else (lambda backend, device, dtype: False)


def time_steps(width: int, repeats: int, meta_interval: int) -> None:
    x, y = torch.randn(256, 256).bfloat16(), torch.randint(0, 10, (256,))
    variants = {}
    for name, structure, image in (("SGD+momentum", None, None),
                                   ("APO-Precond full, φ's bf16 image", "full", True),
                                   ("APO-Precond full, float32 φ", "full", False),
                                   ("APO-Precond kron, φ's bf16 image", "kron", True),
                                   ("APO-Precond kron, float32 φ", "kron", False)):
        torch.manual_seed(0)
        model = mlp(width).bfloat16()
        opt = base_sgd(model) if structure is None else APOPrecond(
            model, lr=0.01, lambda_fsd=0.0, lambda_wsd=0.1, meta_lr=0.01, meta_interval=meta_interval, structure=structure)

        def closure(opt=opt, model=model):
            opt.zero_grad()
            loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            return loss

        variants[name] = (opt, closure, image)

    def step(name):
        opt, closure, image = variants[name]
        use_image(bool(image))
        opt.step(closure)

    for name in variants:  # the meta-step at step 0, and the first plain steps, untimed
        for _ in range(3):
            step(name)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            step(name)  # the warm step: the block starts from the caches its own steps leave
            t0 = time.perf_counter()
            for _ in range(STEPS):
                step(name)
            times[name].append((time.perf_counter() - t0) / STEPS)
    use_image(True)
    sgd = statistics.median(times["SGD+momentum"])
    print(f"bf16 MLP 256-{width}-{width}-{width}-10, batch 256, {torch.get_num_threads()} threads, "
          f"the op's bf16 route: {torch.ops.apo.cpu_bf16_gemm()}; {repeats} rounds of {STEPS}-step blocks, "
          + ("plain steps" if meta_interval == NO_META else f"a meta-step every {meta_interval} steps"))
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:36s} {med * 1e3:8.2f} ms  {med / sgd:5.2f}× SGD")


def train(seed: int, steps: int, image: bool, data, hidden: int) -> tuple[float, float]:
    xtr, ytr, xte, yte = data.x_train, data.y_train, data.x_test, data.y_test
    torch.manual_seed(seed)
    model = small_mlp(width=hidden).bfloat16()
    opt = APOPrecond(model, lr=0.1, lambda_fsd=0.1, lambda_wsd=0.3, meta_lr=0.1, meta_interval=10)
    gen = torch.Generator().manual_seed(seed)
    use_image(image)
    for _ in range(steps):
        idx = torch.randint(len(xtr), (100,), generator=gen)
        other = torch.randint(len(xtr), (100,), generator=gen)
        xb, yb, xo = xtr[idx].bfloat16(), ytr[idx], xtr[other].bfloat16()

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb).float(), yb)
            loss.backward()
            return loss

        opt.step(closure, fsd_inputs=(xo,))
    use_image(True)
    with torch.no_grad():
        loss = float(F.cross_entropy(model(xtr.bfloat16()).float(), ytr))
        acc = float((model(xte.bfloat16()).argmax(1) == yte).float().mean()) * 100
    return loss, acc


def quality(seeds: int, steps: int, hidden: int) -> None:
    from paper.common import mnist1d

    data = mnist1d()
    print(f"MNIST-1D, MLP 40-{hidden}-{hidden}-10 in bf16, APO-Precond, {steps} steps, seeds 0..{seeds - 1}, "
          f"the op's bf16 route: {torch.ops.apo.cpu_bf16_gemm()}")
    for name, image in (("φ's bf16 image", True), ("float32 φ", False)):
        runs = [train(seed, steps, image, data, hidden) for seed in range(seeds)]
        losses, accs = zip(*runs)
        sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
        print(f"  {name:16s} train loss {statistics.mean(losses):.4f} ± {sd(losses):.4f}   "
              f"test acc {statistics.mean(accs):.2f} ± {sd(accs):.2f} %   "
              f"(per seed: {', '.join(f'{a:.1f}' for a in accs)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=cli_int(low=1), default=1024)
    p.add_argument("--repeats", type=cli_int(low=1), default=8)
    p.add_argument("--threads", type=cli_int(low=1), default=2)
    p.add_argument("--meta-interval", type=cli_int(low=1), default=NO_META,
                   help="APO-Precond's K in the timed run (default: none there, plain steps only)")
    p.add_argument("--quality", action="store_true", help="train on MNIST-1D with and without the image")
    p.add_argument("--seeds", type=cli_int(low=1), default=3)
    p.add_argument("--steps", type=cli_int(low=1), default=3000)
    p.add_argument("--hidden", type=cli_int(low=1), default=256, help="the quality run's hidden width")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quality:
        quality(args.seeds, args.steps, args.hidden)
    else:
        time_steps(args.width, args.repeats, args.meta_interval)


if __name__ == "__main__":
    main()
