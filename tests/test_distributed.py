"""Data-parallel APO on torch.distributed: two gloo processes on CPU, spawned from the test.

Every rank trains the same tiny MLP under DistributedDataParallel on its half of each batch; one
process on the whole batch (same seed, same batches) is the reference. Process start-up dominates
on a small CPU, so one module fixture runs every healthy scenario in a single spawn of two ranks;
the failure scenarios (a rank raises, is killed, stalls) each spawn their own. Every wait has a
deadline: a hang fails the test instead of blocking it.
"""
from __future__ import annotations

import datetime
import math
import multiprocessing
import os
import re
import signal
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from apo_kernels import distributed as apo_dist
from apo_kernels.baselines import EKFAC, KFAC
from apo_kernels.optim import APOLR, APOPrecond

from _tiny import mlp, one_thread  # noqa: F401  (one_thread: autouse fixture)
from conftest import load_python_script

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)

WORLD = 2
BATCH = 16            # the whole batch; each rank trains on BATCH // WORLD of it
STEPS = 30
META_INTERVAL = 4     # meta-steps at 0, 4, 8, ...
NONFINITE_STEP = 13   # the last rank's loss is NaN there (its gradients finite): every rank must skip
KINDS = ("lr", "precond", "kfac", "ekfac")
SAVE_AT, RESUME_STEPS = 8, 8  # checkpoint after 8 steps, then 8 more (meta-steps at 8 and 12)
# fp32, 30 steps of a 3-layer MLP: half-batch means averaged by DDP vs one full-batch mean differ
# by rounding only. EKFAC's θ gets its own bound: its eigenbasis of nearly degenerate fp32 factors
# amplifies rounding (measured: reversing the batch order in ONE process moves its θ by 3e-5)
RTOL, ATOL = 1e-4, 1e-6
THETA_ATOL = {"lr": ATOL, "precond": ATOL, "kfac": ATOL, "ekfac": 1e-4}


# --------------------------------------------------------------------------------------------
# Training, shared by the ranks and the single-process reference
# --------------------------------------------------------------------------------------------
def _batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(BATCH, 4, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _optimizer(kind: str, net: nn.Module, sharded: bool = False, meta_batch: str = "same"):
    # large steps on purpose: the first meta-steps overshoot, so the overshoot recovery (a decision
    # on the loss values, which must be every rank's) is exercised
    if kind == "lr":
        return APOLR(net, torch.optim.SGD(net.parameters(), lr=2.0, momentum=0.9),
                     lambda_fsd=0.3, lambda_wsd=0.1, meta_lr=0.2, meta_interval=META_INTERVAL, meta_batch=meta_batch)
    if kind == "precond":
        return APOPrecond(net, lr=1.0, lambda_fsd=0.3, lambda_wsd=0.1, meta_lr=0.05,
                          meta_interval=META_INTERVAL, shard_preconditioners=sharded, meta_batch=meta_batch)
    return {"kfac": KFAC, "ekfac": EKFAC}[kind](net, lr=0.05, damping=1e-2, inverse_interval=3)


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _train(kind, start, stop, *, rank=0, world=1, sharded=False, bucket_view=False,
           nonfinite_step=None, resume=None, save=None):
    """Steps start..stop-1; ``resume``: a checkpoint file to load first; ``save``: (step, file) to
    write a checkpoint before that step (rank 0 writes; the state_dict call is on every rank)."""
    model = mlp()
    net = model if world == 1 else nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
    opt = _optimizer(kind, net, sharded)
    if resume is not None:
        ckpt = torch.load(resume, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    losses = []
    for s in range(start, stop):
        if save is not None and s == save[0]:
            state = {"model": model.state_dict(), "opt": opt.state_dict()}
            if rank == 0:
                torch.save(state, save[1])
        x, y = _batch(s, rank, world)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            if s == nonfinite_step and rank == world - 1:
                return loss.detach() * math.nan  # this rank's loss only: the gradients stay finite
            return loss

        loss = opt.step(closure, fsd_inputs=(x,)) if kind in ("lr", "precond") else opt.step(closure)
        losses.append(_mean_over_ranks(float(loss.detach()), world))
    state = opt.state_dict()  # a collective in sharded mode
    return {
        "losses": torch.tensor(losses, dtype=torch.float64),
        "theta": [p.detach().clone() for p in model.parameters()],
        # APO-Precond's φ from state_dict (gathered in sharded mode), APO-LR's log lr, KFAC: none
        "phi": [t.clone() for t in state["phi"]] if "phi" in state else [t.clone() for t in getattr(opt, "phi", [])],
        "skipped": opt.skipped_steps,
        "meta_steps": getattr(opt, "meta_steps", None),
        "recoveries": getattr(opt, "recoveries", None),
        "replicas": apo_dist.check_replicas(opt),
        "memory": apo_dist.phi_memory(opt) if hasattr(opt, "meta_optimizer") else None,
    }


# --------------------------------------------------------------------------------------------
# Scenarios run by every rank
# --------------------------------------------------------------------------------------------
def _healthy(rank, world, out_dir):
    out = {}
    for kind in KINDS:
        out[kind] = _train(kind, 0, STEPS, rank=rank, world=world, nonfinite_step=NONFINITE_STEP)
    for kind in ("lr", "precond"):
        out[f"{kind}/bucket_view"] = _train(kind, 0, STEPS, rank=rank, world=world, bucket_view=True,
                                            nonfinite_step=NONFINITE_STEP)
    out["precond/sharded"] = _train("precond", 0, STEPS, rank=rank, world=world, sharded=True,
                                    nonfinite_step=NONFINITE_STEP)
    for mode in ("replicated", "sharded"):
        ckpt = out_dir / f"ckpt_{mode}.pt"
        out[f"ckpt/{mode}"] = _train("precond", 0, SAVE_AT + RESUME_STEPS, rank=rank, world=world,
                                     sharded=mode == "sharded", save=(SAVE_AT, ckpt))
        dist.barrier()
        for resumed_as in ("replicated", "sharded"):
            out[f"ckpt/{mode}/resumed_{resumed_as}"] = _train(
                "precond", SAVE_AT, SAVE_AT + RESUME_STEPS, rank=rank, world=world,
                sharded=resumed_as == "sharded", resume=ckpt)
    for kind in KINDS:
        out[f"branch/{kind}"] = _branch_on_one_rank(rank, world, kind)
    for kind in ("lr", "precond"):
        out[f"nan_fsd/{kind}"] = _nan_batch_on_one_rank(rank, world, kind)
        out[f"nan_fresh/{kind}"] = _nan_batch_on_one_rank(rank, world, kind, fresh=True)
    out["fsdp"] = _fsdp_refusals(world)
    return out


def _nan_batch_on_one_rank(rank, world, kind, steps=2 * META_INTERVAL + 1, fresh=False):
    """FSD on a batch of its own; at the second meta-step the last rank's FSD batch holds a NaN (with
    ``fresh``: its fresh meta-batch, which the meta-closure reads). Every rank must skip that meta-step
    together (no rank left waiting in a collective), keep φ and take the step."""
    model = mlp()
    net = nn.parallel.DistributedDataParallel(model)
    opt = _optimizer(kind, net, meta_batch="fresh" if fresh else "same")
    phi_before = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in range(steps):
            x, y = _batch(s, rank, world)
            fsd = x.flip(0) + 0.5
            if s == META_INTERVAL:
                phi_before, recoveries_before = [p.detach().clone() for p in opt.phi], opt.recoveries
                if rank == world - 1:
                    fsd[0, 0] = math.nan

            def closure(x=x):
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss

            if fresh:  # the FSD batch clean, the fresh meta-batch as the FSD batch would have been
                opt.step(closure, fsd_inputs=(x.flip(0) + 0.5,), meta_closure=lambda: closure(fsd))
            else:
                opt.step(closure, fsd_inputs=(fsd,))
            if s == META_INTERVAL:
                phi_after, recoveries_there = [p.detach().clone() for p in opt.phi], opt.recoveries - recoveries_before
    return {"replicas": apo_dist.check_replicas(opt), "skipped": opt.skipped_steps, "meta_steps": opt.meta_steps,
            "recoveries_there": recoveries_there, "phi_kept": all(torch.equal(a, b) for a, b in zip(phi_before, phi_after)),
            "warned": sum(("meta_closure: its loss is not finite at θ itself" if fresh else
                           "fsd_inputs: the FSD term is not finite even at θ' = θ") in str(w.message) for w in caught)}


class _Branchy(nn.Module):
    """A body and a head, and a second head that a batch runs through only when asked."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.branch = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x, use_branch=False):
        h = torch.tanh(self.body(x))
        return self.head(h) + self.branch(h) if use_branch else self.head(h)


def _branch_on_one_rank(rank, world, kind, steps=6):
    """DDP(find_unused_parameters=True) where only rank 0's batch takes the branch, at even steps:
    the branch has gradients on every rank (DDP's all-reduce) but layer inputs on rank 0 only."""
    model = _Branchy()
    net = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = _optimizer(kind, net)
    x0, _ = _batch(0, 0, world)  # rank 0's first batch: the branch's only rows at step 0
    with torch.no_grad():
        rows = torch.tanh(model.body(x0))
        rows = torch.cat([rows, torch.ones(len(rows), 1)], dim=1)
        branch_A_rank0 = rows.T @ rows / len(rows)
    branch_A = None
    for s in range(steps):
        x, y = _batch(s, rank, world)
        use_branch = rank == 0 and s % 2 == 0

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(x, use_branch), y)
            loss.backward()
            return loss

        opt.step(closure, fsd_inputs=(x,)) if kind in ("lr", "precond") else opt.step(closure)
        if s == 0 and kind in ("kfac", "ekfac"):
            branch_A = opt.state[model.branch.weight]["A"].clone()
    return {"theta": [p.detach().clone() for p in model.parameters()], "replicas": apo_dist.check_replicas(opt),
            "skipped": opt.skipped_steps, "branch_A": branch_A, "branch_A_rank0": branch_A_rank0}


def _fsdp_refusals(world):
    """The error each optimizer raises for a model under FSDP2 (fully_shard), or, if fully_shard
    cannot be built here, for a model holding a DTensor parameter."""
    from torch.distributed.device_mesh import init_device_mesh

    model = mlp()
    try:
        from torch.distributed.fsdp import fully_shard
        fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
        how = "fully_shard"
    except Exception as e:  # noqa: BLE001 - fall back to the detection itself
        from torch.distributed.tensor import Shard, distribute_tensor
        model = mlp()
        mesh = init_device_mesh("cpu", (world,))
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
        how = f"DTensor parameter (fully_shard failed: {type(e).__name__})"
    errors = {}
    for kind in KINDS:
        try:
            _optimizer(kind, model)
            errors[kind] = None
        except Exception as e:  # noqa: BLE001 - the test checks the type and message
            errors[kind] = (type(e).__name__, str(e))
    return {"how": how, "errors": errors}


def _failing(rank, world, out_dir, mode):
    """Rank ``world - 1`` fails at step 3 of APOPrecond, after its backward (DDP's all-reduce of that
    step is done): the others are next waiting in an agreement of the optimizer."""
    model = mlp()
    net = nn.parallel.DistributedDataParallel(model)
    opt = _optimizer("precond", net)
    for s in range(8):
        x, y = _batch(s, rank, world)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            if s == 3 and rank == world - 1:
                if mode == "raise":
                    raise ValueError("injected failure")
                if mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(600)  # "stall": alive, never arrives
            return loss

        opt.step(closure, fsd_inputs=(x,))
    return {"steps": 8}


SCENARIOS = {"healthy": _healthy, "failing": _failing}


# --------------------------------------------------------------------------------------------
# Process harness
# --------------------------------------------------------------------------------------------
def _worker(rank, world, init_file, out_dir, scenario, kwargs, pg_timeout):
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    start = time.monotonic()
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        result = {"ok": SCENARIOS[scenario](rank, world, out_dir, **kwargs)}
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    result["elapsed"] = time.monotonic() - start
    torch.save(result, out_dir / f"rank{rank}.tmp")
    os.replace(out_dir / f"rank{rank}.tmp", out_dir / f"rank{rank}.pt")  # the parent polls for it
    if dist.is_initialized() and "ok" in result:
        dist.destroy_process_group()


def _spawn(tmp_path, scenario, *, pg_timeout, deadline, wait_for=None, **kwargs):
    """Run ``scenario`` on WORLD spawned ranks; their results by rank. Waits at most ``deadline`` s
    for the results of the ranks in ``wait_for`` (default all), then kills whatever still runs (a
    process whose peer died can take long to exit after reporting)."""
    ctx = multiprocessing.get_context("spawn")
    init_file = tmp_path / f"init_{scenario}"
    procs = [ctx.Process(target=_worker, args=(r, WORLD, str(init_file), str(tmp_path), scenario, kwargs, pg_timeout),
                         daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline
    wanted = list(range(WORLD) if wait_for is None else wait_for)
    while time.monotonic() < end and not all(
            (tmp_path / f"rank{r}.pt").exists() or not procs[r].is_alive() for r in wanted):
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    results = {}
    for r in range(WORLD):
        f = tmp_path / f"rank{r}.pt"
        results[r] = torch.load(f, weights_only=False) if f.exists() else None
    return results


def _ok(result):
    assert result is not None, "the rank wrote no result (it hung or died)"
    assert "ok" in result, result.get("traceback", result)
    return result["ok"]


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    results = _spawn(tmp, "healthy", pg_timeout=120, deadline=600)
    return [_ok(results[r]) for r in range(WORLD)], tmp


def _reference(kind, **kwargs):
    return _train(kind, 0, STEPS, nonfinite_step=NONFINITE_STEP, **kwargs)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_on_half_batches_match_one_process_on_the_whole_batch(healthy, kind):
    ranks, _ = healthy
    ref = _reference(kind)
    for out in ranks:
        got = out[kind]
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=RTOL, atol=ATOL, equal_nan=True)
        for a, b in zip(got["theta"], ref["theta"]):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=THETA_ATOL[kind])
        assert got["skipped"] == ref["skipped"] >= 1  # the NaN on one rank skipped the step on all
        assert got["meta_steps"] == ref["meta_steps"]
        assert got["recoveries"] == ref["recoveries"]
    if kind in ("lr", "precond"):
        assert ref["recoveries"] >= 1, "the scenario must exercise a recovery decision"
        assert ref["meta_steps"] >= 5


@pytest.mark.parametrize("kind", KINDS)
def test_phi_and_theta_bit_identical_on_every_rank(healthy, kind):
    ranks, _ = healthy
    for out in ranks:
        assert out[kind]["replicas"] == {"phi": True, "theta": True}
    a, b = ranks[0][kind], ranks[1][kind]
    assert torch.equal(a["losses"].nan_to_num(), b["losses"].nan_to_num())
    for x, y in zip(a["theta"], b["theta"]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kind", KINDS)
def test_a_layer_that_only_some_ranks_batches_reach_trains_the_same_on_every_rank(healthy, kind):
    # KFAC/EKFAC used to enter their factor all-reduce for that layer on rank 0 only: a collective
    # mismatch that aborted the process (gloo); now a rank without rows adds zeros, and the layer's
    # factor is the mean over the ranks that had rows: here rank 0's batch factor
    ranks, _ = healthy
    for out in ranks:
        got = out[f"branch/{kind}"]
        assert got["replicas"] == {"phi": True, "theta": True} and got["skipped"] == 0
        if kind in ("kfac", "ekfac"):
            torch.testing.assert_close(got["branch_A"], ranks[0][f"branch/{kind}"]["branch_A_rank0"],
                                       rtol=1e-6, atol=1e-7)
    for x, y in zip(ranks[0][f"branch/{kind}"]["theta"], ranks[1][f"branch/{kind}"]["theta"]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("batch", ["nan_fsd", "nan_fresh"], ids=["FSD batch", "fresh meta-batch"])
@pytest.mark.parametrize("kind", ["lr", "precond"])
def test_a_nan_in_one_ranks_fsd_or_fresh_meta_batch_skips_that_meta_step_on_every_rank(healthy, kind, batch):
    ranks, _ = healthy
    for out in ranks:
        got = out[f"{batch}/{kind}"]
        assert got["replicas"] == {"phi": True, "theta": True}
        assert got["skipped"] == 0 and got["recoveries_there"] == 0 and got["phi_kept"] and got["warned"] == 1
        assert got["meta_steps"] == 2  # of the three at 0, META_INTERVAL and 2·META_INTERVAL


@pytest.mark.parametrize("kind", ["lr", "precond"])
def test_gradient_as_bucket_view_gives_the_same_result(healthy, kind):
    ranks, _ = healthy
    for out in ranks:
        a, b = out[kind], out[f"{kind}/bucket_view"]
        assert torch.equal(a["losses"].nan_to_num(), b["losses"].nan_to_num())
        for x, y in zip(a["theta"] + a["phi"], b["theta"] + b["phi"]):
            assert torch.equal(x, y)


def test_sharded_matches_replicated_and_splits_phi_memory(healthy):
    ranks, _ = healthy
    for out in ranks:
        rep, sh = out["precond"], out["precond/sharded"]
        torch.testing.assert_close(sh["losses"], rep["losses"], rtol=1e-6, atol=1e-7, equal_nan=True)
        for x, y in zip(sh["theta"] + sh["phi"], rep["theta"] + rep["phi"]):  # φ gathered by state_dict
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        assert sh["replicas"] == {"phi": None, "theta": True}
        assert sh["meta_steps"] == rep["meta_steps"] and sh["skipped"] == rep["skipped"]
    full = ranks[0]["precond"]["memory"]
    shares = [out["precond/sharded"]["memory"] for out in ranks]
    assert sum(m["phi"] for m in shares) == full["phi"]
    assert sum(m["meta_state"] for m in shares) == full["meta_state"]
    assert all(0 < m["phi"] < full["phi"] for m in shares)


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_checkpoint_on_two_ranks_resumes_on_two_ranks_in_either_mode(healthy, mode):
    ranks, _ = healthy
    for out in ranks:
        cont = out[f"ckpt/{mode}"]
        same = out[f"ckpt/{mode}/resumed_{mode}"]
        assert torch.equal(same["losses"], cont["losses"][SAVE_AT:])
        for x, y in zip(same["theta"] + same["phi"], cont["theta"] + cont["phi"]):
            assert torch.equal(x, y)
        other = out[f"ckpt/{mode}/resumed_{'sharded' if mode == 'replicated' else 'replicated'}"]
        torch.testing.assert_close(other["losses"], cont["losses"][SAVE_AT:], rtol=1e-6, atol=1e-7)
        for x, y in zip(other["theta"] + other["phi"], cont["theta"] + cont["phi"]):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["replicated", "sharded"])
@pytest.mark.parametrize("sharded_here", [False, True], ids=["replicated", "sharding_requested"])
def test_checkpoint_on_two_ranks_resumes_on_one_process(healthy, mode, sharded_here):
    ranks, tmp = healthy
    cont = ranks[0][f"ckpt/{mode}"]
    # one process, the whole batch (shard_preconditioners has no effect in one process)
    got = _train("precond", SAVE_AT, SAVE_AT + RESUME_STEPS, sharded=sharded_here, resume=tmp / f"ckpt_{mode}.pt")
    torch.testing.assert_close(got["losses"], cont["losses"][SAVE_AT:], rtol=RTOL, atol=ATOL)
    for x, y in zip(got["theta"] + got["phi"], cont["theta"] + cont["phi"]):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)
    assert got["meta_steps"] == cont["meta_steps"]


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp_is_refused_at_construction(healthy, kind):
    ranks, _ = healthy
    for out in ranks:
        err = out["fsdp"]["errors"][kind]
        assert err is not None, f"{kind} accepted an FSDP model ({out['fsdp']['how']})"
        name, msg = err
        assert name == "TypeError" and "FSDP" in msg and "DistributedDataParallel" in msg
        assert "shard_preconditioners=True" in msg


@pytest.mark.parametrize("mode", ["raise", "kill", "stall"])
def test_a_failing_rank_makes_the_others_fail_clearly_within_the_timeout(tmp_path, mode):
    pg_timeout = 5
    results = _spawn(tmp_path, "failing", pg_timeout=pg_timeout, deadline=180, wait_for=[0], mode=mode)
    survivor = results[0]
    assert survivor is not None, "rank 0 did not finish within the deadline: a hang"
    assert "error" in survivor, "rank 0 finished its steps although its peer failed"
    assert "apo_kernels.distributed" in survivor["error"] and "could not agree" in survivor["error"]
    # start-up (spawn, import, rendezvous) is included; the failure itself takes ≤ the group's timeout
    assert survivor["elapsed"] < 120
    if mode == "raise":
        assert "injected failure" in results[1]["error"]


def test_single_process_is_a_no_op():
    model = mlp()
    opt = _optimizer("precond", model, sharded=True)
    assert opt._shards is None and apo_dist.replicas_of(model).world == 1
    assert apo_dist.check_replicas(opt) == {"phi": True, "theta": True}


def test_shard_preconditioners_is_checked():
    with pytest.raises(TypeError, match="shard_preconditioners"):
        APOPrecond(mlp(), lr=0.1, lambda_fsd=0.0, lambda_wsd=0.0, meta_lr=0.1, shard_preconditioners="yes")
    for cls in (KFAC, EKFAC):
        with pytest.raises(ValueError, match="shard_preconditioners.*APOPrecond"):
            cls(mlp(), lr=0.1, damping=1e-2, shard_preconditioners=True)


def test_owners_balance_cost_greedily():
    assert apo_dist._assign([10, 1, 7, 3, 3], 2) == [0, 1, 1, 1, 0]
    assert apo_dist._assign([5, 5, 5, 5], 4) == [0, 1, 2, 3]


def test_train_ddp_example_runs_in_one_process(capsys):
    train_ddp = load_python_script("train_ddp")
    assert train_ddp.main(["--steps", "3", "--meta-interval", "2", "--check"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"rank 0: φ [0-9.]+ (MiB|B), meta-optimizer state [0-9.]+ (MiB|B)", out)
    assert "{'phi': True, 'theta': True}" in out
    with pytest.raises(SystemExit):
        train_ddp.parse_args(["--sharded", "--optimizer", "kfac"])
