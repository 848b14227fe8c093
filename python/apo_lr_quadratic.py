"""APO-LR on least squares: the learnt lr from any start, a scheduler on top of it, and the
fresh-batch ablation (short-horizon bias, APO paper App. D).

1. SGD+momentum started at lr 1e3, 10 (both diverge as fixed lrs), 1e-4 and 1e-2 vs the best fixed
   lr of a grid: a start too large is cut at the first meta-step (``recoveries``), a start too
   small grows by about meta_lr (10 %) per meta-step.
2. A StepLR on the base optimizer multiplies the learnt lr: ``opt.lr`` (effective) vs
   ``opt.learnt_lrs`` (what APO learns, at the base step).
3. Minibatches of 8: same-batch meta-steps (Algorithm 1) keep the lr, fresh-batch ones decay it.

Run:  python python/apo_lr_quadratic.py
"""
import argparse
import math

import torch
from torch import nn

from apo_kernels.optim import APOLR

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
X = torch.randn(256, 5, generator=g) * torch.tensor([1.0, 0.8, 0.6, 0.5, 0.4])
Y = X @ torch.randn(5, 1, generator=g) + 0.3 * torch.randn(256, 1, generator=g)


def full_loss(model):
    with torch.no_grad():
        return (0.5 * (model(X) - Y).pow(2).mean()).item()


def train(lr0, steps=500, momentum=0.9, batch_size=None, meta_batch="same", apo=True, scheduler=None):
    torch.manual_seed(1)
    model = nn.Linear(5, 1)
    base = torch.optim.SGD(model.parameters(), lr=lr0, momentum=momentum)
    opt = APOLR(model, base, lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=10,
                meta_batch=meta_batch) if apo else base
    sched = scheduler(base) if scheduler else None
    gen = torch.Generator().manual_seed(2)

    def closure_on(idx):
        def closure():
            opt.zero_grad()
            loss = 0.5 * (model(X[idx]) - Y[idx]).pow(2).mean()
            loss.backward()
            return loss
        return closure

    for _ in range(steps):
        idx = torch.randint(0, 256, (batch_size,), generator=gen) if batch_size else slice(None)
        other = torch.randint(0, 256, (batch_size,), generator=gen) if batch_size else slice(None)
        if apo:
            opt.step(closure_on(idx), meta_closure=closure_on(other) if meta_batch == "fresh" else None)
        else:
            opt.step(closure_on(idx))
        if sched:
            sched.step()
    return opt, full_loss(model)


def main():
    # no options: --help says what the script shows, and an unknown flag is refused
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    fixed = {10 ** (k / 4): train(10 ** (k / 4), apo=False)[1] for k in range(-16, 5)}
    best_lr = min((v, lr) for lr, v in fixed.items() if math.isfinite(v))[1]
    print(f"SGD+momentum, 500 full-batch steps: best fixed lr {best_lr:.3g}, loss {fixed[best_lr]:.5f}")
    for lr0 in (1e3, 10.0, 1e-2, 1e-4):
        opt, loss = train(lr0)
        hist = " -> ".join(f"{lrs[0]:.3g}" for _, lrs in opt.lr_history[:: max(1, len(opt.lr_history) // 6)])
        print(f"APO-LR from lr {lr0:<6g} loss {loss:.5f} ({loss / fixed[best_lr]:.2f}x best fixed)  "
              f"learnt lr {opt.learnt_lrs[0]:.3g}  recoveries {opt.recoveries}  history: {hist}")

    step_lr = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=200, gamma=0.1)  # noqa: E731
    opt, loss = train(0.1, scheduler=step_lr)
    print(f"APO-LR from lr 0.1 with StepLR(200, 0.1): loss {loss:.5f}, effective lr {opt.lr:.3g} = learnt "
          f"{opt.learnt_lrs[0]:.3g} x schedule {opt.param_groups[0]['lr'] / 0.1:.3g}")

    for mode in ("same", "fresh"):
        opt, loss = train(0.3, steps=600, momentum=0.0, batch_size=8, meta_batch=mode)
        print(f"minibatch 8, meta_batch={mode!r:7}  final lr {opt.lr:.3f}  loss {loss:.4f}")


if __name__ == "__main__":
    main()
