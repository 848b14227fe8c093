"""Real layer sets as the gradient matrices APO-Precond sees: the layers are built (on the ``meta``
device: shapes only, no memory) and read through the layer registry (``apo_kernels.layers``), so a
conv is (c_out, c_in·k·k [+1 for a bias]) exactly as the optimizers view it."""
from __future__ import annotations

import random

from torch import nn

from ..layers import matrix_shape

__all__ = ["resnet18_shapes", "transformer_shapes", "small_layers", "layer_set"]

_META = dict(device="meta")


def resnet18_shapes(width_mult: float = 1.0, num_classes: int = 1000) -> list[tuple[int, int]]:
    """ResNet-18's 20 convs + fc: conv weights (c_out, c_in·k·k) (no bias: BN follows), fc with bias.

    ``width_mult`` scales every channel count (1.0 = the real network: up to 512 × 4608).
    """
    c = [max(1, int(round(w * width_mult))) for w in (64, 128, 256, 512)]
    layers = [nn.Conv2d(3, c[0], 7, stride=2, padding=3, bias=False, **_META)]  # stem 7×7
    cin = c[0]
    for stage, cout in enumerate(c):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, **_META))
            layers.append(nn.Conv2d(cout, cout, 3, padding=1, bias=False, **_META))
            if stride == 2:
                layers.append(nn.Conv2d(cin, cout, 1, stride=2, bias=False, **_META))  # 1×1 downsample
            cin = cout
    layers.append(nn.Linear(c[3], num_classes, **_META))
    return [matrix_shape(m) for m in layers]


def transformer_shapes(d_model: int = 768, n_layers: int = 12, mlp_ratio: int = 4) -> list[tuple[int, int]]:
    """A stack of pre-LN blocks: qkv (3d, d+1), out-proj (d, d+1), fc1 (r·d, d+1), fc2 (d, r·d+1)."""
    h = mlp_ratio * d_model
    block = [nn.Linear(d_model, 3 * d_model, **_META), nn.Linear(d_model, d_model, **_META),
             nn.Linear(d_model, h, **_META), nn.Linear(h, d_model, **_META)]
    return [matrix_shape(m) for m in block] * n_layers


def small_layers(count: int = 64, lo: int = 32, hi: int = 128, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` layers of random sizes in [lo, hi]: the layer set of the grouped-vs-loop target."""
    rng = random.Random(seed)
    return [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(count)]


def layer_set(name: str, scale: str) -> tuple[str, list[tuple[int, int]]]:
    """A named set at a device/mode scale: "gpu" (real sizes), "cpu" (full CPU run), "quick"."""
    if name == "resnet18":
        mult = {"gpu": 1.0, "cpu": 0.25, "quick": 0.125}[scale]
        return f"resnet18(width×{mult:g})", resnet18_shapes(mult)
    if name == "transformer12":
        d = {"gpu": 768, "cpu": 256, "quick": 64}[scale]
        return f"transformer 12 blocks (d={d})", transformer_shapes(d, 12)
    if name == "small64":
        return "64 layers 32–128", small_layers(64)
    raise ValueError(f"unknown layer set {name!r}")
