"""LLaVA configuration: read through transformers' own config classes, frozen into hashable dataclasses.

Reading ``config.json`` with ``AutoConfig`` means a sparse, transformers-4.36-era llava-hf config gets exactly
the defaults HF gives it (vision tower, text tower, rope, ids). The tower and the decoder are parsed by their
families, chosen by ``vision_config.model_type`` and ``text_config.model_type`` (``vlmprune.models.FAMILIES``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from vlmprune.anyres.onevision import OnevisionGeometry
from vlmprune.models import TEXT, VISION, family

SUPPORTED = ("llava", "llava_next", "llava_onevision")
#: model types whose images are tiled by the anyres pinpoints (pixels (NI, tiles, C, S, S) + image_sizes)
ANYRES = ("llava_next", "llava_onevision")


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
    vision_aspect_ratio: str = ""  # LLaVA-OneVision's "anyres_max_N" (its packing budget); "" otherwise
    video_token_id: int | None = None  # LLaVA-OneVision's <video> id

    @property
    def anyres(self) -> bool:
        """Images are tiled by the pinpoints (LLaVA-NeXT, LLaVA-OneVision)."""
        return self.model_type in ANYRES

    @property
    def tokens_per_image(self) -> int:
        """Visual tokens one 1.5 image (or one NeXT tile) contributes before pruning: every token the tower
        outputs ("full"), or all but the first ("default", as HF drops it)."""
        n = self.vision.num_positions
        return n if self.vision_feature_select_strategy == "full" else n - 1

    @classmethod
    def from_hf(cls, hf, source: str | None = None) -> LlavaConfig:
        """Freeze a HF ``LlavaConfig`` / ``LlavaNextConfig``; every index and id is range-checked.

        Args:
          hf: the transformers config object.
          source: the file it was read from, named in errors (default "config.json").

        Raises:
          ValueError: "<source>: <field>=<value> ...": an unsupported tower or strategy, a feature layer outside
            the vision tower, a token id outside the vocabulary, a non-positive size.
        """
        where = source or "config.json"
        if hf.model_type not in SUPPORTED:
            raise ValueError(f"{where}: unsupported model_type {hf.model_type!r}; vlmprune loads {SUPPORTED}")
        try:
            vision = family(hf.vision_config.model_type, VISION)
            text = family(hf.text_config.model_type, TEXT)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        check_sizes(hf, where)
        n_layers = hf.vision_config.num_hidden_layers
        layer = hf.vision_feature_layer
        for i, v in enumerate(layer if isinstance(layer, (list, tuple)) else [layer]):
            field = f"vision_feature_layer[{i}]" if isinstance(layer, (list, tuple)) else "vision_feature_layer"
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{where}: {field}={v!r} must be an integer")
            if not -(n_layers + 1) <= v <= n_layers:
                raise ValueError(
                    f"{where}: {field}={v} is out of range for a vision tower with {n_layers} layers "
                    f"(hidden states -{n_layers + 1}..{n_layers})"
                )
        if not isinstance(layer, int):
            raise ValueError(
                f"{where}: vision_feature_layer={layer!r}: multi-layer feature concatenation is not supported"
            )
        strat = hf.vision_feature_select_strategy
        if strat not in ("default", "full"):
            raise ValueError(f"{where}: unknown vision_feature_select_strategy {strat!r} (default, full)")
        eos = _eos_ids(hf)
        tc = hf.text_config
        pad = getattr(hf, "pad_token_id", None)
        pad_field = "pad_token_id"
        if pad is None:
            pad, pad_field = getattr(tc, "pad_token_id", None), "text_config.pad_token_id"
        if pad is None:
            pad, pad_field = eos[0], "eos_token_id"
        bos = getattr(tc, "bos_token_id", None)
        vocab = tc.vocab_size
        ids = [
            ("image_token_index", getattr(hf, "image_token_id", None)),
            (pad_field, pad),
            ("text_config.bos_token_id", bos),
        ] + [("eos_token_id", e) for e in eos]
        for field, v in ids:
            if v is None and field == "text_config.bos_token_id":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < vocab:
                raise ValueError(
                    f"{where}: {field}={v!r} is not a token id of the vocabulary "
                    f"(text_config.vocab_size={vocab}: ids 0..{vocab - 1})"
                )
        pins = tuple(tuple(p) for p in (getattr(hf, "image_grid_pinpoints", None) or ()))
        for i, p in enumerate(pins):
            if len(p) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in p):
                raise ValueError(
                    f"{where}: image_grid_pinpoints[{i}]={list(p)!r} must be a (height, width) pair "
                    "of positive pixel counts"
                )
        if hf.model_type in ANYRES and not pins:
            raise ValueError(f"{where}: image_grid_pinpoints is empty; a {hf.model_type} model needs its tile grids")
        aspect, video = "", None
        if hf.model_type == "llava_onevision":
            aspect, video = check_onevision(hf, pins, where)
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
            bos_token_id=int(bos or 1),
            image_grid_pinpoints=pins,
            vision_aspect_ratio=aspect,
            video_token_id=video,
        )


def check_onevision(hf, pins, where: str) -> tuple[str, int]:
    """LLaVA-OneVision's own fields: ``vision_aspect_ratio`` ("anyres_max_N"), a ``video_token_index`` in the
    vocabulary and distinct from the image id, pinpoints that are multiples of the tile, no SigLIP pooling head
    (OneVision never runs it). Returns (vision_aspect_ratio, video_token_id)."""
    aspect = str(getattr(hf, "vision_aspect_ratio", "anyres_max_9"))
    if not re.fullmatch(r"anyres_max_[1-9]\d*", aspect):
        raise ValueError(f"{where}: vision_aspect_ratio={aspect!r} must look like 'anyres_max_<N>' (N >= 1)")
    video = getattr(hf, "video_token_index", None)
    vocab = hf.text_config.vocab_size
    if isinstance(video, bool) or not isinstance(video, (int, np.integer)) or not 0 <= video < vocab:
        raise ValueError(
            f"{where}: video_token_index={video!r} is not a token id of the vocabulary (text_config.vocab_size={vocab})"
        )
    if video == hf.image_token_id:
        raise ValueError(f"{where}: video_token_index={video} must differ from image_token_index")
    if getattr(hf.vision_config, "vision_use_head", False):
        raise ValueError(
            f"{where}: vision_config.vision_use_head=True: OneVision feeds the tower's last hidden "
            "state and has no pooling head"
        )
    vc = hf.vision_config
    try:
        OnevisionGeometry(
            tile_size=vc.image_size,
            tokens_per_side=vc.image_size // vc.patch_size,
            pinpoints=pins,
            max_num=int(aspect.rsplit("_", 1)[1]),
        )
    except ValueError as e:
        raise ValueError(f"{where}: image_grid_pinpoints: {e}") from None
    return aspect, int(video)


def check_sizes(hf, where: str) -> None:
    """Positive sizes and layer counts, heads that divide the width, a patch grid that tiles the image."""
    v, t = hf.vision_config, hf.text_config
    for prefix, c, fields in (
        (
            "vision_config",
            v,
            (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_size",
                "patch_size",
                "num_channels",
            ),
        ),
        (
            "text_config",
            t,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
            ),
        ),
    ):
        for f in fields:
            x = getattr(c, f, None)
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise ValueError(f"{where}: {prefix}.{f}={x!r} must be a positive integer")
    if v.hidden_size % v.num_attention_heads:
        raise ValueError(
            f"{where}: vision_config.hidden_size={v.hidden_size} is not a multiple of "
            f"num_attention_heads={v.num_attention_heads}"
        )
    # SigLIP's strided patch convolution leaves the border pixels outside every patch unused, as HF's does
    # (OneVision's 384 / 14: 27 x 27 patches, 6 pixels); CLIP needs whole patches
    if v.image_size % v.patch_size and getattr(v, "model_type", "") != "siglip_vision_model":
        raise ValueError(
            f"{where}: vision_config.image_size={v.image_size} is not a multiple of patch_size={v.patch_size}"
        )
    kv = getattr(t, "num_key_value_heads", None) or t.num_attention_heads
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or t.num_attention_heads % kv:
        raise ValueError(
            f"{where}: text_config.num_key_value_heads={kv!r} must be a positive divisor of "
            f"num_attention_heads={t.num_attention_heads}"
        )
    if not getattr(t, "head_dim", None) and t.hidden_size % t.num_attention_heads:
        raise ValueError(
            f"{where}: text_config.hidden_size={t.hidden_size} is not a multiple of "
            f"num_attention_heads={t.num_attention_heads}"
        )


def _eos_ids(hf) -> tuple[int, ...]:
    eos = getattr(hf.text_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        eos = 2
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)
