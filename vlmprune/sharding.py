"""Multi-device placement: partition rules for a param tree on a ``jax.sharding.Mesh``.

Tensor parallelism splits attention heads and MLP width over the mesh axis ``"model"`` (column-parallel input
projections, row-parallel output projections, Megatron style); data parallelism splits the batch over ``"data"``.
XLA's sharding propagation does the rest inside the jitted forward, prefill and decode: results are the same as on
one device up to floating-point reduction order.

Each model family owns its rules (``SHARDING_RULES`` in ``vlmprune/models/vision/*.py``, ``.../text/*.py``),
written relative to its own module; a composite model prefixes them (:func:`prefix_rules`).

    mesh = jax.make_mesh((2, 4), ("data", "model"))
    model = vlmprune.load(path, mesh=mesh)

A mesh with ``Explicit`` axis types (the default of ``jax.make_mesh``) is converted to ``Auto`` axes over the
same devices (:func:`check_mesh`): the model relies on XLA propagating shardings between the placed params and
inputs. Multi-host (TPU pods, several GPU hosts): call ``jax.distributed.initialize()`` on every host first, build
the mesh over ``jax.devices()`` (all hosts' devices), and run the same program on every host.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")

# (regex over "/"-joined param paths, spec of the param's dims: a mesh axis name or None = replicated)
ShardingRules = list[tuple[str, tuple]]


def prefix_rules(rules: ShardingRules, prefix: str) -> ShardingRules:
    """``rules`` of a sub-module placed at param path ``prefix`` (e.g. ``"language_model"``)."""
    return [(re.escape(prefix) + "/" + pattern, spec) for pattern, spec in rules]


def check_mesh(mesh) -> Mesh:
    """``mesh`` with axes named "data" and/or "model", as a mesh of ``Auto`` axis types over the same devices.

    Raises:
      ValueError: not a ``Mesh``, or other axis names.
    """
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = sorted(set(mesh.axis_names) - set(AXES))
    if unknown:
        raise ValueError(f"mesh axes must be named 'data' and/or 'model', got {mesh.axis_names}")
    types = tuple(getattr(mesh, "axis_types", None) or ())
    if all(t == AxisType.Auto for t in types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: ShardingRules) -> P:
    """PartitionSpec for one param: the first matching rule, replicated where a dim does not divide evenly."""
    for pattern, spec in rules:
        if re.match(pattern + "$", path):
            dims = []
            for size, axis in zip(shape, spec, strict=False):  # a shorter spec replicates the rest
                ok = axis is not None and axis in mesh.shape and size % mesh.shape[axis] == 0
                dims.append(axis if ok else None)
            return P(*dims)
    return P()


def param_shardings(abstract: dict, mesh, rules: ShardingRules) -> dict:
    """A ``NamedSharding`` per leaf of ``abstract`` (anything with ``.shape``: arrays or ``ShapeDtypeStruct``)."""
    mesh = check_mesh(mesh)
    flat = flatten_dict(abstract)
    return unflatten_dict(
        {k: NamedSharding(mesh, param_spec("/".join(k), tuple(np.shape(v)), mesh, rules)) for k, v in flat.items()}
    )


def shard_params(params: dict, mesh, rules: ShardingRules) -> dict:
    """Place every param on ``mesh`` according to ``rules`` (already placed leaves are not copied)."""
    return jax.tree.map(jax.device_put, params, param_shardings(params, mesh, rules))


def batch_sharding(mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Split the leading (batch) dim over ``"data"`` when it divides evenly, else replicate."""
    mesh = check_mesh(mesh)
    if "data" in mesh.shape and shape and shape[0] % mesh.shape["data"] == 0:
        return NamedSharding(mesh, P("data", *([None] * (len(shape) - 1))))
    return NamedSharding(mesh, P())
