"""LLaVA assembly (flax.linen): a vision tower + ``mlp2x_gelu`` projector + a decoder, each taken from its
family by the config (``vlmprune.models.FAMILIES``); LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (SigLIP + Qwen2).

The module exposes its pieces as methods (``encode``, ``project``, ``embed``, ``prefill``, ``decode_step``) so
that the pruning step can sit between encoder and decoder as a plain array function; see ``vlmprune.model``.
The checkpoint side is composed the same way: the families' weight and sharding rules, prefixed
(:func:`weight_rules`, :func:`sharding_rules`), and :func:`load_llava` reads a HF or converted directory with
every tensor placed straight onto its devices.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmprune import sharding
from vlmprune.anyres.onevision import geometry
from vlmprune.io import checkpoint, weights
from vlmprune.io.weights import Rules, identity, prefix_rules, transpose
from vlmprune.models import FAMILIES, Family, family_of
from vlmprune.models.activations import activation
from vlmprune.models.llava_config import LlavaConfig
from vlmprune.models.onevision_processor import load_onevision_processor
from vlmprune.models.text.llama import KVCache

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
        self.vision_tower = family_of(c.vision).module(c.vision, dtype=self.dtype)
        self.multi_modal_projector = Projector(
            c.text.hidden_size, c.projector_hidden_act, c.projector_bias, dtype=self.dtype
        )
        self.language_model = family_of(c.text).module(c.text, dtype=self.dtype)
        if c.anyres:
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
        if self.config.anyres:
            logits = logits + 0 * self.image_newline.sum()
        return logits

    def encode(
        self,
        pixel_values: Array,
        *,
        cls_attention_layers: tuple[int, ...] = (),
        received_attention_layers: tuple[int, ...] = (),
        key_layers: tuple[int, ...] = (),
        hidden_state_layers: tuple[int, ...] = (),
        output_hidden_states: bool = False,
        post_layernorm: bool = False,
    ) -> dict:
        """Vision tower + feature selection.

        pixel_values (NI, C, S, S) -> dict with ``features`` (NI, N, C_vis) (the layer ``vision_feature_layer``,
        CLS dropped for the "default" strategy), ``cls_attn`` {layer: float32 (NI, H, P)}, ``keys``
        {layer: (NI, 1+P, C_vis)}, ``cls_query`` {layer: (NI, C_vis)}, ``hidden_states``
        {hf_index: (NI, 1+P, C_vis)}, ``received_attn`` {layer: (NI, H, N)} (towers without CLS) and
        ``feature_hidden`` (NI, 1+P, C_vis) (the feature layer with CLS). A tap is passed to the tower only when
        requested, so a tower that lacks one (CLS rows on SigLIP) is never asked for it.
        """
        c = self.config
        L = c.vision.num_hidden_layers
        feat_idx = c.vision_feature_layer % (L + 1)
        taps = {
            "cls_attention_layers": tuple(cls_attention_layers),
            "received_attention_layers": tuple(received_attention_layers),
            "key_layers": tuple(key_layers),
        }
        out = self.vision_tower(
            pixel_values,
            hidden_state_layers=tuple(hidden_state_layers) + (feat_idx,),
            output_hidden_states=output_hidden_states,
            post_layernorm=post_layernorm,
            **{k: v for k, v in taps.items() if v},
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


# ---------------------------------------------------------------------------------------------- checkpoints

# The pre-4.52 llava-hf layout is the one the rules use: each sub-model's keys are those of the HF model alone
# ("vision_tower.vision_model.*" = CLIPVisionModel, "language_model.model.*" / "language_model.lm_head.*" =
# LlamaForCausalLM) under one prefix. Newer layouts are renamed to it.
LLAVA_RENAMES = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^model\.image_newline$", "image_newline"),
    # transformers 5.x flattens CLIPVisionModel and saves "vision_tower.embeddings.*" (no "vision_model.").
    (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
]

PROJECTOR_RULES: Rules = [
    (r"multi_modal_projector\.(linear_1|linear_2)\.weight", r"multi_modal_projector/\1/kernel", transpose),
    (r"multi_modal_projector\.(linear_1|linear_2)\.bias", r"multi_modal_projector/\1/bias", identity),
    (r"image_newline", "image_newline", identity),
]

PROJECTOR_SHARDING: sharding.ShardingRules = [
    (r"multi_modal_projector/linear_1/kernel", (None, "model")),
    (r"multi_modal_projector/linear_1/bias", ("model",)),
    (r"multi_modal_projector/linear_2/kernel", ("model", None)),
]


def _compose(vision: Family, text: Family) -> Rules:
    return [
        *prefix_rules(vision.weight_rules, "vision_tower.vision_model.", "vision_tower"),
        *PROJECTOR_RULES,
        *prefix_rules(text.weight_rules, "language_model.", "language_model"),
    ]


def weight_rules(config: LlavaConfig) -> Rules:
    """HF key -> param rules of a LLaVA with ``config``'s tower and decoder (keys as :data:`LLAVA_RENAMES`
    normalises them)."""
    return _compose(family_of(config.vision), family_of(config.text))


def sharding_rules(config: LlavaConfig) -> sharding.ShardingRules:
    """Param path -> partition spec rules of a LLaVA with ``config``'s tower and decoder."""
    v, t = family_of(config.vision), family_of(config.text)
    return [
        *sharding.prefix_rules(v.sharding_rules, "vision_tower"),
        *PROJECTOR_SHARDING,
        *sharding.prefix_rules(t.sharding_rules, "language_model"),
    ]


# The table of the llava-hf 1.5 / NeXT checkpoints (CLIP tower, LLaMA decoder), e.g. to export to PyTorch.
LLAVA_RULES: Rules = _compose(FAMILIES["clip_vision_model"], FAMILIES["llama"])


def param_shapes(module: Llava) -> dict:
    """The param tree of ``module`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    v = module.config.vision
    pix = jnp.zeros((1, v.num_channels, v.image_size, v.image_size), module.dtype)
    return weights.abstract_params(module, jnp.zeros((1, 2), jnp.int32), pix)


def shard_params(params: dict, mesh, config: LlavaConfig) -> dict:
    """Place LLaVA params on ``mesh`` by the families' sharding rules (already placed leaves are not copied)."""
    return sharding.shard_params(params, mesh, sharding_rules(config))


@dataclasses.dataclass(frozen=True)
class LoadedLlava:
    """What :func:`load_llava` reads: config, params (placed), the HF processor (or None) and the HF config."""

    config: LlavaConfig
    params: dict
    processor: Any
    hf_config: Any


def load_config(path: str):
    """(HF config, ``LlavaConfig``) of a checkpoint directory, every field range-checked (no weights read)."""
    hf = checkpoint.read_hf_config(path)
    return hf, LlavaConfig.from_hf(hf, source=os.path.join(path, "config.json"))


def load_llava(path: str, *, dtype, mesh=None, check_finite: bool = True) -> LoadedLlava:
    """Read a HF LLaVA directory (safetensors, any llava-hf key layout) or one written by
    ``io.checkpoint.save_model``.

    Params are built from ``jax.eval_shape`` and each tensor goes from the file to its devices: with a ``mesh``,
    shard by shard to its ``NamedSharding`` (the whole model is never on one device), else to the default device.

    ``check_finite`` scans every weight for NaN/inf (and float16 overflow), naming the tensor.

    Raises:
      FileNotFoundError / ValueError / CheckpointError naming every problem with the files.
    """
    hf, cfg = load_config(path)
    module = Llava(cfg, dtype=dtype)
    abstract = param_shapes(module)
    shardings = None if mesh is None else sharding.param_shardings(abstract, mesh, sharding_rules(cfg))
    if checkpoint.is_converted(path):
        params = checkpoint.restore_params(path, abstract, dtype, shardings, check_finite=check_finite)
    else:
        tied = family_of(cfg.text).tied
        params = weights.load_params(
            path,
            abstract,
            weight_rules(cfg),
            renames=LLAVA_RENAMES,
            dtype=dtype,
            shardings=shardings,
            check_finite=check_finite,
            tied=None if tied is None else tuple(f"language_model/{p}" for p in tied),
        )
    return LoadedLlava(cfg, params, load_processor(path, cfg), hf)


def load_processor(path: str, cfg: LlavaConfig):
    """The checkpoint's processor: HF's ``AutoProcessor`` (LLaVA-1.5, NeXT), or for LLaVA-OneVision one built
    from its image-processor and tokenizer files (``vlmprune.models.onevision_processor``: HF's own processor
    class cannot be built without torchvision). None when the directory ships no tokenizer."""
    if cfg.model_type == "llava_onevision":
        return load_onevision_processor(path, geometry(cfg))
    return checkpoint.load_processor(path)
