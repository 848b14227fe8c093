"""Data-parallel APO on torch.distributed: what the optimizers agree on across ranks, and how.

Replicated mode (the default under DistributedDataParallel). Every rank runs the same optimizer on
its own shard of the batch. DDP averages the gradients of every backward that goes through the
wrapper: the step's closure at θ and, in a meta-step, at the lookahead θ'. From identical gradients
the same deterministic ops give θ, the base optimizer's state and φ (APO-LR's lr; APO-Precond's
A, S, B) identical bit for bit, as long as every decision is taken identically. What does not pass
through DDP is averaged here, with torch's own collectives:

- the non-finite check of the loss and gradients at θ, and that of the meta-gradient: a rank that
  sees a non-finite value makes every rank skip or recover (``all_true``: an all-reduce MAX of a
  "failed" flag);
- the loss at θ and the meta-objective's terms (Q, loss, FSD), used by the overshoot recovery and
  kept in ``last_meta`` (an all-reduce of three or four floats per meta-step);
- the FSD term's gradient: the FSD forwards run on the wrapped module (``local_module``), outside
  DDP, on each rank's own FSD inputs, so that part of ∇θ'Q is local (an all-reduce of θ's size per
  meta-step, only when λ_FSD ≠ 0). KFAC's and EKFAC's batch statistics are averaged likewise.

With equal shards (mean losses) the averages are the full batch's values: two ranks on half-batches
follow one process on the whole batch up to float rounding. ``check_replicas`` verifies that φ and
θ are bit-identical on every rank.

Sharded mode (``APOPrecond(..., shard_preconditioners=True)``). Each layer's φ and meta-optimizer
state live on one owner rank, assigned greedily by cost (the layer's φ entries: m² + n² + mn for an
unblocked layer; largest first, to the least loaded rank). The owner computes its layers'
preconditioned update with the grouped op and their meta-gradient (∇θ'Q is already on every rank);
the updates reach the other ranks by one broadcast per owner. Other ranks keep a placeholder of each
foreign φ tensor on the ``meta`` device (shape only, no memory), so φ's memory per rank is about
1/world_size of the total once constructed (the constructor builds every φ, then releases the
others'). ``state_dict()`` gathers the full, replicated-layout state (a collective: call it on every
rank); it loads in either mode and at any world size.

Failures: every agreement waits at most the process group's timeout. Under gloo a rank that
raises, exits or stalls makes the others raise a RuntimeError naming the agreement they waited for;
under nccl torch's watchdog ends the waiting ranks after the timeout.

Single process (torch.distributed not initialized, or world size 1): every function here returns
at once; the optimizers pay one attribute lookup per decision point.

FSDP (``fully_shard`` / FullyShardedDataParallel) is refused at construction (``refuse_fsdp``).
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Replicas",
    "Shards",
    "replicas_of",
    "local_module",
    "refuse_fsdp",
    "shard_preconditioners",
    "gather_directions",
    "keep_owned",
    "gather_state",
    "owns",
    "check_replicas",
    "traffic",
    "phi_memory",
]


# --------------------------------------------------------------------------------------------
# Which ranks agree, and the collectives
# --------------------------------------------------------------------------------------------
def _is_ddp(model) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def local_module(model: nn.Module) -> nn.Module:
    """The module DDP wraps (forwards outside DDP's gradient reduction), else ``model`` itself."""
    return model.module if _is_ddp(model) else model


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def refuse_fsdp(model: nn.Module) -> None:
    """TypeError for a model sharded by FSDP (fully_shard's DTensor parameters, or the FSDP1 wrapper)."""
    dtensor = _dtensor_type()
    fsdp1 = False
    if dist.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel
        fsdp1 = any(isinstance(m, FullyShardedDataParallel) for m in model.modules())
    if fsdp1 or (dtensor is not None and any(isinstance(p, dtensor) for p in model.parameters())):
        raise TypeError(
            "model is sharded by FSDP (fully_shard / FullyShardedDataParallel): its parameters are "
            "DTensor shards, but the APO step and KFAC need each layer's whole gradient matrix and "
            "the lookahead writes whole parameters, which FSDP does not provide. Use "
            "DistributedDataParallel (φ replicated on every rank), or APOPrecond(..., "
            "shard_preconditioners=True) under DDP to split φ's memory across ranks."
        )


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class _SingleProcess:
    """Nothing to agree with: every method returns its input."""

    world, rank = 1, 0

    def all_true(self, flag: bool, what: str) -> bool:
        return flag

    def mean(self, value: float, what: str) -> float:
        return value

    def average_objective(self, obj, with_grads: bool) -> None:
        return None

    def mean_(self, tensors: Sequence[Tensor], what: str, count: Optional[int] = None) -> None:
        return None

    def count(self, flags: Sequence[bool], what: str) -> list[int]:
        return [int(bool(f)) for f in flags]


class Replicas:
    """The ranks of ``group`` running the same optimizer, and the few collectives it needs.

    Every collective goes through ``_collective``: a failure (another rank raised, exited or did not
    arrive within the process group's timeout) is re-raised as a RuntimeError that says which
    agreement this rank was waiting for. ``traffic`` counts the payload bytes per agreement (what
    is all-reduced or broadcast, not the wire bytes of the algorithm).
    """

    def __init__(self, group, device: torch.device):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.device = device
        self.traffic: dict[str, int] = {}

    def __deepcopy__(self, memo):
        return self  # a copied optimizer agrees with the same ranks (a process group is not copyable)

    def _collective(self, fn, tensor: Tensor, what: str, **kwargs) -> None:
        self.traffic[what] = self.traffic.get(what, 0) + tensor.numel() * tensor.element_size()
        try:
            fn(tensor, group=self.group, **kwargs)
        except RuntimeError as e:
            raise RuntimeError(
                f"apo_kernels.distributed: rank {self.rank} of {self.world} could not agree on {what} "
                f"({fn.__name__} failed): another rank raised, exited or did not arrive within the "
                f"process group's timeout. {type(e).__name__}: {e}"
            ) from e

    def all_true(self, flag: bool, what: str) -> bool:
        """True iff ``flag`` is True on every rank (an all-reduce MAX of a "failed" flag)."""
        failed = torch.tensor([0.0 if flag else 1.0], device=self.device)
        self._collective(dist.all_reduce, failed, what, op=dist.ReduceOp.MAX)
        return float(failed) == 0.0

    def mean(self, value: float, what: str) -> float:
        """The mean over ranks of one float (float64)."""
        return self._mean_floats([value], what)[0]

    def _mean_floats(self, values: Sequence[float], what: str) -> list[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._collective(dist.all_reduce, t, what)
        return [v / self.world for v in t.tolist()]

    def count(self, flags: Sequence[bool], what: str) -> list[int]:
        """Per flag, on how many ranks it is True (one all-reduce)."""
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        if t.numel():
            self._collective(dist.all_reduce, t, what)
        return [int(v) for v in t.tolist()]

    def mean_(self, tensors: Sequence[Tensor], what: str, count: Optional[int] = None) -> None:
        """Replace each tensor by its mean over ranks, in place: one all-reduce per dtype. With
        ``count``, the sum over ranks divided by ``count`` instead of the world size: the mean over
        the ranks that had something to add (the others pass zeros)."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            if t is not None and t.numel() > 0:
                by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            self._collective(dist.all_reduce, flat, what)
            flat.div_(self.world if count is None else count)
            start = 0
            for t in ts:
                t.copy_(flat[start:start + t.numel()].view_as(t))
                start += t.numel()

    def average_objective(self, obj, with_grads: bool) -> None:
        """Q and its loss and FSD terms (each rank's own batch) → their means; ∇θ'Q too when
        ``with_grads`` (its FSD part is local; the rest is DDP's average plus λ_WSD·Δ, the same on
        every rank, which the mean leaves as it is up to rounding)."""
        obj.value, obj.loss, obj.fsd = self._mean_floats([obj.value, obj.loss, obj.fsd], "the meta-objective")
        if with_grads:
            self.mean_(obj.grads, "the FSD term's gradient")

    def broadcast_(self, tensor: Tensor, src: int, what: str) -> None:
        """``tensor`` ← rank ``src``'s (a rank of this group)."""
        self._collective(dist.broadcast, tensor, what, src=dist.get_global_rank(self.group, src)
                         if self.group is not None else src)


def replicas_of(model: nn.Module):
    """The ranks an optimizer of ``model`` must agree with: DDP's process group for a DDP-wrapped
    model, else the default group when torch.distributed is initialized with more than one rank
    (gradients synchronized some other way), else a no-op stand-in (one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return _SingleProcess()
    group = model.process_group if _is_ddp(model) else None
    if dist.get_world_size(group) == 1:
        return _SingleProcess()
    return Replicas(group, _device_of(model))


# --------------------------------------------------------------------------------------------
# Sharded preconditioners
# --------------------------------------------------------------------------------------------
def _release(precond) -> None:
    """Replace every tensor (or list of tensors) a preconditioner holds by a ``meta`` placeholder:
    same shapes and dtypes, no memory."""
    for name, v in list(vars(precond).items()):
        if isinstance(v, Tensor):
            setattr(precond, name, v.to("meta"))
        elif isinstance(v, list) and v and all(isinstance(t, Tensor) for t in v):
            setattr(precond, name, [t.to("meta") for t in v])


def _cost(precond) -> int:
    """A preconditioner's φ entries (m² + n² + mn for an unblocked layer with both factors learnt)."""
    return sum(t.numel() for t in precond.parameters())


def _assign(costs: Sequence[int], world: int) -> list[int]:
    """Greedy (largest first, to the least loaded rank; ties to the lower rank): owner per item."""
    load = [0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


class Shards:
    """Which rank owns which preconditioner, and the exchange of their updates.

    ``owner[id(param)]``: the rank whose preconditioner updates that parameter.
    """

    def __init__(self, replicas: Replicas, preconds: Sequence, params_per_precond: Sequence[Sequence[Tensor]]):
        self.replicas = replicas
        owners = _assign([_cost(pc) for pc in preconds], replicas.world)
        self.owned = {id(pc) for pc, r in zip(preconds, owners) if r == replicas.rank}
        self.owner = {id(p): r for ps, r in zip(params_per_precond, owners) for p in ps}
        self.load = [sum(_cost(pc) for pc, o in zip(preconds, owners) if o == r) for r in range(replicas.world)]

    def gather(self, out: dict, params: Sequence[Tensor], dtype: torch.dtype) -> dict:
        """Complete ``out`` (update per parameter id, this rank's parameters only) with every other
        owner's: one broadcast per owner of its updates, flattened, in ``params`` order."""
        rep = self.replicas
        for r in range(rep.world):
            theirs = [p for p in params if self.owner[id(p)] == r]
            if not theirs:
                continue
            if r == rep.rank:
                buf = torch.cat([out[id(p)].reshape(-1).to(dtype) for p in theirs])
            else:
                buf = torch.empty(sum(p.numel() for p in theirs), dtype=dtype, device=theirs[0].device)
            rep.broadcast_(buf, r, "the sharded preconditioned updates")
            if r != rep.rank:
                start = 0
                for p in theirs:
                    out[id(p)] = buf[start:start + p.numel()].view(p.shape)
                    start += p.numel()
        return out


def shard_preconditioners(model: nn.Module, layers: Sequence, diagonals: Sequence, enabled: bool) -> Optional[Shards]:
    """Sharded mode for APO-Precond: assign each preconditioner (``layers[i].precond``,
    ``diagonals[i][2]``) an owner and release the φ of the others on this rank (see the module
    docstring). None when ``enabled`` is False or there is one rank (then every rank owns all)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"shard_preconditioners must be a bool, got {type(enabled).__name__}")
    if not enabled:
        return None
    replicas = replicas_of(model)
    if replicas.world == 1:
        return None
    preconds = [layer.precond for layer in layers] + [d for _, _, d in diagonals]
    params = [layer.params for layer in layers] + [[p] for _, p, _ in diagonals]
    shards = Shards(replicas, preconds, params)
    for pc in preconds:
        if id(pc) not in shards.owned:
            _release(pc)
    return shards


def owns(shards: Optional[Shards], precond) -> bool:
    """Whether this rank holds ``precond``'s φ (always, without sharding)."""
    return shards is None or id(precond) in shards.owned


def keep_owned(shards: Optional[Shards], plan) -> None:
    """Restrict a step plan (``plan.layers`` / ``plan.Gs`` / ``plan.diags``) to this rank's preconditioners."""
    if shards is None:
        return
    kept = [(layer, G) for layer, G in zip(plan.layers, plan.Gs) if id(layer.precond) in shards.owned]
    plan.layers, plan.Gs = [k for k, _ in kept], [G for _, G in kept]
    plan.diags = [(p, d) for p, d in plan.diags if id(d) in shards.owned]


def gather_directions(shards: Optional[Shards], out: dict, params: Sequence[Tensor], dtype: torch.dtype) -> dict:
    """Every parameter's update on every rank (``Shards.gather``); ``out`` itself without sharding."""
    return out if shards is None else shards.gather(out, params, dtype)


def _is_placeholder(t) -> bool:
    return isinstance(t, Tensor) and t.device.type == "meta"


def gather_state(shards: Optional[Shards], state: dict, phi: Sequence[Tensor], meta_optimizer) -> dict:
    """The full state_dict from every rank's share (a collective): "phi" and the meta-optimizer's
    per-tensor state come from each tensor's owner. Without sharding, ``state`` itself."""
    if shards is None:
        return state
    flat = [p for g in meta_optimizer.param_groups for p in g["params"]]
    mine = {
        "phi": {i: t.detach().cpu() for i, t in enumerate(phi) if not _is_placeholder(t)},
        "meta": {i: {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in st.items()}
                 for i, st in state["meta_optimizer"]["state"].items() if not _is_placeholder(flat[i])},
    }
    shares = [None] * shards.replicas.world
    try:
        dist.all_gather_object(shares, mine, group=shards.replicas.group)
    except RuntimeError as e:
        raise RuntimeError(f"apo_kernels.distributed: rank {shards.replicas.rank} could not gather the sharded "
                           f"state_dict (state_dict() is a collective in sharded mode: call it on every rank). {e}") from e
    out = dict(state)
    phi_full = list(state["phi"])
    meta_state = {}
    for share in shares:
        for i, t in share["phi"].items():
            phi_full[i] = t
        meta_state.update(share["meta"])
    if any(_is_placeholder(t) for t in phi_full):
        raise RuntimeError("apo_kernels.distributed: a φ tensor has no owner among the ranks (ranks built different models?)")
    out["phi"] = phi_full
    out["meta_optimizer"] = {**state["meta_optimizer"], "state": meta_state}
    return out


# --------------------------------------------------------------------------------------------
# Checks and measurements (examples, tests)
# --------------------------------------------------------------------------------------------
def check_replicas(opt, group=None) -> dict[str, Optional[bool]]:
    """Whether φ and θ (the optimizer's model's parameters) are bit-identical on every rank of
    ``group``: {"phi": bool, "theta": bool}. φ is the optimizer's ``phi`` (APO), else every tensor
    of its per-parameter state (KFAC's factors, inverses, momentum); in sharded mode each φ tensor
    lives on one rank and "phi" is None. A collective (all_gather_object of one SHA-256 digest per
    rank and item); all True with one process."""
    if getattr(opt, "_shards", None) is not None:
        phi = None
    elif hasattr(opt, "phi"):
        phi = list(opt.phi)
    else:
        phi = [v for p in opt.model.parameters() for _, v in sorted(opt.state.get(p, {}).items())
               if isinstance(v, Tensor)]
    items = {"phi": phi, "theta": list(opt.model.parameters())}
    if not (dist.is_available() and dist.is_initialized()):
        return {k: None if v is None else True for k, v in items.items()}
    out = {}
    for name, ts in items.items():
        if ts is None:
            out[name] = None
            continue
        h = hashlib.sha256()
        for t in ts:
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests = [None] * dist.get_world_size(group)
        dist.all_gather_object(digests, h.hexdigest(), group=group)
        out[name] = len(set(digests)) == 1
    return out


def traffic(opt) -> dict[str, int]:
    """Payload bytes of the optimizer's own collectives so far, by agreement (sharded mode
    included); empty with one process."""
    out: dict[str, int] = {}
    for rep in {id(r): r for r in (getattr(opt, "_replicas", None),
                                   getattr(getattr(opt, "_shards", None), "replicas", None)) if r is not None}.values():
        for k, v in getattr(rep, "traffic", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def phi_memory(opt) -> dict[str, int]:
    """Bytes this rank holds of φ and of the meta-optimizer's state (``meta`` placeholders count 0)."""
    def nbytes(ts: Iterable) -> int:
        return sum(t.numel() * t.element_size() for t in ts if isinstance(t, Tensor) and not _is_placeholder(t))

    meta_state = [v for st in opt.meta_optimizer.state.values() for v in st.values()]
    return {"phi": nbytes(opt.phi), "meta_state": nbytes(meta_state)}
