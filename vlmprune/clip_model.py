"""A full CLIP checkpoint (both towers + projections) in Flax, as HERO's task-relevance score needs it.

    clip = vlmprune.load_clip("openai/clip-vit-large-patch14-336 local dir")
    img = clip.image_features(pixel_values)        # (B, E), HF get_image_features
    txt = clip.text_features(["a red sign"])      # (B, E), HF get_text_features
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import _checks
from vlmprune.config import clip_configs, read_hf_config
from vlmprune.models.clip import CLIPModel
from vlmprune.weights import CLIP_RULES, abstract_params, load_params


class ClipModel:
    """Loaded CLIP: ``image_features``, ``text_features`` (unnormalised projected embeddings)."""

    def __init__(self, module: CLIPModel, params, tokenizer=None):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self._image = jax.jit(functools.partial(module.apply, method=CLIPModel.image_features))
        self._text = jax.jit(functools.partial(module.apply, method=CLIPModel.text_features))

    def image_features(self, pixel_values) -> jax.Array:
        """float (B, C, S, S) CLIP-normalised pixels -> (B, E)."""
        v = self.module.vision
        shape = tuple(np.shape(pixel_values))
        if len(shape) != 4 or shape[1:] != (v.num_channels, v.image_size, v.image_size):
            raise ValueError(f"pixel_values must be (B, {v.num_channels}, {v.image_size}, {v.image_size}), got {shape}")
        _checks.check_finite("pixel_values", pixel_values)
        return self._image({"params": self.params}, jnp.asarray(pixel_values, self.module.dtype))

    def text_features(self, text_or_ids, attention_mask=None) -> jax.Array:
        """A list of strings (tokenized with the checkpoint's tokenizer) or int ids (B, T) -> (B, E).

        Raises ValueError for text longer than the tower's context (77 tokens for CLIP; the HERO original crashes).
        """
        if isinstance(text_or_ids, (str, list, tuple)) and (isinstance(text_or_ids, str) or isinstance(text_or_ids[0], str)):
            if self.tokenizer is None:
                raise ValueError("this CLIP checkpoint has no tokenizer files: pass token ids instead of text")
            texts = [text_or_ids] if isinstance(text_or_ids, str) else list(text_or_ids)
            enc = self.tokenizer(texts, padding=True, return_tensors="np")
            ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        else:
            ids = np.asarray(text_or_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"token ids must be (B, T) with T >= 1, got shape {ids.shape}")
        limit = self.module.text.max_position_embeddings
        if ids.shape[1] > limit:
            raise ValueError(f"text is {ids.shape[1]} tokens long; the CLIP text tower takes at most {limit}")
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return self._text({"params": self.params}, jnp.asarray(ids, jnp.int32), mask)


def load_clip(path: str, *, dtype="float32") -> ClipModel:
    """Load a HF ``CLIPModel`` directory (config.json + safetensors)."""
    from vlmprune.model import _dtype

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a HF CLIP checkpoint)")
    dt = _dtype(dtype)
    vis, txt, proj = clip_configs(read_hf_config(path))
    module = CLIPModel(vis, txt, proj, dtype=dt)
    abstract = abstract_params(
        module, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, vis.num_channels, vis.image_size, vis.image_size), dt)
    )
    params = load_params(path, abstract, CLIP_RULES, dtype=dt)
    tok = None
    if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return ClipModel(module, params, tok)
