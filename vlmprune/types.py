"""The pytrees that cross the stage boundaries of one request (see the README's "How it works").

    ModelInputs ─▶ vision tower ─(TapRequest)─▶ VisionTaps ─▶ pruner ─▶ PruneResult ─▶ assembly ─▶ decoder
                                                      NextLayout (LLaVA-NeXT only) ─┘

Everything here is a ``flax.struct`` dataclass: arrays are pytree leaves, static settings (layer ids, flags) are
not, so a value can cross ``jax.jit`` as an argument (arrays) or as a static argument (``TapRequest``).
This module depends on nothing else in the package.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import numpy as np

Array = jax.Array


def _static(default: Any = ()):
    return flax.struct.field(pytree_node=False, default=default)


@flax.struct.dataclass
class TapRequest:
    """What a method asks the vision tower (and the projector) for; static and hashable.

    Layer ids are 0-based encoder layers, already resolved (no negatives, no None).

    Attributes:
      cls_attention_layers: layers whose CLS-query attention row (softmax over the patch keys) is returned,
        float32 (B, H, N) each.
      column_mean_layers: layers whose *received* attention (the mean over queries of every key's column,
        float32 (B, H, N)), for towers without a CLS token. A tower computes it as a streaming column sum, never
        keeping the (N, N) map. The CLIP tower does not provide it yet: asking for it fails in ``validate``.
      key_layers: layers whose raw ``k_proj`` outputs (B, 1+N, C) and CLS ``q_proj`` row (B, C) are returned.
      hidden_state_layers: HF hidden-state indices (0 = embeddings, i = output of layer i-1) returned (B, 1+N, C).
      post_layernorm: run the tower to its end and apply its final LayerNorm to the CLS token (``pooled``).
      projected: also hand the method the post-projector embeddings of every token (D_llm), e.g. DivPrune's
        input; the LLM then receives rows of those embeddings instead of projecting the kept features.
    """

    cls_attention_layers: tuple[int, ...] = _static()
    column_mean_layers: tuple[int, ...] = _static()
    key_layers: tuple[int, ...] = _static()
    hidden_state_layers: tuple[int, ...] = _static()
    post_layernorm: bool = _static(False)
    projected: bool = _static(False)

    def union(self, other: TapRequest) -> TapRequest:
        """Both requests at once (sorted unique layers; flags or-ed)."""
        merge = lambda a, b: tuple(sorted(set(a) | set(b)))  # noqa: E731
        return TapRequest(
            cls_attention_layers=merge(self.cls_attention_layers, other.cls_attention_layers),
            column_mean_layers=merge(self.column_mean_layers, other.column_mean_layers),
            key_layers=merge(self.key_layers, other.key_layers),
            hidden_state_layers=merge(self.hidden_state_layers, other.hidden_state_layers),
            post_layernorm=self.post_layernorm or other.post_layernorm,
            projected=self.projected or other.projected,
        )


def _tap(kind: str, taps: dict, layer: int | None) -> Array:
    if layer is None:
        if len(taps) != 1:
            raise ValueError(
                f"VisionTaps: {kind} of the only tapped layer asked for, but {len(taps)} layers "
                f"({sorted(taps)}) were tapped; name the layer"
            )
        (layer,) = taps
    if layer not in taps:
        raise KeyError(
            f"VisionTaps: {kind} of layer {layer} was not requested (tapped: {sorted(taps)}); add it to "
            "the method's TapRequest"
        )
    return taps[layer]


#: the empty request: features only
NO_TAPS = TapRequest()


@flax.struct.dataclass
class VisionTaps:
    """What the vision tower returns for a batch of B images (or tiles).

    Attributes:
      features: (B, N, C) the hidden state of ``vision_feature_layer`` as LLaVA feeds it (CLS dropped for the
        "default" select strategy).
      feature_hidden: (B, 1+N, C) the same layer with its CLS token (VisionZip merges from it).
      cls_attn: {layer: float32 (B, H, N)} CLS-query attention rows over the patch tokens.
      column_mean: {layer: float32 (B, H, N)} received-attention column means (towers without CLS).
      keys: {layer: (B, 1+N, C)} raw ``k_proj`` outputs.
      cls_query: {layer: (B, C)} raw ``q_proj`` output of the CLS token.
      hidden_states: {hf_index: (B, 1+N, C)}.
      pooled: (B, C) post-LayerNorm CLS token, or None.
      embeddings: (B, N, D_llm) post-projector embeddings of ``features`` when the request asked for them.

    Read a tap with the accessors (``cls_attention(layer)`` ...): they name the missing layer when a method reads
    a tap it did not request.
    """

    features: Array
    feature_hidden: Array | None = None
    cls_attn: dict = flax.struct.field(default_factory=dict)
    column_mean: dict = flax.struct.field(default_factory=dict)
    keys: dict = flax.struct.field(default_factory=dict)
    cls_query: dict = flax.struct.field(default_factory=dict)
    hidden_states: dict = flax.struct.field(default_factory=dict)
    pooled: Array | None = None
    embeddings: Array | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[1])

    def cls_attention(self, layer: int | None = None) -> Array:
        """float32 (B, H, N) of ``layer`` (None: the only tapped layer)."""
        return _tap("CLS attention", self.cls_attn, layer)

    def key(self, layer: int | None = None) -> Array:
        """(B, 1+N, C) raw keys of ``layer`` (None: the only tapped layer)."""
        return _tap("keys", self.keys, layer)

    def query_cls(self, layer: int | None = None) -> Array:
        """(B, C) raw CLS query of ``layer`` (None: the only tapped layer)."""
        return _tap("CLS query", self.cls_query, layer)

    def hidden(self, index: int) -> Array:
        """(B, 1+N, C) HF hidden state ``index``."""
        return _tap("hidden state", self.hidden_states, index)

    def received_attention(self, layer: int | None = None) -> Array:
        """float32 (B, H, N) column means of ``layer`` (None: the only tapped layer)."""
        return _tap("received-attention column means", self.column_mean, layer)

    def as_dict(self) -> dict:
        """The encoder-output dict of earlier versions (``features``, ``cls_attn``, ``keys`` ...)."""
        out = {
            "features": self.features,
            "feature_hidden": self.feature_hidden,
            "cls_attn": self.cls_attn,
            "keys": self.keys,
            "cls_query": self.cls_query,
            "hidden_states": self.hidden_states,
        }
        for name in ("column_mean", "pooled", "embeddings"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, dict) or value):
                out[name] = value
        return out

    def reshape_images(self, shape: tuple[int, ...]) -> VisionTaps:
        """Every array's leading axis B split into ``shape`` (e.g. (NI, T) for NeXT tiles)."""
        return jax.tree.map(lambda a: a.reshape(tuple(shape) + a.shape[1:]), self)


@flax.struct.dataclass
class NextLayout:
    """LLaVA-NeXT packing tables of a batch of NI images, over each image's full layout of F entries.

    Attributes:
      token: int32 (NI, F) index into the image's tile-token table (tile t, patch p -> t·N + p); -1 a newline
        kept when its grid row keeps a token, -3 a newline always kept, -2 padding.
      row: int32 (NI, F) stitched-grid row of each entry (-1 for base-image tokens).
      tile_valid: bool (NI, T) tiles that exist (base image included); the rest pad to the largest grid.
    """

    token: Array
    row: Array
    tile_valid: Array

    @property
    def num_tiles(self) -> int:
        return int(self.tile_valid.shape[1])


@flax.struct.dataclass
class PruneResult:
    """What a visual pruner returns.

    Attributes:
      selection: ``vlmprune.prune.Selection`` (B, K) of kept token indices, ascending (layout order); on LLaVA-NeXT
        the indices run over the image's tile-token table (T·N), for merging methods these are the anchors.
      tokens: optional (B, K', C) vision features the LLM receives instead of the selected rows (merging methods:
        the merged tokens in the original's order), valid where ``tokens_valid`` bool (B, K').
      appended: optional (B, E, C) vision features placed after the kept tokens (on NeXT: after the image's
        packed block), e.g. VisionZip's CLS and contextual tokens; ``appended_valid`` bool (B, E).
      projected: True when ``tokens`` / ``appended`` already hold post-projector embeddings (D_llm).
    """

    selection: Any
    tokens: Array | None = None
    tokens_valid: Array | None = None
    appended: Array | None = None
    appended_valid: Array | None = None
    projected: bool = _static(False)


@flax.struct.dataclass
class ModelInputs:
    """One batch as the model takes it (host arrays, validated before anything is traced).

    Attributes:
      input_ids: int (B, L), the HF processor convention (one image-token id per visual token).
      attention_mask: (B, L) 1 for real tokens, or None (all real).
      pixel_values: float (NI, C, S, S) (LLaVA-1.5) or (NI, T, C, S, S) (LLaVA-NeXT tiles).
      image_sizes: int (NI, 2) original (height, width) per image (LLaVA-NeXT), or None.
      pixel_values_videos: float (NV, F, C, S, S) (LLaVA-OneVision videos, one per ``<video>`` placeholder run, the
        same frame count F for all), or None; ``pixel_values`` may then be None (a batch of videos only).
    """

    input_ids: Any
    pixel_values: Any
    attention_mask: Any = None
    image_sizes: Any = None
    pixel_values_videos: Any = None

    @classmethod
    def from_arrays(
        cls, input_ids, pixel_values, attention_mask=None, image_sizes=None, pixel_values_videos=None
    ) -> ModelInputs:
        return cls(
            input_ids=np.asarray(input_ids),
            pixel_values=pixel_values,
            attention_mask=None if attention_mask is None else np.asarray(attention_mask),
            image_sizes=None if image_sizes is None else np.asarray(image_sizes),
            pixel_values_videos=pixel_values_videos,
        )


@flax.struct.dataclass
class ModelOutput:
    """logits float32 (B, L, V) over the assembled sequence; mask bool (B, L) real positions."""

    logits: Array
    mask: Array


__all__ = ["NO_TAPS", "ModelInputs", "ModelOutput", "NextLayout", "PruneResult", "TapRequest", "VisionTaps"]
