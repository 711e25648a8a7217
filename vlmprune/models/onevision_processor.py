"""LLaVA-OneVision's processor, built from a checkpoint's own files.

HF's ``LlavaOnevisionProcessor`` cannot be constructed without torchvision (its video processor needs it), so a
OneVision checkpoint's processor is assembled here from the same parts: the image processor read from the
checkpoint's ``preprocessor_config.json`` (``LlavaOnevisionImageProcessorPil``, the PIL backend of HF's class,
so the checkpoint's own mean/std apply, never the class defaults, which are CLIP's), the checkpoint's tokenizer,
and the ``<image>`` expansion computed from the host layout (``vlmprune.anyres.onevision.image_layout``: the
packed token count of HF's ``_get_number_of_features``).

Only single-image prompts are expanded (HF's tiled path); a prompt with several images is refused, since HF
switches to untiled 730-token images there and this processor does not implement that path.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vlmprune.anyres.onevision import OnevisionGeometry, image_layout


class OnevisionProcessor:
    """Image processor + tokenizer of a OneVision checkpoint, called like HF's processor.

    Attributes:
      image_processor: HF ``LlavaOnevisionImageProcessorPil`` from the checkpoint's preprocessor config.
      tokenizer: the checkpoint's tokenizer.
      geometry: the model's :class:`OnevisionGeometry` (tile size, pinpoints, anyres_max).
      image_token: the placeholder string (``"<image>"``).
      chat_template: the processor's own chat template (``chat_template.jinja``, else the ``chat_template`` of
        ``chat_template.json``, as HF's processors read them), or None to use the tokenizer's.
    """

    def __init__(
        self,
        image_processor,
        tokenizer,
        geometry: OnevisionGeometry,
        image_token: str = "<image>",
        chat_template: str | None = None,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.image_token = image_token
        self.chat_template = chat_template

    def num_image_tokens(self, image_size_hw) -> int:
        """Placeholders one image of (height, width) pixels expands to."""
        return image_layout(image_size_hw, self.geometry).num_tokens

    def apply_chat_template(self, conversation, **kwargs) -> str:
        """The processor's chat template, else the tokenizer's (``<image>`` where the conversation has an image),
        untokenized."""
        if self.chat_template is not None:
            kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """Write the image processor's and the tokenizer's files (what :func:`load_onevision_processor` reads),
        and the processor's own chat template as ``chat_template.jinja``."""
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.chat_template is not None:
            with open(os.path.join(directory, PROCESSOR_TEMPLATE), "w", encoding="utf-8") as f:
                f.write(self.chat_template)

    def __call__(self, images=None, text=None, *, return_tensors: str = "np", padding: bool = False) -> dict[str, Any]:
        """images: one PIL image (or array) per prompt; text: one prompt per image, each with one ``<image>``.

        Returns a dict of NumPy arrays: ``input_ids``, ``attention_mask`` (left padding when ``padding``),
        ``pixel_values`` (NI, T, C, S, S) and ``image_sizes`` (NI, 2) (height, width).

        Raises:
          ValueError: a prompt without exactly one ``<image>``, or a different number of images and prompts.
        """
        if return_tensors != "np":
            raise ValueError(
                f"OnevisionProcessor returns NumPy arrays only (return_tensors='np'), got {return_tensors!r}"
            )
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if len(images) != len(texts):
            raise ValueError(
                f"OnevisionProcessor: {len(images)} image(s) for {len(texts)} prompt(s); give one image "
                "per prompt (several images in one prompt are not supported)"
            )
        out: dict[str, Any] = {}
        if images:
            px = self.image_processor(images, return_tensors="np")
            out["pixel_values"] = np.asarray(px["pixel_values"], np.float32)
            out["image_sizes"] = np.asarray(px["image_sizes"], np.int64)
        expanded = []
        for i, t in enumerate(texts):
            if t.count(self.image_token) != 1:
                raise ValueError(
                    f"OnevisionProcessor: prompt {i} holds {t.count(self.image_token)} "
                    f"{self.image_token!r} placeholders; exactly one is supported"
                )
            n = self.num_image_tokens(out["image_sizes"][i])
            expanded.append(t.replace(self.image_token, self.image_token * n))
        tok = self.tokenizer(expanded, return_tensors="np", padding=padding)
        out["input_ids"] = np.asarray(tok["input_ids"])
        out["attention_mask"] = np.asarray(tok["attention_mask"])
        return out


#: the processor-level chat template files HF reads, in its order of preference
PROCESSOR_TEMPLATE = "chat_template.jinja"
LEGACY_PROCESSOR_TEMPLATE = "chat_template.json"


def read_chat_template(path: str) -> str | None:
    """The processor-level chat template of a checkpoint directory (``chat_template.jinja``, else the
    ``chat_template`` entry of ``chat_template.json``), or None. Raises ValueError naming a malformed file."""
    jinja = os.path.join(path, PROCESSOR_TEMPLATE)
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    legacy = os.path.join(path, LEGACY_PROCESSOR_TEMPLATE)
    if not os.path.isfile(legacy):
        return None
    with open(legacy, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{legacy} is not valid JSON ({e})") from e
    template = data.get("chat_template") if isinstance(data, dict) else None
    if not isinstance(template, str):
        raise ValueError(f"{legacy} must hold a string 'chat_template', got {type(template).__name__}")
    return template


def load_onevision_processor(path: str, geometry: OnevisionGeometry):
    """The processor of a OneVision checkpoint directory, or None when it ships no tokenizer.

    Raises:
      FileNotFoundError: a tokenizer without ``preprocessor_config.json``.
    """
    has_tok = any(
        os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if not has_tok:
        return None
    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        raise FileNotFoundError(
            f"{path}: a OneVision checkpoint with a tokenizer needs preprocessor_config.json "
            "(its image mean/std; HF's class defaults are CLIP's, not the checkpoint's)"
        )
    from transformers import AutoTokenizer  # heavy: only when the directory ships a processor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return OnevisionProcessor(image_processor, tokenizer, geometry, chat_template=read_chat_template(path))
