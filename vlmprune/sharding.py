"""Multi-device placement: partition rules for the param tree on a ``jax.sharding.Mesh``.

Tensor parallelism splits attention heads and MLP width over the mesh axis ``"model"`` (column-parallel input
projections, row-parallel output projections, Megatron style); data parallelism splits the batch over ``"data"``.
XLA's sharding propagation does the rest inside the jitted forward, prefill and decode: results are the same as on
one device up to floating-point reduction order.

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    model = vlmprune.load(path, mesh=mesh)

Multi-host (TPU pods, several GPU hosts): call ``jax.distributed.initialize()`` on every host first, build the mesh
over ``jax.devices()`` (all hosts' devices), and run the same program on every host.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# regex over "/"-joined param paths -> spec of the param's dims (None = replicated)
RULES: list[tuple[str, tuple]] = [
    (r".*/(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|linear_1)/kernel$", (None, "model")),
    (r".*/(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|linear_1)/bias$", ("model",)),
    (r".*/(o_proj|out_proj|down_proj|fc2|linear_2)/kernel$", ("model", None)),
    (r"language_model/embed_tokens/embedding$", ("model", None)),
    (r"language_model/lm_head/kernel$", (None, "model")),
]


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for one param: the first matching rule, replicated where a dim does not divide evenly."""
    for pattern, spec in RULES:
        if re.match(pattern, path):
            dims = []
            for size, axis in zip(shape, spec):
                ok = axis is not None and axis in mesh.shape and size % mesh.shape[axis] == 0
                dims.append(axis if ok else None)
            return P(*dims)
    return P()


def shard_params(params: dict, mesh: Mesh) -> dict:
    """Place every param on ``mesh`` according to ``RULES``."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = sorted(set(mesh.axis_names) - {"data", "model"})
    if unknown:
        raise ValueError(f"mesh axes must be named 'data' and/or 'model', got {mesh.axis_names}")
    types = getattr(mesh, "axis_types", None) or ()
    if any(str(t).endswith("Explicit") for t in types):
        raise ValueError("mesh axes must be AxisType.Auto (XLA propagates shardings inside the model): "
                         "jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))")
    flat = flatten_dict(params)
    out = {}
    for k, v in flat.items():
        spec = param_spec("/".join(k), tuple(np.shape(v)), mesh)
        out[k] = jax.device_put(v, NamedSharding(mesh, spec))
    return unflatten_dict(out)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Split the leading (batch) dim over ``"data"`` when it divides evenly, else replicate."""
    if "data" in mesh.shape and shape and shape[0] % mesh.shape["data"] == 0:
        return NamedSharding(mesh, P("data", *([None] * (len(shape) - 1))))
    return NamedSharding(mesh, P())
