"""HF safetensors -> Flax params through a table of ``regex -> (param path, transform)``, and back.

The machinery only: each model family owns its table (``vlmprune.models.vision.clip``, ``...text.llama``) and a
composite model prefixes and joins them (``vlmprune.models.llava``). Renames normalise other key layouts first.
Every missing, unexpected, mis-shaped, non-float or non-finite tensor (and every unreadable file) is collected and
reported in one error, naming the tensor and its file; unreadable files lead.
The param tree's shapes come from ``jax.eval_shape`` so nothing is allocated twice, and with ``shardings`` each
tensor goes from the file straight to its devices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from vlmprune.io.safetensors import iter_tensors, list_files


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        head = f"{source}: {len(problems)} problem(s) loading the checkpoint:"
        super().__init__("\n  - ".join([head, *problems]))


@dataclasses.dataclass(frozen=True)
class Transform:
    """One re-layout HF tensor -> param, with the shape it produces and its inverse (used by the export)."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # HF shape -> param shape, read from file headers
    inverse: Callable[[Any, tuple[int, ...]], Any]  # (param, HF shape) -> HF tensor

    def __call__(self, w: np.ndarray) -> np.ndarray:
        return self.forward(w)


# torch ``Linear`` weight (out, in) -> flax ``Dense`` kernel (in, out)
transpose = Transform("transpose", lambda w: w.T, lambda s: tuple(s)[::-1], lambda a, s: a.T)
# patch convolution (D, C, p, p) -> ``Dense`` kernel (C*p*p, D) over flattened (C, p, p) patches
patch_conv = Transform(
    "patch_conv", lambda w: w.reshape(w.shape[0], -1).T, lambda s: (math.prod(s[1:]), s[0]), lambda a, s: a.T.reshape(s)
)
identity = Transform("identity", lambda w: w, tuple, lambda a, s: a)


# One rule: (regex over a normalised HF key, param path template with ``\1`` groups, its Transform).
Rules = list[tuple[str, str, Transform]]


def prefix_rules(rules: Rules, src: str, dst: str) -> Rules:
    """``rules`` of a sub-model moved under the HF key prefix ``src`` (e.g. ``"vision_tower."``) and the param
    path prefix ``dst`` (e.g. ``"vision_tower"``; ``""`` keeps the paths as they are)."""
    return [(re.escape(src) + pat, f"{dst}/{tmpl}" if dst else tmpl, fn) for pat, tmpl, fn in rules]


# Buffers some checkpoints carry that have no parameter counterpart.
IGNORED = [r".*rotary_emb\.inv_freq$", r".*embeddings\.position_ids$", r"^logit_scale$"]


class _RuleTable:
    """Compiled ``rules`` + ``renames``: maps one HF key to ``(param path, transform)``, or IGNORE / None."""

    IGNORE = ("", None)

    def __init__(self, rules, renames):
        self.rules = [(re.compile(p + "$"), t, f) for p, t, f in rules]
        self.renames = renames
        self.ignored = [re.compile(p) for p in IGNORED]

    def match(self, key: str):
        norm = key
        for pat, rep in self.renames:
            norm = re.sub(pat, rep, norm)
        if any(p.match(norm) for p in self.ignored):
            return self.IGNORE
        for pat, tmpl, fn in self.rules:
            m = pat.match(norm)
            if m:
                return m.expand(tmpl), fn
        return None


def _plan_tensors(directory: str, expected: dict, table: _RuleTable, tied) -> tuple[dict, list[str]]:
    """From the file headers alone: which tensor (file, key, transform) fills each param, and every problem
    (unreadable files first, then unexpected, non-float, mis-shaped, duplicate and missing tensors)."""
    plan: dict[str, tuple] = {}  # target -> (file, key, transform)
    seen: set[str] = set()  # targets present in the checkpoint, even if mis-shaped or refused
    problems: list[str] = []
    file_problems: list[str] = []  # unreadable files: reported first, their missing tensors summarised
    files = list_files(directory)
    for key, f in iter_tensors(files, file_problems):
        fname = f.path.rsplit("/", 1)[-1]
        hit = table.match(key)
        if hit is None:
            problems.append(f"unexpected tensor {key!r} {list(f.shape(key))} in {fname}")
            continue
        if hit is _RuleTable.IGNORE:
            continue
        target, fn = hit
        if target not in expected:
            problems.append(f"unexpected tensor {key!r} (maps to {target!r}, which this model config does not have)")
            continue
        seen.add(target)
        if jnp.issubdtype(expected[target].dtype, jnp.floating) and f.dtype(key) not in FLOAT_DTYPES:
            problems.append(
                f"tensor {key!r} in {fname} has dtype {f.dtype(key)}, not a floating-point type "
                f"({', '.join(FLOAT_DTYPES)}); quantised or integer weights are not supported"
            )
            continue
        shape = tuple(fn.shape(f.shape(key)))
        want = tuple(expected[target].shape)
        if shape != want:
            problems.append(
                f"shape mismatch for {key!r}: checkpoint {list(f.shape(key))} (as {list(shape)}) "
                f"but the config expects {list(want)} at {target!r}"
            )
            continue
        if target in plan:
            problems.append(f"duplicate tensor for {target!r} (key {key!r})")
            continue
        plan[target] = (f, key, fn)
    if tied is not None:
        tgt, src = tied
        if tgt in expected and tgt not in plan and src in plan:
            f, key, fn = plan[src]
            plan[tgt] = (f, key, _then_transpose(fn))
    missing = sorted(set(expected) - set(plan) - seen)
    if file_problems and missing:
        # the unreadable file(s) explain the missing tensors: one line instead of one per tensor
        shown = ", ".join(repr(m) for m in missing[:3])
        problems.insert(
            0, f"{len(missing)} parameter(s) were not loaded because of the unreadable file(s) above (e.g. {shown})"
        )
    else:
        problems += [f"missing tensor for parameter {m!r} {list(expected[m].shape)}" for m in missing]
    return plan, file_problems + problems


def load_params(
    directory: str,
    abstract_params: dict,
    rules,
    *,
    renames: list[tuple[str, str]] = (),
    dtype=jnp.float32,
    tied: tuple[str, str] | None = None,
    shardings: dict | None = None,
    check_finite: bool = True,
) -> dict:
    """Read a HF safetensors directory into a param pytree shaped like ``abstract_params``.

    Every key, shape and dtype is checked from the file headers before any tensor is read.

    Args:
      directory: HF checkpoint directory (single file or sharded with ``model.safetensors.index.json``).
      abstract_params: pytree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape(module.init, ...)``).
      rules: (regex over the normalised HF key, param path template with ``\\1`` groups, :class:`Transform`).
      renames: (regex, replacement) applied to every HF key first (other layouts -> the one ``rules`` use).
      dtype: floating dtype of the result.
      tied: (target, source) param paths: fill target with source.T when the checkpoint lacks it.
      shardings: optional pytree of ``jax.sharding.Sharding`` shaped like ``abstract_params``: each tensor is
        built shard by shard on its devices (``jax.make_array_from_callback``) and never lands on the default
        device first. None: every tensor on the default device.
      check_finite: scan every tensor for NaN/inf (and for values that overflow ``dtype``); off for speed only.

    Raises:
      CheckpointError: listing every missing, unexpected, mis-shaped, non-float or non-finite tensor and every
        unreadable file; unreadable files come first and the tensors they would have held are summarised in
        one line.
    """
    expected = {"/".join(k): v for k, v in flatten_dict(abstract_params).items()}
    plan, problems = _plan_tensors(directory, expected, _RuleTable(rules, renames), tied)
    if problems:
        raise CheckpointError(directory, problems)
    placement = {} if shardings is None else {"/".join(k): v for k, v in flatten_dict(shardings).items()}
    flat = {}
    for k, (f, key, fn) in plan.items():
        floating = jnp.issubdtype(expected[k].dtype, jnp.floating)
        want_dtype = numpy_dtype(dtype) if floating else np.dtype(expected[k].dtype)
        arr, bad = array_problems(
            key, fn(f.get(key)), want_dtype, check_finite=check_finite, where=f.path.rsplit("/", 1)[-1]
        )
        problems += bad
        if not bad:
            flat[tuple(k.split("/"))] = _place(arr, want_dtype, placement.get(k))
    if problems:
        raise CheckpointError(directory, problems)
    return unflatten_dict(flat)


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def numpy_dtype(dtype) -> np.dtype:
    """A jnp/np dtype (or scalar type) as a NumPy dtype (bfloat16 via ml_dtypes, as jnp uses it)."""
    return np.dtype(jnp.dtype(dtype))


def array_problems(
    name: str, arr: np.ndarray, target: np.dtype, *, check_finite: bool = True, where: str = ""
) -> tuple[np.ndarray, list[str]]:
    """Cast one loaded tensor to ``target`` and say what is wrong with it.

    Returns ``(arr as target, problems)``; problems name ``name`` (and ``where``, the file) for a non-float
    tensor where a float one is needed, NaN/inf values (when ``check_finite``), and values that become
    infinite in ``target`` (e.g. float32 weights beyond float16's 65504).
    """
    loc = f" in {where}" if where else ""
    target = np.dtype(target)
    if jnp.issubdtype(target, jnp.floating) and not jnp.issubdtype(arr.dtype, jnp.floating):
        return arr, [
            f"tensor {name!r}{loc} has dtype {arr.dtype}, not a floating-point type; quantised or integer "
            "weights are not supported"
        ]
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
        out = arr.astype(target, copy=False)
    if not check_finite or not jnp.issubdtype(target, jnp.floating):
        return out, []
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        return out, [
            f"tensor {name!r}{loc} holds {bad} NaN/inf value(s) of {arr.size} (a corrupt or diverged "
            "checkpoint; pass check_finite=False / --no-weight-scan to load it anyway)"
        ]
    over = int(out.size - np.count_nonzero(np.isfinite(out)))
    if over:
        big = float(np.max(np.abs(arr.astype(np.float64))))
        return out, [
            f"tensor {name!r}{loc} has {over} value(s) beyond the {target.name} range (largest |x| = "
            f"{big:.4g}); load it in float32 or bfloat16"
        ]
    return out, []


def _then_transpose(fn: Transform) -> Transform:
    return Transform(
        f"{fn.name}.T", lambda w: fn(w).T, lambda s: tuple(fn.shape(s))[::-1], lambda a, s: fn.inverse(a.T, s)
    )


def _place(arr: np.ndarray, dtype, sharding) -> jax.Array:
    """One host tensor as a jax array of ``dtype``: on the default device, or built shard by shard on its
    devices (each device receives only its slice; also right on several hosts, where every host reads the file
    and fills its own devices)."""
    if sharding is None:
        return jnp.asarray(arr, dtype=dtype)
    host = np.asarray(arr, dtype=dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def abstract_params(module, *args) -> dict:
    """Param shapes without allocating: ``jax.eval_shape`` of ``module.init``."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))
    return shapes["params"]


def iter_export(
    params: dict,
    hf_shapes: dict[str, tuple[int, ...]],
    rules: Rules,
    *,
    renames: list[tuple[str, str]] = (),
    convert: Callable | None = None,
) -> Iterator[tuple[str, Any]]:
    """Flax params -> HF tensors, the inverse of :func:`load_params` through the same rule table.

    Args:
      params: the param pytree (arrays of any backend).
      hf_shapes: ``{hf_key: shape}`` of the target HF model (e.g. from a PyTorch ``state_dict()``); the keys may
        use any layout ``renames`` normalises.
      rules, renames: as for :func:`load_params`.
      convert: applied to each leaf before it is re-laid out (default: ``np.asarray``); e.g. ``torch.from_dlpack``
        to keep the tensors on the accelerator.

    Yields:
      ``(hf_key, tensor)`` for every key of ``hf_shapes`` that is not an ignored buffer, one at a time, so a
      caller can copy each into its model and drop it (a 13B model is never held twice over).

    Raises:
      CheckpointError: every HF key no rule maps, mapped to a missing param, or whose shape disagrees; raised
        before the first tensor is converted.
    """
    convert = np.asarray if convert is None else convert
    flat = {"/".join(k): v for k, v in flatten_dict(params).items()}
    table = _RuleTable(rules, renames)
    plan, problems = [], []
    for key, shape in hf_shapes.items():
        hit = table.match(key)
        if hit is None:
            problems.append(f"no rule maps HF tensor {key!r} {list(shape)}")
            continue
        if hit is _RuleTable.IGNORE:
            continue
        target, fn = hit
        if target not in flat:
            problems.append(f"HF tensor {key!r} maps to {target!r}, which the params do not have")
            continue
        have = tuple(flat[target].shape)
        want = tuple(fn.shape(tuple(shape)))
        if have != want:
            problems.append(
                f"shape mismatch for {key!r}: HF expects {list(shape)}, params have {list(have)} at {target!r}"
            )
            continue
        plan.append((key, target, fn, tuple(shape)))
    if problems:
        raise CheckpointError("export", problems)
    for key, target, fn, shape in plan:
        yield key, fn.inverse(convert(flat[target]), shape)


def export_params(params: dict, hf_shapes: dict[str, tuple[int, ...]], rules, *, renames=(), convert=None) -> dict:
    """``dict(iter_export(...))``: every HF tensor at once (see :func:`iter_export`)."""
    return dict(iter_export(params, hf_shapes, rules, renames=renames, convert=convert))
