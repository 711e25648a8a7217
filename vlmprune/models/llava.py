"""LLaVA assembly (flax.linen): CLIP tower + ``mlp2x_gelu`` projector + LLaMA decoder.

The module exposes its pieces as methods (``encode``, ``project``, ``embed``, ``prefill``, ``decode_step``) so
that the pruning step can sit between encoder and decoder as a plain array function; see ``vlmprune.model``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmprune.config import LlavaConfig
from vlmprune.models.clip import CLIPVisionTransformer, activation
from vlmprune.models.llama import KVCache, LlamaForCausalLM

Array = jax.Array


class Projector(nn.Module):
    """LLaVA ``mlp2x_gelu``: Linear -> GELU -> Linear."""

    out_dim: int
    act: str = "gelu"
    bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.out_dim, use_bias=self.bias, dtype=self.dtype, name="linear_1")(x)
        x = activation(self.act)(x)
        return nn.Dense(self.out_dim, use_bias=self.bias, dtype=self.dtype, name="linear_2")(x)


class Llava(nn.Module):
    config: LlavaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.vision_tower = CLIPVisionTransformer(c.vision, dtype=self.dtype)
        self.multi_modal_projector = Projector(
            c.text.hidden_size, c.projector_hidden_act, c.projector_bias, dtype=self.dtype
        )
        self.language_model = LlamaForCausalLM(c.text, dtype=self.dtype)
        if c.model_type == "llava_next":
            self.image_newline = self.param("image_newline", nn.initializers.zeros, (c.text.hidden_size,))

    def __call__(self, input_ids, pixel_values):
        """Only used by ``init`` to create every parameter."""
        enc = self.encode(pixel_values, post_layernorm=True)
        emb = self.project(enc["features"])
        text = self.embed(input_ids)
        x = jnp.concatenate([emb.reshape(text.shape[0], -1, text.shape[-1]), text], axis=1)
        n = x.shape[1]
        pos = jnp.broadcast_to(jnp.arange(n), x.shape[:2])
        logits, _, _ = self.language_model(x, pos, jnp.ones(x.shape[:2], bool))
        if self.config.model_type == "llava_next":
            logits = logits + 0 * self.image_newline.sum()
        return logits

    def encode(
        self,
        pixel_values: Array,
        *,
        cls_attention_layers: tuple[int, ...] = (),
        key_layers: tuple[int, ...] = (),
        hidden_state_layers: tuple[int, ...] = (),
        output_hidden_states: bool = False,
        post_layernorm: bool = False,
    ) -> dict:
        """Vision tower + feature selection.

        pixel_values (NI, C, S, S) -> dict with ``features`` (NI, N, C_vis) (the layer ``vision_feature_layer``,
        CLS dropped for the "default" strategy), ``cls_attn`` {layer: float32 (NI, H, P)}, ``keys``
        {layer: (NI, 1+P, C_vis)}, ``cls_query`` {layer: (NI, C_vis)}, ``hidden_states``
        {hf_index: (NI, 1+P, C_vis)}, and ``feature_hidden`` (NI, 1+P, C_vis) (the feature layer with CLS).
        """
        c = self.config
        L = c.vision.num_hidden_layers
        feat_idx = c.vision_feature_layer % (L + 1)
        out = self.vision_tower(
            pixel_values,
            hidden_state_layers=tuple(hidden_state_layers) + (feat_idx,),
            cls_attention_layers=cls_attention_layers,
            key_layers=key_layers,
            output_hidden_states=output_hidden_states,
            post_layernorm=post_layernorm,
        )
        h = out["hidden_states"][feat_idx]
        out["feature_hidden"] = h
        out["features"] = h[:, 1:] if c.vision_feature_select_strategy == "default" else h
        return out

    def project(self, features: Array) -> Array:
        """(..., C_vis) -> (..., D_llm)."""
        return self.multi_modal_projector(features)

    def embed(self, input_ids: Array) -> Array:
        return self.language_model.embed(input_ids)

    def prefill(self, embeds, positions, key_mask, cache: KVCache | None, hook=None, last_only=False):
        """The decoder's prefill; ``hook``: an in-LLM pruner's decoder hook or None (see ``LlamaForCausalLM``)."""
        return self.language_model(embeds, positions, key_mask, cache, hook, last_only)

    def decode_step(self, token_ids, positions, cache: KVCache, slot):
        return self.language_model.decode_step(self.embed(token_ids), positions, cache, slot)
