"""Host-side planning of the assembled LLM sequence (NumPy, outside jit).

``input_ids`` follow the HF processor convention: each image's placeholder is expanded to one image-token id per
visual token. A pruning method keeps ``slots`` (a static maximum) of them per image. The plan maps every output
slot either to a text token of the input or to a visual slot, so that the jitted forward can assemble the
sequence with two gathers. Rows that end up shorter than the longest row are left-padded (as HF batches are).
Masked visual slots and padding are excluded from attention and from the position count, which reproduces the
contiguous positions the originals get from boolean indexing.

Videos (LLaVA-OneVision) are a second kind of placeholder (``videos``: their own token id, counts and slots); their
slots follow the images' in the flattened visual table, so the model gathers both with the same two gathers.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class VideoPlaceholders:
    """The videos of a batch in the prompt: their placeholder ``token_id``, placeholder tokens per video, visual
    slots the model provides per video (at most ``stride`` each)."""

    token_id: int
    tokens_per_video: tuple[int, ...]
    slots: tuple[int, ...]
    stride: int

    @property
    def num_videos(self) -> int:
        return len(self.tokens_per_video)


@dataclasses.dataclass(frozen=True)
class SequencePlan:
    """text_src (B, L') index into the row's input_ids or -1; vis_src (B, L') index into the flattened
    visual slots (num_images * slots, then num_videos * video_slots) or -1; text_mask (B, L') the input attention
    mask at text slots."""

    text_src: np.ndarray
    vis_src: np.ndarray
    text_mask: np.ndarray
    num_images: int
    slots: int
    num_videos: int = 0
    video_slots: int = 0

    @property
    def length(self) -> int:
        return self.text_src.shape[1]


def plan_sequence(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    *,
    image_token_id: int,
    tokens_per_image,
    num_images: int,
    slots,
    slot_stride: int | None = None,
    videos: VideoPlaceholders | None = None,
) -> SequencePlan:
    """Validate placeholders and build the plan. Raises ValueError naming the problem.

    Args:
      tokens_per_image: placeholder tokens per image: an int (LLaVA-1.5) or one int per image (LLaVA-NeXT).
      slots: visual slots the model provides per image (int or one per image), at most ``slot_stride`` each.
      slot_stride: image ``i``'s slots are ``i·slot_stride + j`` in the flattened visual table (default: slots).
      videos: the batch's videos, or None; video ``v``'s slots are ``num_images·slot_stride + v·videos.stride + j``.
    """
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
    per_img = (
        [int(tokens_per_image)] * num_images if np.isscalar(tokens_per_image) else [int(t) for t in tokens_per_image]
    )
    per_slots = [int(slots)] * num_images if np.isscalar(slots) else [int(t) for t in slots]
    stride = slot_stride if slot_stride is not None else (max(per_slots) if per_slots else 0)
    kinds = [("image", image_token_id, per_img, per_slots, stride, 0)]
    if videos is not None:
        kinds.append(
            (
                "video",
                videos.token_id,
                list(videos.tokens_per_video),
                list(videos.slots),
                videos.stride,
                num_images * stride,
            )
        )
    found = []
    for kind, token_id, per_item, _, _, _ in kinds:
        is_kind = (ids == token_id) & mask
        total, want = int(is_kind.sum()), sum(per_item)
        if total != want:
            k = len(per_item)
            detail = f"{k} x {per_item[0]}" if len(set(per_item)) == 1 else "+".join(map(str, per_item)) or "0"
            raise ValueError(
                f"input_ids hold {total} {kind} placeholder tokens (id {token_id}) but {k} {kind}(s) "
                f"need {detail} = {want}; expand the <{kind}> placeholder with the model's processor (one id per "
                f"visual token) and pass one {kind} per placeholder"
            )
        found.append(is_kind)
    rows_text, rows_vis = [], []
    item = [0] * len(kinds)
    for r in range(b):
        text_src, vis_src = [], []
        j = 0
        while j < n:
            hit = next((k for k, is_kind in enumerate(found) if is_kind[r, j]), None)
            if hit is not None:
                kind, _, per_item, per_slot, kstride, offset = kinds[hit]
                i = item[hit]
                need = per_item[i]
                run = found[hit][r, j : j + need]
                if run.size < need or not run.all():
                    raise ValueError(
                        f"row {r}: {kind} placeholder run at position {j} is not {need} consecutive tokens ({kind} {i})"
                    )
                text_src.extend([-1] * per_slot[i])
                vis_src.extend(range(offset + i * kstride, offset + i * kstride + per_slot[i]))
                item[hit] += 1
                j += need
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
        text_src[r, length - k :] = rows_text[r]
        vis_src[r, length - k :] = rows_vis[r]
        t = np.asarray(rows_text[r])
        text_mask[r, length - k :] = np.where(t >= 0, mask[r, np.maximum(t, 0)], False)
    if videos is None:
        return SequencePlan(text_src, vis_src, text_mask, num_images, stride)
    return SequencePlan(text_src, vis_src, text_mask, num_images, stride, videos.num_videos, videos.stride)
