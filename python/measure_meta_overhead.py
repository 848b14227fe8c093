"""What a meta-step costs: APO-LR's throughput next to its base optimizer, and the bound on it.

    python python/measure_meta_overhead.py [--rows mlp1024,mlp2048,cnn,...] [--fsd-batch other,own] [--repeats 7] [--threads N] [--clock cpu]
    python python/measure_meta_overhead.py --meta-cost [--repeats 10]
    python python/measure_meta_overhead.py --plain-step-parts [--rows small] [--repeats 60] [--threads 1 --clock cpu]
    python python/measure_meta_overhead.py --meta-step-parts [--rows small] [--fsd-batch own,other] [--repeats 200] [--threads 2]
    python python/measure_meta_overhead.py --free-pieces [--rows small] [--repeats 60] [--threads 2]
    python python/measure_meta_overhead.py --direct-calls [--rows small] [--repeats 200] [--threads 2]
    python python/measure_meta_overhead.py --joint-fsd [--rows small,mlp1024] [--repeats 40]

Throughput (default): apo-bench's ``train`` rows (the same models, batches and data as
``apo_kernels.bench.train_bench`` on CPU; ``small``, ``mlp256``, ``cnn8``: the small MLP row and
the ``--quick`` run's MLP and CNN rows). Every variant trains its own copy of the model in blocks
of K = 10 steps (one meta-step per block); the blocks of all variants run in turn, in a shuffled
order each repeat, so a change in machine load hits them alike and no variant always follows the
same one (right after SGD's block, APO-LR's meta-step ran 0.15 ms slower on the small MLP than after
another APO-LR's: a fixed order cost the row that followed SGD 0.04 of throughput), each timed
block right after an untimed block of its own, so it starts from the caches its own steps leave, as
in a training loop (apo-bench's blocks follow an untimed step for the same reason). A block's time
is estimated as the median time of its first step (the meta-step) plus 9 × the median time of its
other steps, over all repeats (a burst of load on a few steps does not move it); reported per
variant: SGD's block time / the variant's (the bench's ratio, inverted: throughput). ``--clock cpu`` times the process's CPU time instead of wall time: on a machine
shared with other jobs, with ``--threads 1``, it does not count the time the process waits for a
core. Variants:

- ``SGD``: torch.optim.SGD(lr=0.01, momentum=0.9), the base optimizer (the bench's);
- ``APO-LR λ_FSD=…``: APOLR over that SGD, K = 10, λ_WSD = 0, FSD on a second batch (as the bench);
- ``passes only λ_FSD=…``: the same SGD plus, on every 10th step, only the passes a meta-step must
  make: the closure once more (forward + backward on the step's batch), and with the FSD term a
  forward at θ without a graph and a forward + backward at θ' on the FSD batch (on the MLP rows,
  whose models map rows each on its own, inside the closure's at θ', on its batch with the FSD
  rows appended, as APO-LR's). No lookahead, no
  restore, no meta-gradient: the throughput APO-LR would have with zero overhead, its bound;
- ``… own batch`` (``--fsd-batch own``): the FSD term on the step's own batch, ``fsd_inputs=(x,)``
  with the closure's tensor ``x``. APO-LR then takes f(x; θ) from the closure's forward at θ and
  carries the FSD term on the closure's forward and backward at θ' (a meta-step makes the passes
  it makes without the term); its bound does the same.

``--meta-cost``: the wall time of a plain step and of a meta-step (4-layer MLP of width 1024,
batch 128) for APOPrecond and APOLR(SGD+momentum), with torch SGD for reference.

``--plain-step-parts``: what APO-LR's plain step (no meta-step) costs beyond SGD's: as it runs (the
gradient check and SGD's step in one native call, ``apo::sgd_step``), then with the check and the
step apart (the check, then the base optimizer's step with the lr swap around it), and from that
one piece removed at a time: the finiteness check of the loss and gradients at θ, the lr swap, both.
A diagnosis, not a configuration: the pieces are switched off on the instance, and a step without
the check would let a non-finite gradient into the momentum. Every
variant trains its own copy in 10-step blocks, the blocks in a shuffled order each round.

``--meta-step-parts``: APO-LR(SGD+momentum)'s meta-step (λ_FSD = 0.1 on each ``--fsd-batch``, K = 10)
timed in pieces, each the median over meta-steps of its time within one: the closures at θ and θ'
(with the FSD term's value and gradient, which run inside the closure at θ' on the step's batch, and
on another batch inside it where the rows join, else after it), each piece of APO's own work (the
gradient check, the lookahead direction, writing and restoring θ', the meta-gradient with the Adam
step on φ, the base optimizer's step) and what none of them covers; then
the plain step in the same way (its closure, its gradient check and base step, the rest). A diagnosis: the pieces are timed by wrapping them.

``--free-pieces``: APO-LR's throughput (λ_FSD = 0.1 on the step's batch) next to the same optimizer
with pieces of its own work made free, and the bound, interleaved as above: with Δ, the
meta-gradient and φ's Adam step free (the first meta-step's Δ reused, a zero meta-gradient, no step
on φ), then also without the meta-steps' gradient check at θ. A timing oracle, not a configuration (its values
are wrong): what a faster version of those pieces, native code included, could buy at the most.

``--direct-calls``: APO-LR (λ_FSD = 0.1 on the step's batch) with its three shortcuts on and off in
one process, interleaved as above: the plain step's gradient check and base step in one native call
(``apo::sgd_step``), the base optimizer's step by a direct call of the function torch's step calls,
and SGD's lookahead formed in the pass that writes θ' (``apo::sgd_lookahead``); then with the check
and the step apart, then also with the base step through torch's step, then also with Δ formed
before θ' is written.

``--joint-fsd``: APO-LR and its bound (λ_FSD = 0.1 on another batch) with the FSD term's forward and
backward at θ' carried by the closure's, on its batch with the FSD rows appended (a model that maps
rows each on its own: the MLP rows), and apart, interleaved in one process.
"""
import argparse
import random
import statistics
import time
import types

import torch

from apo_kernels import _step_hooks
from apo_kernels._args import cli_int
from apo_kernels._step_hooks import step_quietly
from apo_kernels.bench import train_bench
from apo_kernels.bench.timing import thread_handoff_ns
from apo_kernels.bench.train_bench import INTERVAL, MetaPassesOnly, base_sgd, closure_for, mlp, small_cnn, small_mlp
from apo_kernels.optim import APOLR, APOPrecond, _core, discrepancy, objective, snapshot
from apo_kernels.optim import lr as apo_lr
from apo_kernels.ops import backends

# apo-bench's CPU training rows: (name, model factory, input shape)
ROWS = {
    "mlp1024": ("MLP w=1024 batch=256", lambda: mlp(1024), (256, 256)),
    "mlp2048": ("MLP w=2048 batch=256", lambda: mlp(2048), (256, 256)),
    "cnn": ("CNN c=32 32×32 batch=128", lambda: small_cnn(32), (128, 3, 32, 32)),
    "small": ("MLP 40-256-256-10 batch=100", small_mlp, (100, 40)),
    "mlp256": ("MLP w=256 batch=64 (--quick)", lambda: mlp(256), (64, 256)),
    "cnn8": ("CNN c=8 32×32 batch=32 (--quick)", lambda: small_cnn(8), (32, 3, 32, 32)),
}


def variants(fsd_batches):
    """name -> (optimizer factory, whether its FSD batch is the step's own)."""
    def apo_lr(lam):
        return lambda m: APOLR(m, base_sgd(m), lambda_fsd=lam, lambda_wsd=0.0, meta_interval=INTERVAL)

    out = {"SGD": (base_sgd, False)}
    if "other" in fsd_batches:
        out["APO-LR λ_FSD=0.1"] = (apo_lr(0.1), False)
        out["passes only λ_FSD=0.1"] = (lambda m: MetaPassesOnly(m, base_sgd(m), 0.1), False)
    if "own" in fsd_batches:
        out["APO-LR λ_FSD=0.1 own batch"] = (apo_lr(0.1), True)
        out["passes only λ_FSD=0.1 own batch"] = (lambda m: MetaPassesOnly(m, base_sgd(m), 0.1, own_batch=True), True)
    out["APO-LR λ_FSD=0"] = (apo_lr(0.0), False)
    out["passes only λ_FSD=0"] = (lambda m: MetaPassesOnly(m, base_sgd(m), 0.0), False)
    return out


def throughput(row: str, repeats: int, clock, fsd_batches=("other",), chosen=None) -> dict:
    """Throughput vs SGD of each variant (``chosen``: name -> (factory, own batch[, switch]), else
    ``variants``; ``switch()`` runs before each of the variant's blocks)."""
    label, make_model, shape = ROWS[row]
    gen = torch.Generator().manual_seed(2)  # the bench's data
    batches = [(torch.randn(*shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)) for _ in range(4)]
    fsd_batch = torch.randn(*shape, generator=gen)
    runs = {}
    for name, (make_opt, own_batch, *switch) in (chosen or variants(fsd_batches)).items():
        torch.manual_seed(0)
        model = make_model()
        opt = make_opt(model)
        state = {"step": 0}

        def block(model=model, opt=opt, state=state, own_batch=own_batch, switch=switch):
            """INTERVAL steps (the first one a meta-step); the time of each."""
            for set_up in switch:  # the variant's switches, before each of its blocks
                set_up()
            times = []
            for _ in range(INTERVAL):
                x, y = batches[state["step"] % len(batches)]
                state["step"] += 1

                closure = closure_for(opt, model, x, y)
                t0 = clock()
                if isinstance(opt, torch.optim.SGD):
                    opt.step(closure)
                else:
                    opt.step(closure, fsd_inputs=(x if own_batch else fsd_batch,))
                times.append(clock() - t0)
            return times

        block()  # warm-up
        runs[name] = block
    first, rest = {name: [] for name in runs}, {name: [] for name in runs}
    order = random.Random(0)
    for _ in range(repeats):
        # a shuffled order each round: a block's first step (the meta-step) runs measurably slower
        # right after SGD's block than after another APO-LR's (the allocator's and caches' state)
        for name in order.sample(list(runs), len(runs)):
            runs[name]()  # untimed: the timed block starts warm (a whole block keeps the meta-step first)
            times = runs[name]()
            first[name].append(times[0])
            rest[name] += times[1:]
    # a block's time from the median meta-step and the median plain step: robust to a burst of
    # load that would land on a few steps of one block
    block_s = {name: statistics.median(first[name]) + (INTERVAL - 1) * statistics.median(rest[name]) for name in runs}
    return {name: dict(ms_per_step=t / INTERVAL * 1e3, throughput=block_s["SGD"] / t,
                       meta_ms=statistics.median(first[name]) * 1e3, plain_ms=statistics.median(rest[name]) * 1e3)
            for name, t in block_s.items()}


def print_throughput(rows, repeats, clock_name, fsd_batches):
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    for row in rows:
        res = throughput(row, repeats, clock, fsd_batches)
        print(f"\n{ROWS[row][0]}: {repeats} interleaved 10-step blocks, {clock_name} time; a block = median "
              "first (meta-)step + 9 × median other step")
        print(f"  {'':32s} {'1st step':>10s} {'other':>10s} {'per step':>10s}  throughput vs SGD")
        for name, r in res.items():
            print(f"  {name:32s} {r['meta_ms']:7.3f} ms {r['plain_ms']:7.3f} ms {r['ms_per_step']:7.3f} ms  {r['throughput']:.3f}")
        for suffix in (" own batch", ""):
            apo, bound = f"APO-LR λ_FSD=0.1{suffix}", f"passes only λ_FSD=0.1{suffix}"
            if apo in res:
                a, b = res[apo]["throughput"], res[bound]["throughput"]
                print(f"  λ_FSD=0.1{suffix or ' other batch'}: measured {a:.3f}, bound {b:.3f}, gap {b - a:.3f}")


class _FreePieces(APOLR):
    """APO-LR with pieces of its own work made free, to time what removing them could buy (a timing
    oracle: its values are wrong). ``free`` names the pieces: "meta" reuses the first meta-step's Δ,
    sets a zero meta-gradient and skips φ's Adam step; "check" skips the gradient check at θ of the
    meta-steps (a plain step's check is in the pass of its base step, ``apo::sgd_step``)."""

    def __init__(self, *args, free=(), **kwargs):
        super().__init__(*args, **kwargs)
        self._free, self._kept_deltas = set(free), None
        if "meta" in self._free:
            self.meta_optimizer.step = lambda *a, **k: None  # step_quietly calls an instance's own step
        self._zero_grad_phi = torch.zeros_like(self.log_lr)

    def _lookahead_deltas(self, plan):
        if "meta" not in self._free:
            return super()._lookahead_deltas(plan)
        if self._kept_deltas is None:  # formed once (on its own, not in the pass that writes θ')
            dirs = apo_lr.lr_directions(self.base_optimizer, plan.params_by_group, self._lookahead_scales(plan))
            self._kept_deltas = [d for ds in dirs for d in ds]
        return self._kept_deltas

    def _meta_backward_and_step(self, plan, dQ):
        if "meta" not in self._free:
            return super()._meta_backward_and_step(plan, dQ)
        return None  # (the free meta-gradient below, and no step)

    def _meta_backward(self, plan, dQ):
        if "meta" not in self._free:
            return super()._meta_backward(plan, dQ)
        self.log_lr.grad = self._zero_grad_phi
        return True

    def _local_grads_finite(self, loss, plan):
        return "check" in self._free or super()._local_grads_finite(loss, plan)


def free_pieces(row: str, repeats: int, clock_name: str):
    """APO-LR's throughput (λ_FSD = 0.1 on the step's batch, K = 10) next to the same with pieces of
    its own work made free: the most a faster version of those pieces could buy."""
    def apo(free):
        return lambda m: _FreePieces(m, base_sgd(m), lambda_fsd=0.1, lambda_wsd=0.0, meta_interval=INTERVAL,
                                     free=free)
    chosen = {
        "SGD": (base_sgd, False),
        "APO-LR": (apo(()), True),
        "  Δ, meta-gradient, φ's step free": (apo(("meta",)), True),
        "  the same, and no gradient check on meta-steps": (apo(("meta", "check")), True),
        "passes only (the bound)": (lambda m: MetaPassesOnly(m, base_sgd(m), 0.1, own_batch=True), True),
    }
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    res = throughput(row, repeats, clock, chosen=chosen)
    print_variants(row, repeats, clock_name, res, " (values of the free variants are wrong: a timing oracle)")


def print_variants(row: str, repeats: int, clock_name: str, res: dict, note: str = "",
                   batch: str = "the step's batch") -> None:
    """The table of ``throughput``'s variants with the FSD term on ``batch`` (the modes that choose
    their own variants)."""
    print(f"\n{ROWS[row][0]}, λ_FSD=0.1 on {batch}: {repeats} interleaved 10-step blocks, "
          f"{clock_name} time{note}")
    print(f"  {'':40s} {'1st step':>9s} {'other':>9s}  throughput vs SGD")
    for name, r in res.items():
        print(f"  {name:40s} {r['meta_ms']:6.3f} ms {r['plain_ms']:6.3f} ms  {r['throughput']:.3f}")


def direct_calls(row: str, repeats: int, clock_name: str):
    """APO-LR (λ_FSD = 0.1 on the step's batch, K = 10) with this build's three shortcuts on and off in
    one process, each variant's blocks between the others': the gradient check and the base step in
    one native call (``apo::sgd_step``), the base optimizer's step by a direct call of the function
    torch's step calls (``_step_hooks._single_tensor_sgd_step``) and SGD's lookahead formed in the
    pass that writes θ' (``apo::sgd_lookahead``). Off: the check and then the step, torch's step, and
    Δ formed first. One process, so machine states hit the variants alike."""
    native, single, checked = backends.native_sgd_lookahead, _step_hooks._single_tensor_sgd_step, backends.native_sgd_step

    def switches(one_pass: bool, direct_step: bool, one_call: bool = False):
        def apply():
            backends.native_sgd_lookahead = native if one_pass else None
            _step_hooks._single_tensor_sgd_step = single if direct_step else (lambda opt: False)
            backends.native_sgd_step = checked if one_call else None
        return apply

    both = switches(True, True, True)

    def apo(m):
        return APOLR(m, base_sgd(m), lambda_fsd=0.1, lambda_wsd=0.0, meta_interval=INTERVAL)

    chosen = {
        "SGD": (base_sgd, False, both),
        "APO-LR": (apo, True, both),
        "  its check and base step apart": (apo, True, switches(True, True)),
        "  and its base step through torch's step": (apo, True, switches(True, False)),
        "  and Δ formed before θ' is written": (apo, True, switches(False, False)),
        "passes only (the bound)": (lambda m: MetaPassesOnly(m, base_sgd(m), 0.1, own_batch=True), True, both),
    }
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    try:
        res = throughput(row, repeats, clock, chosen=chosen)
    finally:
        both()
    print_variants(row, repeats, clock_name, res)


def plain_step_parts(row: str, repeats: int, clock_name: str):
    label, make_model, shape = ROWS[row]
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(*shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)) for _ in range(4)]

    def base_step_only(self, plan):  # the base optimizer's step as APOLR._apply calls it, without the lr swap
        step_quietly(self.base_optimizer)
        return True

    removed = {"APO-LR plain step": (), "  its check and step apart": ("fused",),
               "    without the gradient check": ("fused", "check"), "    without the lr swap": ("fused", "swap"),
               "    without both": ("fused", "check", "swap")}
    blocks = {}
    for name in ["SGD", *removed]:
        torch.manual_seed(0)
        model = make_model()
        sgd = base_sgd(model)
        # λ_FSD = 0 and a meta-step only at step 0, in the warm-up block
        opt = sgd if name == "SGD" else APOLR(model, sgd, lambda_fsd=0.0, lambda_wsd=0.0, meta_interval=10**9)
        if "fused" in removed.get(name, ()):  # the check, then the base step, as on a meta-step
            opt._checked_plain_update = types.MethodType(lambda self, loss, plan: None, opt)
        if "check" in removed.get(name, ()):
            opt._local_grads_finite = types.MethodType(lambda self, loss, plan: True, opt)
        if "swap" in removed.get(name, ()):
            opt._apply = types.MethodType(base_step_only, opt)

        def block(model=model, opt=opt):
            t0 = clock()
            for x, y in batches * 3:  # 12 steps
                opt.step(closure_for(opt, model, x, y))
            return (clock() - t0) / (3 * len(batches))

        block()  # warm-up
        blocks[name] = block
    times = {name: [] for name in blocks}
    for _ in range(repeats):
        for name in random.sample(list(blocks), len(blocks)):
            times[name].append(blocks[name]())
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"\n{label}: {repeats} rounds of 12-step blocks, shuffled, {clock_name} time; median per step")
    for name, t in med.items():
        print(f"  {name:32s} {t * 1e6:8.1f} µs  ({(t - med['SGD']) * 1e6:+7.1f} µs over SGD)")


class _PartTimers:
    """Time spent per labelled piece of code, summed within one step: each piece is a callable
    swapped for a timing wrapper (``wrap``) and put back by ``restore``."""

    def __init__(self, clock):
        self.clock, self.step, self._undo = clock, {}, []

    def timed(self, fn, label: str):
        """``fn`` with its time added to ``label``'s in the current step."""
        def run(*args, **kwargs):
            t0 = self.clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.step[label] = self.step.get(label, 0.0) + self.clock() - t0

        return run

    def wrap(self, owner, attr: str, label: str):
        inner = getattr(owner, attr)
        setattr(owner, attr, self.timed(inner, label))
        self._undo.append((owner, attr, inner))

    def restore(self):
        for owner, attr, inner in reversed(self._undo):
            setattr(owner, attr, inner)
        self._undo.clear()


# APO-LR's meta-step in pieces: (owner, attribute, label); "inside" pieces run within a closure
META_STEP_PARTS = (
    (_core.APOCore, "_grads_finite", "gradient check at θ"),
    (APOLR, "_lookahead_deltas", "lookahead direction Δ (SGD: its plan)"),
    (snapshot.ModelSnapshot, "__init__", "snapshot of θ"),
    (snapshot.ModelSnapshot, "write", "θ' = θ + Δ and ‖Δ‖² (SGD: and Δ)"),
    (snapshot.ModelSnapshot, "restore", "θ restored"),
    (_core.APOCore, "_meta_step", "meta-gradient ⟨∇θ'Q, Δ⟩ and Adam step on φ"),
    (APOLR, "_after_meta_step", "clamp and record φ"),
    (APOLR, "_apply", "base step"),
)
# the plain step's gradient check and base step, one native call where it applies
PLAIN_STEP_PARTS = ((APOLR, "_checked_plain_update", "checked base step"),)
INSIDE_CLOSURE = ((discrepancy, "value_and_grad", "of which the FSD value and gradient"),)


def joint_fsd(row: str, repeats: int, clock_name: str):
    """APO-LR (λ_FSD = 0.1 on another batch, K = 10) and its bound with the FSD term's passes at θ'
    carried by the closure's (its batch with the FSD rows appended, ``objective.JointFSD``) and apart
    (``rows_independent`` switched to False before each of their blocks), interleaved in one process."""
    joined, bound_joined = objective.rows_independent, train_bench.rows_independent

    def switch(on: bool):
        def apply():
            objective.rows_independent = joined if on else (lambda model: False)
            train_bench.rows_independent = bound_joined if on else (lambda model: False)
        return apply

    def apo(m):
        return APOLR(m, base_sgd(m), lambda_fsd=0.1, lambda_wsd=0.0, meta_interval=INTERVAL)

    chosen = {
        "SGD": (base_sgd, False, switch(True)),
        "APO-LR, joint": (apo, False, switch(True)),
        "APO-LR, apart": (apo, False, switch(False)),
        "passes only (the bound), joint": (lambda m: MetaPassesOnly(m, base_sgd(m), 0.1), False, switch(True)),
        "passes only (the bound), apart": (lambda m: MetaPassesOnly(m, base_sgd(m), 0.1), False, switch(False)),
    }
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    try:
        res = throughput(row, repeats, clock, chosen=chosen)
    finally:
        switch(True)()
    print_variants(row, repeats, clock_name, res, batch="another batch")


def meta_step_parts(row: str, repeats: int, clock_name: str, own_batch: bool = True):
    """APO-LR(SGD+momentum)'s meta-step on ``row``, λ_FSD = 0.1 on the step's batch (``own_batch``) or
    another, K = 10, timed in pieces: the closures, each piece of APO's own work (the median over
    meta-steps of its time in one meta-step) and what none of them covers. A diagnosis: the pieces are
    timed by wrapping them."""
    label, make_model, shape = ROWS[row]
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(*shape, generator=gen), torch.randint(0, 10, (shape[0],), generator=gen)
    fsd_x = x if own_batch else torch.randn(*shape, generator=gen)
    torch.manual_seed(0)
    model = make_model()
    opt = APOLR(model, base_sgd(model), lambda_fsd=0.1, lambda_wsd=0.0, meta_interval=INTERVAL)
    timers = _PartTimers(clock)
    closure = timers.timed(closure_for(opt, model, x, y), "closures")

    def step():
        timers.step = {}
        t0 = clock()
        opt.step(closure, fsd_inputs=(fsd_x,))
        return clock() - t0, timers.step

    for owner, attr, part in META_STEP_PARTS + INSIDE_CLOSURE + PLAIN_STEP_PARTS:
        timers.wrap(owner, attr, part)
    meta, plain = [], []
    try:
        for k in range(INTERVAL * (repeats + 2)):
            t, parts = step()
            if k >= 2 * INTERVAL:  # two blocks of warm-up
                (meta if k % INTERVAL == 0 else plain).append((t, parts))
    finally:
        timers.restore()
    if opt.meta_steps != repeats + 2:
        raise RuntimeError(f"expected {repeats + 2} meta-steps, got {opt.meta_steps} (skipped {opt.skipped_steps})")

    def med(steps, key):
        return statistics.median(parts.get(key, 0.0) for _, parts in steps)

    total = statistics.median(t for t, _ in meta)
    batch = "the step's batch" if own_batch else "another batch"
    print(f"\n{label}, APO-LR(SGD+momentum), λ_FSD=0.1 on {batch}, K={INTERVAL}: "
          f"{len(meta)} meta-steps, {clock_name} time; medians")
    print(f"  {'meta-step':44s} {total * 1e6:8.1f} µs")
    closures, closures_label = med(meta, "closures"), "closures at θ and θ'"
    inside = {part: med(meta, part) for _, _, part in INSIDE_CLOSURE}
    print(f"    {closures_label:42s} {closures * 1e6:8.1f} µs")
    for part, t in inside.items():
        print(f"      {part:40s} {t * 1e6:8.1f} µs")  # inside the closure at θ', counted there
    own = {part: med(meta, part) for _, _, part in META_STEP_PARTS}
    for part, t in own.items():
        print(f"    {part:42s} {t * 1e6:8.1f} µs")
    print(f"    {'the rest':42s} {(total - closures - sum(own.values())) * 1e6:8.1f} µs")
    plain_total = statistics.median(t for t, _ in plain)
    print(f"  {'plain step':44s} {plain_total * 1e6:8.1f} µs")
    plain_parts = {"its closure": med(plain, "closures"),
                   "its gradient check and base step": med(plain, "checked base step") + med(plain, "gradient check at θ")
                   + med(plain, "base step")}
    for part, t in plain_parts.items():
        print(f"    {part:42s} {t * 1e6:8.1f} µs")
    print(f"    {'the rest of it':42s} {(plain_total - sum(plain_parts.values())) * 1e6:8.1f} µs")


def meta_cost(repeats: int, batch: int, backend: str):
    torch.manual_seed(0)
    x = torch.randn(batch, 1024)
    y = torch.randint(0, 10, (batch,))

    def make():
        torch.manual_seed(0)
        return mlp(1024, d_in=1024)

    def time_steps(opt, net, meta: bool):
        closure = closure_for(opt, net, x, y)
        times = []
        for _ in range(repeats + 2):
            if hasattr(opt, "meta_due"):
                opt.meta_interval = 1 if meta else 0  # a meta-step exactly when asked for
            t0 = time.perf_counter()
            opt.step(closure, fsd_inputs=(x,)) if hasattr(opt, "meta_due") else opt.step(closure)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[2:])  # first two: warm-up

    print(f"MLP 4x1024, batch {batch}, backend {backend}")
    net = make()
    print(f"torch SGD+momentum step          {time_steps(base_sgd(net), net, False) * 1e3:8.1f} ms")
    for name, fac in (
        ("APOPrecond", lambda n: APOPrecond(n, lr=0.01, lambda_fsd=0.1, lambda_wsd=0.0, meta_lr=0.01, backend=backend)),
        ("APOLR", lambda n: APOLR(n, base_sgd(n), lambda_fsd=0.1, lambda_wsd=0.0)),
    ):
        net = make()
        opt = fac(net)
        plain = time_steps(opt, net, False)
        meta = time_steps(opt, net, True)
        print(f"{name + ' step (no meta-update)':32s} {plain * 1e3:8.1f} ms")
        print(f"{name + ' meta-step':32s} {meta * 1e3:8.1f} ms   (x{meta / plain:.2f}; amortized over K=10: "
              f"+{(meta - plain) / 10 / plain * 100:.0f}% per step)  [meta-steps {opt.meta_steps}, skipped {opt.skipped_steps}]")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="mlp1024,mlp2048,cnn", help=f"comma-separated, of {sorted(ROWS)}")
    ap.add_argument("--fsd-batch", default="other", help="comma-separated: other (a second batch, as the bench), "
                    "own (the step's batch)")
    ap.add_argument("--repeats", type=cli_int(1), default=7)
    ap.add_argument("--threads", type=cli_int(1), default=torch.get_num_threads())
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time, or the process's CPU time")
    ap.add_argument("--meta-cost", action="store_true", help="plain step vs meta-step times instead")
    ap.add_argument("--batch", type=cli_int(1), default=128, help="--meta-cost: batch size")
    ap.add_argument("--backend", default="auto", help="--meta-cost: APOPrecond's backend")
    ap.add_argument("--plain-step-parts", action="store_true",
                    help="APO-LR's plain step beyond SGD's: one native call, then the check and step apart with pieces "
                         "removed (diagnosis)")
    ap.add_argument("--free-pieces", action="store_true",
                    help="APO-LR's throughput with Δ, the meta-gradient, φ's step (and the check) made free (oracle)")
    ap.add_argument("--direct-calls", action="store_true",
                    help="APO-LR with its checked native step, direct base step and one-pass SGD lookahead on and "
                         "off, in one process")
    ap.add_argument("--joint-fsd", action="store_true",
                    help="APO-LR and its bound with the FSD term on another batch joined to the closure at θ' and "
                         "apart, in one process")
    ap.add_argument("--meta-step-parts", action="store_true",
                    help="APO-LR's meta-step timed in pieces: the closures and each piece of its own work (diagnosis)")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; choose from {sorted(ROWS)}")
    fsd_batches = [b for b in args.fsd_batch.split(",") if b]
    if not fsd_batches or set(fsd_batches) - {"other", "own"}:
        ap.error("--fsd-batch: a comma-separated list of other, own")
    torch.set_num_threads(args.threads)
    # the threads' cache-line round trip moves with where the host runs the vCPUs, and the timings with it
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, their round trip {thread_handoff_ns()} ns")
    if args.meta_cost:
        meta_cost(args.repeats, args.batch, args.backend)
    elif args.plain_step_parts:
        for row in rows:
            plain_step_parts(row, args.repeats, args.clock)
    elif args.free_pieces:
        for row in rows:
            free_pieces(row, args.repeats, args.clock)
    elif args.direct_calls:
        for row in rows:
            direct_calls(row, args.repeats, args.clock)
    elif args.joint_fsd:
        for row in rows:
            joint_fsd(row, args.repeats, args.clock)
    elif args.meta_step_parts:
        for row in rows:
            for batch in fsd_batches:
                meta_step_parts(row, args.repeats, args.clock, own_batch=batch == "own")
    else:
        print_throughput(rows, args.repeats, args.clock, fsd_batches)
    print(f"the threads' round trip at the end: {thread_handoff_ns()} ns")


if __name__ == "__main__":
    main()
