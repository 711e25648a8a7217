"""The benchmarks' one timer and one stats schema, and the machine description both suites record.

Stats (every timed figure in the JSON outputs): ``{"median", "min", "max", "n", "spread", "iqr"}`` in the figure's
unit (ms, or tokens/s for rates); ``spread`` is half the range over the median, ``iqr`` the interquartile range.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import numpy as np

#: the selection alone is timed over at least this many calls: it takes milliseconds, and its median is the
#: numerator of a target (share of the encoder's time) that 3 calls on a noisy host leave ~10 % uncertain
SELECTION_REPEATS = 20


def stats(xs) -> dict | None:
    """The stats of samples ``xs`` (None for none)."""
    if len(xs) == 0:
        return None
    a = np.asarray(xs, float)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    med = float(med)
    return {
        "median": med,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
        "spread": float((a.max() - a.min()) / 2 / med) if med else 0.0,
        "iqr": float(q3 - q1),
    }


def median(x):
    """The median of a stats dict (a bare number passes through; None stays None)."""
    return x.get("median") if isinstance(x, dict) else x


def jax_sync(x):
    return jax.block_until_ready(x)


def torch_sync(x):
    import torch  # optional dependency: only the PyTorch sides load it

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def timed(fn: Callable[[], Any], sync: Callable[[Any], Any] = jax_sync) -> tuple[float, Any]:
    """(seconds, output) of one call of ``fn``, its result synchronised."""
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - t0, out


def measure(jfn, tfn=None, *, repeats: int, warmup: int, scale: float = 1e3, invert: float | None = None):
    """Time ``jfn`` (JAX) and ``tfn`` (PyTorch, optional) with their calls interleaved (J, T, J, T, ...) so that
    background load hits both alike. Returns (JAX stats, PyTorch stats or None).

    Figures are ms (``scale``); with ``invert=k`` a rate ``k / seconds`` instead.
    """
    js, ts = [], []
    for i in range(warmup + repeats):
        dj, _ = timed(jfn, jax_sync)
        dt = timed(tfn, torch_sync)[0] if tfn is not None else None
        if i >= warmup:
            js.append(invert / dj if invert else dj * scale)
            if dt is not None:
                ts.append(invert / dt if invert else dt * scale)
    return stats(js), stats(ts)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """Host, device and library versions (torch's only where it is already imported)."""
    dev = jax.devices()[0]
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "host_cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "backend": dev.platform,
        "device": dev.device_kind,
        "devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
        "load_average": load_average(),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info.update(
            torch=torch.__version__,
            torch_threads=torch.get_num_threads(),
            omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
        )
    return info
