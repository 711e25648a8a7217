"""HF safetensors -> Flax params through one table of ``regex -> (param path, transform)``.

Both llava-hf key layouts are accepted: the pre-4.52 ``language_model.model.*`` / ``vision_tower.*`` /
``multi_modal_projector.*`` and the newer ``model.language_model.*`` / ``model.vision_tower.*``. Every missing,
unexpected, mis-shaped, non-float or non-finite tensor (and every unreadable file) is collected and reported in
one error, naming the tensor and its file.
The param tree's shapes come from ``jax.eval_shape`` so nothing is allocated twice.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from vlmprune.safetensors_io import iter_tensors, list_files


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        head = f"{source}: {len(problems)} problem(s) loading the checkpoint:"
        super().__init__("\n  - ".join([head, *problems]))


def _t(w):  # torch Linear (out, in) -> flax Dense kernel (in, out)
    return w.T


def _conv(w):  # patch conv (D, C, p, p) -> Dense kernel (C*p*p, D)
    return w.reshape(w.shape[0], -1).T


def _id(w):
    return w


def _clip_rules(src: str, dst: str) -> list[tuple[str, str, Callable]]:
    """Rules for one CLIP transformer under HF prefix ``src`` and param prefix ``dst``."""
    s = re.escape(src)
    layer = rf"{s}encoder\.layers\.(\d+)\."
    return [
        (rf"{s}embeddings\.patch_embedding\.weight", f"{dst}/patch_embedding/kernel", _conv),
        (rf"{s}embeddings\.class_embedding", f"{dst}/class_embedding", _id),
        (rf"{s}embeddings\.position_embedding\.weight", f"{dst}/position_embedding", _id),
        (rf"{s}embeddings\.token_embedding\.weight", f"{dst}/token_embedding/embedding", _id),
        (rf"{s}(pre_layrnorm|post_layernorm|final_layer_norm)\.weight", dst + r"/\1/scale", _id),
        (rf"{s}(pre_layrnorm|post_layernorm|final_layer_norm)\.bias", dst + r"/\1/bias", _id),
        (layer + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight", dst + r"/layers_\1/self_attn/\2/kernel", _t),
        (layer + r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.bias", dst + r"/layers_\1/self_attn/\2/bias", _id),
        (layer + r"(layer_norm1|layer_norm2)\.weight", dst + r"/layers_\1/\2/scale", _id),
        (layer + r"(layer_norm1|layer_norm2)\.bias", dst + r"/layers_\1/\2/bias", _id),
        (layer + r"mlp\.(fc1|fc2)\.weight", dst + r"/layers_\1/\2/kernel", _t),
        (layer + r"mlp\.(fc1|fc2)\.bias", dst + r"/layers_\1/\2/bias", _id),
    ]


_LLAMA = r"model\.language_model\."
LLAVA_RULES: list[tuple[str, str, Callable]] = [
    *_clip_rules("model.vision_tower.vision_model.", "vision_tower"),
    (r"model\.multi_modal_projector\.(linear_1|linear_2)\.weight", r"multi_modal_projector/\1/kernel", _t),
    (r"model\.multi_modal_projector\.(linear_1|linear_2)\.bias", r"multi_modal_projector/\1/bias", _id),
    (r"model\.image_newline", "image_newline", _id),
    (_LLAMA + r"embed_tokens\.weight", "language_model/embed_tokens/embedding", _id),
    (_LLAMA + r"norm\.weight", "language_model/norm/weight", _id),
    (_LLAMA + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.weight",
     r"language_model/layers_\1/self_attn/\2/kernel", _t),
    (_LLAMA + r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.bias",
     r"language_model/layers_\1/self_attn/\2/bias", _id),
    (_LLAMA + r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"language_model/layers_\1/mlp/\2/kernel", _t),
    (_LLAMA + r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.bias", r"language_model/layers_\1/mlp/\2/bias", _id),
    (_LLAMA + r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
     r"language_model/layers_\1/\2/weight", _id),
    (r"lm_head\.weight", "language_model/lm_head/kernel", _t),
]

# Old (pre-4.52) llava-hf prefixes -> new ones.
LLAVA_RENAMES = [
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
    # transformers 5.x flattens CLIPVisionModel and saves "vision_tower.embeddings.*" (no "vision_model.").
    (r"^model\.vision_tower\.(?!vision_model\.)", "model.vision_tower.vision_model."),
]

CLIP_RULES: list[tuple[str, str, Callable]] = [
    *_clip_rules("vision_model.", "vision_model"),
    *_clip_rules("text_model.", "text_model"),
    (r"visual_projection\.weight", "visual_projection/kernel", _t),
    (r"text_projection\.weight", "text_projection/kernel", _t),
]

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


def load_params(
    directory: str,
    abstract_params: dict,
    rules: list[tuple[str, str, Callable]],
    *,
    renames: list[tuple[str, str]] = (),
    dtype=jnp.float32,
    tied: tuple[str, str] | None = None,
    check_finite: bool = True,
) -> dict:
    """Read a HF safetensors directory into a param pytree shaped like ``abstract_params``.

    Args:
      directory: HF checkpoint directory (single file or sharded with ``model.safetensors.index.json``).
      abstract_params: pytree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape(module.init, ...)``).
      rules: (regex over the normalised HF key, param path template with ``\\1`` groups, numpy transform).
      renames: (regex, replacement) applied to every HF key first (old layouts -> new).
      dtype: floating dtype of the result.
      tied: (target, source) param paths: fill target with source.T when the checkpoint lacks it.
      check_finite: scan every tensor for NaN/inf (and for values that overflow ``dtype``); off for speed only.

    Raises:
      CheckpointError: listing every missing, unexpected, mis-shaped, non-float or non-finite tensor and every
        unreadable file; unreadable files come first and the tensors they would have held are summarised in
        one line.
    """
    expected = {"/".join(k): v for k, v in flatten_dict(abstract_params).items()}
    table = _RuleTable(rules, renames)
    out: dict[str, np.ndarray] = {}
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
        floating = jnp.issubdtype(expected[target].dtype, jnp.floating)
        if floating and f.dtype(key) not in FLOAT_DTYPES:
            problems.append(f"tensor {key!r} in {fname} has dtype {f.dtype(key)}, not a floating-point type "
                            f"({', '.join(FLOAT_DTYPES)}); quantised or integer weights are not supported")
            continue
        want = tuple(expected[target].shape)
        if _transformed_shape(fn, f.shape(key)) != want:
            problems.append(f"shape mismatch for {key!r}: checkpoint {list(f.shape(key))} "
                            f"(as {list(_transformed_shape(fn, f.shape(key)))}) but the config expects {list(want)} "
                            f"at {target!r}")
            continue
        if target in out:
            problems.append(f"duplicate tensor for {target!r} (key {key!r})")
            continue
        want_dtype = numpy_dtype(dtype) if floating else np.dtype(expected[target].dtype)
        arr, bad = array_problems(key, fn(f.get(key)), want_dtype, check_finite=check_finite, where=fname)
        problems += bad
        out[target] = arr
    if tied is not None:
        tgt, src = tied
        if tgt in expected and tgt not in out and src in out:
            out[tgt] = out[src].T
    missing = sorted(set(expected) - set(out) - seen)
    if file_problems and missing:
        # the unreadable file(s) explain the missing tensors: one line instead of one per tensor
        shown = ", ".join(repr(m) for m in missing[:3])
        problems.insert(0, f"{len(missing)} parameter(s) were not loaded because of the unreadable file(s) above "
                           f"(e.g. {shown})")
    else:
        for m in missing:
            problems.append(f"missing tensor for parameter {m!r} {list(expected[m].shape)}")
    problems = file_problems + problems
    if problems:
        raise CheckpointError(directory, problems)
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in out.items()})


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def numpy_dtype(dtype) -> np.dtype:
    """A jnp/np dtype (or scalar type) as a NumPy dtype (bfloat16 via ml_dtypes, as jnp uses it)."""
    return np.dtype(jnp.dtype(dtype))


def array_problems(name: str, arr: np.ndarray, target: np.dtype, *, check_finite: bool = True,
                   where: str = "") -> tuple[np.ndarray, list[str]]:
    """Cast one loaded tensor to ``target`` and say what is wrong with it.

    Returns ``(arr as target, problems)``; problems name ``name`` (and ``where``, the file) for a non-float
    tensor where a float one is needed, NaN/inf values (when ``check_finite``), and values that become
    infinite in ``target`` (e.g. float32 weights beyond float16's 65504).
    """
    loc = f" in {where}" if where else ""
    target = np.dtype(target)
    if jnp.issubdtype(target, jnp.floating) and not jnp.issubdtype(arr.dtype, jnp.floating):
        return arr, [f"tensor {name!r}{loc} has dtype {arr.dtype}, not a floating-point type; quantised or integer "
                     "weights are not supported"]
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
        out = arr.astype(target, copy=False)
    if not check_finite or not jnp.issubdtype(target, jnp.floating):
        return out, []
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        return out, [f"tensor {name!r}{loc} holds {bad} NaN/inf value(s) of {arr.size} (a corrupt or diverged "
                     "checkpoint; pass check_finite=False / --no-weight-scan to load it anyway)"]
    over = int(out.size - np.count_nonzero(np.isfinite(out)))
    if over:
        big = float(np.max(np.abs(arr.astype(np.float64))))
        return out, [f"tensor {name!r}{loc} has {over} value(s) beyond the {target.name} range (largest |x| = "
                     f"{big:.4g}); load it in float32 or bfloat16"]
    return out, []


def _transformed_shape(fn: Callable, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a loading transform gives a tensor of ``shape`` (checked before the data is read)."""
    shape = tuple(shape)
    if fn is _t:
        return shape[::-1]
    if fn is _conv:
        return (math.prod(shape[1:]), shape[0]) if shape else shape
    return shape


def abstract_params(module, *args) -> dict:
    """Param shapes without allocating: ``jax.eval_shape`` of ``module.init``."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))
    return shapes["params"]


def _inverse(fn: Callable, arr, shape: tuple[int, ...]):
    """Undo a loading transform: Flax layout -> the HF tensor of ``shape``."""
    if fn is _t:
        arr = arr.T
    elif fn is _conv:
        arr = arr.T.reshape(shape)
    return arr


def iter_export(
    params: dict,
    hf_shapes: dict[str, tuple[int, ...]],
    rules: list[tuple[str, str, Callable]],
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
        want = tuple(shape)
        if fn is _t:
            want = want[::-1]
        elif fn is _conv:
            want = (math.prod(want[1:]), want[0])
        if have != want:
            problems.append(f"shape mismatch for {key!r}: HF expects {list(shape)}, params have {list(have)} "
                            f"at {target!r}")
            continue
        plan.append((key, target, fn, tuple(shape)))
    if problems:
        raise CheckpointError("export", problems)
    for key, target, fn, shape in plan:
        yield key, _inverse(fn, convert(flat[target]), shape)


def export_params(params: dict, hf_shapes: dict[str, tuple[int, ...]], rules, *, renames=(), convert=None) -> dict:
    """``dict(iter_export(...))``: every HF tensor at once (see :func:`iter_export`)."""
    return dict(iter_export(params, hf_shapes, rules, renames=renames, convert=convert))
