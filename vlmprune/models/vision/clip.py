"""CLIP vision and text towers (flax.linen), numerically matching HF transformers' ``CLIPModel``.

The vision tower returns only what LLaVA and the pruning methods consume:

* hidden states (all of them only when asked; otherwise just the layers requested),
* the CLS-query row of the attention probabilities at the layers a method asks for, computed as one row
  ``softmax(q_cls · Kᵀ / √d)`` per head — O(N·d), never an N×N map — while every layer's full attention goes
  through ``vlmprune.models.attention`` (fused ``jax.nn.dot_product_attention`` on GPU/TPU),
* optionally the raw key projections of some layers (VisionZip and PruMerge+ use them).

Parameter names mirror HF's module names so the weight table in ``vlmprune.weights`` stays one line per tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmprune.models.attention import attention

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

    @classmethod
    def from_hf(cls, c) -> "CLIPVisionConfig":
        return cls(
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            image_size=c.image_size,
            patch_size=c.patch_size,
            num_channels=c.num_channels,
            layer_norm_eps=c.layer_norm_eps,
            hidden_act=c.hidden_act,
            projection_dim=getattr(c, "projection_dim", 768),
        )


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
    def from_hf(cls, c) -> "CLIPTextConfig":
        return cls(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            max_position_embeddings=c.max_position_embeddings,
            layer_norm_eps=c.layer_norm_eps,
            hidden_act=c.hidden_act,
            eos_token_id=c.eos_token_id,
            projection_dim=getattr(c, "projection_dim", 768),
        )


def activation(name: str):
    """HF activation names -> jax functions (exact variants, not approximations HF does not use)."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "silu":
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r}")


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
        x = x + h
        h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="layer_norm2")(x)
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(h)
        h = activation(self.act)(h)
        h = nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(h)
        return x + h, cls_attn, k


def _layer_index(layer: int, num_layers: int) -> int:
    idx = layer + num_layers if layer < 0 else layer
    if not 0 <= idx < num_layers:
        raise ValueError(f"layer index {layer} out of range for {num_layers} encoder layers")
    return idx


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
        """
        c = self.config
        L = c.num_hidden_layers
        hs_idx = tuple(sorted({_layer_index(i, L + 1) for i in hidden_state_layers}))
        attn_idx = tuple(sorted({_layer_index(i, L) for i in cls_attention_layers}))
        key_idx = tuple(sorted({_layer_index(i, L) for i in key_layers}))
        need = max([0, *hs_idx] + [i + 1 for i in attn_idx + key_idx])
        if output_hidden_states or post_layernorm:
            need = L
        n_run = need if num_layers is None else num_layers

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

        hidden, cls_attn, keys, cls_query = {}, {}, {}, {}
        if output_hidden_states or 0 in hs_idx:
            hidden[0] = x
        for i in range(L):
            layer = CLIPEncoderLayer(
                c.hidden_size, c.intermediate_size, c.num_attention_heads, c.layer_norm_eps, c.hidden_act,
                dtype=self.dtype, name=f"layers_{i}",
            )
            if i >= n_run:
                # Instantiate the params (so init builds the full tree) without running the layer.
                if self.is_initializing():
                    layer(x)
                continue
            x, a, k = layer(x, cls_row=i in attn_idx, keys=i in key_idx)
            if a is not None:
                cls_attn[i] = a[:, :, 1:]
            if k is not None:
                keys[i], cls_query[i] = k
            if output_hidden_states or (i + 1) in hs_idx:
                hidden[i + 1] = x
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
        """input_ids: int (B, T); attention_mask: (B, T) 1 for real tokens. Returns last_hidden (B,T,D), pooled (B,D)."""
        c = self.config
        b, t = input_ids.shape
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="token_embedding")
        pos = self.param("position_embedding", nn.initializers.normal(0.02), (c.max_position_embeddings, c.hidden_size))
        x = tok(input_ids) + pos[:t].astype(self.dtype)[None]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if attention_mask is not None:
            causal = causal & attention_mask.astype(bool)[:, None, None, :]
        for i in range(c.num_hidden_layers):
            x, _, _ = CLIPEncoderLayer(
                c.hidden_size, c.intermediate_size, c.num_attention_heads, c.layer_norm_eps, c.hidden_act,
                dtype=self.dtype, name=f"layers_{i}",
            )(x, causal_mask=causal)
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
