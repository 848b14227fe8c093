"""Plain-step time of APO-Precond (full and kron) on a large embedding against SGD+momentum, and
the bound the passes and GEMMs of such a step set.

Model: nn.Embedding(262144, 64) -> Flatten -> Linear(64*16, 10), tokens (32, 16); no meta-steps.
The variants run interleaved in one process (round-robin blocks), medians per step. With
--threads 1 the clock is the process's CPU time (robust to other jobs on the machine), otherwise
wall time.

The bound is the same model's fwd+bwd plus the operations a plain step cannot avoid, timed as bare
calls on persistent tensors (no optimizer code, no fresh allocation):
  SGD+momentum  buf·μ + g in place, θ −= lr·buf                                  (8 passes)
  full carried  one call of the fused momentum op with carry=True (per block of rows
                v = μ·buf + g and Y = μ·Y + Y(g), the GEMMs on the rows the batch touched only,
                the finiteness of v and Y), θ −= Y: APO-Precond's default plain step
  full Y(v)     one call of the fused momentum op (apo_kernels.precondition_momentum_grouped:
                per block of rows v = μ·buf + g, the two 64×64 GEMMs with S² between them,
                ≈ 4.3 GFLOP over all rows, and the finiteness of v and Y), θ −= Y (3 passes):
                the step with carry_direction=False
  unfused full  the same step from separate torch calls: v into a spare buffer, the op as row
                blocks, a check of Y and of the gradient (one read each), θ −= Y
  kron          v as above, one GEMM with R into Y (≈ 2.1 GFLOP; apo::kron_precondition with an
                identity left side, as the optimizer calls it), Y·diag(u) in place, the two checks
                and θ −= Y

    python python/measure_embedding_step.py --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import apo_kernels
from apo_kernels._args import cli_int
from apo_kernels.optim import APOPrecond

VOCAB, DIM, TOKENS, BATCH = 262144, 64, 16, 32


def model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, DIM), nn.Flatten(), nn.Linear(DIM * TOKENS, 10))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=cli_int(1), default=1)
    ap.add_argument("--rounds", type=cli_int(1), default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(0)
    tok = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)

    def trainer(kind, carry=True):
        net = model()
        if kind == "sgd":
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = APOPrecond(net, lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.01, meta_interval=0,
                             structure=kind, carry_direction=carry)

        def step():  # (fwd+bwd, step) times
            t0 = clock()
            opt.zero_grad()
            F.cross_entropy(net(tok), y).backward()
            t1 = clock()
            opt.step()
            return t1 - t0, clock() - t1
        return step

    # the bound's bare operations, on persistent tensors of the embedding's shape
    shape = (VOCAB, DIM)
    cur, spare, Y, S2 = (torch.randn(shape, generator=gen) * 1e-3 for _ in range(4))
    B = torch.eye(DIM) + 0.01 * torch.randn(DIM, DIM, generator=gen)
    R, u, block = B @ B.T, torch.rand(VOCAB, 1, generator=gen) + 0.5, torch.empty(8192, DIM)
    probe = model()
    p = probe[0].weight.detach()

    def fwd_bwd():  # the embedding's gradient, written by the backward as in a real step
        probe.zero_grad()
        F.cross_entropy(probe(tok), y).backward()
        return probe[0].weight.grad

    def v(g):
        torch.mul(cur, 0.9, out=spare)
        spare.add_(g)

    def checks_and_update(g):
        Y.sum()
        g.sum()
        p.add_(Y, alpha=-0.1)

    def full(g, carry=False):
        apo_kernels.precondition_momentum_grouped([g], [cur], 0.9, [None], [S2], [B], vs=[spare], out=[Y],
                                                  carry=carry, backend="cpu")
        p.add_(Y, alpha=-0.1)

    def unfused_full(g):
        v(g)
        for r0 in range(0, VOCAB, block.shape[0]):
            r1 = r0 + block.shape[0]
            torch.mm(spare[r0:r1], B, out=block)
            block.mul_(S2[r0:r1])
            torch.mm(block, B.T, out=Y[r0:r1])
        checks_and_update(g)

    def kron(g):
        v(g)
        torch.ops.apo.kron_precondition(spare, None, R, Y)
        Y.mul_(u)
        checks_and_update(g)

    def sgd_ops(g):
        cur.mul_(0.9)
        cur.add_(g)
        p.add_(cur, alpha=-0.1)

    def bare(fn):
        def step():
            t0 = clock()
            g = fwd_bwd()
            t1 = clock()
            fn(g)
            return t1 - t0, clock() - t1
        return step

    variants = {"SGD+momentum": trainer("sgd"), "APO full": trainer("full"),
                "APO full, Y(v)": trainer("full", carry=False), "APO kron": trainer("kron"),
                "bound SGD+momentum": bare(sgd_ops), "bound full carried": bare(lambda g: full(g, carry=True)),
                "bound full Y(v)": bare(full), "bound unfused full": bare(unfused_full), "bound kron": bare(kron)}
    times = {k: [] for k in variants}
    for r in range(args.rounds + 1):
        for k, step in variants.items():
            for _ in range(3):
                t = step()
                if r:  # round 0 warms up
                    times[k].append(t)
    med = {k: (statistics.median(a for a, _ in ts), statistics.median(b for _, b in ts)) for k, ts in times.items()}
    print(f"threads {args.threads}, {'CPU' if args.threads == 1 else 'wall'} time, medians of {3 * args.rounds} steps")
    for group in (("SGD+momentum", "APO full", "APO full, Y(v)", "APO kron"),
                  ("bound SGD+momentum", "bound full carried", "bound full Y(v)", "bound unfused full", "bound kron")):
        base = sum(med[group[0]])
        for k in group:
            fb, st = med[k]
            print(f"  {k:20s} fwd+bwd {fb * 1e3:7.2f} ms  step {st * 1e3:7.2f} ms  total {(fb + st) * 1e3:7.2f} ms"
                  f"  {(fb + st) / base:.2f}x")


if __name__ == "__main__":
    main()
