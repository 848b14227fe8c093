"""Measure what a meta-step costs: time of a step with and without the meta-update.

4-layer MLP of width 1024 (batch 128, 10 classes), CPU, float32, closure-driven steps:

    python python/measure_meta_overhead.py [--threads N] [--backend auto] [--repeats 10]

Prints the median wall time of a plain step (no meta-update) and of a meta-step for APOPrecond
and APOLR(SGD+momentum), plus plain torch.optim.SGD for reference. A meta-step does: the
closure at θ, the lookahead (one grouped op call), the closure again at θ', two FSD forwards
and one FSD backward, the op's grouped backward, an Adam step on φ, and the real update.
"""
import argparse
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F

from apo_kernels.optim import APOLR, APOPrecond


def model(width=1024, depth=4, d_in=1024, classes=10):
    layers, d = [], d_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def time_steps(opt, net, x, y, meta: bool, repeats: int):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    times = []
    for _ in range(repeats + 2):
        if hasattr(opt, "meta_due"):
            # choose the kind of step: a meta-step exactly when asked for
            opt.meta_interval = 1 if meta else 0
        t0 = time.perf_counter()
        opt.step(closure, fsd_inputs=(x,)) if hasattr(opt, "meta_due") else opt.step(closure)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])  # first two: warm-up


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1024)
    y = torch.randint(0, 10, (args.batch,))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, backend {args.backend}, "
          f"MLP 4x1024, batch {args.batch}")

    net = model()
    sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    t_sgd = time_steps(sgd, net, x, y, False, args.repeats)
    print(f"torch SGD+momentum step          {t_sgd * 1e3:8.1f} ms")

    net = model()
    apo = APOPrecond(net, lr=0.01, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, backend=args.backend)
    plain = time_steps(apo, net, x, y, False, args.repeats)
    meta = time_steps(apo, net, x, y, True, args.repeats)
    print(f"APOPrecond step (no meta-update) {plain * 1e3:8.1f} ms")
    print(f"APOPrecond meta-step             {meta * 1e3:8.1f} ms   (x{meta / plain:.2f}; "
          f"amortized over K=10: +{(meta - plain) / 10 / plain * 100:.0f}% per step)"
          f"  [meta-steps {apo.meta_steps}, skipped {apo.skipped_steps}]")

    net = model()
    lr = APOLR(net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9), lambda_fsd=0.1, lambda_wsd=0.0)
    plain = time_steps(lr, net, x, y, False, args.repeats)
    meta = time_steps(lr, net, x, y, True, args.repeats)
    print(f"APOLR step (no meta-update)      {plain * 1e3:8.1f} ms")
    print(f"APOLR meta-step                  {meta * 1e3:8.1f} ms   (x{meta / plain:.2f}; "
          f"amortized over K=10: +{(meta - plain) / 10 / plain * 100:.0f}% per step)"
          f"  [meta-steps {lr.meta_steps}, skipped {lr.skipped_steps}]")


if __name__ == "__main__":
    main()
