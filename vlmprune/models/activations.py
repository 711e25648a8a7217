"""HF activation names as jax functions, shared by the model families."""

from __future__ import annotations

import jax


def activation(name: str):
    """HF activation names -> jax functions (exact variants, not approximations HF does not use)."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r}")
