"""APO-Precond: meta-learn a structured preconditioner per layer with the proximal objective.

Per layer the gradient (or momentum) matrix G (m, n) is preconditioned as

    Y = A · (S²⊙(Aᵀ G B)) · Bᵀ          (apo_kernels.precondition_grouped, one call per step)

and the update is θ ← θ − update_scale · (lr_t / lr) · Y(v), v = μ·v + (g + wd·θ) (heavy-ball
momentum on the gradient, as torch.optim.SGD, then preconditioned; lr_t / lr is an lr scheduler's
factor, 1 without one). Layer → matrix, as the layer registry ``apo_kernels.layers`` reads it
(``register_layer`` adds a type):

    nn.Linear            weight (out, in) + bias as an extra column      → (out, in + 1)
    nn.Conv1d/2d/3d      weight (out, in/groups·k…) + bias column         → (out, in/groups·k… + 1)
    nn.Embedding         weight (V, d); A fixed to the identity on the vocabulary side (S still
                         scales each entry: a diagonal block there), B (d, d) learnt
    everything else      a diagonal S-only preconditioner Y = S²⊙G (norm scales, 1-D params,
                         params of unregistered modules, the bias of a layer whose weight is tied);
                         with ``small_full_max``, those with at most that many entries instead
                         get a full one: flattened to (1, numel), A = 1 fixed, B learnt

Blocking rule (``max_precond_dim``): a side longer than it is split into ⌈size/max⌉ near-equal
blocks with a dense factor each (block-diagonal A or B); see ``preconditioners.split_sizes``.

Parametrization (measured; numbers in README): S² starts at lr / update_scale — the base step
size is folded into S instead of multiplying P by lr — so the first updates equal SGD(+momentum)
with learning rate ``lr``. S is stored as a log (S² = exp(2S)) so Adam's ≈meta_lr absolute steps
are *relative* changes of the step size whatever lr's magnitude, and the meta-Adam keeps a short
second-moment memory (β2 = 0.9), because the meta-gradient shrinks with the loss.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .._args import FLOAT32_MAX, check_bool, check_choice, check_int, check_number, check_pair
from .. import distributed
from .._numerics import all_finite, all_finite_scratch, checked_loss, loss_finite
from .._step_hooks import step_with_hooks, warn_at_caller
from ..layers import Layer, LayerView, find_layers
from ..ops import backends, resolve_backend
from ._core import (APOCore, _Plan, check_common_args, check_state_finite, momentum_catch_up,
                    with_load_state_dict_hooks, with_state_dict_hooks)
from .kron import KronPreconditioner
from .preconditioners import (
    S_PARAMS,
    DiagonalPreconditioner,
    StructuredPreconditioner,
    meta_backward_many,
    momentum_precondition_many,
    precondition_many,
)

# structure= → the per-layer preconditioner class
STRUCTURES = {"full": StructuredPreconditioner, "kron": KronPreconditioner}


class _FlatView(LayerView):
    """A parameter no layer owns, as one row (1, numel): A is the fixed 1×1 identity, B learnt."""

    name = "full"
    learn_left = False

    def matrix(self, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return weight.reshape(1, -1)


class _Layer:
    """A layer (``apo_kernels.layers.Layer``: weight + bias as one (m, n) matrix) with its
    preconditioner (a ``STRUCTURES`` class); ``kind`` is its view's name ("linear", "conv",
    "embedding", …, "full" for a small parameter no layer owns)."""

    def __init__(self, layer: Layer, precond_kwargs: dict, structure: str = "full"):
        self.layer, self.name, self.kind = layer, layer.name, layer.view.name
        self.weight, self.bias, self.params = layer.weight, layer.bias, layer.params
        self.shape = self.m, self.n = layer.shape
        self.precond = STRUCTURES[structure](self.m, self.n, learn_left=layer.view.learn_left, **precond_kwargs)
        self.view_geometry = _view_geometry(layer)

    def matrix(self, w: Tensor, b: Optional[Tensor]) -> Tensor:
        return self.layer.matrix(w, b)

    def split(self, Y: Tensor) -> list[Tensor]:
        """Y (m, n) as tensors shaped like ``params``: on every step, so the views ``split`` returns
        are rebuilt from their recorded geometry (one call each) where it applies."""
        if self.view_geometry is None or not Y.is_contiguous():
            return self.layer.split(Y)
        base = Y.storage_offset()
        return [Y.as_strided(size, stride, base + offset) for size, stride, offset in self.view_geometry]


def _by_operand_dtype(layers: list[_Layer], half: dict[int, torch.dtype]) -> list[tuple[Optional[torch.dtype], list[int]]]:
    """The positions in ``layers`` grouped by the dtype their op call runs in (``half``'s, None for φ's),
    in first-seen order: one grouped call of the op per group."""
    groups: dict[Optional[torch.dtype], list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(half.get(layer.index), []).append(i)
    return list(groups.items())


def _matrix(layer: _Layer, parts: list[Tensor]) -> Tensor:
    """The layer's (m, n) matrix of tensors shaped like its parameters (a copy)."""
    return layer.matrix(*parts) if len(parts) == 2 else layer.matrix(parts[0], None)


def _whole_matrix(layer: _Layer) -> bool:
    """Whether the layer's matrix is its one parameter, reshaped (its gradient is then G)."""
    if layer.view_geometry is None or len(layer.params) != 1:
        return False
    size, stride, offset = layer.view_geometry[0]
    return offset == 0 and stride == torch.empty(size, device="meta").stride()


def _bias_last_column(layer: _Layer) -> bool:
    """Whether the layer's matrix is its weight, reshaped, with its bias as the last column (a linear
    or conv layer with bias): the fused momentum op then reads both gradients as they are."""
    if layer.view_geometry is None or len(layer.params) != 2:
        return False
    m, n = layer.shape
    weight = torch.empty(layer.shape, device="meta")[:, :n - 1]
    try:
        weight = weight.view(layer.params[0].shape)
    except RuntimeError:
        return False
    return layer.view_geometry == [(tuple(weight.shape), weight.stride(), 0), ((m,), (n,), n - 1)]


def _view_geometry(layer: Layer) -> Optional[list[tuple[tuple[int, ...], tuple[int, ...], int]]]:
    """(size, stride, offset) of each tensor the layer's ``split`` returns for a contiguous (m, n)
    matrix when they are all views of it (every built-in layout), else None; probed on a meta tensor
    (no memory)."""
    probe = torch.empty(layer.shape, device="meta")
    try:
        parts = layer.split(probe)
    except Exception:  # a registered layout that cannot run on meta tensors: treated as copying
        return None
    if not all(t is probe or t._base is probe for t in parts):
        return None
    return [(tuple(t.shape), t.stride(), t.storage_offset()) for t in parts]


class _StepBuffers:
    """Flat buffers in φ's dtype, each holding one value of every parameter, kept between steps
    (a fresh tensor above glibc's mmap threshold, 32 MiB, is page-faulted in on every step).

    Copies 0 and 1 are the momentum (``current``) and the next step's v = μ·buf + g (``spare``).
    They swap when a step's update is taken, so a skipped step leaves the momentum as it was. With
    ``directions`` a third copy holds the step's Y where the caller can write it (the kron
    structure's GEMMs, the fused momentum step, the diagonal preconditioners), and with ``work``
    (the kron structure) a buffer as long as the largest layer's matrix holds an intermediate of one
    layer at a time.

    A layer whose ``split`` returns views (every built-in layout) has its (m, n) matrix as one
    contiguous block of each copy, its parameters' values being views of that block: v written per
    parameter IS the op's input G, no concatenation (``mats``; None for a layout that is not a view,
    whose matrix is then built per step). Blocks start 64 bytes apart, the CPU allocator's
    alignment, so the kernels see them as they see fresh tensors. No copy ever aliases ``.grad``
    (which zero_grad(set_to_none=False), accumulation and DDP bucket views write in place).
    """

    ALIGN_BYTES = 64

    def __init__(self, layers: list[_Layer], others: list[Tensor], dtype: torch.dtype, device: torch.device,
                 directions: bool = False, work: bool = False):
        per = max(1, self.ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        in_place = [layer.view_geometry is not None for layer in layers]  # probed once, at construction
        blocks, size = [], 0  # (start, shape): a layer's matrix, or one parameter
        for shapes in [[layer.shape] if ok else [tuple(p.shape) for p in layer.params]
                       for layer, ok in zip(layers, in_place)] + [[tuple(p.shape)] for p in others]:
            for shape in shapes:
                blocks.append((size, shape))
                size += -(-math.prod(shape) // per) * per
        self.flat = [torch.zeros(max(size, 1), dtype=dtype, device=device) for _ in range(3 if directions else 2)]
        self.views: list[list[Tensor]] = []  # per copy, per parameter: the layers' in order, then ``others``
        self.mats: list[list[Optional[Tensor]]] = []  # per copy, per layer: its matrix, or None
        for flat in self.flat:
            chunks = iter([flat[start:start + math.prod(shape)].view(shape) for start, shape in blocks])
            views, mats = [], []
            for layer, ok in zip(layers, in_place):
                mats.append(next(chunks) if ok else None)
                views += layer.split(mats[-1]) if ok else [next(chunks) for _ in layer.params]
            self.views.append(views + list(chunks))
            self.mats.append(mats)
        counts = [len(layer.params) for layer in layers]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        # per copy, per layer: its parameters' views
        self.layer_views = [[views[s:s + c] for s, c in zip(starts, counts)] for views in self.views]
        largest = max([math.prod(layer.shape) for layer in layers], default=0)
        self.work = torch.empty(largest, dtype=dtype, device=device) if work and largest else None
        self.current = 0

    DIRECTIONS = 2  # the copy holding Y

    @property
    def spare(self) -> int:
        return 1 - self.current

    def swap(self) -> None:
        self.current = 1 - self.current

    def work_for(self, shape: tuple[int, int]) -> Optional[Tensor]:
        """The work buffer as an (m, n) matrix (None without one)."""
        return None if self.work is None else self.work[:shape[0] * shape[1]].view(shape)


class _PrecondPlan(_Plan):
    # The fused momentum step's results, when this step took it: layer index → its Y (a view of the
    # directions copy), whether every such Y is finite, and the spare views of the parameters whose
    # v was formed outside it (the gradient check reads those; the op checked the rest).
    ready: Optional[dict] = None
    ready_finite: bool = True
    rest_vs: Optional[list] = None
    fused_v_finite: bool = True


class APOPrecond(APOCore):
    """APO with a structured preconditioner per layer (APO-Precond), torch.optim closure style.

    Args:
        model: the module to train; its layer types decide the preconditioner structure.
        lr: the base step size: the initial update is SGD(+momentum) with this lr (also the
            SGD+momentum step during warm-up).
        lambda_fsd, lambda_wsd: weights of the FSD and WSD proximity terms in Q.
        meta_lr: Adam learning rate on S; each dense d×d block of A or B uses meta_lr / d, so a
            meta-step changes its operator norm by about meta_lr whatever the layer width.
        meta_interval: a meta-step every this many steps, from step 0 (0: never).
        fsd: "kl" | "mse" | callable(new_out, old_out) -> scalar.
        momentum: heavy-ball coefficient on the gradient before preconditioning (0 disables).
        weight_decay: L2 added to the gradient (torch.optim.SGD's convention).
        warmup_steps: steps during which θ follows SGD+momentum with ``lr`` while φ is already
            meta-learnt.
        update_scale: the real update is update_scale × the meta-optimized lookahead step — a
            margin below the greedy one-step optimum, which is reused for meta_interval steps.
            S starts at √(lr/update_scale), so the first real updates are exactly SGD's size.
        max_precond_dim: longest dense side of A or B; longer sides become block-diagonal.
        small_full_max: a parameter no layer owns with at most this many entries gets a full
            preconditioner instead of a diagonal one: flattened to a (1, numel) row, with A the fixed
            1×1 identity and B a learnt numel×numel factor (e.g. the 2-vector of a Rosenbrock
            problem gets a full 2×2 preconditioner). None (default): diagonal for all of them.
        backend: op backend ("auto", "cpu", "cuda", "triton", "reference").
        meta_betas: Adam betas of the meta-optimizer. The default (0.5, 0.9) keeps a SHORT
            second-moment memory: the meta-gradient shrinks with the loss (∝ ‖g‖² on a
            quadratic), and with β2 = 0.999 Adam's steps collapse to ~loss_now/loss_then·meta_lr
            (measured: no gain over SGD on a cond-3000 regression, vs 1e-15 with β2 = 0.9).
        s_param: "log" (S² = exp(2S): Adam's steps are relative changes of the step size,
            independent of lr's magnitude; default) or "linear" (S² = S·S).
        meta_batch: "same" (Algorithm 1) or "fresh" (ablation; needs ``step(meta_closure=...)``).
        grad_scaler: the torch.amp.GradScaler the closure scales its loss with.
        structure: "full" (default; the rule above, S (m, n) free) or "kron" (S² = u vᵀ of rank
            one, u, v > 0, so P = (A diag(u) Aᵀ) ⊗ (B diag(v) Bᵀ) = L ⊗ R: a step is 2 GEMMs L·G·R
            with L and R rebuilt only after a meta-step; the meta-gradient is the op's backward
            at S² = u vᵀ and the chain rule; ``kron.KronPreconditioner``). Parameters without a
            layer keep their diagonal preconditioner either way.
        shard_preconditioners: under torch.distributed (DDP), keep each preconditioner's φ and
            meta-optimizer state on one owner rank only (assigned by cost), which computes that
            layer's update and meta-gradient and broadcasts the update: φ's memory per rank is
            about 1/world_size. ``state_dict()`` then gathers (call it on every rank); ``phi``
            holds ``meta``-device placeholders for the other ranks' tensors. No effect in one
            process. See ``apo_kernels.distributed``.

    Learning-rate schedulers: the real update is multiplied by ``schedule_factor()`` =
    param_groups[0]["lr"] / ``lr`` (the constructor's). The lookahead does not see it: φ learns the
    greedy step at the base lr — if it saw the factor, the meta-step would learn S² back up and undo
    a decay. With identity φ the updates are torch.optim.SGD's under the same scheduler.

    A step too large to evaluate (non-finite lookahead or update; on the first meta-step a
    lookahead worse than not stepping) scales S² down and retries (``recoveries``; see
    ``apo_kernels.optim._core``). No state aliases ``.grad``.

    Per-layer statistics: ``preconditioner_stats()``. φ is float32 (float64 for a float64 model)
    whatever the model's dtype; the momentum buffer has φ's dtype. The step of a bf16 layer (update,
    lookahead and the op's meta-gradient) runs on bf16 operands (its G and a bf16 image of φ, cast
    after each change of φ) where the op is faster so (``backends.half_operands_pay``: the CPU op on
    AMX-BF16), one process. The momentum buffers are views of
    one of two flat buffers the optimizer keeps (the other receives the next step's v), so a step
    allocates no momentum-sized tensor; a buffer read from ``state`` is overwritten two steps later
    (``state_dict()`` returns copies). Between steps that is one more φ-dtype copy of the parameters
    than a single momentum buffer (two more where Y is kept too: with structure="kron", plus the
    largest layer's matrix, and on the CPU backend when a layer takes the fused momentum step); the
    peak within a step is unchanged.

    Fused momentum step (CPU backend, structure="full", momentum on, unsharded): on a plain step past
    warm-up and on a meta-step (its lookahead), every layer whose matrix is its one parameter (an
    embedding, a linear or conv without bias) or its weight with the bias as the last column (a
    linear or conv with bias: the op reads both gradients as they are) forms v = μ·buf + g and Y(v)
    in one call of ``apo_kernels.precondition_momentum_grouped``, one block of rows at a time, bit for
    bit the unfused step. With ``carry_direction`` (default), such a layer whose matrix is its one
    parameter and whose A is a fixed identity (an embedding) carries its direction from one plain step
    to the next while φ is unchanged:
    Y_t = μ·Y_{t−1} + Y(g_t), which the op forms only on the gradient's nonzero rows (those the batch
    touched), the same direction as Y(v_t) in exact arithmetic, rounded differently (the carried
    rounding errors decay with μ). After a meta-step, a skipped step or a restored state, Y(v) is
    formed again. ``carry_direction=False`` keeps every step bit for bit the unfused one.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        lambda_fsd: float,
        lambda_wsd: float,
        meta_lr: float,
        meta_interval: int = 10,
        fsd: Union[str, Callable] = "kl",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        update_scale: float = 0.9,
        max_precond_dim: Optional[int] = 2048,
        small_full_max: Optional[int] = None,
        backend: str = "auto",
        meta_betas: tuple[float, float] = (0.5, 0.9),
        s_param: str = "log",
        meta_batch: str = "same",
        grad_scaler=None,
        shard_preconditioners: bool = False,
        structure: str = "full",
        carry_direction: bool = True,
    ):
        check_common_args(model, lambda_fsd, lambda_wsd, meta_lr, meta_interval, fsd, meta_batch, grad_scaler)
        lr = check_number("lr", lr, low=0.0, low_ok=False)
        momentum = check_number("momentum", momentum, low=0.0, high=1.0, high_ok=False)
        weight_decay = check_number("weight_decay", weight_decay, high=FLOAT32_MAX)
        update_scale = check_number("update_scale", update_scale, low=0.0, low_ok=False)
        warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
        for name, v in (("max_precond_dim", max_precond_dim), ("small_full_max", small_full_max)):
            if v is not None:
                check_int(name, v, low=1)
        check_choice("s_param", s_param, S_PARAMS)
        check_choice("structure", structure, tuple(STRUCTURES))
        meta_betas = check_pair("meta_betas", meta_betas, high=1.0, high_ok=False)
        carry_direction = check_bool("carry_direction", carry_direction)

        lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
        if lazy:  # its shape is not known yet, and φ's blocks are built from it
            raise ValueError(f"model: parameter {lazy[0]!r} is not initialized yet (a lazy module); APOPrecond builds "
                             f"each layer's preconditioner from its shape: run one forward pass, model(x), first")
        trainable = [p for p in model.parameters() if p.requires_grad]
        devices = {p.device for p in trainable}
        if len(devices) != 1:
            raise ValueError(f"model: all trainable parameters must be on one device, got {sorted(map(str, devices))}")
        device = trainable[0].device
        resolved = resolve_backend(backend, device)  # an unavailable backend fails here, naming it, not at step
        self.phi_dtype = torch.float64 if any(p.dtype == torch.float64 for p in trainable) else torch.float32
        finfo = torch.finfo(self.phi_dtype)
        if not finfo.tiny <= lr / update_scale <= finfo.max:
            raise ValueError(f"lr / update_scale = {lr / update_scale:.3g} is the initial S² and must be a normal "
                             f"{self.phi_dtype} number (lr={lr}, update_scale={update_scale})")
        kwargs = dict(init_s=math.sqrt(lr / update_scale), max_dim=max_precond_dim,
                      s_param=s_param, dtype=self.phi_dtype, device=device)

        # Layers first (in module order); a tied weight is preconditioned by the first layer that holds it
        self.structure = structure
        self.layers = [_Layer(layer, kwargs, structure) for layer in find_layers(model, shared="first_owner")]
        claimed = {id(p) for layer in self.layers for p in layer.params}
        self.diagonals: list[tuple[str, Tensor, DiagonalPreconditioner]] = []
        for name, p in model.named_parameters():
            if not p.requires_grad or id(p) in claimed or p.numel() == 0:  # empty: nothing to update
                continue
            claimed.add(id(p))
            if small_full_max is not None and p.numel() <= small_full_max:
                self.layers.append(_Layer(Layer(name, None, _FlatView(), p), kwargs, structure))
            else:
                self.diagonals.append((name, p, DiagonalPreconditioner(
                    p.shape, init_s=kwargs["init_s"], s_param=s_param, dtype=self.phi_dtype, device=device)))

        for i, layer in enumerate(self.layers):
            layer.index = i  # its block in the step buffers
        params = [p for layer in self.layers for p in layer.params] + [p for _, p, _ in self.diagonals]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        torch.optim.Optimizer.__init__(self, params, defaults)
        self._initial_lr = lr
        self.model = model
        self.lambda_fsd, self.lambda_wsd = float(lambda_fsd), float(lambda_wsd)
        self.meta_interval, self.fsd, self.meta_batch = meta_interval, fsd, meta_batch
        self.grad_scaler = grad_scaler
        self.warmup_steps, self.update_scale = warmup_steps, update_scale
        self.max_precond_dim, self.small_full_max, self.backend = max_precond_dim, small_full_max, backend
        self._params = params
        self._index = {id(p): i for i, p in enumerate(params)}
        # frozen at construction: no φ, so not trained if unfrozen later (a warning says so, once)
        self._left_out = [(name, p) for name, p in model.named_parameters() if not p.requires_grad and p.numel() > 0]
        # sharded mode: φ only for this rank's preconditioners (the others' are placeholders)
        self._shards = distributed.shard_preconditioners(model, self.layers, self.diagonals, shard_preconditioners)
        # Layers whose plain steps take the fused momentum op, whose CPU kernel forms v and Y one block
        # of rows at a time: a layer whose matrix is its one parameter (an embedding, a linear or conv
        # without bias) or its weight with its bias as the last column, with the full structure and
        # momentum, unsharded
        self._fused_layers = [layer for layer in self.layers if _whole_matrix(layer) or _bias_last_column(layer)] if (
            structure == "full" and momentum != 0 and resolved == "cpu" and self._shards is None) else []
        # Those of them with a fixed identity A (an embedding: its gradient is zero on the rows the
        # batch did not touch) carry their direction between meta-steps, Y_t = μ·Y_{t−1} + Y(g_t)
        self._carried_layers = [layer for layer in self._fused_layers
                                if not layer.precond.learn_left and _whole_matrix(layer)] if carry_direction else []
        # φ's tensor versions at which the directions copy holds Y(momentum) of every carried layer
        # (set by an update that took those Ys; None: the next fused step forms Y(v) again)
        self._carry_versions: Optional[tuple[int, ...]] = None
        self._phi = [t for layer in self.layers for t in layer.precond.parameters()] + \
                    [t for _, _, d in self.diagonals for t in d.parameters()]
        # Adam moves every entry by ≈ lr; the meta-gradient of a d×d factor is low-rank, so its
        # sign pattern is too, and a step of lr per entry changes the factor's operator norm by
        # ≈ lr·d (measured: a 4×1024 MLP blew up on the first meta-step at meta_lr=0.01). Each
        # factor block therefore gets meta_lr / d: ≈ meta_lr of operator-norm change per step,
        # whatever the width. S (elementwise, log-scale) keeps meta_lr.
        self.meta_lr = float(meta_lr)
        groups = []
        for layer in self.layers:
            pc = layer.precond
            for blocks, learn in ((pc.A, pc.learn_left), (pc.B, pc.learn_right)):
                if learn:
                    groups += [{"params": [b], "lr": meta_lr / b.shape[0]} for b in blocks]
        factor_ids = {id(g["params"][0]) for g in groups}
        groups.append({"params": [t for t in self._phi if id(t) not in factor_ids], "lr": meta_lr})
        # fused (one kernel per factor, as torch provides on CPU and CUDA): torch's default there is
        # the per-tensor loop, ~8 passes over φ. (A sharded rank's placeholders of the φ it does not
        # own are `meta` tensors that never get a gradient: every rank takes the same kernel.)
        fused = all(t.device.type in ("cpu", "cuda", "meta") and t.is_floating_point() for t in self._phi)
        self.meta_optimizer = torch.optim.Adam(groups, lr=meta_lr, betas=meta_betas, fused=fused or None)
        self._init_core()
        self._buffers: Optional[_StepBuffers] = None  # made at the first step that can use them

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # keyed by parameter identity: a copy's (copy.deepcopy, pickle) parameters are new objects
        self._index = {id(p): i for i, p in enumerate(self._params)}

    # ---- public ------------------------------------------------------------------------
    @step_with_hooks
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None, *, fsd_inputs=None, meta_closure=None):
        """One step of Algorithm 1; returns the closure's loss (None without a closure).

        Without a closure the gradients in ``.grad`` are used — only on steps with no
        meta-update. ``fsd_inputs``: tuple of inputs for ``model(*fsd_inputs)``.
        """
        if self._left_out and self.meta_due():
            self._warn_if_unfrozen()
        return self._run_step(closure, fsd_inputs, meta_closure)

    def _warn_if_unfrozen(self) -> None:
        """A parameter frozen when the optimizer was built and trainable now has no preconditioner and
        is not trained: said once (checked on meta-steps, every ``meta_interval`` steps)."""
        unfrozen = [name for name, p in self._left_out if p.requires_grad]
        if unfrozen:
            self._left_out = []
            more = f" (and {len(unfrozen) - 1} more)" if len(unfrozen) > 1 else ""
            warn_at_caller(f"APOPrecond: parameter {unfrozen[0]!r}{more} was frozen when the optimizer was built "
                           f"and requires grad now; it has no preconditioner and is not trained. Build the "
                           f"optimizer after unfreezing it.", UserWarning)

    def preconditioner_stats(self) -> dict[str, dict[str, float]]:
        """Per layer / diagonal parameter: s2_mean (mean of S², the step multiplier), a_dist and
        b_dist (‖A−I‖_F, ‖B−I‖_F over blocks; 0 where the factor is fixed or absent)."""
        out = {layer.name: layer.precond.stats() for layer in self.layers
               if distributed.owns(self._shards, layer.precond)}  # sharded: this rank's only
        out.update({name: d.stats() for name, _, d in self.diagonals if distributed.owns(self._shards, d)})
        return out

    @property
    def phi(self) -> list[Tensor]:
        """The meta-learnt tensors in meta-optimizer order (A blocks, S, B blocks per layer, then
        the diagonal S's)."""
        return list(self._phi)

    # ---- hooks ---------------------------------------------------------------------------
    def _all_params(self):
        return self._params

    def _device_type(self) -> str:
        return self._params[0].device.type

    def _prepare(self):
        group = self.param_groups[0]
        mom, wd = group["momentum"], group["weight_decay"]
        plan = _PrecondPlan()
        if not self._prepare_in_buffers(plan, mom, wd):
            self._prepare_fresh(plan, mom, wd)
        plan.v_of = dict(zip(map(id, plan.params), plan.vs)) if self.diagonals else {}
        plan.diags = [(p, d) for _, p, d in self.diagonals if id(p) in plan.v_of]
        # the update list is built in plan.params order straight from the layers unless a layer
        # is left out (a parameter without a gradient) or sharding moves updates between ranks
        plan.in_order = plan.complete and self._shards is None
        distributed.keep_owned(self._shards, plan)  # sharded: this rank's preconditioners only
        return plan

    def _local_grads_finite(self, loss, plan) -> bool:
        # v = μ·buf + (g + wd·θ) is finite only if g is (NaN and ±inf survive + and ·), so one check
        # of the spare buffer, which holds every v, clears all gradients (with the loss, in one call);
        # the gradients themselves are read only when it fails (v may overflow from finite values)
        if plan.rest_vs is not None:  # the fused op checked its layers' v
            if plan.fused_v_finite and all_finite_scratch(plan.rest_vs):
                return loss_finite(loss)
        elif plan.buffers is not None:  # one read-only check of the spare buffer and the loss together
            if all_finite([plan.buffers.flat[plan.buffers.spare], checked_loss(loss)]):
                return True
        return super()._local_grads_finite(loss, plan)

    def _prepare_in_buffers(self, plan, mom: float, wd: float) -> bool:
        """The common case: every parameter has a gradient in φ's dtype and either all or none have
        a momentum buffer. v = μ·buf + (g + wd·θ) (torch.optim.SGD's arithmetic) is written into the
        spare copy of ``_StepBuffers``, where each layer's matrix G is already laid out: no
        concatenation and no allocation per step. False (nothing done) otherwise."""
        params = self._params
        grads = [p.grad for p in params]
        if any(g is None or g.dtype != self.phi_dtype for g in grads):
            return False
        bufs = [self.state[p].get("momentum_buffer") for p in params] if mom != 0 else [None]
        with_momentum = bufs[0] is not None
        if any((b is not None) != with_momentum for b in bufs):
            return False
        if self._buffers is None:
            kron = self.structure == "kron"
            work = kron and not all(layer.precond.native_step for layer in self.layers)  # (the matmul route's L·G)
            self._buffers = _StepBuffers(self.layers, [p for _, p, _ in self.diagonals], self.phi_dtype,
                                         params[0].device, directions=kron or bool(self._fused_layers), work=work)
        mb = self._buffers
        vs = mb.views[mb.spare]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if with_momentum:
            held = mb.views[mb.current]
            if any(b is not h for b, h in zip(bufs, held)):  # restored by load_state_dict, or set by hand
                torch._foreach_copy_(held, bufs)
                self._carry_versions = None  # the directions copy is not their Y
            fused = self._fused_this_step(grads)
            if fused:
                self._momentum_step_fused(plan, fused, grads, mom)
            else:
                torch.mul(mb.flat[mb.current], mom, out=mb.flat[mb.spare])
                torch._foreach_add_(vs, grads)
        else:
            torch._foreach_copy_(vs, grads)
        plan.params, plan.vs, plan.buffers, plan.complete = params, vs, mb, True
        plan.layers = self.layers
        plan.Gs = [G if G is not None else _matrix(layer, layer_vs)
                   for layer, G, layer_vs in zip(self.layers, mb.mats[mb.spare], mb.layer_views[mb.spare])]
        return True

    def _fused_this_step(self, grads: list[Tensor]) -> list[_Layer]:
        """The fused layers whose v and Y this step forms in the fused op, for those with contiguous
        gradients: on every step that takes a Y at the φ of this moment (a plain step past warm-up
        updates θ with it, a meta-step's lookahead starts from it; a plain warm-up step takes v)."""
        if not self._fused_layers or (self._apo_step < self.warmup_steps and not self.meta_due()):
            return []
        return [layer for layer in self._fused_layers if grads[self._index[id(layer.weight)]].is_contiguous()]

    def _momentum_step_fused(self, plan, fused: list[_Layer], grads: list[Tensor], mom: float) -> None:
        """v = μ·buf + g for every parameter into the spare copy and, for the ``fused`` layers, Y(v) into
        the directions copy: those in one call of the fused op (bit for bit torch.optim.SGD's v), the
        other parameters' v with foreach ops (the same rounding)."""
        mb = self._buffers
        cur, spare, out = mb.mats[mb.current], mb.mats[mb.spare], mb.mats[mb.DIRECTIONS]
        taken = {self._index[id(p)] for layer in fused for p in layer.params}
        rest = [i for i in range(len(grads)) if i not in taken]
        held, vs = mb.views[mb.current], mb.views[mb.spare]
        plan.rest_vs = [vs[i] for i in rest]
        if rest:
            torch._foreach_copy_(plan.rest_vs, [held[i] for i in rest])
            torch._foreach_mul_(plan.rest_vs, mom)
            torch._foreach_add_(plan.rest_vs, [grads[i] for i in rest])
        # the carried layers' directions copy holds Y(momentum) at this φ: carry it (once: a step
        # that does not complete leaves the copy changed and the momentum not)
        carry = self._carry_versions is not None and self._carry_versions == self._phi_versions()
        self._carry_versions = None
        carried = {layer.index for layer in self._carried_layers} if carry else set()
        flags = [True, True]
        for group, carrying in (([l for l in fused if l.index not in carried], False),
                                ([l for l in fused if l.index in carried], True)):
            if not group:
                continue
            weights, biases = self._fused_grads(group, grads)
            v_ok, y_ok = momentum_precondition_many(
                [layer.precond for layer in group], weights, [cur[layer.index] for layer in group], mom,
                [spare[layer.index] for layer in group], [out[layer.index] for layer in group], carry=carrying,
                bias_grads=biases, backend=self.backend, checked=True).tolist()
            flags = [flags[0] and v_ok, flags[1] and y_ok]
        plan.fused_v_finite, plan.ready_finite = flags
        plan.ready = {layer.index: out[layer.index] for layer in fused}

    def _fused_grads(self, layers: list[_Layer], grads: list[Tensor]) -> tuple[list[Tensor], list[Optional[Tensor]]]:
        """The fused op's gradients of ``layers``: each weight's as its matrix columns (m, n) or, with a
        bias, (m, n − 1); the bias gradients (None for a layer without one)."""
        weights = [grads[self._index[id(layer.weight)]].view(layer.m, layer.n - (len(layer.params) - 1))
                   for layer in layers]
        biases = [grads[self._index[id(layer.params[1])]] if len(layer.params) == 2 else None for layer in layers]
        return weights, biases

    def _phi_versions(self) -> tuple[int, ...]:
        """The version counters of φ's tensors: any in-place change of φ (a meta-step, a shrink, a
        loaded state, a user's edit) moves one."""
        return tuple(t._version for t in self._phi)

    def _prepare_fresh(self, plan, mom: float, wd: float) -> None:
        """Any mix of missing gradients, buffers and dtypes, one parameter at a time, in fresh
        tensors; a layer with a gradient for only some of its parameters gets zeros for the others."""
        v = {}
        for p in self._params:
            if p.grad is None:
                continue
            g = p.grad.to(self.phi_dtype)
            if wd != 0:
                g = g.add(p.to(self.phi_dtype), alpha=wd)
            buf = self.state[p].get("momentum_buffer") if mom != 0 else None
            if buf is not None:
                v[id(p)] = buf.mul(mom).add_(g)
            else:
                # v becomes the momentum buffer and is read after the lookahead's closure: it must
                # never alias .grad, which zero_grad(set_to_none=False), gradient accumulation or
                # DDP bucket views write in place (.to() returns .grad itself when dtypes match)
                v[id(p)] = g.clone() if g is p.grad else g
        plan.params = [p for p in self._params if id(p) in v]
        plan.vs = [v[id(p)] for p in plan.params]
        plan.buffers, plan.complete = None, len(plan.params) == len(self._params)
        plan.layers, plan.Gs = [], []
        for layer in self.layers:
            if any(id(p) in v for p in layer.params):
                plan.layers.append(layer)
                plan.Gs.append(_matrix(layer, [v[id(p)] if id(p) in v else
                                               torch.zeros(p.shape, dtype=self.phi_dtype, device=p.device)
                                               for p in layer.params]))

    def _half_operands(self, layers: list[_Layer]) -> dict[int, torch.dtype]:
        """Layer index -> the half-precision dtype a step multiplies that layer's operands in: its
        parameters' dtype where they are all bf16 and the op runs bf16 operands faster than φ's float32
        (``backends.half_operands_pay``: the CPU op on AMX), on one process (not sharded). Y then comes
        from G and φ's cached bf16 image, rounded as torch's bf16 chain rounds (the rule a bf16 layer of
        the op keeps there), in the update and in the lookahead alike: a meta-step judges the step the
        updates take. The meta-gradient is the op's backward on the same operands, added to φ's
        gradient in float32."""
        out = {}
        for layer in layers:
            dtype = layer.weight.dtype
            if (dtype != self.phi_dtype and self._shards is None and all(p.dtype == dtype for p in layer.params)
                    and backends.half_operands_pay(self.backend, layer.weight.device, dtype)):
                out[layer.index] = dtype
        return out

    def _directions(self, plan) -> tuple[list[Tensor], list[Tensor]]:
        """(Y(φ) per parameter of ``plan.params``: the preconditioned step at the current φ (lr folded
        into S); the tensors that hold them, each layer's whole Y, to be checked at once). Fresh
        tensors (the op's results) or views of them, except where this step's buffers hold a
        directions copy (the kron structure, the fused momentum step): there Y overwrites the
        previous step's. In half precision where ``_half_operands`` says so."""
        mb = plan.buffers if plan.buffers is not None and len(plan.buffers.flat) > plan.buffers.DIRECTIONS else None
        half = self._half_operands(plan.layers)
        # Ys the fused momentum step formed at the φ of ``_prepare`` (and checked): used once, by the
        # first call (a meta-step's lookahead, or the update); any later one (a retry after φ
        # shrank, the update after a meta-step) forms every Y again
        ready, plan.ready, plan.ready_finite = plan.ready or {}, None, True
        if self.structure == "kron":  # L·G·R with the cached factors: 2 GEMMs, no op call
            Ys = [l.precond.apply(G, dtype=half[l.index]) if l.index in half else
                  l.precond.apply(G) if mb is None else
                  l.precond.apply(G, out=mb.mats[mb.DIRECTIONS][l.index], work=mb.work_for(G.shape))
                  for l, G in zip(plan.layers, plan.Gs)]
        else:
            # G is built here in φ's dtype and device with each layer's shape: the op directly, one
            # grouped call per operand dtype (φ's, and a half-precision image of φ where ``half`` says)
            todo = [(l, G) for l, G in zip(plan.layers, plan.Gs) if l.index not in ready]
            formed = {}
            for dtype, batch in _by_operand_dtype([l for l, _ in todo], half):
                formed.update(zip([todo[i][0].index for i in batch], precondition_many(
                    [todo[i][0].precond for i in batch], [todo[i][1] for i in batch], backend=self.backend,
                    checked=True, operand_dtype=dtype)))
            Ys = [ready[l.index] if l.index in ready else formed[l.index] for l in plan.layers]
        parts = [y for layer, Y in zip(plan.layers, Ys) for y in layer.split(Y)]
        diags = [d.apply(plan.v_of[id(p)], out=None if mb is None else mb.views[mb.DIRECTIONS][self._index[id(p)]])
                 for p, d in plan.diags]
        if plan.in_order:  # every layer's parameters, then the diagonal ones: plan.params' order
            return parts + diags, [Y for l, Y in zip(plan.layers, Ys) if l.index not in ready] + diags
        out = dict(zip([id(p) for layer in plan.layers for p in layer.params], parts))
        out.update((id(p), y) for (p, _), y in zip(plan.diags, diags))
        # sharded: the other owners' updates arrive by broadcast
        out = distributed.gather_directions(self._shards, out, plan.params, self.phi_dtype)
        steps = [out[id(p)] for p in plan.params]
        return steps, steps

    def _lookahead_deltas(self, plan):
        # the lookahead judges the step a warmed-up momentum buffer will take (momentum_catch_up)
        group = self.param_groups[0]
        young = not any("momentum_buffer" in self.state.get(p, {}) for p in plan.params)
        plan.catch_up = momentum_catch_up(group["momentum"], 1 if young else self._apo_step + 1)
        # fresh tensors (the op's results) or views of them, one per parameter: scaled in place
        return [y.mul_(-plan.catch_up) for y in self._directions(plan)[0]]

    def _meta_backward(self, plan, dQ):
        # θ' = θ − c·Y(φ)  ⇒  ∂Q/∂φ = (∂Y/∂φ)ᵀ(−c·∇θ'Q): the op's backward with grad_out = −c·∇θ'Q
        # one fresh tensor per parameter: −c·∇θ'Q (exact either way: c·g then the sign)
        dy = {id(p): g.mul(-plan.catch_up).to(self.phi_dtype) for p, g in zip(plan.params, dQ)}
        dYs = [_matrix(layer, [dy[id(p)] if id(p) in dy else torch.zeros(p.shape, dtype=self.phi_dtype, device=p.device)
                               for p in layer.params])
               for layer in plan.layers]
        # the backward on the operands the lookahead's Y took
        for dtype, batch in _by_operand_dtype(plan.layers, self._half_operands(plan.layers)):
            meta_backward_many([plan.layers[i].precond for i in batch], [dYs[i] for i in batch],
                               [plan.Gs[i] for i in batch], backend=self.backend, checked=True, operand_dtype=dtype)
        for p, d in plan.diags:
            d.meta_backward(dy[id(p)], plan.v_of[id(p)])

    def schedule_factor(self) -> float:
        """param_groups[0]["lr"] / the lr given at construction: what an lr scheduler has made of it."""
        return float(self.param_groups[0]["lr"]) / self._initial_lr

    def _apply(self, plan) -> bool:
        group = self.param_groups[0]
        if self._apo_step < self.warmup_steps:  # SGD+momentum with the (scheduled) lr
            steps, scale = plan.vs, float(group["lr"])
            whole, fused_finite, carries = steps, True, False
        else:
            # The schedule multiplies the real update only: the lookahead (and so φ) stays at the
            # base step, else the meta-step would learn S back up and undo the decay.
            fused_finite = plan.ready_finite  # of the fused step's Ys, if _directions takes them
            # the update takes every carried layer's Y from the directions copy (the fused step formed
            # them and no meta-step's lookahead took them first)
            carries = bool(self._carried_layers) and plan.ready is not None and all(
                layer.index in plan.ready for layer in self._carried_layers)
            (steps, whole), scale = self._directions(plan), self.update_scale * self.schedule_factor()
        if not (fused_finite and all_finite_scratch(whole)):  # this step's own tensors (v: the spare buffer)
            return False
        params = plan.params
        if any(y.dtype != p.dtype for p, y in zip(params, steps)):
            # formed in φ's dtype, rounded once (as the lookahead); checked before anything is written
            rounded = {i: (p.to(y.dtype) - y * scale).to(p.dtype)
                       for i, (p, y) in enumerate(zip(params, steps)) if y.dtype != p.dtype}
            if not all_finite_scratch(rounded.values()):  # e.g. beyond fp16's range
                return False
            for i, new in rounded.items():
                params[i].copy_(new)
            same = [i for i in range(len(params)) if i not in rounded]
            params, steps = [params[i] for i in same], [steps[i] for i in same]
        if params:  # torch.optim.SGD's own operation, p.add_(y, alpha=-scale), over the list
            torch._foreach_add_(params, steps, alpha=-scale)
        if group["momentum"] != 0:
            for p, v in zip(plan.params, plan.vs):
                self.state[p]["momentum_buffer"] = v
            if plan.buffers is not None:  # v (the spare copy) is the momentum now; the old one is spare
                plan.buffers.swap()
        # the directions copy holds Y(momentum) of every carried layer at this φ only if this update
        # took those Ys (an update from v, from fresh Ys or from a step without the fused op: not)
        self._carry_versions = self._phi_versions() if carries else None
        return True

    def _shrink_phi(self, factor: float):
        for pc in [layer.precond for layer in self.layers] + [d for _, _, d in self.diagonals]:
            pc.scale_s2(factor)

    # ---- state -----------------------------------------------------------------------------
    @with_state_dict_hooks
    def state_dict(self) -> dict:
        """Momentum buffers (by parameter index), φ, meta-optimizer state, counters, hyperparameters.
        Sharded: gathered from every rank (a collective), in the same layout."""
        return distributed.gather_state(self._shards, {
            "momentum": {i: self.state[p]["momentum_buffer"].clone()
                         for i, p in enumerate(self._params) if "momentum_buffer" in self.state.get(p, {})},
            "phi": [t.detach().clone() for t in self._phi],
            "meta_optimizer": self.meta_optimizer.state_dict(),
            **self._core_state(),
            "initial_lr": self._initial_lr,
            "structure": self.structure,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
        }, self._phi, self.meta_optimizer)

    @with_load_state_dict_hooks
    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``; tensors are mapped to this optimizer's device and dtypes. A
        state that does not fit this optimizer (another kind, structure or model) is refused before
        anything is loaded."""
        self._check_state_keys(state, ("phi", "momentum", "meta_optimizer", "initial_lr", "param_groups"))
        saved = state.get("structure", "full")
        if saved != self.structure:
            raise ValueError(f"state_dict: saved with structure={saved!r}, this optimizer has "
                             f"structure={self.structure!r}")
        if len(state["phi"]) != len(self._phi):
            raise ValueError("state_dict: φ has a different number of tensors (a different model?)")
        for t, s in zip(self._phi, state["phi"]):
            if t.shape != s.shape:
                raise ValueError(f"state_dict: φ tensor of shape {tuple(s.shape)} where {tuple(t.shape)} expected")
        for i, buf in state["momentum"].items():
            if not 0 <= int(i) < len(self._params) or buf.shape != self._params[int(i)].shape:
                raise ValueError(f"state_dict: momentum buffer {i} of shape {tuple(buf.shape)} fits no parameter of "
                                 f"this model (a different model?)")
        check_state_finite({"phi": state["phi"], "momentum": state["momentum"],
                            "meta_optimizer['state']": state["meta_optimizer"].get("state", {})})
        with torch.no_grad():
            for t, s in zip(self._phi, state["phi"]):
                t.copy_(s.to(device=t.device, dtype=t.dtype))
        self.state.clear()
        for i, buf in state["momentum"].items():
            p = self._params[int(i)]
            self.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=self.phi_dtype).clone()
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        for g, saved in zip(self.param_groups, state["param_groups"]):
            g.update(saved)
        self._load_core_state(state)
        self._initial_lr = float(state["initial_lr"])
        self._carry_versions = None  # the next fused step forms Y(v) from the loaded momentum
