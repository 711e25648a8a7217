"""LLaVA-OneVision's processor, built from a checkpoint's own files.

HF's ``LlavaOnevisionProcessor`` cannot be constructed without torchvision (its video processor needs it), so a
OneVision checkpoint's processor is assembled here from the same parts: the image processor read from the
checkpoint's ``preprocessor_config.json`` (``LlavaOnevisionImageProcessorPil``, the PIL backend of HF's class,
so the checkpoint's own mean/std apply, never the class defaults, which are CLIP's), the checkpoint's tokenizer,
and the ``<image>`` expansion computed from the host layout (``vlmprune.anyres.onevision.image_layout``: the
packed token count of HF's ``_get_number_of_features``).

Only single-image prompts are expanded (HF's tiled path); a prompt with several images is refused, since HF
switches to untiled 730-token images there and this processor does not implement that path.

Videos: HF's ``LlavaOnevisionVideoProcessor`` needs torchvision, which this project does not install, so
:func:`preprocess_video` restates it on the host (NumPy + PIL): the settings are read from the checkpoint's own
files in HF's order (:func:`read_video_processor_facts`), every frame is resized to the configured size with PIL's
filter of the configured ``resample`` (HF's torchvision backend runs torch's antialiased resize on the uint8
frames, which rounds a few pixels differently, by at most 2 levels of 255), then rescaled and normalised in
float32 in HF's fused order, ``(x - mean/rescale) / (std/rescale)``. A ``<video>`` placeholder expands to
``F·ceil(n/2)² + 1`` tokens (``vlmprune.anyres.onevision.video_num_tokens``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from vlmprune.anyres.onevision import (
    CLASS_DEFAULT_MEAN,
    CLASS_DEFAULT_STD,
    OnevisionGeometry,
    image_layout,
    video_num_tokens,
)

#: where HF looks for a video processor's settings, in its order: the nested entry of processor_config.json, the
#: video processor's own file, then the image processor's file
VIDEO_CONFIG_FILES = (
    ("processor_config.json", "video_processor"),
    ("video_preprocessor_config.json", None),
    ("preprocessor_config.json", None),
)


@dataclasses.dataclass(frozen=True)
class VideoProcessorFacts:
    """What a OneVision checkpoint's video processor does, read from its own files (absent keys take the class
    defaults of HF's ``LlavaOnevisionVideoProcessor``: CLIP's mean/std, 384 x 384, bicubic, 1/255).

    size_hw: (height, width) every frame is resized to; resample: PIL filter id (3 = bicubic); source: the file.
    """

    image_mean: tuple[float, float, float] = CLASS_DEFAULT_MEAN
    image_std: tuple[float, float, float] = CLASS_DEFAULT_STD
    rescale_factor: float = 1 / 255
    size_hw: tuple[int, int] = (384, 384)
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    source: str = ""


def read_video_processor_facts(directory: str) -> VideoProcessorFacts:
    """The video processor settings of a checkpoint directory, from the first of :data:`VIDEO_CONFIG_FILES` that
    holds them. Raises FileNotFoundError when none does, ValueError naming the file and field of a bad value."""
    cfg = where = None
    for name, key in VIDEO_CONFIG_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path) as fh:
                data = json.load(fh)
            data = data.get(key) if key else data
            if isinstance(data, dict):
                cfg, where = data, path
                break
    if cfg is None:
        raise FileNotFoundError(
            f"{directory}: no video processor settings (looked for {', '.join(n for n, _ in VIDEO_CONFIG_FILES)})"
        )

    def triple(field, default):
        v = cfg.get(field)
        v = default if v is None else v
        v = (v,) * 3 if isinstance(v, (int, float)) else tuple(v)
        if len(v) != 3 or not all(isinstance(x, (int, float)) and np.isfinite(x) for x in v):
            raise ValueError(f"{where}: {field} must be 3 numbers, got {cfg.get(field)!r}")
        return tuple(float(x) for x in v)

    mean, std = triple("image_mean", CLASS_DEFAULT_MEAN), triple("image_std", CLASS_DEFAULT_STD)
    if min(std) <= 0:
        raise ValueError(f"{where}: image_std must be > 0, got {list(std)}")
    size = cfg.get("size") or {"height": 384, "width": 384}
    h, w = (size.get("height"), size.get("width")) if isinstance(size, dict) else (None, None)
    if not all(isinstance(v, int) and v >= 1 for v in (h, w)):
        raise ValueError(f"{where}: size must be {{'height': h, 'width': w}} in pixels, got {size!r}")
    rescale = cfg.get("rescale_factor", 1 / 255)
    if not isinstance(rescale, (int, float)) or not rescale > 0:
        raise ValueError(f"{where}: rescale_factor must be a positive number, got {rescale!r}")
    resample = cfg.get("resample", 3)
    if resample not in (0, 1, 2, 3, 4, 5):
        raise ValueError(f"{where}: resample must be a PIL filter id 0..5, got {resample!r}")
    flags = {k: cfg.get(k) for k in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb")}
    flags = {k: True if v is None else v for k, v in flags.items()}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise ValueError(f"{where}: {k} must be true or false, got {v!r}")
    return VideoProcessorFacts(mean, std, float(rescale), (h, w), int(resample), **flags, source=where)


def video_frames(video, name: str = "video") -> np.ndarray:
    """One video as uint8 (F, H, W, 3): a (F, H, W, 3) uint8 array, a float array of whole numbers in 0..255
    (converted exactly), or a sequence of PIL images (converted to RGB by PIL) or (H, W, 3) arrays of one size.

    Raises ValueError naming ``name`` and the problem: no frames, a wrong rank or channel count, a dtype that is
    not uint8 or float, NaN/inf or values that are not whole numbers in 0..255, frames of different sizes.
    """
    if isinstance(video, np.ndarray):
        frames = video
    elif isinstance(video, (list, tuple)):
        if not video:
            raise ValueError(f"{name} has no frames")
        arrs = []
        for i, fr in enumerate(video):
            a = np.asarray(fr.convert("RGB")) if isinstance(fr, Image.Image) else np.asarray(fr)
            if a.shape != np.shape(arrs[0] if arrs else a):
                raise ValueError(
                    f"{name}: frame {i} is {a.shape[:2]}, frame 0 is {arrs[0].shape[:2]}; give frames of one size"
                )
            arrs.append(a)
        frames = np.stack(arrs)
    else:
        raise ValueError(
            f"{name} must be a (frames, height, width, 3) array or a list of frames, got {type(video).__name__}"
        )
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (frames, height, width, 3) (RGB, channels last), got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"{name} has no frames")
    if min(frames.shape[1:3]) < 1:
        raise ValueError(f"{name}: frames of {frames.shape[1:3]} pixels are empty")
    if frames.dtype == np.uint8:
        return frames
    if frames.dtype.kind != "f":
        raise ValueError(f"{name} must be uint8 (or float holding 0..255), got dtype {frames.dtype}")
    if not np.isfinite(frames).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(frames)).sum())} NaN/inf value(s)")
    if frames.min() < 0 or frames.max() > 255 or (frames != np.round(frames)).any():
        raise ValueError(
            f"{name}: float frames must hold whole numbers in 0..255 (raw pixel levels), got values in "
            f"[{float(frames.min())}, {float(frames.max())}]; pass uint8 frames"
        )
    return frames.astype(np.uint8)


def preprocess_video(video, facts: VideoProcessorFacts, name: str = "video") -> np.ndarray:
    """One video (see :func:`video_frames`) -> float32 (F, 3, H, W) pixel values, as the checkpoint's video
    processor computes them (module docstring): resize each frame to ``facts.size_hw`` with PIL, then rescale and
    normalise in float32."""
    frames = video_frames(video, name)
    h, w = facts.size_hw
    if facts.do_resize and frames.shape[1:3] != (h, w):
        frames = np.stack([np.asarray(Image.fromarray(f).resize((w, h), facts.resample)) for f in frames])
    x = frames.astype(np.float32)
    if facts.do_rescale and facts.do_normalize:  # HF fuses them: mean and std divided by the rescale factor
        inv = np.float32(1.0 / facts.rescale_factor)
        mean = np.asarray(facts.image_mean, np.float32) * inv
        std = np.asarray(facts.image_std, np.float32) * inv
        x = (x - mean) / std
    elif facts.do_rescale:
        x = x * np.float32(facts.rescale_factor)
    elif facts.do_normalize:
        x = (x - np.asarray(facts.image_mean, np.float32)) / np.asarray(facts.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def preprocess_videos(videos: Sequence, facts: VideoProcessorFacts) -> np.ndarray:
    """A batch of videos -> float32 (NV, F, 3, H, W). Every video must have the same number of frames (HF's model
    takes one (NV, F, ...) array); ValueError naming the videos otherwise."""
    out = [preprocess_video(v, facts, name=f"video {i}") for i, v in enumerate(videos)]
    if not out:
        raise ValueError("no videos given")
    counts = [v.shape[0] for v in out]
    if len(set(counts)) > 1:
        raise ValueError(
            f"videos of a batch must have the same number of frames, got {counts}; sample the same number of "
            "frames from each (or run them in separate batches)"
        )
    return np.stack(out)


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
        video_facts: VideoProcessorFacts | None = None,
        video_token: str = "<video>",
        chat_template: str | None = None,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.geometry = geometry
        self.image_token = image_token
        self.video_facts = video_facts
        self.video_token = video_token
        self.chat_template = chat_template

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholders one video of ``num_frames`` frames expands to: ``F·ceil(n/2)² + 1``."""
        return video_num_tokens(num_frames, self.geometry.tokens_per_side)

    def preprocess_videos(self, videos) -> np.ndarray:
        """float32 (NV, F, 3, S, S) of a batch of videos (:func:`preprocess_videos` with the checkpoint's
        settings)."""
        if self.video_facts is None:
            raise ValueError("this processor has no video processor settings")
        return preprocess_videos(videos, self.video_facts)

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

    def __call__(
        self, images=None, text=None, *, videos=None, return_tensors: str = "np", padding: bool = False
    ) -> dict[str, Any]:
        """images: one PIL image (or array) per prompt that holds ``<image>``; videos: one video (frames, see
        :func:`video_frames`) per prompt that holds ``<video>``; text: the prompts, each with exactly one
        ``<image>`` or one ``<video>``. Images and videos are matched to the prompts in order.

        Returns a dict of NumPy arrays: ``input_ids``, ``attention_mask`` (left padding when ``padding``), and
        ``pixel_values`` (NI, T, C, S, S) with ``image_sizes`` (NI, 2) (height, width) when images are given,
        ``pixel_values_videos`` (NV, F, 3, S, S) when videos are given (same F for all).

        Raises:
          ValueError: a prompt without exactly one placeholder, or a different number of images (videos) and
            prompts that hold one.
        """
        if return_tensors != "np":
            raise ValueError(
                f"OnevisionProcessor returns NumPy arrays only (return_tensors='np'), got {return_tensors!r}"
            )
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (list(images) if isinstance(images, (list, tuple)) else [images])
        if videos is None:
            videos = []
        elif isinstance(videos, np.ndarray) and videos.ndim == 4:
            videos = [videos]  # one (F, H, W, 3) video
        else:
            videos = list(videos)
        kinds = []
        for i, t in enumerate(texts):
            ni, nv = t.count(self.image_token), t.count(self.video_token)
            if ni + nv != 1:
                raise ValueError(
                    f"OnevisionProcessor: prompt {i} holds {ni} {self.image_token!r} and {nv} {self.video_token!r} "
                    "placeholders; exactly one image or one video per prompt is supported"
                )
            kinds.append("image" if ni else "video")
        for kind, given in (("image", images), ("video", videos)):
            want = kinds.count(kind)
            if len(given) != want:
                raise ValueError(
                    f"OnevisionProcessor: {len(given)} {kind}(s) for {want} prompt(s) with a {kind} placeholder; "
                    f"give one {kind} per such prompt (several in one prompt are not supported)"
                )
        out: dict[str, Any] = {}
        if images:
            px = self.image_processor(images, return_tensors="np")
            out["pixel_values"] = np.asarray(px["pixel_values"], np.float32)
            out["image_sizes"] = np.asarray(px["image_sizes"], np.int64)
        if videos:
            out["pixel_values_videos"] = self.preprocess_videos(videos)
        expanded, seen = [], {"image": 0, "video": 0}
        for t, kind in zip(texts, kinds):
            k = seen[kind]
            seen[kind] += 1
            if kind == "image":
                expanded.append(
                    t.replace(self.image_token, self.image_token * self.num_image_tokens(out["image_sizes"][k]))
                )
            else:
                n = self.num_video_tokens(out["pixel_values_videos"].shape[1])
                expanded.append(t.replace(self.video_token, self.video_token * n))
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

    The video settings come from :func:`read_video_processor_facts` (HF's order of files).

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
    return OnevisionProcessor(
        image_processor,
        tokenizer,
        geometry,
        video_facts=read_video_processor_facts(path),
        chat_template=read_chat_template(path),
    )
