"""Section 2 -- preconditioner cost per training step vs layer width (one w×w layer, batch N rows).

Every piece is the code that really runs in the optimizers (apo_kernels.baselines' layer functions
and the public op), timed separately and amortized with K = T = 10:

    APO    = op forward                         + (op backward + op forward) / K   (meta-step)
    APO-kron = L·G·R (2 GEMMs)                  + (its closed-form meta-gradient, 6 GEMMs + L·G·R
                                                   + rebuilding L = A diag(u) Aᵀ, R = B diag(v) Bᵀ) / K
    KFAC   = factor update + apply (2 GEMMs)    + (π-damping + 2 Cholesky inverses, fp32) / T
    EKFAC  = factor update + eigenbasis scaling + apply (4 GEMMs) + (2 eigh, fp32) / T

"half" runs the per-step parts in bf16 (fp16 if only fp16 was asked); KFAC/EKFAC still invert /
eigendecompose in fp32 (torch has no half linalg), which is what practitioners do. APO's meta-step
also needs the model's extra forward/backward passes -- those are in the end-to-end section, not here.
"""
from __future__ import annotations

import torch

from ..baselines.ekfac import eigenbasis, ekfac_apply, projected_second_moment
from ..baselines.kfac import damped_inverse, factored_damping, kfac_apply, kronecker_factors
from ..optim.kron import KronPreconditioner
from .common import Config, make_row

K = T = 10
MASK = (False, True, True, True)


def _ema_(old, new, decay=0.95):
    return old.mul_(decay).add_(new, alpha=1 - decay)


def run(cfg: Config, batch: int = 256) -> list[dict]:
    import apo_kernels

    timer, dev = cfg.timer, cfg.device
    gen = torch.Generator().manual_seed(1)
    half = next((d for d in ("bf16", "fp16") if d in cfg.dtypes), None)
    dnames = ["fp32"] + ([half] if half else [])
    backend = cfg.backends[0] if cfg.backends else "reference"
    rows: list[dict] = []
    for dname in dnames:
        dt = cfg.dtype(dname)
        for w in cfg.widths:
            if not cfg.size_ok(w, dname):
                continue
            rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen) * sc).to(dev, dt)
            G, dY = rnd(w, w), rnd(w, w)
            A, B = rnd(w, w, sc=w**-0.5), rnd(w, w, sc=w**-0.5)
            S = (torch.rand(w, w, generator=gen) + 0.5).to(dev, dt)
            a, g = rnd(batch, w), rnd(batch, w, sc=1.0 / batch)
            case = f"w={w}"
            extra = dict(width=w, batch=batch, K=K, T=T, backend=backend)

            cfg.tick(f"precond {dname} w={w}: APO")
            t_fwd = timer(lambda: apo_kernels.precondition(G, A, S, B, backend=backend))
            t_meta = timer(
                lambda: (
                    apo_kernels.precondition_backward(dY, G, A, S, B, output_mask=MASK, backend=backend),
                    apo_kernels.precondition(G, A, S, B, backend=backend),
                )
            )

            cfg.tick(f"precond {dname} w={w}: APO-kron")
            kron = KronPreconditioner(w, w, dtype=dt, device=dev)
            with torch.no_grad():  # the op rows' A, B; u, v = exp(2·N(0, 0.1²))
                for dst, src in ((kron.A[0], A), (kron.B[0], B), (kron.su, rnd(w, sc=0.1)), (kron.sv, rnd(w, sc=0.1))):
                    dst.copy_(src)
            t_kron_apply = timer(lambda: kron.apply(G))

            def kron_meta():
                kron.meta_backward(dY, G, backend=backend)  # the lookahead's L·G·R is the apply above
                kron.su.grad = kron.sv.grad = kron.A[0].grad = kron.B[0].grad = None
                kron.su.add_(0.0)  # the meta-optimizer's write: L and R are rebuilt
                return kron.factors()

            t_kron_meta = timer(kron_meta)

            cfg.tick(f"precond {dname} w={w}: KFAC")
            Af, Gf = kronecker_factors(a, g, batch)
            t_factor = timer(lambda: (_ema_(Af, kronecker_factors(a, g, batch)[0]), _ema_(Gf, kronecker_factors(a, g, batch)[1])))

            def invert():
                la, lg = factored_damping(Af, Gf, 1e-3)
                return damped_inverse(Af, la), damped_inverse(Gf, lg)

            t_inv = timer(invert)
            Ai, Gi = (x.to(dt) for x in invert())
            t_kapply = timer(lambda: kfac_apply(G, Ai, Gi))

            cfg.tick(f"precond {dname} w={w}: EKFAC")
            t_eigh = timer(lambda: (eigenbasis(Af), eigenbasis(Gf)))
            (lA, QA), (lG, QG) = eigenbasis(Af), eigenbasis(Gf)
            scale = torch.outer(lG, lA)
            t_scale = timer(lambda: _ema_(scale, projected_second_moment(a, g, batch, QA, QG)))
            QAc, QGc = QA.to(dt), QG.to(dt)
            t_eapply = timer(lambda: ekfac_apply(G, QAc, QGc, scale, 1e-3))

            m = lambda t: t["median_ms"]
            apo = m(t_fwd) + m(t_meta) / K
            kron_ms = m(t_kron_apply) + (m(t_kron_meta) + m(t_kron_apply)) / K
            kfac = m(t_factor) + m(t_kapply) + m(t_inv) / T
            ekfac = m(t_factor) + m(t_scale) + m(t_eapply) + m(t_eigh) / T
            parts = dict(
                apo_forward_ms=m(t_fwd), apo_meta_ms=m(t_meta),
                factor_update_ms=m(t_factor), kfac_inverse_ms=m(t_inv), kfac_apply_ms=m(t_kapply),
                ekfac_eigh_ms=m(t_eigh), ekfac_scale_ms=m(t_scale), ekfac_apply_ms=m(t_eapply),
                kron_apply_ms=m(t_kron_apply), kron_meta_ms=m(t_kron_meta),
            )
            common = dict(extra, **parts)
            rows.append(make_row("precond", case, "APO", dname, w, dict(median_ms=apo), ratio_vs_kfac=apo / kfac, ratio_vs_ekfac=apo / ekfac, **common))
            rows.append(make_row("precond", case, "APO-kron", dname, w, dict(median_ms=kron_ms), ratio_vs_kfac=kron_ms / kfac, ratio_vs_ekfac=kron_ms / ekfac, **common))
            rows.append(make_row("precond", case, "KFAC", dname, w, dict(median_ms=kfac), ratio_vs_kfac=1.0, ratio_vs_ekfac=kfac / ekfac, **common))
            rows.append(make_row("precond", case, "EKFAC", dname, w, dict(median_ms=ekfac), ratio_vs_kfac=ekfac / kfac, ratio_vs_ekfac=1.0, **common))
    for r in rows:  # the section's baseline is KFAC (the cheapest classical method)
        r["baseline"], r["ratio"] = "KFAC", r["ratio_vs_kfac"]
    return rows
