"""Checkpoint directories: HF config and processor files, and converted checkpoints saved/restored with orbax.

Model-agnostic: the model side (``vlmprune.models.llava``) decides what to build and hands over the param shapes
(and optionally their shardings).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from vlmprune.io.safe_output import OutputKind, staged_dir, write_marker
from vlmprune.io.weights import CheckpointError

FORMAT_FILE = "vlmprune.json"
PARAMS_DIR = "params"
#: what ``LlavaModel.save`` / ``vlmprune convert`` write, recognised by its marker file
ORBAX_CHECKPOINT = OutputKind(FORMAT_FILE, "vlmprune-orbax", "vlmprune checkpoint")


def read_hf_config(path: str):
    """HF config object for a checkpoint directory, via AutoConfig (local files only)."""
    from transformers import AutoConfig  # heavy (pulls in torch): only when a directory is read

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(
            f"{path}: no config.json (expected a Hugging Face LLaVA directory or a vlmprune checkpoint)"
        )
    check_json_files(path, ["config.json"])
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raise with the file named
        raise ValueError(f"{cfg_file}: could not be read as a transformers config: {e}") from e


def check_json_files(path: str, names=None) -> None:
    """Raise ValueError naming the first of ``names`` (default: every ``*.json`` in ``path``) that is not valid
    JSON, so a broken file is reported by name rather than by the library that trips over it."""
    names = sorted(f for f in os.listdir(path) if f.endswith(".json")) if names is None else names
    for name in names:
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            continue
        try:
            with open(f, encoding="utf-8") as fh:
                json.load(fh)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from None


def load_processor(path: str):
    """The checkpoint's HF processor when it ships tokenizer files, else None."""
    has_tok = any(
        os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if not has_tok:
        return None
    from transformers import AutoProcessor  # heavy (pulls in torch): only when a directory ships a processor

    check_json_files(
        path,
        [
            f
            for f in sorted(os.listdir(path))
            if f.endswith(".json") and f != "config.json" and not f.startswith("model.safetensors")
        ],
    )
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - name the directory and the processor files
        names = [
            f
            for f in sorted(os.listdir(path))
            if f.endswith(".json") and f != "config.json" and not f.startswith("model.safetensors")
        ]
        raise ValueError(
            f"{path}: the processor/tokenizer files could not be read ({', '.join(names)}): {type(e).__name__}: {e}"
        ) from e


def is_converted(path: str) -> bool:
    """True for a directory written by :func:`save_model` (orbax params), False for a HF safetensors one."""
    return os.path.exists(os.path.join(path, FORMAT_FILE))


def save_model(model, directory: str, *, overwrite: bool = False, protect=(), flag: str = "overwrite=True") -> None:
    """Write params (orbax), the HF config and processor into ``directory``.

    Only into an absent or empty directory, or one holding an earlier vlmprune checkpoint (replaced whole);
    any other directory needs ``overwrite=True`` (see ``vlmprune.io.safe_output``). Everything is written into a
    temporary sibling first and renamed into place when complete.

    Raises:
      OutputExistsError: the directory holds other files (nothing is written).
    """
    directory = os.path.abspath(directory)
    with staged_dir(directory, ORBAX_CHECKPOINT, overwrite=overwrite, protect=protect, flag=flag) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, PARAMS_DIR), model.params)
        model.hf_config.save_pretrained(tmp)
        if model.processor is not None:
            model.processor.save_pretrained(tmp)
        write_marker(tmp, ORBAX_CHECKPOINT, version=1, params=PARAMS_DIR)


def restore_params(path: str, abstract, dtype, shardings=None, *, check_finite: bool = True):
    """Params saved by :func:`save_model`, checked against ``abstract`` (pytree of ``jax.ShapeDtypeStruct``).

    The saved tree is compared with ``abstract`` from orbax's metadata before anything is read, every missing,
    unexpected or mis-shaped entry reported at once. Floating leaves are cast to ``dtype``. ``shardings``
    (a pytree like ``abstract``): orbax reads each array straight into its shards. A saved integer tensor where
    the model needs a float one is refused by name; ``check_finite`` also reports NaN/inf values and values that
    overflow ``dtype``, by name (computed where the arrays live, shard by shard).

    Raises:
      CheckpointError: listing every problem.
    """
    target = os.path.join(os.path.abspath(path), PARAMS_DIR)
    if not os.path.isdir(target):
        raise CheckpointError(path, [f"missing params directory {target!r}"])
    try:
        with ocp.StandardCheckpointer() as ckpt:
            meta = ckpt.metadata(target)
            tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
            tree = getattr(tree, "tree", tree)  # a TreeMetadata wraps the nested dict of ArrayMetadata
            _check_tree(path, abstract, tree)
            _check_saved_dtypes(path, abstract, tree)
            if shardings is None:
                restored = ckpt.restore(target)
            else:
                saved = {"/".join(k): v for k, v in flatten_dict(tree).items()}
                place = {"/".join(k): v for k, v in flatten_dict(shardings).items()}
                cast = lambda d: dtype if jnp.issubdtype(d, jnp.floating) else d  # noqa: E731
                want = jax.tree_util.tree_map_with_path(
                    lambda p, a: jax.ShapeDtypeStruct(a.shape, cast(saved[_key(p)].dtype), sharding=place[_key(p)]),
                    abstract,
                )
                restored = ckpt.restore(target, want)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(path, [f"orbax could not restore {target!r}: {e}"]) from e
    cast = jax.tree.map(
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x), restored
    )
    if check_finite:
        _check_finite(path, restored, cast, dtype)
    return cast


def _check_saved_dtypes(path: str, abstract, saved) -> None:
    want = {"/".join(k): v for k, v in flatten_dict(abstract).items()}
    got = {"/".join(k): v for k, v in flatten_dict(saved).items()}
    problems = [
        f"tensor {k!r} in {PARAMS_DIR} has dtype {got[k].dtype}, not a floating-point type; quantised or "
        "integer weights are not supported"
        for k in sorted(want)
        if jnp.issubdtype(want[k].dtype, jnp.floating) and not jnp.issubdtype(got[k].dtype, jnp.floating)
    ]
    if problems:
        raise CheckpointError(path, problems)


def _check_finite(path: str, restored, cast, dtype) -> None:
    saved = {"/".join(k): v for k, v in flatten_dict(restored).items()}
    problems = []
    for k, x in sorted({"/".join(k): v for k, v in flatten_dict(cast).items()}.items()):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            continue
        bad = int(x.size - jnp.count_nonzero(jnp.isfinite(saved[k])))
        if bad:
            problems.append(
                f"tensor {k!r} in {PARAMS_DIR} holds {bad} NaN/inf value(s) of {x.size} (a corrupt or "
                "diverged checkpoint; pass check_finite=False / --no-weight-scan to load it anyway)"
            )
            continue
        over = int(x.size - jnp.count_nonzero(jnp.isfinite(x)))
        if over:
            problems.append(
                f"tensor {k!r} in {PARAMS_DIR} has {over} value(s) beyond the {jnp.dtype(dtype).name} "
                "range; load it in float32 or bfloat16"
            )
    if problems:
        raise CheckpointError(path, problems)


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _check_tree(path: str, abstract, saved) -> None:
    want = {"/".join(k): v for k, v in flatten_dict(abstract).items()}
    got = {"/".join(k): v for k, v in flatten_dict(saved).items()}
    problems = [f"missing tensor for parameter {k!r}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected tensor {k!r}" for k in sorted(set(got) - set(want))]
    problems += [
        f"shape mismatch at {k!r}: checkpoint {list(got[k].shape)}, config {list(want[k].shape)}"
        for k in sorted(set(want) & set(got))
        if tuple(got[k].shape) != tuple(want[k].shape)
    ]
    if problems:
        raise CheckpointError(path, problems)
