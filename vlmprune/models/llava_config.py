"""LLaVA configuration: read through transformers' own config classes, frozen into hashable dataclasses.

Reading ``config.json`` with ``AutoConfig`` means a sparse, transformers-4.36-era llava-hf config gets exactly
the defaults HF gives it (vision tower, text tower, rope, ids). The tower and the decoder are parsed by their
families, chosen by ``vision_config.model_type`` and ``text_config.model_type`` (``vlmprune.models.FAMILIES``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmprune.models import TEXT, VISION, family

SUPPORTED = ("llava", "llava_next")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: Any  # a vision family's config (``CLIPVisionConfig``, ...)
    text: Any  # a decoder family's config (``LlamaConfig``, ...)
    model_type: str = "llava"
    image_token_id: int = 32000
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 0
    bos_token_id: int = 1
    image_grid_pinpoints: tuple = ()

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one 1.5 image (or one NeXT tile) contributes before pruning: every token the tower
        outputs ("full"), or all but the first ("default", as HF drops it)."""
        n = self.vision.num_positions
        return n if self.vision_feature_select_strategy == "full" else n - 1

    @classmethod
    def from_hf(cls, hf) -> "LlavaConfig":
        if hf.model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {hf.model_type!r}; vlmprune loads {SUPPORTED}")
        vision = family(hf.vision_config.model_type, VISION)
        text = family(hf.text_config.model_type, TEXT)
        layer = hf.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError(f"vision_feature_layer={layer!r}: multi-layer feature concatenation is not supported")
        strat = hf.vision_feature_select_strategy
        if strat not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {strat!r}")
        eos = _eos_ids(hf)
        tc = hf.text_config
        pad = getattr(hf, "pad_token_id", None)
        if pad is None:
            pad = getattr(tc, "pad_token_id", None)
        if pad is None:
            pad = eos[0]
        return cls(
            vision=vision.config.from_hf(hf.vision_config),
            text=text.config.from_hf(tc),
            model_type=hf.model_type,
            image_token_id=int(hf.image_token_id),
            vision_feature_layer=int(layer),
            vision_feature_select_strategy=strat,
            projector_hidden_act=getattr(hf, "projector_hidden_act", "gelu"),
            projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)),
            eos_token_ids=eos,
            pad_token_id=int(pad),
            bos_token_id=int(getattr(tc, "bos_token_id", None) or 1),
            image_grid_pinpoints=tuple(tuple(p) for p in (getattr(hf, "image_grid_pinpoints", None) or ())),
        )


def _eos_ids(hf) -> tuple[int, ...]:
    eos = getattr(hf.text_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        eos = 2
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
