"""Image preprocessing as the papers ran it: ``pad`` (original LLaVA) or ``crop`` (HF ``llava-hf``).

LLaVA-1.5's own evaluation (``image_aspect_ratio="pad"``) first makes every image square by centring it on a
canvas filled with the processor's mean colour (``int(255 * mean)`` per channel), then runs CLIP preprocessing:
bicubic resize to the shortest edge, centre crop (a no-op on the square), rescale by 1/255, normalise with the CLIP
mean and std. The ``llava-hf`` checkpoints' processor skips the padding and centre-crops, cutting off the long
side's edges. Which numbers come from which pipeline:

* ``pad``: the VisPruner, FasterVLM, DivPrune and VisionZip LLaVA-1.5 tables (run with the original LLaVA code).
* ``crop``: HiRED's tables (HF ``llava-hf`` pipeline through lmms-eval) and every ``llava-hf`` processor default.

LLaVA-NeXT's any-resolution tiling is the same in both pipelines; only ``crop`` (its processor, unchanged)
applies there and asking it for ``pad`` is an error.

``set_image_aspect(processor, aspect)`` switches a loaded ``LlavaProcessor`` in place; ``pad_pixels`` is the pad
pipeline on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from transformers.utils import PushToHubMixin

ASPECTS = ("crop", "pad")


def check_aspect(aspect: str) -> str:
    if aspect not in ASPECTS:
        raise ValueError(f"image aspect must be one of {list(ASPECTS)}, got {aspect!r}")
    return aspect


def mean_colour(image_mean: Sequence[float]) -> tuple[int, ...]:
    """The canvas colour of the original ``expand2square``: ``int(255 * m)`` per channel (truncated, not rounded)."""
    return tuple(int(m * 255) for m in image_mean)


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Centre ``image`` (RGB) on a square canvas of its longer side filled with ``fill``; square images pass.

    The offset of the shorter side is ``(long - short) // 2`` (the extra pixel of an odd difference goes after)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _side(size, key_square: str) -> tuple[int, int]:
    """(height, width) from an HF size dict ({shortest_edge} or {height, width})."""
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    return int(size[key_square]), int(size[key_square])


def pad_pixels(images: Sequence[Image.Image], image_processor) -> np.ndarray:
    """The pad pipeline with ``image_processor``'s settings. Returns float32 (N, 3, H, W) (H, W = its crop size).

    Each image: RGB, ``expand_to_square`` with the mean colour, PIL resize (the processor's resampling filter)
    to the shortest-edge size -- the whole square, as CLIP's resize of a square image -- centre crop to the crop
    size, ``x / 255``, ``(x - mean) / std``. This is the original CLIP processor's order of operations."""
    ip = image_processor
    mean = np.asarray(ip.image_mean, np.float32)
    std = np.asarray(ip.image_std, np.float32)
    fill = mean_colour(ip.image_mean)
    size = ip.size
    short = int(size["shortest_edge"]) if "shortest_edge" in size else None
    rh, rw = (short, short) if short is not None else _side(size, "shortest_edge")
    ch, cw = _side(ip.crop_size, "height") if getattr(ip, "do_center_crop", True) and ip.crop_size else (rh, rw)
    resample = Image.Resampling(int(getattr(ip, "resample", Image.Resampling.BICUBIC)))
    out = []
    for im in images:
        if not hasattr(im, "convert"):
            raise TypeError(f"pad preprocessing needs PIL images, got {type(im).__name__}")
        sq = expand_to_square(im.convert("RGB"), fill)
        arr = np.asarray(sq.resize((rw, rh), resample=resample))  # uint8 (rh, rw, 3)
        top, left = (rh - ch) // 2, (rw - cw) // 2
        if top < 0 or left < 0:
            raise ValueError(f"crop size {(ch, cw)} exceeds the resized image {(rh, rw)}")
        arr = arr[top : top + ch, left : left + cw]
        arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)  # CLIP's rescale: float64 product, float32
        arr = (arr - mean) / std
        out.append(arr.transpose(2, 0, 1))
    return np.stack(out).astype(np.float32)


class PadToSquareImageProcessor(PushToHubMixin):
    """Wraps a checkpoint's CLIP image processor so that it runs the pad pipeline (``pad_pixels``).

    Every attribute but the call is the wrapped processor's (sizes, mean, ``to_dict``, ``save_pretrained``: a
    saved checkpoint keeps its own processor; the aspect is a load-time choice,
    ``vlmprune.load(..., image_aspect="pad")``). The ``PushToHubMixin`` base is what transformers' processor
    serialisation looks for before it calls ``to_dict``."""

    image_aspect = "pad"

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        if name == "inner":  # not set yet (copy / unpickling): no delegation loop
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, images, return_tensors=None, **kwargs):
        from transformers import BatchFeature

        imgs = images if isinstance(images, (list, tuple)) else [images]
        flat = []
        for im in imgs:  # the processor may pass one list per prompt
            flat.extend(im if isinstance(im, (list, tuple)) else [im])
        return BatchFeature({"pixel_values": pad_pixels(flat, self.inner)}, tensor_type=return_tensors)

    preprocess = __call__


def image_aspect(processor) -> str:
    """ "pad" when ``processor`` runs the pad pipeline, else "crop"."""
    return getattr(getattr(processor, "image_processor", None), "image_aspect", "crop")


def set_image_aspect(processor, aspect: str, *, is_next: bool = False):
    """Switch ``processor`` (an HF LLaVA processor) to ``aspect`` in place and return it.

    ``pad`` on a LLaVA-NeXT processor (``is_next``) is refused: its tiling has no pad variant."""
    check_aspect(aspect)
    if processor is None:
        raise ValueError("this checkpoint has no processor files; an image aspect needs its image processor")
    ip = processor.image_processor
    inner = ip.inner if isinstance(ip, PadToSquareImageProcessor) else ip
    if aspect == "pad":
        if is_next:
            raise ValueError(
                "image aspect 'pad' applies to LLaVA-1.5 only; LLaVA-NeXT tiles every image as its "
                "processor does (use 'crop')"
            )
        processor.image_processor = PadToSquareImageProcessor(inner)
    else:
        processor.image_processor = inner
    return processor
