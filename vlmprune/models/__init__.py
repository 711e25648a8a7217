"""Flax (linen) models: one file per vision tower (``vision/``) and per decoder (``text/``), composed by
``llava.py``. ``FAMILIES`` maps each HF ``model_type`` to its family; adding one is a file plus a line here
(``docs/adding_a_model.md``).
"""

from __future__ import annotations

from vlmprune.models.family import TEXT, VISION, Family
from vlmprune.models.text import llama, qwen2
from vlmprune.models.vision import clip, siglip

# HF model_type (of ``vision_config`` / ``text_config``) -> family.
FAMILIES: dict[str, Family] = {
    "clip_vision_model": clip.FAMILY,
    "llama": llama.FAMILY,
    "mistral": llama.FAMILY,
    "siglip_vision_model": siglip.FAMILY,
    "qwen2": qwen2.FAMILY,
}


def family(model_type: str, kind: str) -> Family:
    """The ``kind`` (``"vision"`` or ``"text"``) family registered for HF ``model_type``.

    Raises:
      ValueError: naming the model type and the ones implemented.
    """
    fam = FAMILIES.get(model_type)
    if fam is None or fam.kind != kind:
        known = sorted(k for k, f in FAMILIES.items() if f.kind == kind)
        what = "vision tower" if kind == VISION else "language model"
        raise ValueError(
            f"unsupported {what} {model_type!r}; vlmprune implements {', '.join(known)} "
            "(see docs/adding_a_model.md to add one)"
        )
    return fam


def family_of(config) -> Family:
    """The family whose config class ``config`` is an instance of."""
    for fam in FAMILIES.values():
        if isinstance(config, fam.config):
            return fam
    raise ValueError(
        f"no model family has config type {type(config).__name__}; known: "
        f"{sorted({f.config.__name__ for f in FAMILIES.values()})}"
    )


__all__ = ["FAMILIES", "TEXT", "VISION", "Family", "family", "family_of"]
