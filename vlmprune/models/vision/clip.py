"""CLIP (the ``clip_vision_model`` family): vision and text towers (flax.linen), numerically matching HF
transformers' ``CLIPModel``, their weight and sharding rules, and the full CLIP model HERO scores with.

The vision tower returns only what LLaVA and the pruning methods consume:

* hidden states (all of them only when asked; otherwise just the layers requested),
* the CLS-query row of the attention probabilities at the layers a method asks for, computed as one row
  ``softmax(q_cls · Kᵀ / √d)`` per head — O(N·d), never an N×N map — while every layer's full attention goes
  through ``vlmprune.models.attention`` (fused ``jax.nn.dot_product_attention`` on GPU/TPU),
* optionally the raw key projections of some layers (VisionZip and PruMerge+ use them).

Parameter names mirror HF's module names so the weight table below stays one line per tensor.

    clip = vlmprune.load_clip("openai/clip-vit-large-patch14-336 local dir")
    img = clip.image_features(pixel_values)        # (B, E), HF get_image_features
    txt = clip.text_features(["a red sign"])      # (B, E), HF get_text_features
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import checks
from vlmprune.io.checkpoint import read_hf_config
from vlmprune.io.dtypes import parse_dtype
from vlmprune.io.weights import Rules, abstract_params, identity, load_params, patch_conv, prefix_rules, transpose
from vlmprune.models.attention import attention
from vlmprune.models.family import VISION, Family, fields_from_hf
from vlmprune.models.vit_encoder import ENCODER_RULES, ENCODER_SHARDING_RULES, mlp_residual
from vlmprune.models.vit_taps import resolve_requests, run_layers
from vlmprune.sharding import ShardingRules

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        """Tokens the tower outputs: the class token, then the patches."""
        return self.num_patches + 1

    @classmethod
    def from_hf(cls, c) -> CLIPVisionConfig:
        return fields_from_hf(cls, c, projection_dim=getattr(c, "projection_dim", 768))


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 2
    projection_dim: int = 768

    @classmethod
    def from_hf(cls, c) -> CLIPTextConfig:
        return fields_from_hf(cls, c, projection_dim=getattr(c, "projection_dim", 768))


class CLIPAttention(nn.Module):
    """Multi-head self-attention with optional CLS-row tap and key tap."""

    hidden_size: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, causal_mask: Array | None = None, cls_row: bool = False, keys: bool = False):
        """x: (B, T, D). causal_mask: bool (B, 1, T, T) or None. Returns (out (B,T,D), cls_attn, raw_keys).

        cls_attn: (B, H, T) float32 softmax probabilities of the CLS query (row 0) over all T keys, or None.
        raw_keys: ((B, T, D) output of k_proj, (B, D) CLS row of q_proj), both before any scaling, or None.
        """
        b, t, d = x.shape
        hd = d // self.num_heads
        dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)  # noqa: E731
        q = dense("q_proj")(x)
        k_raw = dense("k_proj")(x)
        v = dense("v_proj")(x)
        q4 = q.reshape(b, t, self.num_heads, hd)
        k4 = k_raw.reshape(b, t, self.num_heads, hd)
        v4 = v.reshape(b, t, self.num_heads, hd)
        scale = hd**-0.5
        out = attention(q4, k4, v4, mask=causal_mask, scale=scale)
        out = dense("out_proj")(out.reshape(b, t, d))
        cls_attn = None
        if cls_row:
            # One query row per head: (B, H, T). HF scales q before the matmul; so do we.
            logits = jnp.einsum("bhd,bthd->bht", (q4[:, 0] * scale).astype(jnp.float32), k4.astype(jnp.float32))
            cls_attn = jax.nn.softmax(logits, axis=-1)
        return out, cls_attn, ((k_raw, q[:, 0]) if keys else None)


class CLIPEncoderLayer(nn.Module):
    hidden_size: int
    intermediate_size: int
    num_heads: int
    eps: float
    act: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, causal_mask=None, cls_row=False, keys=False):
        h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm1")(x)
        h, cls_attn, k = CLIPAttention(self.hidden_size, self.num_heads, dtype=self.dtype, name="self_attn")(
            h, causal_mask=causal_mask, cls_row=cls_row, keys=keys
        )
        x = mlp_residual(x + h, self.hidden_size, self.intermediate_size, self.eps, self.act, self.dtype)
        return x, cls_attn, k


def encoder_layer(c: CLIPVisionConfig | CLIPTextConfig, dtype, i: int) -> CLIPEncoderLayer:
    """Encoder layer ``layers_{i}`` of either tower, shaped by its config (built inside a compact method)."""
    return CLIPEncoderLayer(
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.layer_norm_eps,
        c.hidden_act,
        dtype=dtype,
        name=f"layers_{i}",
    )


class CLIPVisionTransformer(nn.Module):
    """CLIP ViT. Param tree mirrors HF ``CLIPVisionTransformer`` (``vision_model.*``)."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        pixel_values: Array,
        *,
        hidden_state_layers: tuple[int, ...] = (),
        cls_attention_layers: tuple[int, ...] = (),
        key_layers: tuple[int, ...] = (),
        num_layers: int | None = None,
        output_hidden_states: bool = False,
        post_layernorm: bool = False,
    ) -> dict:
        """Run the tower.

        Args:
          pixel_values: float (B, C, S, S), HF's NCHW layout and normalisation.
          hidden_state_layers: indices into HF's ``hidden_states`` tuple (0 = embeddings after pre-layernorm,
            i = output of encoder layer i-1; negative allowed) whose states to return.
          cls_attention_layers: encoder layer indices (0-based, negative allowed) whose CLS-query attention row
            to return, patch columns only.
          key_layers: encoder layer indices whose raw ``k_proj`` outputs (all tokens) and ``q_proj`` output (CLS
            row) to return; VisionZip and PruMerge(+) score and merge with them.
          num_layers: run only the first ``num_layers`` encoder layers (default: as many as the requests need).
          output_hidden_states: return every hidden state (for parity tests).
          post_layernorm: also return ``pooled`` = post_layernorm(CLS of the last layer run).

        Returns a dict with
          ``hidden_states``: {hf_index: (B, 1+P, D)} for the requested indices (all if output_hidden_states),
          ``cls_attn``: {layer: float32 (B, H, P)}, ``keys``: {layer: (B, 1+P, D)}, ``cls_query``: {layer: (B, D)},
          and ``pooled`` (B, D).

        Raises:
          ValueError (at trace time, before any compile): a layer index out of range or not an int; num_layers
            outside [needed, L] (:func:`vlmprune.models.vit_taps.resolve_requests`).
        """
        c = self.config
        L = c.num_hidden_layers
        hs_idx, idx, n_run = resolve_requests(
            "CLIPVisionTransformer",
            L,
            hidden_state_layers,
            {"cls_attention_layers": cls_attention_layers, "key_layers": key_layers},
            num_layers,
            run_all=output_hidden_states or post_layernorm,
        )

        b, ch, hgt, wid = pixel_values.shape
        p = c.patch_size
        x = pixel_values.astype(self.dtype)
        # Patch "conv" as a matmul over flattened (C, p, p) patches; kernel layout (C*p*p, D).
        x = x.reshape(b, ch, hgt // p, p, wid // p, p).transpose(0, 2, 4, 1, 3, 5)
        x = x.reshape(b, (hgt // p) * (wid // p), ch * p * p)
        x = nn.Dense(c.hidden_size, use_bias=False, dtype=self.dtype, name="patch_embedding")(x)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (c.num_patches + 1, c.hidden_size))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), x], axis=1)
        x = x + pos.astype(self.dtype)[None]
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)

        def make_layer(i):
            return encoder_layer(c, self.dtype, i)

        flags = {"cls_row": idx["cls_attention_layers"], "keys": idx["key_layers"]}
        x, hidden, extras = run_layers(
            self, x, make_layer, L, n_run, hs_idx, flags, output_hidden_states=output_hidden_states
        )
        cls_attn = {i: a[:, :, 1:] for i, a in extras["cls_row"].items()}
        keys = {i: k for i, (k, _) in extras["keys"].items()}
        cls_query = {i: q for i, (_, q) in extras["keys"].items()}
        post = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")
        out = {"hidden_states": hidden, "cls_attn": cls_attn, "keys": keys, "cls_query": cls_query}
        if post_layernorm or self.is_initializing():
            out["pooled"] = post(x[:, 0])
        return out


class CLIPTextTransformer(nn.Module):
    """CLIP text tower. Param tree mirrors HF ``CLIPTextTransformer`` (``text_model.*``)."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> dict:
        """input_ids: int (B, T); attention_mask: (B, T) 1 for real tokens.

        Returns last_hidden (B, T, D), pooled (B, D)."""
        c = self.config
        b, t = input_ids.shape
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (c.max_position_embeddings, c.hidden_size))
        x = tok(input_ids) + pos[:t].astype(self.dtype)[None]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            causal = causal & attention_mask.astype(bool)[:, None, None, :]
        for i in range(c.num_hidden_layers):
            x, _, _ = encoder_layer(c, self.dtype, i)(x, causal_mask=causal)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        if c.eos_token_id == 2:
            # Legacy configs: HF pools at the highest token id (the EOT token of the original vocabulary).
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = x[jnp.arange(b), eos_pos]
        return {"last_hidden": x, "pooled": pooled}


class CLIPModel(nn.Module):
    """Full CLIP (both towers and projections), as HERO's task-relevance score needs."""

    vision: CLIPVisionConfig
    text: CLIPTextConfig
    projection_dim: int = 768
    dtype: Any = jnp.float32

    def setup(self):
        self.vision_model = CLIPVisionTransformer(self.vision, dtype=self.dtype)
        self.text_model = CLIPTextTransformer(self.text, dtype=self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        return self.image_features(pixel_values), self.text_features(input_ids, attention_mask)

    def image_features(self, pixel_values: Array) -> Array:
        """(B, C, S, S) -> projected, unnormalised image embeddings (B, E), as HF ``get_image_features``."""
        return self.visual_projection(self.vision_model(pixel_values, post_layernorm=True)["pooled"])

    def text_features(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """(B, T) -> projected, unnormalised text embeddings (B, E), as HF ``get_text_features``."""
        return self.text_projection(self.text_model(input_ids, attention_mask)["pooled"])


def clip_configs(hf) -> tuple[CLIPVisionConfig, CLIPTextConfig, int]:
    """(vision, text, projection_dim) of a HF ``CLIPConfig``."""
    if hf.model_type != "clip":
        raise ValueError(f"expected a full CLIP checkpoint (model_type 'clip'), got {hf.model_type!r}")
    return CLIPVisionConfig.from_hf(hf.vision_config), CLIPTextConfig.from_hf(hf.text_config), int(hf.projection_dim)


# ---------------------------------------------------------------------------------------------- weights, sharding

# HF ``CLIPEncoderLayer`` i -> ``layers_i`` (shared by both towers).

# HF ``CLIPVisionTransformer`` keys -> :class:`CLIPVisionTransformer` params.
WEIGHT_RULES: Rules = [
    (r"embeddings\.patch_embedding\.weight", "patch_embedding/kernel", patch_conv),
    (r"embeddings\.class_embedding", "class_embedding", identity),
    (r"embeddings\.position_embedding\.weight", "position_embedding", identity),
    (r"(pre_layrnorm|post_layernorm)\.weight", r"\1/scale", identity),
    (r"(pre_layrnorm|post_layernorm)\.bias", r"\1/bias", identity),
    *ENCODER_RULES,
]

# HF ``CLIPTextTransformer`` keys -> :class:`CLIPTextTransformer` params.
TEXT_WEIGHT_RULES: Rules = [
    (r"embeddings\.token_embedding\.weight", "token_embedding/embedding", identity),
    (r"embeddings\.position_embedding\.weight", "position_embedding", identity),
    (r"final_layer_norm\.weight", "final_layer_norm/scale", identity),
    (r"final_layer_norm\.bias", "final_layer_norm/bias", identity),
    *ENCODER_RULES,
]

# HF ``CLIPModel`` keys -> :class:`CLIPModel` params.
CLIP_RULES: Rules = [
    *prefix_rules(WEIGHT_RULES, "vision_model.", "vision_model"),
    *prefix_rules(TEXT_WEIGHT_RULES, "text_model.", "text_model"),
    (r"visual_projection\.weight", "visual_projection/kernel", transpose),
    (r"text_projection\.weight", "text_projection/kernel", transpose),
]

# Tensor parallel over heads and MLP width: q/k/v and fc1 split by columns, out_proj and fc2 by rows.
SHARDING_RULES: ShardingRules = ENCODER_SHARDING_RULES

FAMILY = Family(
    name="CLIP",
    kind=VISION,
    config=CLIPVisionConfig,
    module=CLIPVisionTransformer,
    weight_rules=WEIGHT_RULES,
    sharding_rules=SHARDING_RULES,
)


# ---------------------------------------------------------------------------------------------- full CLIP, loaded


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
        checks.check_finite("pixel_values", pixel_values)
        return self._image({"params": self.params}, jnp.asarray(pixel_values, self.module.dtype))

    def text_features(self, text_or_ids, attention_mask=None) -> jax.Array:
        """A list of strings (tokenized with the checkpoint's tokenizer) or int ids (B, T) -> (B, E).

        Raises ValueError for text longer than the tower's context (77 tokens for CLIP; the HERO original crashes).
        """
        if isinstance(text_or_ids, (str, list, tuple)) and (
            isinstance(text_or_ids, str) or isinstance(text_or_ids[0], str)
        ):
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
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a HF CLIP checkpoint)")
    dt = parse_dtype(dtype)
    vis, txt, proj = clip_configs(read_hf_config(path))
    module = CLIPModel(vis, txt, proj, dtype=dt)
    abstract = abstract_params(
        module, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, vis.num_channels, vis.image_size, vis.image_size), dt)
    )
    params = load_params(path, abstract, CLIP_RULES, dtype=dt)
    tok = None
    if any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer  # heavy (pulls in torch): only when the checkpoint ships one

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return ClipModel(module, params, tok)
