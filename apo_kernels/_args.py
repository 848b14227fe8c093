"""Argument checks shared by the optimizers and baselines: one exception type per kind of mistake.

A value of the wrong type raises TypeError, a value of the right type outside its range or set
raises ValueError, and every message starts with the argument's name. ``bool`` is never a number
(``True`` is an int to Python, never a learning rate to a user), and a Tensor is never a plain
number: hyperparameters are Python scalars.
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
from typing import Any, Callable, Optional, Sequence

__all__ = ["FLOAT32_MAX", "check_number", "check_int", "check_choice", "check_bool", "check_pair", "check_type",
           "check_optimizer_state_shapes", "cli_int", "cli_ints", "cli_device"]


# the largest float32: a coefficient that scales float32 tensors (torch's alpha=, a weight decay, an
# lr bound) above it makes torch raise "value cannot be converted to type float without overflow"
# at the first step, naming nothing
FLOAT32_MAX = 3.4028234663852886e38


def _range_text(low, low_ok, high, high_ok) -> str:
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    return (f"{'[' if low_ok and low is not None else '('}{left}, "
            f"{right}{']' if high_ok and high is not None else ')'}")


def check_number(name: str, value: Any, *, low: Optional[float] = 0.0, low_ok: bool = True,
                 high: Optional[float] = None, high_ok: bool = True) -> float:
    """A finite real number in the given range (``low``/``high`` None: unbounded; ``*_ok``: the
    bound itself is allowed), returned as float. Default range: [0, inf)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = not math.isfinite(v)
    if low is not None:
        bad = bad or (v < low if low_ok else v <= low)
    if high is not None:
        bad = bad or (v > high if high_ok else v >= high)
    if bad:
        raise ValueError(f"{name} must be a finite number in {_range_text(low, low_ok, high, high_ok)}, got {value!r}")
    return v


def check_int(name: str, value: Any, *, low: Optional[int] = None) -> int:
    """An integer (not a bool), at least ``low`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of the given strings."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_pair(name: str, value: Any, **number_range) -> tuple[float, float]:
    """Two numbers (a tuple or list), each checked by ``check_number`` with ``number_range``."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{name} must be a pair of numbers, got {type(value).__name__} {value!r}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers, got {len(value)} values")
    return tuple(check_number(f"{name}[{i}]", v, **number_range) for i, v in enumerate(value))


def check_type(name: str, value: Any, types, what: str):
    """``value`` is an instance of ``types``; ``what`` says what was expected, for the message."""
    if not isinstance(value, types):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def check_optimizer_state_shapes(state: dict, params: Sequence, expected: Callable[[Any, str], tuple],
                                 what: str = "") -> None:
    """A torch.optim ``state_dict`` (``state``, ``param_groups``) against the parameters it is loaded
    into: every saved tensor of more than 0 dims has the shape ``expected(param, key)`` gives
    (torch.optim loads any shape, and the step that reads it fails later). ValueError naming
    ``state_dict``, the entry and the parameter's index; ``what`` names whose state it is."""
    saved_ids = [i for g in state.get("param_groups", []) for i in g.get("params", [])]
    for i, p in zip(saved_ids, params):
        for key, v in state.get("state", {}).get(i, {}).items():
            shape = tuple(getattr(v, "shape", ()))
            if not shape:  # not a tensor, or a 0-d one (a step count)
                continue
            want = tuple(expected(p, key))
            if shape != want:
                raise ValueError(f"state_dict: {what}{key!r} of parameter {i} has shape {shape} where {want} "
                                 f"expected (a different model?)")


# --------------------------------------------------------------------------------------------
# Command-line flags (apo-bench, the scripts under python/): argparse ``type=`` callables. argparse
# turns their ArgumentTypeError into its usage line and a message naming the flag, exit status 2,
# before anything runs.
# --------------------------------------------------------------------------------------------
def cli_int(low: int = 1) -> Callable[[str], int]:
    """An integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def cli_ints(text: str) -> list[int]:
    """A comma list of at least one positive integer (sizes, widths)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def cli_device(text: str, *, auto: bool = False) -> str:
    """cpu, cuda or cuda:N, and "auto" where ``auto`` (whether that CUDA device exists is the
    caller's check, with torch)."""
    if text in ("cpu", "cuda") or re.fullmatch(r"cuda:\d+", text) or (auto and text == "auto"):
        return text
    raise argparse.ArgumentTypeError(f"expected {'auto, ' if auto else ''}cpu, cuda or cuda:N, got {text!r}")
