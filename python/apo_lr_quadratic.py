"""APO-LR on least squares: a learning rate 100x too small grows, a diverging one shrinks, and the
fresh-batch ablation (short-horizon bias, APO paper App. D) decays the learning rate faster.

Run:  python python/apo_lr_quadratic.py
"""
import torch
from torch import nn

from apo_kernels.optim import APOLR

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
X = torch.randn(256, 5, generator=g) * torch.tensor([1.0, 0.8, 0.6, 0.5, 0.4])
Y = X @ torch.randn(5, 1, generator=g) + 0.3 * torch.randn(256, 1, generator=g)


def train(lr0, steps=300, batch_size=None, meta_batch="same"):
    torch.manual_seed(1)
    model = nn.Linear(5, 1)
    opt = APOLR(model, torch.optim.SGD(model.parameters(), lr=lr0),
                lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=10, meta_batch=meta_batch)
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
        opt.step(closure_on(idx), meta_closure=closure_on(other) if meta_batch == "fresh" else None)
    with torch.no_grad():
        loss = 0.5 * (model(X) - Y).pow(2).mean().item()
    return opt, loss


for lr0 in (0.01, 4.0):
    opt, loss = train(lr0)
    hist = " -> ".join(f"{lrs[0]:.3g}" for _, lrs in opt.lr_history[::6])
    print(f"lr0 = {lr0:<5} final lr {opt.lr:.3f}  loss {loss:.4f}   history: {hist}")

for mode in ("same", "fresh"):
    opt, loss = train(0.3, steps=600, batch_size=8, meta_batch=mode)
    print(f"minibatch 8, meta_batch={mode!r:7}  final lr {opt.lr:.3f}  loss {loss:.4f}")
