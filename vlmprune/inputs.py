"""Host-side checks of what a caller hands the model: token ids, masks, pixels, the generation length.

Each check runs in NumPy on concrete values before anything is traced, and raises a ``ValueError`` naming the
argument and the problem. Conversions that are done (and are therefore safe) are listed per function; nothing
is clipped or wrapped.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

#: |pixel| above this is refused. Processor outputs are normalised to a few units (CLIP: about -1.8..2.2) and even
#: unnormalised 0..255 floats stay far below it; values beyond it come from a bug and overflow in the tower.
PIXEL_LIMIT = 1e4
#: positions are int32 inside the model
MAX_POSITIONS = 2**31 - 1


def as_array(name: str, x) -> np.ndarray:
    """``x`` as a NumPy array. Lists/tuples are converted with ``np.asarray``; ragged ones are refused."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return np.asarray(x)
    if isinstance(x, (list, tuple)):
        try:
            arr = np.asarray(x)
        except ValueError as e:
            raise ValueError(f"{name} is a ragged nested list ({e}); pass a rectangular array") from None
        if arr.dtype == object:
            raise ValueError(f"{name} is a ragged nested list; pass a rectangular array")
        return arr
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")


def check_token_ids(input_ids, vocab_size: int) -> np.ndarray:
    """input_ids (B, L) of an integer dtype (or a nested list of ints), every id in ``[0, vocab_size)``.

    Returns the ids as a NumPy array. Raises ValueError naming the first bad ids and where they are: an id
    ``>= vocab_size`` would read past the embedding table and a negative one would wrap to another token.
    """
    ids = as_array("input_ids", input_ids)
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must hold integers, got dtype {ids.dtype}")
    if ids.size == 0:
        return ids
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        where = np.argwhere(bad)
        shown = ", ".join(f"{int(ids[tuple(w)])} at {tuple(int(i) for i in w)}" for w in where[:3])
        raise ValueError(
            f"input_ids hold {int(bad.sum())} id(s) outside the vocabulary [0, {vocab_size}): "
            f"{shown}; tokenize with the model's own processor"
        )
    return ids


def check_attention_mask(attention_mask):
    """None, or a (B, L) array of 0/1 (bool or integer); any other value is refused (not cast to bool)."""
    if attention_mask is None:
        return None
    mask = as_array("attention_mask", attention_mask)
    if mask.dtype == bool:
        return mask
    if mask.dtype.kind not in "iuf" or (mask.size and not np.isin(mask, (0, 1)).all()):
        vals = np.unique(mask)[:5] if mask.dtype.kind in "iuf" else mask.dtype
        raise ValueError(f"attention_mask must hold only 0 and 1, got {vals}")
    return mask


def check_pixel_values(pixel_values, name: str = "pixel_values"):
    """Pixels as the processor returns them: floating point, finite, ``|x| <= PIXEL_LIMIT``.

    Conversions: a nested list/tuple of floats becomes a NumPy array; float64 arrays are later rounded to the
    model's dtype. Refused: integer or bool pixels (raw 0..255 images: run the model's processor, which
    normalises them), NaN/inf, and values past ``PIXEL_LIMIT`` (which is below float16's largest value, so no
    accepted pixel becomes infinite in any model dtype). Arrays under a user's ``jax.jit`` (tracers) pass
    through unchecked. ``name`` is the argument the messages name (``pixel_values_videos`` for videos).
    """
    if pixel_values is None:
        raise ValueError(f"{name} is required (one image per <image> placeholder)")
    if isinstance(pixel_values, (list, tuple)):
        pixel_values = as_array(name, pixel_values)
    if not hasattr(pixel_values, "dtype") or not hasattr(pixel_values, "shape"):
        raise ValueError(f"{name} must be an array, got {type(pixel_values).__name__}")
    kind = np.dtype(pixel_values.dtype).kind if _is_numpy_dtype(pixel_values.dtype) else "f"
    if kind in "biu":
        raise ValueError(
            f"{name} has dtype {pixel_values.dtype}; the model takes the processor's normalised "
            "floating-point pixels (raw integer images must go through model.processor first)"
        )
    if kind not in "f" and not _is_float_like(pixel_values.dtype):
        raise ValueError(f"{name} must be floating point, got dtype {pixel_values.dtype}")
    if not _is_concrete(pixel_values):
        return pixel_values
    arr = np.asarray(pixel_values, np.float32) if pixel_values.size else np.asarray(pixel_values)
    finite = np.isfinite(arr)
    if not finite.all():
        raise ValueError(f"{name} contains {int(arr.size - np.count_nonzero(finite))} NaN/inf value(s)")
    big = np.abs(arr) > PIXEL_LIMIT
    if big.any():
        raise ValueError(
            f"{name} has {int(big.sum())} value(s) of magnitude above {PIXEL_LIMIT:g} (largest "
            f"{float(np.abs(arr).max()):.4g}); processor outputs lie within a few units"
        )
    return pixel_values


def kv_cache_bytes(text_config, batch: int, max_len: int, dtype) -> int:
    """Bytes of the KV cache for ``batch`` rows of ``max_len`` positions: 2 x layers x kv heads x head_dim."""
    t = text_config
    per_pos = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * np.dtype(dtype).itemsize
    return int(batch) * int(max_len) * per_pos


def available_memory(devices=None) -> tuple[int | None, str]:
    """(bytes free for new buffers, where) on the first device (summed over ``devices``); host RAM for CPU."""
    devs = list(devices) if devices is not None else jax.devices()[:1]
    total, names = 0, set()
    for d in devs:
        stats = None
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory stats
            stats = None
        names.add(d.platform)
        if stats and "bytes_limit" in stats:
            total += int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
            continue
        host = _host_available()
        if host is None:
            return None, d.platform
        return host, "host memory"
    return total, f"{len(devs)} {'/'.join(sorted(names))} device(s)"


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_generation_memory(
    text_config, *, batch: int, prompt_len: int, max_new_tokens: int, dtype, devices=None
) -> None:
    """Refuse a ``max_new_tokens`` whose KV cache cannot exist, before anything is allocated.

    The cache holds ``prompt_len + max_new_tokens`` positions per row; it must fit the free memory of the
    device(s) (host RAM on CPU) and the int32 position range.
    """
    length = int(prompt_len) + int(max_new_tokens)
    if length > MAX_POSITIONS:
        raise ValueError(
            f"max_new_tokens={max_new_tokens}: {length} positions exceed the int32 position range ({MAX_POSITIONS})"
        )
    need = kv_cache_bytes(text_config, batch, length, dtype)
    free, where = available_memory(devices)
    if free is not None and need > free:
        raise ValueError(
            f"max_new_tokens={max_new_tokens}: the KV cache for {batch} row(s) x {length} positions needs "
            f"{_gb(need)} ({text_config.num_hidden_layers} layers x 2 x {text_config.num_key_value_heads} heads x "
            f"{text_config.head_dim} x {np.dtype(dtype).name}), more than the {_gb(free)} free on {where}; "
            "lower max_new_tokens"
        )


def check_logits_finite(logits, where: str = "prefill") -> None:
    """Raise when the model produced NaN/inf logits (bad weights or inputs that passed every other check)."""
    arr = np.asarray(logits)
    if not np.isfinite(arr).all():
        raise ValueError(
            f"the {where} produced {int(arr.size - np.count_nonzero(np.isfinite(arr)))} NaN/inf "
            "logit(s): the weights or inputs overflow in this dtype (try float32, or load with the "
            "default weight scan to find a non-finite tensor)"
        )


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _is_numpy_dtype(dt) -> bool:
    try:
        np.dtype(dt)
        return True
    except TypeError:
        return False


def _is_float_like(dt) -> bool:
    try:
        return bool(jnp.issubdtype(dt, jnp.floating))
    except TypeError:
        return False


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)
