"""LLaVA-OneVision configuration: a HF ``LlavaOnevisionConfig`` frozen into hashable dataclasses, with range checks.

The config is read through transformers' own ``AutoConfig`` so absent fields get exactly HF's defaults. The
vision part is a minimal SigLIP description (what the layout and a tower need); the SigLIP tower module owns the
full tower config.
"""

from __future__ import annotations

import dataclasses
import os

from transformers import AutoConfig

from vlmprune.models.text.qwen2 import Qwen2Config
from vlmprune.anyres.onevision import OnevisionGeometry, anyres_max


@dataclasses.dataclass(frozen=True)
class SiglipVisionFacts:
    """The SigLIP tower's static shape: ``image_size // patch_size`` tokens per side, no CLS token."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class OnevisionConfig:
    vision: SiglipVisionFacts
    text: Qwen2Config
    image_grid_pinpoints: tuple[tuple[int, int], ...]
    vision_aspect_ratio: str
    vision_feature_layer: int
    vision_feature_select_strategy: str
    image_token_id: int
    video_token_id: int
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True

    @property
    def max_num(self) -> int:
        return anyres_max(self.vision_aspect_ratio)

    def geometry(self) -> OnevisionGeometry:
        return OnevisionGeometry(tile_size=self.vision.image_size, tokens_per_side=self.vision.tokens_per_side,
                                 pinpoints=self.image_grid_pinpoints, max_num=self.max_num)


def _where(field: str) -> str:
    return f"LlavaOnevision config: {field}"


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{_where(name)} must be a positive int, got {v!r}")
    return v


def onevision_config_from_hf(hf) -> OnevisionConfig:
    """A ``transformers.LlavaOnevisionConfig`` -> :class:`OnevisionConfig`. Raises ValueError naming the field for
    anything this port does not reproduce or that is out of range."""
    if getattr(hf, "model_type", None) != "llava_onevision":
        raise ValueError(f"{_where('model_type')} must be 'llava_onevision', got {getattr(hf, 'model_type', None)!r}")
    vc = hf.vision_config
    if vc.model_type != "siglip_vision_model":
        raise ValueError(f"{_where('vision_config.model_type')} must be 'siglip_vision_model', got {vc.model_type!r}")
    if getattr(vc, "vision_use_head", False):
        raise ValueError(f"{_where('vision_config.vision_use_head')}: the attention-pool head is not used by "
                         "OneVision and is not supported")
    fields = {k: _positive_int(f"vision_config.{k}", getattr(vc, k)) for k in
              ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size")}
    if fields["image_size"] % fields["patch_size"]:
        raise ValueError(f"{_where('vision_config.image_size')}={fields['image_size']} must be a multiple of "
                         f"patch_size={fields['patch_size']}")
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError(f"{_where('vision_config.hidden_size')}={fields['hidden_size']} must be a multiple of "
                         f"num_attention_heads={fields['num_attention_heads']}")
    vision = SiglipVisionFacts(**fields, layer_norm_eps=float(vc.layer_norm_eps), hidden_act=str(vc.hidden_act))
    if hf.text_config.model_type != "qwen2":
        raise ValueError(f"{_where('text_config.model_type')} must be 'qwen2', got {hf.text_config.model_type!r}")
    text = Qwen2Config.from_hf(hf.text_config)
    layer = hf.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{_where('vision_feature_layer')}={layer!r}: only one int layer is supported "
                         "(multi-layer concatenation is not)")
    if not -(vision.num_hidden_layers + 1) <= layer <= vision.num_hidden_layers:
        raise ValueError(f"{_where('vision_feature_layer')}={layer} is outside the tower's hidden states "
                         f"[-{vision.num_hidden_layers + 1}, {vision.num_hidden_layers}]")
    strategy = hf.vision_feature_select_strategy
    if strategy not in ("full", "default"):
        raise ValueError(f"{_where('vision_feature_select_strategy')} must be 'full' or 'default', got {strategy!r}")
    ids = {}
    for name in ("image_token_index", "video_token_index"):
        v = getattr(hf, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < text.vocab_size:
            raise ValueError(f"{_where(name)}={v!r} must be a token id in [0, {text.vocab_size})")
        ids[name] = v
    if ids["image_token_index"] == ids["video_token_index"]:
        raise ValueError(f"{_where('video_token_index')} must differ from image_token_index")
    aspect = str(hf.vision_aspect_ratio)
    anyres_max(aspect)  # raises naming the field
    pins = tuple(tuple(int(x) for x in p) for p in (hf.image_grid_pinpoints or ()))
    try:  # the geometry validates the pinpoints against the tile size
        OnevisionGeometry(tile_size=vision.image_size, tokens_per_side=vision.tokens_per_side, pinpoints=pins)
    except ValueError as e:
        raise ValueError(f"{_where('image_grid_pinpoints')}: {e}") from e
    act = getattr(hf, "projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{_where('projector_hidden_act')}={act!r}: only 'gelu' (erf) is supported")
    return OnevisionConfig(vision=vision, text=text, image_grid_pinpoints=pins, vision_aspect_ratio=aspect,
                           vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                           image_token_id=ids["image_token_index"], video_token_id=ids["video_token_index"],
                           projector_hidden_act=act,
                           projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)))


def read_onevision_config(directory: str) -> OnevisionConfig:
    """``config.json`` of a checkpoint directory (local files only) -> :class:`OnevisionConfig`."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: no config.json")
    return onevision_config_from_hf(AutoConfig.from_pretrained(directory, local_files_only=True))
