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

from vlmprune.io.weights import CheckpointError

FORMAT_FILE = "vlmprune.json"
PARAMS_DIR = "params"


def read_hf_config(path: str):
    """HF config object for a checkpoint directory, via AutoConfig (local files only)."""
    from transformers import AutoConfig  # heavy (pulls in torch): only when a directory is read

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face LLaVA directory or a vlmprune checkpoint)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raise with the file named
        raise ValueError(f"{cfg_file}: could not be read as a transformers config: {e}") from e


def load_processor(path: str):
    """The checkpoint's HF processor when it ships tokenizer files, else None."""
    has_tok = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_tok:
        return None
    from transformers import AutoProcessor  # heavy (pulls in torch): only when a directory ships a processor

    return AutoProcessor.from_pretrained(path, local_files_only=True)


def is_converted(path: str) -> bool:
    """True for a directory written by :func:`save_model` (orbax params), False for a HF safetensors one."""
    return os.path.exists(os.path.join(path, FORMAT_FILE))


def save_model(model, directory: str) -> None:
    """Write ``model.params`` with orbax plus ``model.hf_config`` (and ``model.processor``) into ``directory``."""
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, PARAMS_DIR)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(target, model.params, force=True)
    model.hf_config.save_pretrained(directory)
    if model.processor is not None:
        model.processor.save_pretrained(directory)
    with open(os.path.join(directory, FORMAT_FILE), "w") as f:
        json.dump({"format": "vlmprune-orbax", "version": 1, "params": PARAMS_DIR}, f)


def restore_params(path: str, abstract, dtype, shardings=None):
    """Params saved by :func:`save_model`, checked against ``abstract`` (pytree of ``jax.ShapeDtypeStruct``).

    The saved tree is compared with ``abstract`` from orbax's metadata before anything is read, every missing,
    unexpected or mis-shaped entry reported at once. Floating leaves are cast to ``dtype``. ``shardings``
    (a pytree like ``abstract``): orbax reads each array straight into its shards.

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
            if shardings is None:
                restored = ckpt.restore(target)
            else:
                saved = {"/".join(k): v for k, v in flatten_dict(tree).items()}
                place = {"/".join(k): v for k, v in flatten_dict(shardings).items()}
                cast = lambda d: dtype if jnp.issubdtype(d, jnp.floating) else d  # noqa: E731
                want = jax.tree_util.tree_map_with_path(
                    lambda p, a: jax.ShapeDtypeStruct(a.shape, cast(saved[_key(p)].dtype), sharding=place[_key(p)]),
                    abstract)
                restored = ckpt.restore(target, want)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(path, [f"orbax could not restore {target!r}: {e}"]) from e
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x),
                        restored)


def _key(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _check_tree(path: str, abstract, saved) -> None:
    want = {"/".join(k): v for k, v in flatten_dict(abstract).items()}
    got = {"/".join(k): v for k, v in flatten_dict(saved).items()}
    problems = [f"missing tensor for parameter {k!r}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected tensor {k!r}" for k in sorted(set(got) - set(want))]
    problems += [f"shape mismatch at {k!r}: checkpoint {list(got[k].shape)}, config {list(want[k].shape)}"
                 for k in sorted(set(want) & set(got)) if tuple(got[k].shape) != tuple(want[k].shape)]
    if problems:
        raise CheckpointError(path, problems)
