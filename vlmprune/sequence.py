"""Host-side planning of the assembled LLM sequence (NumPy, outside jit).

``input_ids`` follow the HF processor convention: each image's placeholder is expanded to one image-token id per
visual token. A pruning method keeps ``slots`` (a static maximum) of them per image. The plan maps every output
slot either to a text token of the input or to a visual slot, so that the jitted forward can assemble the
sequence with two gathers. Rows that end up shorter than the longest row are left-padded (as HF batches are).
Masked visual slots and padding are excluded from attention and from the position count, which reproduces the
contiguous positions the originals get from boolean indexing.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SequencePlan:
    """text_src (B, L') index into the row's input_ids or -1; vis_src (B, L') index into the flattened
    visual slots (num_images * slots) or -1; text_mask (B, L') the input attention mask at text slots."""

    text_src: np.ndarray
    vis_src: np.ndarray
    text_mask: np.ndarray
    num_images: int
    slots: int

    @property
    def length(self) -> int:
        return self.text_src.shape[1]


def plan_sequence(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    tokens_per_image: int,
    num_images: int,
    slots: int,
) -> SequencePlan:
    """Validate placeholders and build the plan. Raises ValueError naming the problem."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {ids.shape}")
    b, n = ids.shape
    if n == 0:
        raise ValueError("input_ids is empty: the prompt must contain at least one token")
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids shape {ids.shape}")
    empty = np.where(mask.sum(1) == 0)[0]
    if empty.size:
        raise ValueError(f"row(s) {empty.tolist()} of the batch have no real tokens (empty prompt)")
    is_img = (ids == image_token_id) & mask
    total = int(is_img.sum())
    if total != num_images * tokens_per_image:
        raise ValueError(
            f"input_ids hold {total} image placeholder tokens (id {image_token_id}) but {num_images} image(s) "
            f"need {num_images} x {tokens_per_image} = {num_images * tokens_per_image}; expand the <image> "
            "placeholder with the model's processor (one id per visual token) and pass one image per placeholder"
        )
    rows_text, rows_vis = [], []
    img = 0
    for r in range(b):
        text_src, vis_src = [], []
        pos = np.where(is_img[r])[0]
        if pos.size % tokens_per_image:
            raise ValueError(f"row {r}: {pos.size} image tokens is not a multiple of {tokens_per_image} per image")
        j = 0
        while j < n:
            if is_img[r, j]:
                run = pos[(pos >= j)][:tokens_per_image]
                if run.size < tokens_per_image or run[-1] - j != tokens_per_image - 1:
                    raise ValueError(f"row {r}: image placeholder run at position {j} is not {tokens_per_image} "
                                     "consecutive tokens")
                text_src.extend([-1] * slots)
                vis_src.extend(range(img * slots, (img + 1) * slots))
                img += 1
                j += tokens_per_image
            else:
                text_src.append(j)
                vis_src.append(-1)
                j += 1
        rows_text.append(text_src)
        rows_vis.append(vis_src)
    length = max(len(t) for t in rows_text)
    text_src = np.full((b, length), -1, np.int32)
    vis_src = np.full((b, length), -1, np.int32)
    text_mask = np.zeros((b, length), bool)
    for r in range(b):
        k = len(rows_text[r])
        text_src[r, length - k:] = rows_text[r]
        vis_src[r, length - k:] = rows_vis[r]
        t = np.asarray(rows_text[r])
        text_mask[r, length - k:] = np.where(t >= 0, mask[r, np.maximum(t, 0)], False)
    return SequencePlan(text_src, vis_src, text_mask, num_images, slots)
