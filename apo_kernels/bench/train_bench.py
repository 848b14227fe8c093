"""Section 3 -- end-to-end training step time: one loop drives every optimizer (torch.optim's too).

    def closure(): opt.zero_grad(); loss = ce(model(x), y); loss.backward(); return loss
    opt.step(closure)                       # APO: opt.step(closure, fsd_inputs=(x_fsd,))

Step time = median over blocks of 10 steps (one full K = T = 10 cycle, so the amortized meta-step /
inversion is inside every block) / 10, after warm-up steps (10; 2 with --quick, one block). The final loss of the run is kept
too (no tuning: a timing table, not a leaderboard). Optimizers whose package is missing, or which
raise, give a row with the reason instead of a time.
"""
from __future__ import annotations

import importlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .common import Config, make_row

INTERVAL = 10


def mlp(width: int, d_in: int = 256, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )


def small_cnn(channels: int = 32, classes: int = 10) -> nn.Module:
    """3 conv blocks on 32×32 inputs down to 4×4, then Linear(2c·16 → 128) → Linear(128 → classes)."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * c * 16, 128), nn.ReLU(), nn.Linear(128, classes),
    )


def _optimizers(include_peers: bool = True):
    """name -> factory(model) returning (optimizer, takes_fsd_inputs)."""
    from ..baselines import EKFAC, KFAC

    facs = {
        "SGD": lambda m: (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), False),
        "Adam": lambda m: (torch.optim.Adam(m.parameters(), lr=1e-3), False),
        "KFAC": lambda m: (KFAC(m, lr=0.01, damping=0.1, inverse_interval=INTERVAL), False),
        "EKFAC": lambda m: (EKFAC(m, lr=0.01, damping=0.1, inverse_interval=INTERVAL), False),
    }

    def apo_lr(m, lambda_fsd=0.1):
        from ..optim import APOLR

        base = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        return APOLR(m, base, lambda_fsd=lambda_fsd, lambda_wsd=0.0, meta_interval=INTERVAL), True

    def apo_precond(m):
        from ..optim import APOPrecond

        return APOPrecond(m, lr=0.01, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=INTERVAL), True

    facs["APO-LR(SGD)"] = apo_lr
    # without the FSD term a meta-step is one extra forward/backward instead of ~2.3 (see report)
    facs["APO-LR(SGD) λ_FSD=0"] = lambda m: apo_lr(m, lambda_fsd=0.0)
    facs["APO-Precond"] = apo_precond
    # Modern peers from a maintained package, when installed (time + final loss only, default
    # hyper-parameters, preconditioner refresh every 10 steps where the optimizer has one).
    po = None
    if include_peers:
        try:
            po = importlib.import_module("pytorch_optimizer")
        except Exception:
            pass
    peers = [
        ("SOAP", "SOAP", dict(lr=3e-3, precondition_frequency=INTERVAL)),
        ("Shampoo", "Shampoo", dict(lr=1e-3, preconditioning_compute_steps=INTERVAL)),
        ("PSGD-Kron", "Kron", dict(lr=1e-3)),
    ]
    for name, cls_name, kw in peers if po is not None else []:
        cls = getattr(po, cls_name, None)
        if cls is not None:
            facs[f"{name} (pytorch_optimizer)"] = lambda m, cls=cls, kw=kw: (cls(m.parameters(), **kw), False)
    return facs


def _time_training(model, opt, fsd, batches, fsd_batch, sync, blocks: int, warmup: int):
    """``warmup`` untimed steps, then ``blocks`` timed blocks of INTERVAL steps (each block holds
    exactly one meta-step / inversion / eigh, whatever the phase)."""
    it = 0
    loss = None

    def one_step():
        nonlocal it
        x, y = batches[it % len(batches)]
        it += 1

        def closure():
            opt.zero_grad()
            out = F.cross_entropy(model(x), y)
            out.backward()
            return out

        return opt.step(closure, fsd_inputs=(fsd_batch,)) if fsd else opt.step(closure)

    for _ in range(warmup):
        loss = one_step()
    block_times = []
    for _ in range(blocks):
        sync()
        t0 = time.perf_counter()
        for _ in range(INTERVAL):
            loss = one_step()
        sync()
        block_times.append(time.perf_counter() - t0)
    per = sorted(t / INTERVAL * 1e3 for t in block_times)
    n = len(per)
    med = per[n // 2] if n % 2 else 0.5 * (per[n // 2 - 1] + per[n // 2])
    final = float(loss.detach()) if loss is not None else float("nan")
    return dict(median_ms=med, p20_ms=per[int(0.2 * (n - 1))], p80_ms=per[int(math.ceil(0.8 * (n - 1)))], reps=n), final


def run(cfg: Config) -> list[dict]:
    dev = cfg.device
    sync = (lambda: torch.cuda.synchronize()) if cfg.is_cuda else (lambda: None)
    gen = torch.Generator().manual_seed(2)
    blocks, warmup = (1, 2) if cfg.quick else (3, INTERVAL)
    problems = []
    mlp_batch = 4096 if cfg.is_cuda else (64 if cfg.quick else 256)
    for w in cfg.train_widths:
        problems.append((f"MLP w={w} batch={mlp_batch}", lambda w=w: mlp(w), (mlp_batch, 256)))
    cnn_c, cnn_batch = (8, 32) if cfg.quick else (32, 128 if not cfg.is_cuda else 512)
    problems.append((f"CNN c={cnn_c} 32×32 batch={cnn_batch}", lambda: small_cnn(cnn_c), (cnn_batch, 3, 32, 32)))

    rows: list[dict] = []
    facs = _optimizers(include_peers=not cfg.quick)  # peers only in the full run (--quick: ≤ 60 s)
    for label, make_model, xshape in problems:
        n_batches = 4
        batches = [
            (torch.randn(*xshape, generator=gen).to(dev), torch.randint(0, 10, (xshape[0],), generator=gen).to(dev))
            for _ in range(n_batches)
        ]
        fsd_batch = torch.randn(*xshape, generator=gen).to(dev)
        for name, fac in facs.items():
            cfg.tick(f"train {label}: {name}")
            torch.manual_seed(0)
            model = make_model().to(dev)
            try:
                opt, fsd = fac(model)
                timing, final_loss = _time_training(model, opt, fsd, batches, fsd_batch, sync, blocks, warmup)
            except Exception as exc:
                rows.append(make_row("train", label, name, "fp32", None, {}, error=f"{type(exc).__name__}: {exc}"[:300]))
                continue
            rows.append(make_row("train", label, name, "fp32", None, timing, final_loss=final_loss, steps=warmup + INTERVAL * blocks))
    for r in rows:
        base = next((b for b in rows if b["case"] == r["case"] and b["impl"] == "SGD" and "median_ms" in b), None)
        if base and "median_ms" in r:
            r["baseline"], r["ratio"] = "SGD", r["median_ms"] / base["median_ms"]
    return rows
