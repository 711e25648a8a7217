"""Loading HF LLaVA directories and saving/restoring converted checkpoints (orbax)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from vlmprune.config import LlavaConfig, read_hf_config
from vlmprune.weights import LLAVA_RENAMES, LLAVA_RULES, CheckpointError, abstract_params, load_params

FORMAT_FILE = "vlmprune.json"
PARAMS_DIR = "params"


def _abstract(module, cfg: LlavaConfig):
    v = cfg.vision
    pix = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), module.dtype)
    return abstract_params(module, jnp.zeros((1, 2), jnp.int32), pix)


def load_processor(path: str):
    """The checkpoint's HF processor when it ships tokenizer files, else None."""
    has_tok = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not has_tok:
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path, local_files_only=True)


def load_model(path: str, *, dtype, mesh=None):
    from vlmprune.model import LlavaModel
    from vlmprune.models.llava import Llava

    hf = read_hf_config(path)
    cfg = LlavaConfig.from_hf(hf)
    module = Llava(cfg, dtype=dtype)
    abstract = _abstract(module, cfg)
    if os.path.exists(os.path.join(path, FORMAT_FILE)):
        params = _restore_orbax(path, abstract, dtype)
    else:
        params = load_params(
            path, abstract, LLAVA_RULES, renames=LLAVA_RENAMES, dtype=dtype,
            tied=("language_model/lm_head/kernel", "language_model/embed_tokens/embedding"),
        )
    name = {jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16"}[dtype]
    return LlavaModel(cfg, params, dtype=name, processor=load_processor(path), hf_config=hf, mesh=mesh)


def save_model(model, directory: str) -> None:
    import orbax.checkpoint as ocp

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


def _restore_orbax(path: str, abstract, dtype):
    import orbax.checkpoint as ocp
    from flax.traverse_util import flatten_dict

    target = os.path.join(os.path.abspath(path), PARAMS_DIR)
    if not os.path.isdir(target):
        raise CheckpointError(path, [f"missing params directory {target!r}"])
    try:
        with ocp.StandardCheckpointer() as ckpt:
            meta = ckpt.metadata(target)
            tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
            restored = ckpt.restore(target)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(path, [f"orbax could not restore {target!r}: {e}"]) from e
    del tree
    want = {"/".join(k): v for k, v in flatten_dict(abstract).items()}
    got = {"/".join(k): v for k, v in flatten_dict(restored).items()}
    problems = [f"missing tensor for parameter {k!r}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected tensor {k!r}" for k in sorted(set(got) - set(want))]
    problems += [f"shape mismatch at {k!r}: checkpoint {list(np.shape(got[k]))}, config {list(want[k].shape)}"
                 for k in sorted(set(want) & set(got)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if problems:
        raise CheckpointError(path, problems)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.asarray(x),
                        restored)
