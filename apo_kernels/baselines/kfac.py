"""KFAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions): the curvature baseline of apo-bench.

The layers and their matrices are those of the layer registry (``apo_kernels.layers``), the same
APOPrecond preconditions: a layer type with Kronecker factors there (nn.Linear; nn.Conv1d/2d/3d
with groups=1 and numeric zero padding; any type registered with ``input_rows``/``output_rows``)
is preconditioned here. Per such layer with weight gradient ∇W of shape (out, in) -- a
convolution's weight is read as (out, in·Πkernel) and a bias becomes one extra input column --
KFAC approximates the Fisher of vec(W) by A ⊗ G with

    A = E[a aᵀ]   (in+1, in+1)   layer inputs a (convolutions: unfolded patches), ones column for bias
    G = E[g gᵀ]   (out, out)     per-example gradients of −log p(y|x) w.r.t. the layer output

and updates with  ΔW = (G + λ_G I)⁻¹ ∇W (A + λ_A I)⁻¹.

Which Fisher (``fisher``):

* ``"mc"`` -- the Fisher of Martens & Grosse: y is SAMPLED from the model's predictive distribution
  p(y|x) given by ``likelihood`` and the model's output f (``"categorical"``: softmax(f) over dim 1,
  ``"bernoulli"``: sigmoid(f) per entry, ``"gaussian"``: N(f, I) per entry). On factor-update steps a
  forward hook on the model draws y as soon as ``model(x)`` returns and backpropagates
  ∂(−log p(y|f))/∂f / N once (``torch.autograd.grad`` on the layer weights, graph retained): one
  extra backward, ``.grad`` untouched. The sampling uses the optimizer's own generator (``seed``),
  never torch's global RNG stream. The model's output must be f itself (logits / mean), and the
  closure's loss should be the mean over the batch of −log p(y|f): cross-entropy,
  BCE-with-logits summed over outputs, or ½‖f − y‖² summed over outputs; another scale of the loss
  only rescales the step (fold it into lr).
* ``"empirical"`` (default, kept for backward compatibility) -- g are the gradients of the loss
  the closure computes, with the real targets. Cheaper (no extra backward) but the empirical Fisher
  is a poor curvature model far from a minimum (Kunstner et al. 2019).

Step bound: ``kl_clip`` (default 1e-3) scales the KFAC directions so that lr²·Σ Δ·∇ ≤ kl_clip
(Ba et al. 2017), which keeps a too large lr from running away; ``kl_clip=None`` turns it off.

Damping: factored Tikhonov, λ_A·λ_G = damping, split by π = sqrt((tr A / dim A) / (tr G / dim G))
(Martens & Grosse §6.3). A dead layer (a trace of 0 or not finite) gets π = 1, and π is clamped
to [1/MAX_PI, MAX_PI], so each side keeps at least sqrt(damping)/MAX_PI: a vanishing trace cannot
take one side's damping to 0 (singular) and the other to ∞. The damped inverses are computed in
float32 by Cholesky; where that fails (a rank-deficient factor below float32's resolution) the
inverse is redone in float64, then by a float64 eigendecomposition of the factor's PSD part, and if
even that fails the previous inverse is kept; each such event is counted in ``recoveries``.

The factors are running averages (stat_decay), refreshed every ``factor_interval`` steps from hooks
on the real modules; the inverses are recomputed every ``inverse_interval`` steps, in float32
whatever the model's dtype (torch.linalg.inv / cholesky have no bf16/fp16 kernels, see apo-bench's
low-precision section).

Conventions (chosen to match curvlinops' ``KFACLinearOperator(kfac_approx="expand",
separate_weight_and_bias=False)`` with ``fisher_type="empirical"`` or ``"mc"``, which
tests/test_baselines.py checks): the loss is a MEAN over the batch (dimension 0 of the layer
input), so a per-example output gradient is N·grad_output; for weight sharing (convolution locations,
extra leading dims of a Linear input) A averages over the N·L rows and G sums over the L locations
of each example:

    A = aᵀa / (N·L),   G = (N·g)ᵀ(N·g) / N  with a: (N·L, in+1), g: (N·L, out).

Every other parameter (norm scales, embeddings -- their input factor would be a dense V×V matrix
of token frequencies --, grouped convs, weights another module also holds) gets plain SGD with
momentum. ``step(closure=None)`` follows torch.optim's closure contract (as the APO optimizers do):
it returns the closure's loss, or uses the gradients already in ``.grad`` without a closure. A step
whose loss, gradient or update is not finite changes nothing (``skipped_steps``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .._args import FLOAT32_MAX, check_choice, check_int, check_number, check_optimizer_state_shapes, check_type
from .. import distributed
from .._numerics import all_finite
from .._step_hooks import step_with_hooks, warn_at_caller, zero_grad_quietly
from ..layers import Layer, find_layers

__all__ = [
    "KFAC",
    "FISHER_TYPES",
    "LIKELIHOODS",
    "MAX_PI",
    "kronecker_factors",
    "factored_damping",
    "damped_inverse",
    "damped_inverse_ex",
    "kfac_apply",
    "sampled_output_gradient",
]

FISHER_TYPES = ("empirical", "mc")
LIKELIHOODS = ("categorical", "bernoulli", "gaussian")
# π's clamp: traces may differ by up to MAX_PI² before the split stops following them.
MAX_PI = 1e4


# --------------------------------------------------------------------------------------------
# Layer-level functions (plain tensors; also what apo-bench times)
# --------------------------------------------------------------------------------------------
def _cov_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16 sums of N squared activations overflow (max 65504); bf16 has fp32's range.
    return torch.float32 if dtype == torch.float16 else dtype


def kronecker_factors(a: Tensor, g: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """Batch Kronecker factors in float32.

    a: (R, d_in) layer-input rows (R = N·L), g: (R, d_out) output-gradient rows of a MEAN loss over
    ``batch_size`` = N examples. Returns A = aᵀa/R (d_in, d_in) and G = N·gᵀg (d_out, d_out).
    """
    ca, cg = _cov_dtype(a.dtype), _cov_dtype(g.dtype)
    a = a.to(ca)
    g = g.to(cg)
    A = (a.T @ a).float().div_(a.shape[0])
    G = (g.T @ g).float().mul_(batch_size)
    return A, G


def factored_damping(A: Tensor, G: Tensor, damping: float) -> tuple[float, float]:
    """π-split Tikhonov damping (Martens & Grosse 2015, §6.3): returns (λ_A, λ_G), λ_A·λ_G = damping.

    π = sqrt((tr A/dim A) / (tr G/dim G)), 1 when a trace is 0 or not finite, clamped to
    [1/MAX_PI, MAX_PI] so that neither side's damping goes to 0 or ∞.
    """
    ta = float(A.diagonal().double().mean())
    tg = float(G.diagonal().double().mean())
    if ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg):
        pi = min(max(math.sqrt(ta / tg), 1.0 / MAX_PI), MAX_PI)
    else:
        pi = 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def damped_inverse(M: Tensor, lam: float) -> Optional[Tensor]:
    """(M + lam·I)⁻¹ of a symmetric PSD matrix in float32; None if M is not finite (see damped_inverse_ex)."""
    return damped_inverse_ex(M, lam)[0]


def damped_inverse_ex(M: Tensor, lam: float) -> tuple[Optional[Tensor], bool]:
    """(M + lam·I)⁻¹ of a symmetric PSD matrix, returned in float32, and whether a fallback was needed.

    Cholesky in float32; where it fails or gives a non-finite result (M rank deficient below
    float32's resolution of lam), Cholesky in float64; then (M₊ + lam·I)⁻¹ from a float64 eigh,
    M₊ the PSD part of M (its negative eigenvalues are rounding). Returns (None, True) when even
    that fails (M not finite): the caller keeps its previous inverse.
    """
    for dtype in (torch.float32, torch.float64):
        Md = M.to(dtype)
        Md = Md + lam * torch.eye(Md.shape[0], dtype=dtype, device=Md.device)
        L, info = torch.linalg.cholesky_ex(Md)
        if int(info) == 0:
            inv = torch.cholesky_inverse(L).float()
            if all_finite([inv]):
                return inv, dtype != torch.float32
    try:
        evals, evecs = torch.linalg.eigh(M.double())
    except (torch.linalg.LinAlgError, RuntimeError):
        return None, True
    inv = ((evecs / (evals.clamp_min(0.0) + lam)) @ evecs.T).float()
    return (inv, True) if all_finite([inv]) else (None, True)


def kfac_apply(grad_mat: Tensor, A_inv: Tensor, G_inv: Tensor) -> Tensor:
    """KFAC direction G⁻¹ ∇W A⁻¹ (2 GEMMs), in the dtype of the given matrices."""
    return G_inv @ grad_mat @ A_inv


def sampled_output_gradient(output: Tensor, likelihood: str, generator: Optional[torch.Generator]) -> Tensor:
    """∂(−log p(y|f))/∂f at y drawn from p(·|f), per example (not divided by N), in float32.

    f = ``output``; ``"categorical"``: classes along dim 1 (F.cross_entropy's layout), gradient
    softmax(f) − onehot(y); ``"bernoulli"``: per entry, sigmoid(f) − y; ``"gaussian"``: unit variance
    per entry, f − y = −ε with ε ~ N(0, 1). The draws use ``generator`` only (the same calls as
    curvlinops' ``draw_label``, so a generator with the same seed draws the same y).
    """
    check_choice("likelihood", likelihood, LIKELIHOODS)
    f = output.detach().float()
    if likelihood == "categorical":
        logits = f.movedim(1, -1)
        probs = logits.reshape(-1, logits.shape[-1]).softmax(dim=1)
        y = probs.multinomial(num_samples=1, generator=generator)
        grad = probs.scatter_add(1, y, -torch.ones_like(probs[:, :1]))
        return grad.reshape(logits.shape).movedim(-1, 1)
    if likelihood == "bernoulli":
        probs = f.sigmoid()
        return probs - probs.bernoulli(generator=generator)
    return -torch.randn(f.shape, generator=generator, device=f.device, dtype=f.dtype)  # "gaussian"


# --------------------------------------------------------------------------------------------
# One preconditioned layer: its matrices come from the layer registry (apo_kernels.layers)
# --------------------------------------------------------------------------------------------
class _Layer:
    """Book-keeping for one preconditioned module (weight + optional bias) and its captures."""

    __slots__ = ("layer", "module", "weight", "bias", "a", "g", "batch_size", "calls", "backwards")

    def __init__(self, layer: Layer):
        self.layer, self.module = layer, layer.module
        self.weight: nn.Parameter = layer.weight
        self.bias: Optional[nn.Parameter] = layer.bias
        self.a: Optional[Tensor] = None
        self.g: Optional[Tensor] = None
        self.batch_size = 0
        self.calls = 0  # captured forwards since the last step (the latest one's rows are kept)
        self.backwards = 0  # of those, how many got their output gradient: more than one is said

    def input_rows(self, x: Tensor) -> Tensor:
        rows = self.layer.view.input_rows(self.module, x)
        if self.bias is not None:  # the bias is the matrix's last column: an input of ones
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows.detach()

    def output_rows(self, gy: Tensor) -> Tensor:
        return self.layer.view.output_rows(self.module, gy).detach()

    def captured(self) -> bool:
        """Whether this step's forward and backward captured the layer's input and output rows."""
        return self.a is not None and self.g is not None

    def grad_matrix(self) -> Optional[Tensor]:
        gw = self.weight.grad
        if gw is None:
            return None
        gb = None
        if self.bias is not None:
            gb = torch.zeros_like(self.bias) if self.bias.grad is None else self.bias.grad
            gb = gb.to(gw.dtype)
        return self.layer.matrix(gw, gb)

    def param_matrix(self) -> Tensor:
        return self.layer.matrix(self.weight.detach(), None if self.bias is None else self.bias.detach())

    def split(self, mat: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        parts = self.layer.split(mat)
        return parts[0], (parts[1] if len(parts) == 2 else None)


def _inert_hook(module, inputs, output) -> None:
    """What a KFAC hook becomes in a copy of the model made without its optimizer."""


def _inert():
    return _inert_hook


class _Hook:
    """A forward hook calling ``kfac.<method>(module, inputs, output, *args)``. A model copied or
    pickled gets ``_inert_hook`` in its place: the copy's forwards must not feed this optimizer,
    and the optimizer (its state, its model) must not travel with the copy. A copied optimizer
    hooks its own model again (``KFAC.__setstate__``)."""

    __slots__ = ("kfac", "method", "args")

    def __init__(self, kfac, method: str, *args):
        self.kfac, self.method, self.args = kfac, method, args

    def __call__(self, module, inputs, output):
        return getattr(self.kfac, self.method)(module, inputs, output, *self.args)

    def __reduce__(self):
        return _inert, ()


class KFAC(torch.optim.Optimizer):
    """K-FAC with Kronecker factors from forward/backward hooks, SGD-momentum on the other parameters.

    Args:
        model: the nn.Module being trained (its layers with Kronecker factors are found and hooked).
        lr: learning rate (> 0).
        damping: Tikhonov damping λ added to the Fisher (> 0), split between the factors by π.
        momentum: heavy-ball momentum on the preconditioned direction, in [0, 1).
        weight_decay: L2 penalty added to the gradient before preconditioning (>= 0).
        stat_decay: running-average decay of the factors, in [0, 1).
        factor_interval: refresh the factors from the hooks every this many steps (>= 1).
        inverse_interval: recompute inverses every this many steps (>= 1).
        kl_clip: bound κ on the step's predicted KL change, lr²·Σ Δ·∇ ≤ κ (Ba et al. 2017; the
            KFAC directions are scaled down to meet it). Default 1e-3, as in common PyTorch KFAC
            implementations: without it lr 0.1 or 0.03 (momentum 0.9) diverged on an MNIST-1D MLP.
            None = off.
        fisher: ``"empirical"`` (default: gradients of the closure's loss) or ``"mc"`` (Martens &
            Grosse: targets sampled from the model's predictive distribution; needs ``likelihood``).
        likelihood: with ``fisher="mc"``: ``"categorical"`` (logits, classes on dim 1),
            ``"bernoulli"`` (logits per entry) or ``"gaussian"`` (mean per entry, unit variance).
        seed: seed of the optimizer's own generator for the sampled targets (default 0).
        shard_preconditioners: only False: KFAC keeps every layer's factors on every rank
            (under DDP its batch factors are averaged over ranks, see ``apo_kernels.distributed``);
            sharded preconditioners are APOPrecond's.

    Usage (torch.optim's closure contract)::

        opt = KFAC(model, lr=0.01, damping=1e-3, fisher="mc", likelihood="categorical")
        def closure():
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
        loss = opt.step(closure)        # or: loss.backward(); opt.step()

    With ``fisher="mc"`` the model must be called as ``model(x)`` (the hooked module) and return
    one tensor; tensor or module backward hooks that the user put on the model also run during
    the sampled backward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        damping: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        stat_decay: float = 0.95,
        factor_interval: int = 1,
        inverse_interval: int = 10,
        kl_clip: Optional[float] = 1e-3,
        fisher: str = "empirical",
        likelihood: Optional[str] = None,
        seed: int = 0,
        shard_preconditioners: bool = False,
    ):
        check_type("model", model, nn.Module, "a torch.nn.Module")
        distributed.refuse_fsdp(model)
        if shard_preconditioners is not False:
            raise ValueError(f"shard_preconditioners: {type(self).__name__} keeps every layer's factors on every "
                             "rank (replicated under DDP); sharded preconditioners are APOPrecond's "
                             "(APOPrecond(..., shard_preconditioners=True))")
        defaults = dict(
            lr=check_number("lr", lr, low=0.0, low_ok=False),
            damping=check_number("damping", damping, low=0.0, low_ok=False),
            momentum=check_number("momentum", momentum, high=1.0, high_ok=False),
            weight_decay=check_number("weight_decay", weight_decay, high=FLOAT32_MAX),
            stat_decay=check_number("stat_decay", stat_decay, high=1.0, high_ok=False),
            kl_clip=None if kl_clip is None else check_number("kl_clip", kl_clip, low=0.0, low_ok=False),
        )
        self.factor_interval = check_int("factor_interval", factor_interval, low=1)
        self.inverse_interval = check_int("inverse_interval", inverse_interval, low=1)
        self.fisher = check_choice("fisher", fisher, FISHER_TYPES)
        if fisher == "mc":
            if likelihood is None:
                raise ValueError(f"likelihood must be given with fisher='mc', one of {LIKELIHOODS}")
            self.likelihood = check_choice("likelihood", likelihood, LIKELIHOODS)
        elif likelihood is not None:
            raise ValueError(f"likelihood is used only with fisher='mc' (got fisher={fisher!r}, likelihood={likelihood!r})")
        else:
            self.likelihood = None
        check_int("seed", seed)
        self.seed = int(seed)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        super().__init__(params, defaults)
        self.model = model
        self._replicas = distributed.replicas_of(model)  # the ranks the factors and skips are agreed with
        self.steps = 0
        self.skipped_steps = 0  # non-finite loss, gradient or update: nothing updated
        # How often the curvature needed a fallback (see the module docstring); nothing raises.
        self.recoveries = {"float64_inverse": 0, "kept_previous_curvature": 0, "non_finite_factors": 0}
        self._generator: Optional[torch.Generator] = None
        self._generator_state: Optional[Tensor] = None  # restored by load_state_dict, applied lazily
        self._sampling = False  # True during the sampled backward of fisher="mc"
        self._pending: list[_Layer] = []  # layers captured by the current forward, for the sampled backward
        self._warned_no_sample = False
        self._warned_uncaptured: set[str] = set()
        self._warned_repeated: set[str] = set()
        self._refresh_next = False

        # The registered layers with Kronecker factors (apo_kernels.layers); a layer whose weight or
        # bias another module also holds (tied weights) takes the SGD-momentum path.
        self.layers: list[_Layer] = [_Layer(L) for L in find_layers(model, shared="exclude", kronecker=True)]
        layer_params = {id(p) for L in self.layers for p in (L.weight, L.bias) if p is not None}
        self.other_params = [p for p in params if id(p) not in layer_params]
        self._handles = []
        self._register_hooks()

    # ---------------------------------------------------------------------------------- hooks
    def _register_hooks(self) -> None:
        for L in self.layers:
            self._handles.append(L.module.register_forward_hook(_Hook(self, "_capture", L)))
        if self.fisher == "mc":  # registered last: runs after the layer hooks when model is a layer itself
            self._handles.append(self.model.register_forward_hook(_Hook(self, "_sampled_backward")))

    def __getstate__(self) -> dict:
        # torch.optim.Optimizer pickles only defaults/state/param_groups; the layers, the model and
        # the counters must travel too (copy.deepcopy, pickle). The hooks do not: a copy hooks its
        # own copy of the model (__setstate__), and the copied model's old hooks are inert (_Hook)
        state = self.__dict__.copy()
        state["_handles"] = bool(self._handles)  # whether the copy hooks its model (remove_hooks: not)
        return state

    def __setstate__(self, state: dict) -> None:
        # also called by torch.optim's load_state_dict, with only state and param_groups: the
        # hooks are then this optimizer's own and stay as they are
        copied = "_handles" in state
        hooked = state.pop("_handles", False)
        super().__setstate__(state)
        if copied:
            self._handles = []
            if hooked:
                self._register_hooks()

    def _capturing(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.steps % self.factor_interval == 0

    def _capture(self, module: nn.Module, inputs, output, layer: _Layer) -> None:
        """Forward hook of a layer: keep its input rows and hook its output for the output rows."""
        if not self._capturing(module) or not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = inputs[0]
        layer.calls += 1
        call = layer.calls
        layer.batch_size = x.shape[0] if x.dim() > 1 else 1
        layer.a = layer.input_rows(x)
        self._pending.append(layer)

        def grad_hook(gy: Tensor):
            # empirical: the user's backward; mc: only the sampled backward. Only the output of the
            # call whose inputs are kept: a and g of one call, also for a module applied twice
            if self._sampling == (self.fisher == "mc"):
                layer.backwards += 1
                if layer.calls == call:
                    layer.g = layer.output_rows(gy)

        output.register_hook(grad_hook)

    def _sampler(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._generator_state is not None:
                self._generator.set_state(self._generator_state)
                self._generator_state = None
        return self._generator

    def _sampled_backward(self, module: nn.Module, inputs, output) -> None:
        """fisher="mc": backpropagate ∂(−log p(y|f))/∂f / N for y ~ p(·|f) to the hooked layers."""
        pending, self._pending = self._pending, []
        if not pending or not self._capturing(module):
            return
        if not isinstance(output, Tensor):
            raise TypeError(
                f"fisher='mc' needs the model to return one tensor (the {self.likelihood} likelihood's "
                f"parameters), got {type(output).__name__}"
            )
        if not output.requires_grad or not all_finite([output]):
            return  # a non-finite output: the loss is not finite either, the step will be skipped
        if self.likelihood == "categorical" and output.dim() < 2:
            raise ValueError(f"likelihood='categorical' needs an output (N, C, ...), got shape {tuple(output.shape)}")
        n = output.shape[0] if output.dim() > 0 else 1
        dF = sampled_output_gradient(output, self.likelihood, self._sampler(output.device)).div_(n)
        self._sampling = True
        try:
            torch.autograd.grad(
                output, list({id(L.weight): L.weight for L in pending}.values()), grad_outputs=dF.to(output.dtype),
                retain_graph=True, allow_unused=True,
            )
        finally:
            self._sampling = False

    def remove_hooks(self) -> None:
        """Detach from the model (the optimizer keeps working as SGD-momentum with stale factors)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------- per-layer curvature
    def _update_factors(self, layer: _Layer, state: dict, decay: float, ranks: int = 1) -> bool:
        """Fold this step's batch factors, averaged over the ``ranks`` ranks that captured rows for
        the layer (a rank without rows adds zeros), into the running averages."""
        if layer.captured():
            A, G = kronecker_factors(layer.a, layer.g, layer.batch_size)
        else:  # float32, as kronecker_factors returns them
            m, n = layer.layer.shape
            A = torch.zeros(n, n, device=layer.weight.device)
            G = torch.zeros(m, m, device=layer.weight.device)
        self._replicas.mean_([A, G], "KFAC's batch factors", count=ranks)  # each rank's batch → the whole batch's
        if not all_finite([A, G]):  # finite rows whose squares overflow must not poison the averages
            self.recoveries["non_finite_factors"] += 1
            return False
        if "A" not in state:
            state["A"], state["G"] = A, G
        else:
            state["A"].mul_(decay).add_(A, alpha=1 - decay)
            state["G"].mul_(decay).add_(G, alpha=1 - decay)
        return True

    def _update_curvature(self, layer: _Layer, state: dict, damping: float, dtype: torch.dtype) -> None:
        lam_a, lam_g = factored_damping(state["A"], state["G"], damping)
        A_inv, fell_back_a = damped_inverse_ex(state["A"], lam_a)
        G_inv, fell_back_g = damped_inverse_ex(state["G"], lam_g)
        self.recoveries["float64_inverse"] += int(fell_back_a) + int(fell_back_g)
        if A_inv is None or G_inv is None:
            self.recoveries["kept_previous_curvature"] += 1
            return
        state["A_inv"], state["G_inv"] = A_inv, G_inv
        # Applied in the gradient's dtype: cast once per inversion, not every step.
        state["A_inv_c"] = A_inv.to(dtype)
        state["G_inv_c"] = G_inv.to(dtype)

    def _has_curvature(self, state: dict) -> bool:
        return "A_inv" in state

    def _precondition(self, layer: _Layer, state: dict, grad_mat: Tensor, damping: float) -> Tensor:
        dt = grad_mat.dtype
        A_inv, G_inv = state["A_inv_c"], state["G_inv_c"]
        if A_inv.dtype != dt:
            A_inv, G_inv = A_inv.to(dt), G_inv.to(dt)
        return kfac_apply(grad_mat, A_inv, G_inv)

    def _clear_captures(self) -> None:
        for layer in self.layers:
            layer.a = layer.g = None
            layer.calls = layer.backwards = 0
        self._pending = []

    # ------------------------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``, without its profiler range when no profiler runs (``zero_grad_quietly``)."""
        zero_grad_quietly(self, set_to_none)

    @step_with_hooks
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        """One update; returns the closure's loss (None without a closure)."""
        if closure is not None and not callable(closure):
            raise TypeError(f"closure must be callable or None, got {type(closure).__name__}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = [p.grad for g in self.param_groups for p in g["params"]]
        if not self._replicas.all_true(all_finite(grads + ([loss.detach()] if isinstance(loss, Tensor) else [])),
                                       "the finiteness of the loss and gradients"):
            # a non-finite loss or gradient must not reach the factors, the momentum or θ
            self._clear_captures()
            self.skipped_steps += 1
            return loss
        if self.fisher == "mc" and not self._warned_no_sample and any(
            L.a is not None and L.g is None for L in self.layers
        ):
            self._warned_no_sample = True
            warn_at_caller(
                "KFAC(fisher='mc') captured layer inputs but no sampled backward ran: call the model "
                "given to the optimizer (its forward hook draws the targets); those factors are not updated",
                RuntimeWarning,
            )
        group = self.param_groups[0]
        lr, damping, mom = group["lr"], group["damping"], group["momentum"]
        wd, decay, kl_clip = group["weight_decay"], group["stat_decay"], group["kl_clip"]
        refresh = self.steps % self.inverse_interval == 0 or self._refresh_next
        self._refresh_next = False

        updates: list[tuple[Tensor, Tensor, bool]] = []  # (param, direction, KL-clipped?)
        vg_sum = 0.0
        # under DDP a layer may have run on some ranks' batches only (a branch taken on some ranks):
        # every rank must take part in its factors' all-reduce, so agree on who has rows first
        ranks_with_rows = self._replicas.count([layer.captured() for layer in self.layers],
                                               "which layers captured KFAC factors")
        uncaptured = []  # layers with a gradient whose forward hook saw nothing on a factor step
        repeated = [layer.layer.name for layer in self.layers if layer.backwards > 1]
        for layer, ranks in zip(self.layers, ranks_with_rows):
            grad_mat = layer.grad_matrix()
            if grad_mat is None:
                continue
            state = self.state[layer.weight]
            if ranks:
                if self._update_factors(layer, state, decay, ranks):
                    self._after_factor_update(layer, state, decay, ranks)
            elif layer.a is None and self.steps % self.factor_interval == 0:
                uncaptured.append(layer.layer.name)
            if wd:
                grad_mat = grad_mat.add(layer.param_matrix(), alpha=wd)
            if "A" in state and (refresh or not self._has_curvature(state)):
                self._update_curvature(layer, state, damping, grad_mat.dtype)
            if self._has_curvature(state):
                direction = self._precondition(layer, state, grad_mat, damping)
                if kl_clip is not None:
                    vg_sum += float((direction.float() * grad_mat.float()).sum()) * lr * lr
            else:
                direction = grad_mat  # no statistics yet (e.g. first step in eval mode)
            dw, db = layer.split(direction)
            updates.append((layer.weight, dw, True))
            if db is not None:
                updates.append((layer.bias, db, True))
        self._clear_captures()
        self._warn_uncaptured(uncaptured)
        self._warn_repeated(repeated)

        nu = 1.0
        if kl_clip is not None and vg_sum > 0:
            nu = min(1.0, math.sqrt(kl_clip / vg_sum))
        for p in self.other_params:
            if p.grad is None:
                continue
            d = p.grad
            if wd:
                d = d.add(p.detach(), alpha=wd)
            updates.append((p, d, False))  # clipping applies to the KFAC directions only

        if not all_finite([d for _, d, _ in updates]) or not math.isfinite(vg_sum):
            # finite gradients, overflowing direction (a near-singular curvature): change nothing
            self.skipped_steps += 1
            self._refresh_next = True  # recompute the curvature at the next step, whatever the interval
            return loss
        for p, d, clipped in updates:
            if clipped and nu != 1.0:
                d = d * nu
            st = self.state[p]
            if mom:
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = d.detach().clone()  # never an alias of .grad
                else:
                    buf.mul_(mom).add_(d)
                d = buf
            p.add_(d, alpha=-lr)
        self.steps += 1
        return loss

    def _warn_repeated(self, names: list[str]) -> None:
        """Once per layer: more than one of its calls between two steps got an output gradient (a
        module applied twice, or several micro-batches in the closure); its factors are its last
        call's. A forward whose backward never runs (an extra forward to log) is not counted."""
        new = [n for n in names if n not in self._warned_repeated]
        if not new:
            return
        self._warned_repeated.update(new)
        warn_at_caller(
            f"{type(self).__name__}: layer(s) {', '.join(repr(n) for n in new)} ran more than once between two "
            "steps, each call backpropagated (a module applied twice, or several micro-batches in one closure); "
            "their Kronecker factors are those of the last call only (curvlinops' kfac_approx='expand' sums the "
            "calls' factors)",
            RuntimeWarning)

    def _warn_uncaptured(self, names: list[str]) -> None:
        """Once per layer: it has a gradient, but its forward hook captured no rows on a factor step,
        so it has no Kronecker factors and takes the plain gradient direction."""
        new = [n for n in names if n not in self._warned_uncaptured]
        if not new:
            return
        self._warned_uncaptured.update(new)
        warn_at_caller(
            f"{type(self).__name__}: layer(s) {', '.join(repr(n) for n in new)} got a gradient, but their forward "
            "hook captured no inputs on a factor-update step, so they have no Kronecker factors and take the "
            "plain gradient direction. Causes: the module is in eval mode (KFAC captures in training mode "
            "only), or its weight is used without calling the module (nn.MultiheadAttention's out_proj), or "
            "its output did not require grad", RuntimeWarning)

    def _after_factor_update(self, layer: _Layer, state: dict, decay: float, ranks: int = 1) -> None:
        """Hook for EKFAC (its per-step eigenbasis scaling; ``ranks`` as in ``_update_factors``)."""

    # ------------------------------------------------------------------------ state dict
    _FP32_KEYS = ("A", "G", "A_inv", "G_inv", "QA", "QG", "eig_A", "eig_G", "scale")

    def state_dict(self):
        sd = super().state_dict()
        sd["kfac_steps"] = self.steps
        sd["kfac_skipped_steps"] = self.skipped_steps
        sd["kfac_recoveries"] = dict(self.recoveries)
        generator_state = self._generator.get_state() if self._generator is not None else self._generator_state
        if generator_state is not None:
            sd["kfac_generator_state"] = generator_state.clone()
        return sd

    def _check_state_shapes(self, state_dict) -> None:
        """Every saved tensor has the shape this model gives it (torch.optim loads any shape, and the
        step that reads it fails later): the factors by their side of the layer's (m, n) matrix,
        every other buffer its parameter's shape."""
        sides = {}
        for L in self.layers:
            m, n = L.layer.view.shape(L.weight.shape, None if L.bias is None else L.bias.shape)
            sides[id(L.weight)] = {"A": (n, n), "G": (m, m), "eig_A": (n,), "eig_G": (m,), "scale": (m, n)}

        def expected(p, key):
            side = sides.get(id(p), {})
            # A, A_inv, A_inv_c, QA, QA_c are the input side's; G… and QG… the output side's
            return side.get(key if key in side else key.lstrip("Q").split("_")[0], p.shape)

        check_optimizer_state_shapes(state_dict, [p for g in self.param_groups for p in g["params"]], expected)

    def load_state_dict(self, state_dict):
        self._check_state_shapes(state_dict)
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("kfac_steps", 0))
        self.skipped_steps = int(state_dict.pop("kfac_skipped_steps", 0))
        self.recoveries.update(state_dict.pop("kfac_recoveries", {}))
        self._generator_state = state_dict.pop("kfac_generator_state", None)
        self._generator = None  # recreated on the output's device with the saved state
        # torch.optim casts floating state to the param's dtype on load; the curvature is fp32 master
        # data, so restore those entries ourselves.
        saved = {
            k: {key: v for key, v in st.items() if key in self._FP32_KEYS}
            for k, st in state_dict["state"].items()
        }
        state_dict["state"] = {
            k: {key: v for key, v in st.items() if key not in self._FP32_KEYS}
            for k, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        id_to_param = {i: p for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for k, entries in saved.items():
            p = id_to_param[int(k)]
            for key, v in entries.items():
                self.state[p][key] = v.to(device=p.device, dtype=torch.float32)
