"""The contract between a model family (one vision tower or one decoder) and the models that compose it.

A family file (``vlmprune/models/vision/<name>.py`` or ``vlmprune/models/text/<name>.py``) defines

* a frozen config dataclass with ``from_hf(hf_sub_config)`` (the ``vision_config`` / ``text_config`` object
  transformers builds), refusing what it does not implement with a ``ValueError``;
* a flax module built as ``Module(config, dtype=...)`` whose param names mirror the HF module's;
* ``WEIGHT_RULES``: ``(regex, param path, Transform)`` over the HF keys of that module *on its own*
  (the vision tower's ``embeddings.*``, ``encoder.layers.N.*``; the decoder's ``model.*`` and ``lm_head.*``);
* ``SHARDING_RULES``: ``(regex, spec)`` over the module's own param paths;
* one :class:`Family` value tying them together, registered by HF ``model_type`` in ``vlmprune.models.FAMILIES``.

What the composing model reads from a config (documented here, checked by the tests on every family):

* vision: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``image_size``, ``patch_size``,
  ``num_channels``, ``num_patches`` (patch tokens), ``num_positions`` (tokens the tower outputs: patches plus any
  class token);
* text: ``hidden_size``, ``num_hidden_layers``, ``num_key_value_heads``, ``head_dim``, ``vocab_size``,
  ``max_position_embeddings``, ``rope_scaling``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmprune.io.weights import Rules
from vlmprune.sharding import ShardingRules

VISION, TEXT = "vision", "text"


@dataclasses.dataclass(frozen=True)
class Family:
    """One vision tower or decoder family.

    Attributes:
      name: short name for messages ("CLIP", "LLaMA").
      kind: ``VISION`` or ``TEXT``.
      config: the config class (``config.from_hf(hf_sub_config)``).
      module: the flax module class (``module(config, dtype=...)``).
      weight_rules: HF key rules relative to the module (see the module docstring).
      sharding_rules: param path rules relative to the module.
      tied: optional (target, source) param paths, relative: target is filled from ``source.T`` when a
        checkpoint lacks it (an LM head tied to the embeddings).
    """

    name: str
    kind: str
    config: type
    module: Any
    weight_rules: Rules
    sharding_rules: ShardingRules
    tied: tuple[str, str] | None = None

    def __post_init__(self):
        if self.kind not in (VISION, TEXT):
            raise ValueError(f"family kind must be {VISION!r} or {TEXT!r}, got {self.kind!r}")


def fields_from_hf(cls, hf, **computed):
    """``cls(...)`` (a config dataclass) with every field read from the same-named attribute of the HF config
    ``hf`` except those given in ``computed`` (renamed, defaulted or converted ones). A field ``hf`` lacks raises
    AttributeError."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in computed]
    return cls(**{name: getattr(hf, name) for name in names}, **computed)
