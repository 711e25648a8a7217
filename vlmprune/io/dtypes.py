"""The parameter dtypes a checkpoint can be loaded in, by name."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype) -> Any:
    """A name of :data:`DTYPES` or a dtype-like -> the jnp scalar type. ValueError for an unknown name."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def dtype_name(dtype) -> str:
    """The :data:`DTYPES` name of a dtype-like (``jnp.bfloat16`` -> ``"bfloat16"``)."""
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return name
