"""Layer registry: how a module's weight (and bias) become one gradient matrix.

APOPrecond, KFAC, EKFAC and apo-bench's layer sets all read a layer through the same view, so
the baselines precondition the same matrices as APO. A view says

- ``params(module)``: the (weight, bias) the matrix is made of (bias None: the layer has none);
- ``matrix(weight, bias)``: the (m, n) matrix of a weight-shaped and a bias-shaped tensor (the
  gradient, the momentum, the update); the bias, if any, is the LAST column;
- ``split(Y, weight_shape, bias_shape)``: the inverse, a matrix update back to (weight, bias);
- ``shape(weight_shape, bias_shape)``: (m, n) without touching parameter memory (derived from
  ``matrix``; nothing to write for a new view);
- ``learn_left``: whether APO learns the left factor A (rows side); False where the rows are not
  a space a dense factor makes sense on (an embedding's vocabulary: A stays the identity, S
  still scales each entry);
- for Kronecker-factored curvature (KFAC, EKFAC), ``has_kronecker_factors(module)`` and
  ``input_rows(module, x)`` / ``output_rows(module, gy)``: the layer's inputs and output gradients
  as rows a (R, n_weight) and g (R, m) with  grad W_matrix = Σ_r g_rᵀ a_r  (the bias column of
  ones is appended by the optimizer).

Registered here: nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.MultiheadAttention (its packed
q/k/v input projection). A new layer type is one call:

    register_layer(MyLayer, MyView())

Lookup follows the class hierarchy (a subclass of nn.Linear is a Linear unless it has an entry of
its own). ``find_layers`` walks a model and decides, in one place, what happens to a parameter
that several modules share (tied weights).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerView",
    "LinearView",
    "ConvView",
    "EmbeddingView",
    "AttentionInProjView",
    "Layer",
    "register_layer",
    "view_of",
    "registered_layers",
    "find_layers",
    "matrix_shape",
    "SHARED_POLICIES",
]


class LayerView:
    """The default view: row i holds everything that feeds output unit i, ``weight[i]`` flattened
    and then ``bias[i]`` (nn.Linear: (out, in + 1), a convolution: (out, in/groups·k… + 1)).

    Subclass it and override what differs; ``name`` labels the layer kind in APOPrecond's
    ``layers`` and in messages.
    """

    name = "layer"
    learn_left = True

    def params(self, module: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return getattr(module, "weight", None), getattr(module, "bias", None)

    def matrix(self, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        W = weight if weight.dim() == 2 else weight.reshape(weight.shape[0], -1)  # 2-D: no call (hot path)
        if bias is None:
            return W
        return torch.cat([W, bias.unsqueeze(1) if bias.dim() == 1 else bias.reshape(W.shape[0], 1)], dim=1)

    def shape(self, weight_shape: Sequence[int], bias_shape: Optional[Sequence[int]] = None) -> tuple[int, int]:
        """(m, n) of ``matrix`` for these parameter shapes, without parameter memory."""
        if type(self).matrix is LayerView.matrix:
            rows = int(weight_shape[0])
            return rows, math.prod(weight_shape) // max(rows, 1) + (0 if bias_shape is None else 1)
        # another layout: ask it, on uninitialized one-byte stand-ins (meta tensors would do, but
        # their first torch.cat costs seconds of lazy imports)
        probe = lambda s: torch.empty(tuple(s), dtype=torch.uint8)  # noqa: E731
        m, n = self.matrix(probe(weight_shape), None if bias_shape is None else probe(bias_shape)).shape
        return int(m), int(n)

    def split(self, Y: Tensor, weight_shape: Sequence[int],
              bias_shape: Optional[Sequence[int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        if bias_shape is None:
            return _as_shape(Y, weight_shape), None
        return _as_shape(Y[:, :-1], weight_shape), _as_shape(Y[:, -1], bias_shape)

    # ---- Kronecker factors (KFAC, EKFAC) --------------------------------------------------
    def has_kronecker_factors(self, module: nn.Module) -> bool:
        """Whether ``input_rows``/``output_rows`` are defined for this module (False: the KFAC
        baselines give its parameters plain SGD with momentum)."""
        return False

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no Kronecker factors")

    def output_rows(self, module: nn.Module, gy: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} defines no Kronecker factors")


def _as_shape(t: Tensor, shape: Sequence[int]) -> Tensor:
    """``t.reshape(shape)``, without the call when ``t`` has that shape already (the usual case of
    a Linear layer, on every optimizer step)."""
    return t if t.shape == tuple(shape) else t.reshape(shape)


class LinearView(LayerView):
    """nn.Linear: y = x Wᵀ + b over any leading dims (each leading position is one row)."""

    name = "linear"

    def has_kronecker_factors(self, module: nn.Module) -> bool:
        return True

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def output_rows(self, module: nn.Module, gy: Tensor) -> Tensor:
        return gy.reshape(-1, gy.shape[-1])


def _unfold_nd(x: Tensor, kernel, dilation, padding, stride) -> Tensor:
    """F.unfold for any number of spatial dims: (N, C, *spatial) → (N, C·K, L), K = Πkernel, the
    columns in the order of a (out, C, *kernel) weight flattened per output channel."""
    x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
    out = [(s - d * (k - 1) - 1) // st + 1 for s, k, d, st in zip(x.shape[2:], kernel, dilation, stride)]
    taps = [
        x[(slice(None), slice(None)) + tuple(slice(o * d, o * d + st * (n - 1) + 1, st)
                                             for o, d, st, n in zip(offset, dilation, stride, out))]
        for offset in itertools.product(*(range(k) for k in kernel))
    ]
    return torch.stack(taps, dim=2).reshape(x.shape[0], x.shape[1] * len(taps), -1)


class ConvView(LayerView):
    """nn.Conv1d/2d/3d: weight (out, in/groups, *kernel) read as (out, in/groups·Πkernel).

    Kronecker factors for ``groups == 1`` and zero padding given as numbers: the inputs are the
    unfolded patches (one row per example and output location), the output gradients one row per
    example and location (Grosse & Martens 2016).
    """

    name = "conv"

    def has_kronecker_factors(self, module: nn.Module) -> bool:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def input_rows(self, module: nn.Module, x: Tensor) -> Tensor:
        kernel, dilation = tuple(module.kernel_size), tuple(module.dilation)
        padding, stride = tuple(module.padding), tuple(module.stride)
        if x.dim() == len(kernel) + 1:  # unbatched input
            x = x.unsqueeze(0)
        if len(kernel) == 1:  # a 2-D convolution of height 1
            x = x.unsqueeze(2)
            kernel, dilation, padding, stride = (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
        if len(kernel) == 2:
            patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        else:
            patches = _unfold_nd(x, kernel, dilation, padding, stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·L, in·Πkernel)

    def output_rows(self, module: nn.Module, gy: Tensor) -> Tensor:
        if gy.dim() == len(module.kernel_size) + 1:  # unbatched
            gy = gy.unsqueeze(0)
        return gy.movedim(1, -1).reshape(-1, gy.shape[1])


class EmbeddingView(LayerView):
    """nn.Embedding: weight (V, d) as it is, rows = vocabulary entries, no bias.

    APO keeps A fixed to the identity on the vocabulary side and learns B (d, d). No Kronecker
    factors: its input factor is the diagonal matrix of token frequencies, which a dense V×V factor
    and its inverse would spend O(V²) memory and O(V³) time on; KFAC and EKFAC give embeddings
    SGD with momentum.
    """

    name = "embedding"
    learn_left = False

    def params(self, module: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return module.weight, None


class AttentionInProjView(LayerView):
    """nn.MultiheadAttention's packed input projection: in_proj_weight (3E, E) and in_proj_bias,
    the query, key and value projections stacked, read as one (3E, E + 1) matrix, as three
    nn.Linear layers would be. A module built with separate q/k/v weights (kdim or vdim ≠ E) has
    no packed weight and is no layer (its weights go per parameter). Its ``out_proj`` is an
    nn.Linear child, a layer of its own. No Kronecker factors: the projection runs inside
    ``F.multi_head_attention_forward``, where no module hook sees its inputs."""

    name = "attention_in_proj"

    def params(self, module: nn.Module) -> tuple[Optional[Tensor], Optional[Tensor]]:
        return module.in_proj_weight, module.in_proj_bias


_VIEWS: dict[type, LayerView] = {}


def register_layer(module_type: type, view: LayerView) -> None:
    """Make ``module_type`` (and its subclasses without an entry of their own) a layer read by
    ``view``; registering a type again replaces its view."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if not isinstance(view, LayerView):
        raise TypeError(f"view must be a LayerView, got {type(view).__name__}")
    _VIEWS[module_type] = view


def view_of(module: nn.Module) -> Optional[LayerView]:
    """The view of the most specific registered class of ``module``, None if it is not a layer."""
    for cls in type(module).__mro__:
        if cls in _VIEWS:
            return _VIEWS[cls]
    return None


def registered_layers() -> dict[type, LayerView]:
    """A copy of the registry (module type → view)."""
    return dict(_VIEWS)


register_layer(nn.Linear, LinearView())
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, ConvView())
register_layer(nn.Embedding, EmbeddingView())
register_layer(nn.MultiheadAttention, AttentionInProjView())


@dataclass(eq=False)
class Layer:
    """One module's weight (+ bias) bound to its view; ``module`` is None for a parameter that no
    layer owns and a caller views as a matrix itself."""

    name: str
    module: Optional[nn.Module]
    view: LayerView
    weight: Tensor
    bias: Optional[Tensor] = None

    @property
    def params(self) -> list[Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the layer's matrix."""
        return self.view.shape(self.weight.shape, None if self.bias is None else self.bias.shape)

    def matrix(self, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """The (m, n) matrix of tensors shaped like (weight, bias); bias is required when the
        layer has one."""
        if self.bias is not None and bias is None:
            raise ValueError(f"bias: layer {self.name!r} has a bias, its matrix needs a bias-shaped tensor")
        return self.view.matrix(weight, bias if self.bias is not None else None)

    def split(self, Y: Tensor) -> list[Tensor]:
        """An (m, n) matrix back to tensors shaped like ``params``."""
        w, b = self.view.split(Y, self.weight.shape, None if self.bias is None else self.bias.shape)
        return [w] if self.bias is None else [w, b]


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(m, n) of a registered module's matrix, bias column included when it has a bias (works on
    modules built on the ``meta`` device)."""
    view = view_of(module)
    if view is None:
        raise TypeError(f"module: {type(module).__name__} is not a registered layer type")
    weight, bias = view.params(module)
    return view.shape(weight.shape, None if bias is None else bias.shape)


SHARED_POLICIES = ("first_owner", "exclude")


def find_layers(model: nn.Module, *, shared: str, kronecker: bool = False) -> list[Layer]:
    """The registered layers of ``model`` with a trainable weight, in module order.

    ``kronecker=True`` keeps only layers with Kronecker factors. ``shared`` decides what happens to
    a parameter several modules hold (tied weights):

    - ``"first_owner"`` (APO): the first layer that holds it takes it, later ones are skipped (a
      tied weight's gradient, summed over its uses, is preconditioned once), and a later layer
      keeps its other parameters (its bias then goes to the caller's per-parameter path).
      Frozen or already taken biases are left out of the matrix.
    - ``"exclude"`` (KFAC, EKFAC): a layer any of whose parameters another module also holds is
      left out: Kronecker factors from one module's activations do not describe a gradient
      summed over several modules.
    """
    if shared not in SHARED_POLICIES:
        raise ValueError(f"shared must be one of {SHARED_POLICIES}, got {shared!r}")
    holders = Counter(id(p) for mod in model.modules() for p in mod._parameters.values() if p is not None)
    claimed: set[int] = set()
    layers = []
    for name, mod in model.named_modules():
        view = view_of(mod)
        if view is None or (kronecker and not view.has_kronecker_factors(mod)):
            continue
        weight, bias = view.params(mod)
        # a weight computed from other tensors (torch.nn.utils.parametrize, pruning's weight_orig ·
        # mask) is not a parameter, and an empty one has no matrix: the module is no layer here, its
        # own parameters go per parameter
        if (not isinstance(weight, Tensor) or not weight.is_leaf or not weight.requires_grad or weight.numel() == 0
                or id(weight) in claimed):
            continue
        if shared == "exclude" and any(holders[id(p)] > 1 for p in (weight, bias) if isinstance(p, Tensor)):
            continue
        if not isinstance(bias, Tensor) or not bias.is_leaf or not bias.requires_grad or id(bias) in claimed:
            bias = None
        layers.append(Layer(name or view.name, mod, view, weight, bias))
        claimed.update(id(p) for p in layers[-1].params)
    return layers
