"""Input validation shared by the public functions.

Every check runs in Python on static values and shapes, so a bad argument raises a ``ValueError`` that names
the problem before anything is traced or compiled. Data checks (NaN/inf) run only on concrete arrays: inside a
user's own ``jax.jit`` the values are unknown at trace time and the check is skipped (documented per function).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import numpy as np


def is_concrete(x) -> bool:
    """True when x holds actual values (not a tracer under jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def check_int(name: str, value, *, lo: int | None = None, hi: int | None = None, where: str = "") -> int:
    """A static Python int within [lo, hi]."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{prefix}{name} must be a Python int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{prefix}{name} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{prefix}{name} must be <= {hi}, got {value}")
    return value


def check_bool(name: str, value, *, where: str = "") -> bool:
    """A static Python bool (not an int or a NumPy bool)."""
    if not isinstance(value, bool):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{name} must be a bool, got {value!r}")
    return value


def check_float(
    name: str,
    value,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    where: str = "",
) -> float:
    """A static Python/NumPy real within the given (open or closed) bounds."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{prefix}{name} must be a Python float, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{prefix}{name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{prefix}{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise ValueError(f"{prefix}{name} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def check_rank(name: str, x, rank: int, *, where: str = "", dims: str = "") -> None:
    prefix = f"{where}: " if where else ""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise ValueError(f"{prefix}{name} must be an array, got {type(x).__name__}")
    if len(shape) != rank:
        hint = f" {dims}" if dims else ""
        raise ValueError(f"{prefix}{name} must have rank {rank}{hint}, got shape {tuple(shape)}")


def check_dims_equal(pairs: Sequence[tuple[str, int, str, int]], *, where: str = "") -> None:
    """Each (name_a, dim_a, name_b, dim_b) must agree."""
    prefix = f"{where}: " if where else ""
    for na, da, nb, db in pairs:
        if da != db:
            raise ValueError(f"{prefix}{na} ({da}) does not match {nb} ({db})")


def check_finite(name: str, x, *, where: str = "") -> None:
    """Raise if a concrete array holds NaN or inf. Skipped for tracers (values unknown at trace time)."""
    if not is_concrete(x):
        return
    arr = np.asarray(x)
    if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
        prefix = f"{where}: " if where else ""
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"{prefix}{name} contains {bad} NaN/inf value(s)")
