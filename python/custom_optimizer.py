"""Write your own APO optimizer from the lower layer (apo_kernels.optim.preconditioners and
apo_kernels.optim.objective) and the op.

This is a complete, minimal APO-Precond for one model, written on three public pieces:

  * ``StructuredPreconditioner``  — φ = (A, S, B) for one (m, n) weight; Y = A·(S²⊙(AᵀGB))·Bᵀ
  * ``precondition_many`` / ``meta_backward_many`` — all layers through ONE grouped op call
    (``apo_kernels.precondition_grouped`` / ``precondition_grouped_backward``)
  * ``proximal_objective_grad`` — writes θ' = θ + Δ into the model, calls the closure on the
    SAME batch, adds FSD and WSD, restores θ / buffers / .grad / RNG exactly, returns ∇θ'Q

Algorithm 1 of APO, every ``K`` steps:
    Δ(φ) = −Y(φ)                                   lookahead (lr is folded into S)
    ∇θ'Q = ∇J_B(θ') + λ_FSD ∇D_F + λ_WSD Δ          one extra forward/backward at θ'
    ∇φQ  = (∂Y/∂φ)ᵀ(−∇θ'Q)                         the op's backward, grad_out = −∇θ'Q
    φ ← Adam(φ, ∇φQ);  θ ← θ − Y(φ)

Run:  python python/custom_optimizer.py
"""
import argparse
import math

import torch
from torch import nn
import torch.nn.functional as F

import apo_kernels
from apo_kernels.optim.objective import proximal_objective_grad
from apo_kernels.optim.preconditioners import StructuredPreconditioner, meta_backward_many, precondition_many


class TinyAPO:
    """APO-Precond for the nn.Linear weights of a model (biases skipped to keep it short)."""

    def __init__(self, model, lr=0.1, meta_lr=0.1, K=5, lambda_fsd=0.1, lambda_wsd=0.0):
        self.model, self.K, self.t = model, K, 0
        self.lambda_fsd, self.lambda_wsd = lambda_fsd, lambda_wsd
        self.weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
        # S² starts at lr: the first step is exactly SGD with this lr
        self.pcs = [StructuredPreconditioner(*w.shape, init_s=math.sqrt(lr)) for w in self.weights]
        # Adam moves each entry by ≈ lr: give each d×d factor lr/d so its operator norm moves by
        # ≈ meta_lr per step whatever the width (what APOPrecond does); S keeps meta_lr
        groups = [{"params": [f], "lr": meta_lr / f.shape[0]} for pc in self.pcs for f in pc.A + pc.B]
        groups.append({"params": [pc.S for pc in self.pcs], "lr": meta_lr})
        self.meta_opt = torch.optim.Adam(groups, betas=(0.5, 0.9))

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self, closure, fsd_inputs):
        with torch.enable_grad():
            loss = closure()                                   # g = ∇J_B(θ) in .grad
        grads = [w.grad.clone() for w in self.weights]         # (m, n) each
        if self.t % self.K == 0:
            deltas = [-y for y in precondition_many(self.pcs, grads)]
            obj = proximal_objective_grad(                      # θ' written in place, then restored
                self.model, self.weights, deltas, closure, fsd_inputs=fsd_inputs,
                lambda_fsd=self.lambda_fsd, lambda_wsd=self.lambda_wsd, fsd="kl")
            self.meta_opt.zero_grad()
            meta_backward_many(self.pcs, [-g for g in obj.grads], grads)   # fills A/S/B .grad
            self.meta_opt.step()
        for w, y in zip(self.weights, precondition_many(self.pcs, grads)):
            w.sub_(y)                                           # θ ← θ − Y(φ), new φ
        self.t += 1
        return loss


def main():
    # no options: --help says what the script shows, and an unknown flag is refused
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    torch.manual_seed(0)
    x = torch.randn(256, 10) * torch.logspace(0, -1.5, 10)     # badly scaled features
    y = (x @ torch.randn(10, 4)).argmax(1)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = TinyAPO(model)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    print("op backends:", {k: v.split(":")[0] for k, v in apo_kernels.backends().items()})
    for t in range(201):
        loss = opt.step(closure, fsd_inputs=(x,))
        if t % 50 == 0:
            s2 = [float(pc.S2().mean()) for pc in opt.pcs]
            print(f"step {t:3d}  loss {loss.item():.4f}  mean S² per layer {[f'{v:.3f}' for v in s2]}")


if __name__ == "__main__":
    main()
