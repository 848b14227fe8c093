"""APO-Precond's plain step against SGD+momentum on the small MLP, with and without the fused momentum op.

    python python/measure_precond_plain_step.py [--repeats 300] [--threads 2]

The model of apo-bench's small row, MLP 40-256-256-10 (batch 100), with biases (each layer's
matrix carries its bias as the last column: 256×41, 256×257, 10×257) and without them (256×40,
256×256, 10×256). Per model: SGD+momentum (torch's default step), APO-Precond's plain step (no
meta-step in the run; K = 10^9), and the same with the fused momentum op switched off on the
instance (v = μ·buf + g with foreach ops, then the grouped op, then the checks of v and Y: the step
as it is on a backend without the fused op; a diagnosis, bit for bit the same values). Every variant
trains its own copy in 10-step blocks; the blocks run in a shuffled order each round, each timed
block right after an untimed step of its own (apo-bench's warm step). Prints the median step time
per variant and its ratio to SGD's on the same model.
"""
import argparse
import random
import statistics
import time

import torch
from torch import nn

from apo_kernels._args import cli_int
from apo_kernels.bench.timing import thread_handoff_ns
from apo_kernels.bench.train_bench import base_sgd, closure_for, small_mlp
from apo_kernels.optim import APOPrecond

STEPS = 10


def mlp(bias: bool) -> nn.Module:
    if bias:
        return small_mlp()
    return nn.Sequential(nn.Linear(40, 256, bias=False), nn.ReLU(), nn.Linear(256, 256, bias=False), nn.ReLU(),
                         nn.Linear(256, 10, bias=False))


def variants() -> dict:
    """name -> (model with biases, optimizer factory, fused op on)."""
    out = {}
    for bias in (True, False):
        tag = "with biases" if bias else "without biases"
        out[f"SGD, {tag}"] = (bias, base_sgd, None)
        for fused in (True, False):
            out[f"APO-Precond, {tag}" + ("" if fused else ", unfused")] = (bias, None, fused)
    return out


def build(bias: bool, factory, fused):
    torch.manual_seed(0)
    model = mlp(bias)
    if factory is not None:
        return model, factory(model)
    opt = APOPrecond(model, lr=0.01, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=10**9,
                     backend="cpu")
    if not fused:
        opt._fused_layers = []
    elif not opt._fused_layers:
        raise RuntimeError("the fused momentum op takes no layer of this model here")
    return model, opt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=cli_int(1), default=300, help="timed rounds")
    ap.add_argument("--threads", type=cli_int(1), default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(100, 40, generator=gen), torch.randint(0, 10, (100,), generator=gen)) for _ in range(4)]
    steps, times = {}, {}
    handoff = thread_handoff_ns()  # the threads' round trip: where the host runs the vCPUs moves it, and the timings
    for name, (bias, factory, fused) in variants().items():
        model, opt = build(bias, factory, fused)
        count = [0]

        def step(model=model, opt=opt, count=count):
            x, y = batches[count[0] % len(batches)]
            count[0] += 1
            closure = closure_for(opt, model, x, y)
            opt.step(closure) if isinstance(opt, torch.optim.SGD) else opt.step(closure, fsd_inputs=(x,))

        for _ in range(STEPS):  # warm-up (APO-Precond's step 0 is its only meta-step)
            step()
        steps[name], times[name] = step, []
    for _ in range(args.repeats):
        for name in random.sample(list(steps), len(steps)):
            steps[name]()  # untimed: the block starts from the caches its own step leaves
            t0 = time.perf_counter()
            for _ in range(STEPS):
                steps[name]()
            times[name].append((time.perf_counter() - t0) / STEPS)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (their round trip {handoff} ns at the start, "
          f"{thread_handoff_ns()} ns at the end), {args.repeats} rounds of {STEPS}-step blocks, shuffled; median step")
    for name, t in med.items():
        sgd = med["SGD, " + name.split(", ")[1]]
        print(f"  {name:40s} {t * 1e3:7.3f} ms  {t / sgd:6.3f}× SGD")


if __name__ == "__main__":
    main()
