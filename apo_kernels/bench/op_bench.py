"""Section 1 -- the op: forward and backward per backend vs the hand-written torch chain, and the
grouped op vs a per-layer loop over real layer sets.

Baselines (what a user writes by hand):
- forward:  ``A @ (S * (A.T @ G @ B)) @ B.T`` (4 matmuls + mul);
- backward: ``torch.autograd.grad`` of that chain for (dA, dS, dB) given dY -- the meta-gradient's
  outputs -- vs ``apo_kernels.precondition_backward(..., output_mask=(False, True, True, True))``;
- grouped:  a Python loop of the chain over the layers vs one ``precondition_grouped`` call, the
  two (and a loop of the op) timed in interleaved blocks, so their ratio survives a machine whose
  speed drifts during the run; on a CPU the grouped forward also on one thread, and its floor (that
  time over the thread count: a perfect split of the op's one-thread work).
"""
from __future__ import annotations

import time

import torch

from .common import Config, add_ratios, divide_times, make_row, num_threads
from .shapes import layer_set

MASK = (False, True, True, True)

# The grouped forward on the CPU also runs on one thread (the same interleaved rounds), and its floor
# row is that time over the run's thread count: the op at its one-thread rate with a perfect split.
# Where the floor misses the grouped target, scheduling cannot reach it on that machine; only a
# faster one-thread op can.
ONE_THREAD = "grouped: {backend}, one thread"
GROUPED_FLOOR = "floor: grouped {backend} on one thread ÷ threads"


def _on_one_thread(fn):
    def run():
        with num_threads(1):
            return fn()
    return run


def chain(G, A, S, B):
    return A @ (S * (A.T @ G @ B)) @ B.T


def _inputs(m: int, n: int, dtype, device, gen: torch.Generator):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cpu") * scale).to(device=device, dtype=dtype)

    G = r(m, n)
    A = r(m, m, scale=m**-0.5)
    B = r(n, n, scale=n**-0.5)
    S = (torch.rand(m, n, generator=gen) + 0.5).to(device=device, dtype=dtype)
    dY = r(m, n)
    return G, A, S, B, dY


def _chain_backward(G, A, S, B, dY):
    A_, S_, B_ = (t.detach().requires_grad_(True) for t in (A, S, B))
    with torch.enable_grad():
        Y = chain(G, A_, S_, B_)
        return torch.autograd.grad(Y, (A_, S_, B_), dY)


def _grouped_dtypes(cfg: Config) -> list[str]:
    """The grouped comparison's dtypes: fp32, and on a GPU the first half-precision one asked for."""
    return [d for d in ["fp32"] + [d for d in cfg.dtypes if d != "fp32" and cfg.is_cuda][:1] if d in cfg.dtypes]


GROUPED_ROUNDS_PER_SETTING = 3  # the grouped comparison's rounds: this many times the settings' rounds


def n_grouped_ticks(cfg: Config) -> int:
    """The grouped comparison's progress ticks: one per round, forward and backward, of every set."""
    per = cfg.timer.settings.warmup + GROUPED_ROUNDS_PER_SETTING * cfg.timer.settings.rounds
    return len(cfg.layer_sets) * len(_grouped_dtypes(cfg)) * 2 * per


def _interleaved(cfg: Config, fns: dict, tick) -> dict[str, dict]:
    """Each callable timed in blocks of calls, round-robin with the others (``Timer.interleaved``),
    so that a change in the machine's speed during the run hits the loop and the grouped call alike
    and their ratio stays meaningful; a block lasts ≈ 20 ms of the slowest callable, and 3 times the
    settings' rounds (GROUPED_ROUNDS_PER_SETTING) are timed, each block right after one untimed call.
    Returns per-call timings (or ``dict(error=...)``)."""
    slowest = 0.0
    for fn in fns.values():
        try:
            fn()  # first use: kernels, allocator pools
            t0 = time.perf_counter()
            fn()
            cfg.timer.sync()
            slowest = max(slowest, time.perf_counter() - t0)
        except Exception:  # reported by the timed rounds
            pass
    calls = max(1, round(0.02 / slowest)) if slowest > 0 else 1

    def block(fn):
        def run_block():
            for _ in range(calls):
                fn()
        return run_block

    rounds = GROUPED_ROUNDS_PER_SETTING * cfg.timer.settings.rounds
    # each block right after one untimed call of its own: it starts warm, not from the other's caches
    out = cfg.timer.interleaved({name: block(fn) for name, fn in fns.items()}, rounds=rounds, on_round=tick,
                                before=fns)
    return {name: t if "error" in t else divide_times(t, calls) | {"calls": calls}
            for name, t in out.items()}


def run(cfg: Config) -> dict:
    import apo_kernels

    timer, dev = cfg.timer, cfg.device
    gen = torch.Generator().manual_seed(0)
    single: list[dict] = []
    for dname in cfg.dtypes:
        dt = cfg.dtype(dname)
        for size in cfg.sizes:
            if not cfg.size_ok(size, dname):
                continue
            G, A, S, B, dY = _inputs(size, size, dt, dev, gen)
            cfg.tick(f"op {dname} {size}: torch chain")
            with torch.no_grad():
                single.append(make_row("op", "forward", "torch chain", dname, size, timer(lambda: chain(G, A, S, B))))
            single.append(
                make_row("op", "backward", "torch chain", dname, size, timer(lambda: _chain_backward(G, A, S, B, dY)))
            )
            for be in cfg.backends:
                cfg.tick(f"op {dname} {size}: {be}")
                try:
                    fwd = timer(lambda: apo_kernels.precondition(G, A, S, B, backend=be))
                    bwd = timer(
                        lambda: apo_kernels.precondition_backward(dY, G, A, S, B, output_mask=MASK, backend=be)
                    )
                except Exception as exc:  # a backend that fails here is reported, not fatal
                    single.append(make_row("op", "forward", be, dname, size, {}, error=repr(exc)[:300]))
                    continue
                single.append(make_row("op", "forward", be, dname, size, fwd))
                single.append(make_row("op", "backward", be, dname, size, bwd))
    add_ratios(single, "torch chain")

    grouped: list[dict] = []
    for set_name in cfg.layer_sets:
        label, shapes = layer_set(set_name, cfg.scale)
        # the loop of chains opens a parallel region per torch op, the grouped call a few: where the
        # threads' cores are far apart the loop slows far more, and their ratio moves with it
        cfg.probe(f"before grouped {label}")
        for dname in _grouped_dtypes(cfg):
            dt = cfg.dtype(dname)
            layers = [_inputs(m, n, dt, dev, gen) for m, n in shapes]
            Gs, As, Ss, Bs, dYs = (list(x) for x in zip(*layers))
            size = f"{len(shapes)} layers"
            extra = dict(layers=len(shapes), max_dim=max(max(s) for s in shapes), layer_set=set_name)

            def add(direction, impl, timing, **kw):
                grouped.append(make_row("grouped", f"{label} {direction}", impl, dname, size, timing,
                                        direction=direction, **extra, **kw))

            def loop_chain():
                return [chain(g, a, s, b) for g, a, s, b in zip(Gs, As, Ss, Bs)]

            def loop_chain_bwd():
                return [_chain_backward(g, a, s, b, dy) for g, a, s, b, dy in zip(Gs, As, Ss, Bs, dYs)]

            forward = {"loop: torch chain": loop_chain}
            backward = {"loop: torch chain": loop_chain_bwd}
            for be in cfg.backends:
                forward[f"loop: op[{be}]"] = lambda be=be: [apo_kernels.precondition(g, a, s, b, backend=be)
                                                            for g, a, s, b in zip(Gs, As, Ss, Bs)]
                forward[f"grouped: {be}"] = lambda be=be: apo_kernels.precondition_grouped(Gs, As, Ss, Bs, backend=be)
                backward[f"grouped: {be}"] = lambda be=be: apo_kernels.precondition_grouped_backward(
                    dYs, Gs, As, Ss, Bs, output_mask=MASK, backend=be)
                if not cfg.is_cuda:
                    forward[ONE_THREAD.format(backend=be)] = _on_one_thread(forward[f"grouped: {be}"])
            for direction, fns, grad in (("forward", forward, False), ("backward", backward, True)):
                tick = lambda desc: cfg.tick(f"grouped {label} {dname} {direction}: {len(fns)} interleaved, {desc}")
                with torch.set_grad_enabled(grad):
                    timings = _interleaved(cfg, fns, tick)
                    for impl, timing in timings.items():
                        if "error" in timing:
                            add(direction, impl, {}, error=timing["error"])
                        else:
                            add(direction, impl, timing)
                    threads = torch.get_num_threads()
                    for be in cfg.backends:
                        one = timings.get(ONE_THREAD.format(backend=be), {})
                        if "median_ms" in one:
                            add(direction, GROUPED_FLOOR.format(backend=be), divide_times(one, threads), threads=threads)
    add_ratios(grouped, "loop: torch chain")
    return dict(single=single, grouped=grouped)
