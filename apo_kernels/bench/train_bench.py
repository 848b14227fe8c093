"""Section 3 -- end-to-end training step time: one loop drives every optimizer (torch.optim's too).

    def closure(): opt.zero_grad(); loss = ce(model(x), y); loss.backward(); return loss
    opt.step(closure)                       # APO: opt.step(closure, fsd_inputs=(x_fsd,))

Step time = one block of 10 steps (one full K = T = 10 cycle, so the amortized meta-step /
inversion is inside every block), divided by 10. The optimizers of one problem are timed
round-robin (``Timer.interleaved``): a warm-up block of each, then ≥ 3 rounds of one block of each
in turn, so load from other processes hits them alike; a row is the median [p20–p80] of its blocks
and its ratio the ratio of medians. Each timed block comes right after one untimed step of the same
optimizer: a block then starts with the caches as a training loop of that optimizer leaves them.
Without it a block started from what the previous row's block left, and after a heavy optimizer (an
EKFAC, Shampoo or PSGD-Kron block takes 7–17× SGD's on the small MLP) its first steps ran cold:
SGD's block, timed first in each round after the round before's last rows (the peers and the op
alone), ran 5–7 % slower than with the warm step (paired in one process), which raised every ratio
to SGD toward 1. The final loss of the run is kept too (no tuning: a timing table, not a
leaderboard). Optimizers whose package is missing, or which raise, give a row with the reason
instead of a time.

The small problem (MLP 40-256-256-10, batch 100, the size of the paper's MNIST-1D experiments) runs
on 2 threads unless ``--threads`` says otherwise. There the optimizer's own per-step cost, not its
arithmetic, decides the ratio to SGD; its extra row times APO-Precond's plain step alone, with a
``meta_interval`` longer than the run (its one meta-step, at step 0, falls in the warm-up block).
Two more rows there measure what that step cannot go below: the preconditioning op alone on the
optimizer's own layer matrices (one grouped call per step, interleaved with the optimizers), and the
floor, SGD's step plus that op (the sum of the two medians, p20s and p80s): a plain step does SGD's
forward, backward and update and the op's four GEMMs per layer.

Every problem also times APO-LR's bound (``MetaPassesOnly``): SGD plus only the forward and backward
passes a meta-step must make. Its throughput against SGD is the most APO-LR can reach on that row.
"""
from __future__ import annotations

import contextlib
import importlib

import torch
import torch.nn.functional as F
from torch import nn

from ..optim.discrepancy import kl, value_and_grad
from ..optim.objective import JointFSD, rows_independent
from .common import Config, add_ratios, divide_times, make_row, num_threads

INTERVAL = 10
NO_META = "APO-Precond, plain steps (meta_interval > run)"
NO_META_KRON = "APO-Precond kron, plain steps (meta_interval > run)"
OP_ALONE = "the plain step's op alone (APO-Precond's layer matrices)"
FLOOR = "floor of a plain step: SGD + the op alone"
BOUND = "APO-LR's bound: SGD + a meta-step's passes only"
OWN_BATCH = "APO-LR(SGD), FSD on the step's batch"
BOUND_OWN = "APO-LR's bound, FSD on the step's batch"
SMALL_THREADS = 2  # the small problem's threads unless --threads is given


def mlp(width: int, d_in: int = 256, classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d_in, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )


def small_mlp(d_in: int = 40, width: int = 256, classes: int = 10) -> nn.Module:
    """An MNIST-1D-sized MLP, 40-256-256-10: the size the paper experiments train, where the
    optimizer's own per-step cost (not its arithmetic) decides the ratio to SGD."""
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def small_cnn(channels: int = 32, classes: int = 10) -> nn.Module:
    """3 conv blocks on 32×32 inputs down to 4×4, then Linear(2c·16 → 128) → Linear(128 → classes)."""
    c = channels
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * c * 16, 128), nn.ReLU(), nn.Linear(128, classes),
    )


class MetaPassesOnly:
    """SGD plus, every INTERVAL steps, only the forward and backward passes an APO-LR meta-step must
    make: the closure once more (the loss at the lookahead) and, with the FSD term on another batch,
    a forward at θ without a graph and a forward + backward at θ' on that batch (on a model that maps
    rows each on its own, inside the closure's, on its batch with those rows appended). With ``own_batch``
    (the FSD batch is the step's) f(x; θ) is the closure's own output and the FSD term rides on the
    closure at θ' (its gradient at the output added to the closure's backward), as APO-LR does. No
    lookahead, restore or meta-gradient: the throughput APO-LR would have with no overhead of its
    own, its bound. Drives ``base``'s step; ``step`` and ``zero_grad`` as an optimizer's."""

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, lambda_fsd: float, own_batch: bool = False):
        self.model, self.base, self.lambda_fsd, self.steps = model, base, lambda_fsd, 0
        self.own_batch = own_batch

    def zero_grad(self):
        self.base.zero_grad()

    def _ride(self, old):
        def hook(module, inputs, out):
            g = value_and_grad(kl, out, old)[1]
            out.register_hook(lambda grad: grad + self.lambda_fsd * g)
        return self.model.register_forward_hook(hook)

    def step(self, closure, fsd_inputs=None):
        meta = self.steps % INTERVAL == 0
        fsd = meta and self.lambda_fsd != 0.0
        outputs = []
        hook = (self.model.register_forward_hook(lambda m, i, out: outputs.append(out.detach()))
                if fsd and self.own_batch else None)
        loss = closure()
        if hook is not None:
            hook.remove()
        if meta:
            params = list(self.model.parameters())
            grads = [p.grad for p in params]
            for p in params:
                p.grad = None
            ride = self._ride(outputs[0]) if fsd and self.own_batch else None
            joint = None
            if fsd and not self.own_batch:
                with torch.no_grad():
                    old = self.model(*fsd_inputs)  # f(x̃; θ)
                # on a model that maps rows each on its own the FSD passes at θ' ride on the closure's
                # (its batch with the FSD rows appended), as APO-LR's do
                if rows_independent(self.model):
                    joint = JointFSD(self.model, fsd_inputs, old, kl, self.lambda_fsd)
            with joint or contextlib.nullcontext():
                closure()  # the loss at the lookahead (and the FSD term, on the own batch or joint)
            if ride is not None:
                ride.remove()
            if fsd and not self.own_batch and joint is None:
                new = self.model(*fsd_inputs)  # f(x̃; θ') and its backward
                torch.autograd.grad(new, params, value_and_grad(kl, new, old)[1])
            for p, g in zip(params, grads):
                p.grad = g
        self.base.step()
        self.steps += 1
        return loss


def base_sgd(model: nn.Module) -> torch.optim.SGD:
    """The SGD row's optimizer, which is also APO-LR's base optimizer and its bound's: one configuration,
    torch's default (its per-tensor step on CPU)."""
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)


def closure_for(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """The training closure every row steps with: zero the grads, cross-entropy on (x, y), backward."""
    def closure():
        opt.zero_grad()
        out = F.cross_entropy(model(x), y)
        out.backward()
        return out

    return closure


def _optimizers(include_peers: bool = True, run_steps: int = 10**6):
    """name -> factory(model) returning (optimizer, FSD batch): the FSD batch is None (the optimizer
    takes no ``fsd_inputs``), "other" (a batch of its own, as in the paper) or "own" (the step's
    batch, ``fsd_inputs=(x,)``); ``run_steps`` bounds the steps one optimizer takes (the plain-step
    row's meta_interval is longer)."""
    from ..baselines import EKFAC, KFAC

    facs = {
        "SGD": lambda m: (base_sgd(m), None),
        "Adam": lambda m: (torch.optim.Adam(m.parameters(), lr=1e-3), None),
        "KFAC": lambda m: (KFAC(m, lr=0.01, damping=0.1, inverse_interval=INTERVAL), None),
        "EKFAC": lambda m: (EKFAC(m, lr=0.01, damping=0.1, inverse_interval=INTERVAL), None),
    }

    def apo_lr(m, lambda_fsd=0.1):
        from ..optim import APOLR

        return APOLR(m, base_sgd(m), lambda_fsd=lambda_fsd, lambda_wsd=0.0, meta_interval=INTERVAL), "other"

    def apo_precond(m, meta_interval=INTERVAL, structure="full"):
        from ..optim import APOPrecond

        return APOPrecond(m, lr=0.01, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, meta_interval=meta_interval,
                          structure=structure), "other"

    facs["APO-LR(SGD)"] = apo_lr
    # what APO-LR(SGD) would cost with no overhead of its own: the row's bound on its throughput
    facs[BOUND] = lambda m: (MetaPassesOnly(m, base_sgd(m), 0.1), "other")
    # the FSD term on the step's own batch (the paper's App. D): it rides on the closure's passes
    facs[OWN_BATCH] = lambda m: (apo_lr(m)[0], "own")
    facs[BOUND_OWN] = lambda m: (MetaPassesOnly(m, base_sgd(m), 0.1, own_batch=True), "own")
    # without the FSD term a meta-step is one extra forward/backward instead of ~2.3 (see report)
    facs["APO-LR(SGD) λ_FSD=0"] = lambda m: apo_lr(m, lambda_fsd=0.0)
    facs["APO-Precond"] = apo_precond
    # the plain step alone (timed on the small MLP only): APO-Precond's per-step overhead
    facs[NO_META] = lambda m: apo_precond(m, meta_interval=run_steps + 1)
    # the same for the Kronecker-factored structure: L·G·R, 2 GEMMs per layer instead of 4
    facs[NO_META_KRON] = lambda m: apo_precond(m, meta_interval=run_steps + 1, structure="kron")
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
            facs[f"{name} (pytorch_optimizer)"] = lambda m, cls=cls, kw=kw: (cls(m.parameters(), **kw), None)
    return facs


def _training_step(model, opt, fsd, batches, fsd_batch):
    """One training step of ``opt`` and the state it updates: steps run, last loss. A block is
    INTERVAL of them (any INTERVAL consecutive steps hold exactly one meta-step / inversion / eigh,
    whatever the phase), and one more, untimed, warms the block up."""
    state = dict(steps=0, loss=None)

    def step():
        x, y = batches[state["steps"] % len(batches)]
        state["steps"] += 1
        closure = closure_for(opt, model, x, y)
        if fsd is None:
            state["loss"] = opt.step(closure)
        else:
            state["loss"] = opt.step(closure, fsd_inputs=(x if fsd == "own" else fsd_batch,))

    return step, state


def problems(cfg: Config) -> list[tuple]:
    """(case label, problem key, model factory, input shape, threads) of every training problem."""
    out = []
    mlp_batch = 4096 if cfg.is_cuda else (64 if cfg.quick else 256)
    for w in cfg.train_widths:
        out.append((f"MLP w={w} batch={mlp_batch}", "mlp", lambda w=w: mlp(w), (mlp_batch, 256), cfg.threads))
    small_threads = cfg.threads or SMALL_THREADS
    threads_label = f"{small_threads} thread" + ("s" if small_threads > 1 else "")
    out.append((f"MLP 40-256-256-10 batch=100, {threads_label}", "small-mlp", small_mlp, (100, 40), small_threads))
    cnn_c, cnn_batch = (8, 32) if cfg.quick else (32, 128 if not cfg.is_cuda else 512)
    out.append((f"CNN c={cnn_c} 32×32 batch={cnn_batch}", "cnn", lambda: small_cnn(cnn_c), (cnn_batch, 3, 32, 32), cfg.threads))
    return out


def _runs_on(name: str, problem: str) -> bool:
    return name not in (NO_META, NO_META_KRON) or problem == "small-mlp"


def n_ticks(cfg: Config) -> int:
    """The section's progress ticks: one per round of every problem."""
    return len(problems(cfg)) * (cfg.timer.settings.warmup + cfg.timer.settings.rounds)


def _op_alone_call(model: nn.Module):
    """One call of the grouped op that APO-Precond's plain step makes on ``model`` (its layers' tiles
    and factors, random matrices G), on the optimizer's backend."""
    from ..optim import APOPrecond
    from ..optim.preconditioners import precondition_many

    opt = APOPrecond(model, lr=0.01, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01)
    preconds = [layer.precond for layer in opt.layers]
    gen = torch.Generator().manual_seed(3)
    Gs = [torch.randn(layer.shape, generator=gen).to(opt.phi_dtype).to(opt.layers[0].weight.device)
          for layer in opt.layers]

    def call():
        precondition_many(preconds, Gs, backend=opt.backend, checked=True)

    return call


def _block(unit):
    """INTERVAL calls of ``unit`` (a training step, or the op alone): one timed block."""
    def block():
        for _ in range(INTERVAL):
            unit()

    return block


def _floor_row(sgd: dict, op: dict, make) -> dict:
    """SGD's step plus the op alone: the quantiles summed (an estimate, not a timed row)."""
    keys = ("median_ms", "p20_ms", "p80_ms", "min_ms")
    return make(FLOOR, {k: sgd[k] + op[k] for k in keys}, reps=min(sgd["reps"], op["reps"]),
                estimate="sum of the SGD row and the op-alone row")


def run(cfg: Config) -> list[dict]:
    dev = cfg.device
    gen = torch.Generator().manual_seed(2)
    settings = cfg.timer.settings
    run_steps = (INTERVAL + 1) * (settings.warmup + settings.rounds)  # each block and its warm step
    rows: list[dict] = []
    facs = _optimizers(include_peers=not cfg.quick, run_steps=run_steps)  # peers only in the full run
    for label, problem, make_model, xshape, threads in problems(cfg):
        n_batches = 4
        batches = [
            (torch.randn(*xshape, generator=gen).to(dev), torch.randint(0, 10, (xshape[0],), generator=gen).to(dev))
            for _ in range(n_batches)
        ]
        fsd_batch = torch.randn(*xshape, generator=gen).to(dev)
        row = lambda name, timing, **kw: make_row("train", label, name, "fp32", None, timing, problem=problem,
                                                   batch=xshape[0], **kw)
        with num_threads(threads if dev.type == "cpu" else None) as n_threads:
            cfg.probe(f"before {label}")
            units, states, done = {}, {}, {}  # name -> one step (or op call), its block's unit and warm-up
            for name, fac in facs.items():
                if not _runs_on(name, problem):
                    continue
                torch.manual_seed(0)
                try:
                    model = make_model().to(dev)
                    opt, fsd = fac(model)
                except Exception as exc:
                    done[name] = row(name, {}, error=f"{type(exc).__name__}: {exc}"[:300])
                    continue
                units[name], states[name] = _training_step(model, opt, fsd, batches, fsd_batch)
            if problem == "small-mlp":
                torch.manual_seed(0)
                units[OP_ALONE] = _op_alone_call(make_model().to(dev))
            blocks = {name: _block(unit) for name, unit in units.items()}
            tick = lambda desc: cfg.tick(f"train {label}: {len(blocks)} optimizers interleaved, {desc}")
            for name, per_block in cfg.timer.interleaved(blocks, on_round=tick, before=units).items():
                if "error" in per_block:
                    done[name] = row(name, {}, error=per_block["error"])
                    continue
                per_step = divide_times(per_block, INTERVAL)
                if name == OP_ALONE:
                    done[name] = row(name, per_step, threads=n_threads)
                    continue
                loss = states[name]["loss"]
                done[name] = row(name, per_step, final_loss=float(loss.detach()) if loss is not None else float("nan"),
                                 steps=states[name]["steps"], threads=n_threads)
            if OP_ALONE in done and "median_ms" in done[OP_ALONE] and "median_ms" in done.get("SGD", {}):
                done[FLOOR] = _floor_row(done["SGD"], done[OP_ALONE], lambda *a, **kw: row(*a, threads=n_threads, **kw))
        rows += [done[name] for name in [*facs, OP_ALONE, FLOOR] if name in done]
    add_ratios(rows, "SGD")
    return rows
