"""Data-parallel APO with torch.distributed: DistributedDataParallel on CPU (gloo) or GPUs (nccl).

    torchrun --nproc_per_node=2 python/train_ddp.py                   # APO-Precond, φ on every rank
    torchrun --nproc_per_node=2 python/train_ddp.py --sharded --check # each layer's φ on one rank
    torchrun --nproc_per_node=2 python/train_ddp.py --optimizer lr    # APO-LR (SGD momentum)
    torchrun --nproc_per_node=2 python/train_ddp.py --model resnet18 --steps 3 --meta-interval 2
    python python/train_ddp.py                                        # one process, no torchrun

Every rank trains the same model on its own shard of each (synthetic) batch; DDP averages the
gradients, ``apo_kernels.distributed`` the optimizer's decisions (see its docstring). Models: a
small MLP classifier (default), or ``--model resnet18``: one linear map per ResNet-18 layer matrix
(apo_kernels.bench.shapes.resnet18_shapes, (out, in·k·k), the fc with a bias), each on its own slice
of the input, trained by regression — the preconditioner set APO-Precond builds for ResNet-18.

Printed per rank: φ's memory and the meta-optimizer's state (after training, so the moments
exist), and the payload bytes that crossed the process group per step and per meta-step: DDP's
gradient all-reduce (counted by a communication hook) and the optimizer's own agreements (by
kind). ``--check`` exits 1 unless θ and φ are bit-identical on every rank at the end (in sharded
mode each φ tensor lives on one rank: θ is checked).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from apo_kernels import distributed as apo_dist
from apo_kernels.baselines import KFAC
from apo_kernels.bench.shapes import resnet18_shapes
from apo_kernels.optim import APOLR, APOPrecond


class LayerSet(nn.Module):
    """One nn.Linear per (out, in) matrix, each applied to its own slice of the input; the last
    matrix's columns include a bias (resnet18_shapes' fc)."""

    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList()
        self.ins = []
        for i, (m, n) in enumerate(shapes):
            bias = i == len(shapes) - 1  # resnet18_shapes: the fc (last) has a bias column
            self.layers.append(nn.Linear(n - 1 if bias else n, m, bias=bias))
            self.ins.append(n - 1 if bias else n)
        self.in_features = sum(self.ins)
        self.out_features = sum(m for m, _ in shapes)

    def forward(self, x):
        return torch.cat([layer(part) for layer, part in zip(self.layers, x.split(self.ins, dim=1))], dim=1)


def build_model(args) -> tuple[nn.Module, str]:
    if args.model == "resnet18":
        return LayerSet(resnet18_shapes(args.width)), "mse"
    return nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)), "kl"


def batch(args, model, step, rank, world, device):
    """The global batch of ``step`` (the same on every rank), then this rank's shard of it."""
    g = torch.Generator().manual_seed(args.seed * 100003 + step)
    if isinstance(model, LayerSet):
        x = torch.randn(args.batch, model.in_features, generator=g)
        y = torch.randn(args.batch, model.out_features, generator=g)
    else:
        x = torch.randn(args.batch, 32, generator=g)
        y = (x[:, :10] + 0.5 * x[:, 10:20]).argmax(dim=1)  # a learnable rule
    n = args.batch // world
    return x[rank * n:(rank + 1) * n].to(device), y[rank * n:(rank + 1) * n].to(device)


def size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes} B"


def make_optimizer(args, net, fsd):
    if args.optimizer == "lr":
        return APOLR(net, torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9), lambda_fsd=args.lambda_fsd,
                     lambda_wsd=0.1, meta_interval=args.meta_interval, fsd=fsd)
    if args.optimizer == "kfac":
        return KFAC(net, lr=args.lr, damping=1e-3)
    return APOPrecond(net, lr=args.lr, lambda_fsd=args.lambda_fsd, lambda_wsd=0.1, meta_lr=0.01,
                      meta_interval=args.meta_interval, fsd=fsd, shard_preconditioners=args.sharded)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=("precond", "lr", "kfac"), default="precond")
    p.add_argument("--sharded", action="store_true", help="APO-Precond: each layer's φ on one owner rank")
    p.add_argument("--model", choices=("mlp", "resnet18"), default="mlp")
    p.add_argument("--width", type=float, default=1.0, help="--model resnet18: channel multiplier")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--meta-interval", type=int, default=5)
    p.add_argument("--batch", type=int, default=64, help="global batch (split evenly over the ranks)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lambda-fsd", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--check", action="store_true", help="exit 1 unless θ and φ are bit-identical on every rank")
    args = p.parse_args(argv)
    if args.steps < 1 or args.meta_interval < 0 or args.batch < 1:
        p.error("--steps and --batch must be >= 1, --meta-interval >= 0")
    if args.sharded and args.optimizer != "precond":
        p.error("--sharded is APO-Precond's (--optimizer precond)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of ranks ({world})")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)  # the same initial θ on every rank (DDP also broadcasts rank 0's)
    model, fsd = build_model(args)
    model = model.to(device)
    ddp_bytes = Counter()
    net = model
    if distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)

        def counting_hook(state, bucket):
            ddp_bytes["total"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(state, bucket)

        net.register_comm_hook(None, counting_hook)
    opt = make_optimizer(args, net, fsd)

    def loss_fn(out, y):
        return F.mse_loss(out, y) if fsd == "mse" else F.cross_entropy(out, y)

    per_step, per_meta, losses = [], [], []
    for step in range(args.steps):
        x, y = batch(args, model, step, rank, world, device)
        meta = getattr(opt, "meta_due", lambda: False)()
        before = (ddp_bytes["total"], apo_dist.traffic(opt))

        def closure():
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure) if args.optimizer == "kfac" else opt.step(closure, fsd_inputs=(x,))
        losses.append(float(loss.detach()))
        ours = {k: v - before[1].get(k, 0) for k, v in apo_dist.traffic(opt).items() if v - before[1].get(k, 0)}
        (per_meta if meta else per_step).append((ddp_bytes["total"] - before[0], ours))

    check = apo_dist.check_replicas(opt)
    memory = apo_dist.phi_memory(opt) if hasattr(opt, "meta_optimizer") else {"phi": 0, "meta_state": 0}
    n_theta = sum(p.numel() for p in model.parameters())
    report = {"rank": rank, "memory": memory, "first_loss": losses[0], "last_loss": losses[-1]}
    reports = [None] * world
    if distributed:
        dist.all_gather_object(reports, report)
    else:
        reports = [report]
    if rank == 0:
        mode = "sharded" if args.sharded else "replicated"
        print(f"{args.optimizer} ({mode}), {world} rank(s) on {device.type}, model {args.model}"
              f"{f' width {args.width:g}' if args.model == 'resnet18' else ''}: θ {n_theta} entries "
              f"({n_theta * 4 / 2**20:.2f} MiB fp32), {args.steps} steps, global batch {args.batch}")
        print(f"loss (rank 0's shard): {losses[0]:.4f} -> {losses[-1]:.4f}")
        for r in reports:
            m = r["memory"]
            print(f"  rank {r['rank']}: φ {size(m['phi'])}, meta-optimizer state {size(m['meta_state'])}")
        for name, rows in (("step", per_step), ("meta-step", per_meta)):
            if rows:
                ddp, ours = rows[-1]  # the latest of its kind (the first steps may include recoveries)
                detail = ", ".join(f"{k} {v} B" for k, v in ours.items()) or "none"
                print(f"  per {name} (rank 0, latest): DDP gradient all-reduce {ddp} B; "
                      f"optimizer's own {sum(ours.values())} B ({detail})")
        print(f"replicas bit-identical: {check}")
    if distributed:
        dist.destroy_process_group()
    if args.check and (check["theta"] is False or check["phi"] is False):
        print(f"rank {rank}: --check failed: {check}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
