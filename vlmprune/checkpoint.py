"""Loading HF LLaVA directories and saving/restoring converted checkpoints (orbax)."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from vlmprune.config import LlavaConfig, check_json_files, read_hf_config
from vlmprune.safe_output import OutputKind, staged_dir, write_marker
from vlmprune.weights import (
    LLAVA_RENAMES, LLAVA_RULES, CheckpointError, abstract_params, array_problems, load_params, numpy_dtype,
)

FORMAT_FILE = "vlmprune.json"
PARAMS_DIR = "params"
#: what ``LlavaModel.save`` / ``vlmprune convert`` write, recognised by its marker file
ORBAX_CHECKPOINT = OutputKind(FORMAT_FILE, "vlmprune-orbax", "vlmprune checkpoint")


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

    check_json_files(path, [f for f in sorted(os.listdir(path)) if f.endswith(".json") and f != "config.json"
                            and not f.startswith("model.safetensors")])
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - name the directory and the processor files
        names = [f for f in sorted(os.listdir(path)) if f.endswith(".json") and f != "config.json"
                 and not f.startswith("model.safetensors")]
        raise ValueError(f"{path}: the processor/tokenizer files could not be read ({', '.join(names)}): "
                         f"{type(e).__name__}: {e}") from e


def load_config(path: str):
    """(HF config, ``LlavaConfig``) of a checkpoint directory, every field range-checked (no weights read)."""
    hf = read_hf_config(path)
    return hf, LlavaConfig.from_hf(hf, source=os.path.join(path, "config.json"))


def load_model(path: str, *, dtype, mesh=None, check_finite: bool = True):
    """Load a HF LLaVA directory or a vlmprune (orbax) checkpoint; ``check_finite`` scans weights for NaN/inf."""
    from vlmprune.model import LlavaModel
    from vlmprune.models.llava import Llava

    hf, cfg = load_config(path)
    module = Llava(cfg, dtype=dtype)
    abstract = _abstract(module, cfg)
    if os.path.exists(os.path.join(path, FORMAT_FILE)):
        params = _restore_orbax(path, abstract, dtype, check_finite=check_finite)
    else:
        params = load_params(
            path, abstract, LLAVA_RULES, renames=LLAVA_RENAMES, dtype=dtype, check_finite=check_finite,
            tied=("language_model/lm_head/kernel", "language_model/embed_tokens/embedding"),
        )
    name = {jnp.float32: "float32", jnp.bfloat16: "bfloat16", jnp.float16: "float16"}[dtype]
    return LlavaModel(cfg, params, dtype=name, processor=load_processor(path), hf_config=hf, mesh=mesh)


def save_model(model, directory: str, *, overwrite: bool = False, protect=(), flag: str = "overwrite=True") -> None:
    """Write params (orbax), the HF config and processor into ``directory``.

    Only into an absent or empty directory, or one holding an earlier vlmprune checkpoint (replaced whole);
    any other directory needs ``overwrite=True`` (see ``vlmprune.safe_output``). Everything is written into a
    temporary sibling first and renamed into place when complete.

    Raises:
      OutputExistsError: the directory holds other files (nothing is written).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    with staged_dir(directory, ORBAX_CHECKPOINT, overwrite=overwrite, protect=protect, flag=flag) as tmp:
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(tmp, PARAMS_DIR), model.params)
        model.hf_config.save_pretrained(tmp)
        if model.processor is not None:
            model.processor.save_pretrained(tmp)
        write_marker(tmp, ORBAX_CHECKPOINT, version=1, params=PARAMS_DIR)


def _restore_orbax(path: str, abstract, dtype, *, check_finite: bool = True):
    import orbax.checkpoint as ocp
    from flax.traverse_util import flatten_dict, unflatten_dict

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
    cast = {}
    for k in sorted(set(want) & set(got)):
        if tuple(np.shape(got[k])) != tuple(want[k].shape):
            continue
        target = numpy_dtype(dtype) if jnp.issubdtype(want[k].dtype, jnp.floating) else np.dtype(want[k].dtype)
        arr, bad = array_problems(k, np.asarray(got[k]), target, check_finite=check_finite, where=PARAMS_DIR)
        problems += bad
        cast[k] = arr
    if problems:
        raise CheckpointError(path, problems)
    return unflatten_dict({tuple(k.split("/")): jnp.asarray(v) for k, v in cast.items()})
