"""Model configuration: read through transformers' own config classes, frozen into hashable dataclasses.

Reading ``config.json`` with ``AutoConfig`` means a sparse, transformers-4.36-era llava-hf config gets exactly
the defaults HF gives it (vision tower, text tower, rope, ids).
"""

from __future__ import annotations

import dataclasses
import os

from vlmprune.models.clip import CLIPTextConfig, CLIPVisionConfig
from vlmprune.models.llama import LlamaConfig

SUPPORTED = ("llava", "llava_next")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    vision: CLIPVisionConfig
    text: LlamaConfig
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
        """Visual tokens one 1.5 image (or one NeXT tile) contributes before pruning."""
        n = self.vision.num_patches
        return n + 1 if self.vision_feature_select_strategy == "full" else n

    @classmethod
    def from_hf(cls, hf) -> "LlavaConfig":
        if hf.model_type not in SUPPORTED:
            raise ValueError(f"unsupported model_type {hf.model_type!r}; vlmprune loads {SUPPORTED}")
        if hf.vision_config.model_type not in ("clip_vision_model",):
            raise ValueError(f"unsupported vision tower {hf.vision_config.model_type!r} (only CLIP is implemented)")
        if hf.text_config.model_type not in ("llama", "mistral"):
            raise ValueError(f"unsupported language model {hf.text_config.model_type!r} (llama, mistral)")
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
            vision=CLIPVisionConfig.from_hf(hf.vision_config),
            text=LlamaConfig.from_hf(tc),
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


def read_hf_config(path: str):
    """HF config object for a checkpoint directory, via AutoConfig (local files only)."""
    from transformers import AutoConfig

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face LLaVA directory or a vlmprune checkpoint)")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - re-raise with the file named
        raise ValueError(f"{cfg_file}: could not be read as a transformers config: {e}") from e


def clip_configs(hf) -> tuple[CLIPVisionConfig, CLIPTextConfig, int]:
    """(vision, text, projection_dim) of a HF ``CLIPConfig``."""
    if hf.model_type != "clip":
        raise ValueError(f"expected a full CLIP checkpoint (model_type 'clip'), got {hf.model_type!r}")
    return CLIPVisionConfig.from_hf(hf.vision_config), CLIPTextConfig.from_hf(hf.text_config), int(hf.projection_dim)
