"""Low-precision inversion, run for real: torch.linalg.inv / cholesky / eigh on bf16 and fp16
Kronecker factors, on the bench's device. Each row says what happened: the error torch raised, or
the accuracy of what came back (inverse residual ‖M X − I‖_max, eigenvalue error vs float64).
This is why KFAC/EKFAC must leave half precision to invert, and APO (no inverse) need not.
"""
from __future__ import annotations

import torch

from .common import Config

OPS = ("inv", "cholesky", "eigh")


def _factor(n: int, device, gen) -> torch.Tensor:
    a = torch.randn(4 * n, n, generator=gen, dtype=torch.float64)
    M = a.T @ a / (4 * n) + 1e-3 * torch.eye(n, dtype=torch.float64)  # KFAC-like: cond ~ 1e2–1e3
    return M.to(device)


def run(cfg: Config) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    sizes = [64] if cfg.quick else [64, 256, 1024]
    rows = []
    for n in sizes:
        M64 = _factor(n, cfg.device, gen)
        eye = torch.eye(n, dtype=torch.float64, device=cfg.device)
        ev64 = torch.linalg.eigvalsh(M64)
        cond = float(ev64[-1] / ev64[0])
        for dname in ("fp32", "bf16", "fp16"):
            M = M64.to(cfg.dtype(dname))
            cfg.tick(f"low-precision linalg n={n} {dname}")
            for op in OPS:
                row = dict(section="lowprec", case=f"n={n}", impl=f"torch.linalg.{op}", dtype=dname, size=n, cond=cond)
                try:
                    if op == "inv":
                        X = torch.linalg.inv(M)
                        row["error"] = None
                        row["residual_max"] = float((M64 @ X.double() - eye).abs().max())
                    elif op == "cholesky":
                        L = torch.linalg.cholesky(M)
                        row["error"] = None
                        row["residual_max"] = float((L.double() @ L.double().T - M64).abs().max() / M64.abs().max())
                    else:
                        ev, V = torch.linalg.eigh(M)
                        row["error"] = None
                        row["residual_max"] = float(((ev.double() - ev64).abs() / ev64[-1]).max())
                    finite = bool(torch.isfinite(torch.tensor(row["residual_max"])))
                    row["outcome"] = f"ran; residual {row['residual_max']:.2e}" + ("" if finite else " (non-finite)")
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    row["outcome"] = "refused: " + row["error"]
                rows.append(row)
    return rows
