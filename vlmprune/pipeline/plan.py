"""Host planning (NumPy, before anything is traced): validate a batch and lay it out for the jitted stages.

``plan_inputs(config, inputs, pruner, ...) -> Plan``: checks the pixels and placeholders, builds the LLaVA-NeXT
layout in the pruner's packing style, counts the static visual slots of every image from the pruner's budget,
runs the pruner's declared host preparation (instruction texts, auxiliary CLIP) and maps every output slot to a
text token or a visual slot (``vlmprune.pipeline.sequence``). Nothing here knows which method runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import inputs as input_checks
from vlmprune.anyres.geometry import max_tiles
from vlmprune.anyres.layout import BatchLayout, batch_layout
from vlmprune.anyres.onevision import (
    OnevisionBatch,
    PackTables,
    VideoBatch,
    grid_table,
    onevision_batch,
    onevision_video_batch,
    spatial_ranks,
)
from vlmprune.pipeline.sequence import SequencePlan, VideoPlaceholders, plan_sequence
from vlmprune.prune.base import HostInputs, HostNeeds, VisualPruner, check_pruner, slot_count
from vlmprune.prune.onevision_grid import official_slots
from vlmprune.types import ModelInputs, NextLayout


@flax.struct.dataclass
class DeviceInputs:
    """The arrays the jitted stages take (one pytree, so that sharding is one ``tree.map``).

    input_ids int32 (B, L); pixel_values (NI, C, S, S) or (NI, T_max, C, S, S), or None (a batch of videos only);
    text_src, vis_src int32 (B, L') and text_mask bool (B, L') from the :class:`SequencePlan`; layout: NextLayout,
    OneVision PackTables or None; aux: the pruner's prepared host arrays; pixel_values_videos (NV, F, C, S, S) and
    video_layout (their PackTables, frames on the tile axis) for LLaVA-OneVision videos, else None.
    """

    input_ids: Any
    pixel_values: Any
    text_src: Any
    vis_src: Any
    text_mask: Any
    layout: NextLayout | PackTables | None = None
    aux: dict = flax.struct.field(default_factory=dict)
    pixel_values_videos: Any = None
    video_layout: PackTables | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """A validated batch: the sequence plan, the (tile-padded) pixels (None without images), the NeXT / OneVision
    layout, the pruner's prepared arrays, the static visual slot stride (None on LLaVA-1.5), and the OneVision
    videos' pixels and layout (None without videos)."""

    sequence: SequencePlan
    pixel_values: np.ndarray | None
    layout: BatchLayout | OnevisionBatch | None
    aux: dict
    stride: int | None
    video_pixels: np.ndarray | None = None
    videos: VideoBatch | None = None

    def device_inputs(self, input_ids, dtype) -> DeviceInputs:
        return DeviceInputs(
            input_ids=jnp.asarray(input_ids, jnp.int32),
            pixel_values=None if self.pixel_values is None else jnp.asarray(self.pixel_values, dtype),
            text_src=jnp.asarray(self.sequence.text_src),
            vis_src=jnp.asarray(self.sequence.vis_src),
            text_mask=jnp.asarray(self.sequence.text_mask),
            layout=None if self.layout is None else self.layout.tables(),
            aux={k: jnp.asarray(v) for k, v in self.aux.items()},
            pixel_values_videos=None if self.video_pixels is None else jnp.asarray(self.video_pixels, dtype),
            video_layout=None if self.videos is None else self.videos.tables(),
        )


def check_pixels(config, pixel_values):
    """pixel_values of the right rank and tile shape for ``config``, finite; ValueError naming the problem."""
    v = config.vision
    pixel_values = input_checks.check_pixel_values(pixel_values)
    shape = tuple(getattr(pixel_values, "shape", ()))
    want = (v.num_channels, v.image_size, v.image_size)
    if config.anyres:
        if len(shape) != 5 or shape[2:] != want:
            raise ValueError(
                f"pixel_values must have shape (num_images, num_tiles, {want[0]}, {want[1]}, {want[2]}) for "
                f"this {config.model_type} model (tile size {v.image_size}), got {shape}; preprocess images with the "
                "model's processor"
            )
    elif len(shape) != 4 or shape[1:] != want:
        raise ValueError(
            f"pixel_values must have shape (num_images, {want[0]}, {want[1]}, {want[2]}) for this vision "
            f"tower (image_size={v.image_size}), got {shape}; preprocess images with the model's processor"
        )
    return pixel_values


def check_video_pixels(config, pixel_values_videos):
    """pixel_values_videos (NV, F, C, S, S) of the tower's tile size with F >= 1, floating point and finite, on
    a LLaVA-OneVision model; ValueError naming the problem (None passes through)."""
    if pixel_values_videos is None:
        return None
    if config.model_type != "llava_onevision":
        raise ValueError(
            f"pixel_values_videos: video input is supported on LLaVA-OneVision only, not on this {config.model_type} "
            "model"
        )
    v = config.vision
    x = input_checks.check_pixel_values(pixel_values_videos, name="pixel_values_videos")
    shape = tuple(getattr(x, "shape", ()))
    want = (v.num_channels, v.image_size, v.image_size)
    if len(shape) != 5 or shape[2:] != want or min(shape[:2]) < 1:
        raise ValueError(
            f"pixel_values_videos must have shape (num_videos, num_frames, {want[0]}, {want[1]}, {want[2]}) with at "
            f"least one video and one frame (frames of {v.image_size} px, the same frame count for every video), "
            f"got {shape}; preprocess videos with the model's processor"
        )
    return x


def next_layout(config, pixel_values, image_sizes, pruner=None):
    """Host-side anyres layout of a NeXT batch in the pruner's packing style; pads tiles to the largest grid.

    Returns (pixels (NI, T_max, C, S, S) float32, BatchLayout, placeholder counts per image (official layout))."""
    c = config
    style, pins = "official", c.image_grid_pinpoints
    if isinstance(pruner, VisualPruner):
        style, pins = pruner.layout_style(c)
    if image_sizes is None:
        raise ValueError("image_sizes (num_images, 2) as (height, width) is required for LLaVA-NeXT inputs")
    sizes = np.asarray(image_sizes)
    ni = pixel_values.shape[0]
    if sizes.shape != (ni, 2):
        raise ValueError(f"image_sizes must have shape ({ni}, 2) (one (height, width) per image), got {sizes.shape}")
    geo = dict(tile_size=c.vision.image_size, tokens_per_side=c.vision.image_size // c.vision.patch_size)
    lay = batch_layout(sizes, pins, style=style, **geo)
    official = lay if style == "official" else batch_layout(sizes, pins, **geo)  # what the processor expanded
    t_max = max_tiles(c.image_grid_pinpoints, c.vision.image_size)
    for i, li in enumerate(lay.layouts):
        if li.num_tiles > pixel_values.shape[1]:
            raise ValueError(
                f"image {i} of size {tuple(sizes[i])} needs {li.num_tiles} tiles "
                f"({li.grid_rows}x{li.grid_cols} grid + base) but pixel_values holds "
                f"{pixel_values.shape[1]}"
            )
    if pixel_values.shape[1] > t_max:
        raise ValueError(
            f"pixel_values holds {pixel_values.shape[1]} tiles per image; the pinpoints allow at most {t_max}"
        )
    pix = np.zeros((ni, t_max) + tuple(pixel_values.shape[2:]), np.float32)
    pix[:, : pixel_values.shape[1]] = np.asarray(pixel_values, np.float32)
    return pix, lay, [li.length for li in official.layouts]


def image_texts(config, ids, mask, plan: SequencePlan, text, tokenizer) -> list[str]:
    """The instruction text per image, for text-guided pruners (``HostNeeds.text``): ``text`` (one string per batch
    row) or, by default, the row's real tokens after its last image placeholder, decoded without special tokens."""
    b = ids.shape[0]
    if text is not None:
        text = [text] if isinstance(text, str) else list(text)
        if len(text) != b:
            raise ValueError(f"text must hold one string per batch row ({b}), got {len(text)}")
    rows = []
    for r in range(b):
        if text is not None:
            rows.append(text[r])
            continue
        if tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer: pass text=[...] for text-guided pruning")
        m = np.ones(ids.shape[1], bool) if mask is None else np.asarray(mask[r]).astype(bool)
        img = np.where((ids[r] == config.image_token_id) & m)[0]
        start = img[-1] + 1 if img.size else 0
        rows.append(tokenizer.decode(ids[r, start:][m[start:]], skip_special_tokens=True).strip())
    out = [""] * plan.num_images
    for r in range(b):
        img_src = plan.vis_src[r][(plan.vis_src[r] >= 0) & (plan.vis_src[r] < plan.num_images * plan.slots)]
        for v in np.unique(img_src // plan.slots):
            out[int(v)] = rows[r]
    return out


def prepare_host(
    pruner, config, pixel_values, layouts, texts: Callable[[], Sequence[str]], clip_loader: Callable[[str], Any] | None
) -> dict:
    """Run the pruner's declared host preparation: the texts and auxiliary CLIP model it ``needs``, then its
    ``prepare``. Returns a dict of host arrays (empty for pruners that need nothing)."""
    if not isinstance(pruner, VisualPruner):
        return {}
    needs: HostNeeds = pruner.needs
    clip = None
    if needs.clip_path is not None:
        if clip_loader is None:
            raise ValueError(f"{pruner.name} needs an auxiliary CLIP model ({needs.clip_path}) and no loader was given")
        clip = clip_loader(needs.clip_path)
    host = HostInputs(config, pixel_values, layouts, texts() if needs.text else None, clip)
    return dict(pruner.prepare(host))


def plan_inputs(
    config,
    inputs: ModelInputs,
    pruner=None,
    *,
    text=None,
    tokenizer=None,
    clip_loader: Callable[[str], Any] | None = None,
) -> Plan:
    """Validate a batch on the host and plan it (see the module docstring). ValueError names any problem."""
    pruner = check_pruner(pruner)
    if pruner is not None:
        pruner.validate(config)
    videos = check_video_pixels(config, inputs.pixel_values_videos)
    c = config
    no_images = c.model_type == "llava_onevision" and inputs.pixel_values is None and videos is not None
    pixel_values = None if no_images else check_pixels(config, inputs.pixel_values)
    ids = input_checks.check_token_ids(inputs.input_ids, c.text.vocab_size)
    mask = input_checks.check_attention_mask(inputs.attention_mask)
    if c.model_type == "llava":
        n = c.tokens_per_image
        slots = slot_count(pruner, c, None, n, 0)
        seq = plan_sequence(
            ids,
            mask,
            image_token_id=c.image_token_id,
            tokens_per_image=n,
            num_images=pixel_values.shape[0],
            slots=slots,
        )
        aux = prepare_host(
            pruner,
            c,
            np.asarray(pixel_values),
            None,
            lambda: image_texts(c, ids, mask, seq, text, tokenizer),
            clip_loader,
        )
        return Plan(seq, pixel_values, None, aux, None)
    if c.model_type == "llava_onevision":
        return _plan_onevision(c, ids, mask, pixel_values, inputs.image_sizes, videos, pruner)
    pix, lay, placeholders = next_layout(c, pixel_values, inputs.image_sizes, pruner)
    slots = [slot_count(pruner, c, li.num_tiles, li.length, li.num_newlines) for li in lay.layouts]
    stride = max(slots)
    seq = plan_sequence(
        ids,
        mask,
        image_token_id=c.image_token_id,
        tokens_per_image=placeholders,
        num_images=pix.shape[0],
        slots=slots,
        slot_stride=stride,
    )
    aux = prepare_host(
        pruner, c, pix, lay.layouts, lambda: image_texts(c, ids, mask, seq, text, tokenizer), clip_loader
    )
    return Plan(seq, pix, lay, aux, stride)


def onevision_image_slots(c, pruner, pix: np.ndarray, lay: OnevisionBatch) -> tuple[list[int], int, dict]:
    """LLaVA-OneVision images under ``pruner``: (visual slots per image, the static stride, the host arrays
    ``prune`` reads from ``ctx.aux``), as :func:`plan_inputs` plans them (see ``_plan_onevision``).

    pix: (NI, T_max, C, S, S) and lay: :func:`vlmprune.anyres.onevision.onevision_batch`'s results."""
    placeholders = [li.num_tokens for li in lay.layouts]
    if not isinstance(pruner, VisualPruner):
        return placeholders, lay.length, {}
    if pruner.selects_per_tile(c) and pruner.spatial_compat(c):
        aux = {
            "spatial_rank": spatial_ranks(lay.layouts, pix.shape[1], pruner.tile_packing(c)),
            "tile_grid": grid_table(lay.layouts),
        }
        return [pruner.budget(c, li.num_tiles).kept for li in lay.layouts], pruner.budget(c, pix.shape[1]).kept, aux
    if pruner.selects_per_tile(c):
        per_tile = pruner.budget(c, 1).kept
        slots = [official_slots(li, per_tile) for li in lay.layouts]
        return slots, max(slots), dict(pruner.prepare(HostInputs(c, pix, lay.layouts)))
    slots, stride = packed_block_slots(c, pruner, [li.num_tiles for li in lay.layouts], placeholders, pix.shape[1])
    return slots, min(stride, lay.length), {}


def packed_block_slots(c, pruner, units, counts, max_units: int) -> tuple[list[int], int]:
    """A visual pruner that selects on each packed block (images: tiles; videos: frames): block ``i`` of
    ``counts[i]`` tokens and ``units[i]`` tiles or frames gets ``min(budget(units[i]), counts[i])`` slots; the
    stride is the budget of ``max_units``."""
    slots = [min(pruner.budget(c, u).kept, v) for u, v in zip(units, counts)]
    return slots, pruner.budget(c, max_units).kept


def _plan_onevision(c, ids, mask, pixel_values, image_sizes, videos, pruner) -> Plan:
    """OneVision: the official packing computed on the host (``vlmprune.anyres.onevision``); every image's block
    gets the batch's largest length. A visual pruner (one whose ``validate`` accepts OneVision) selects on the packed
    block: image ``i`` gets ``min(budget(T_i), V_i)`` slots, the static stride is the budget of the largest grid.
    A pruner that selects per tile (``selects_per_tile``) either keeps the official layout (docs/methods.md §9.4
    mode B: image ``i`` gets ``T + min(K_i·T, oh_i·ow_i) + oh_i`` slots at most, T = ``budget(1)``, the stride is the
    batch's largest, and the pruner's ``prepare`` lists the grids) or, when ``spatial_compat``, gets its whole
    budget (mode A), the rank table of its declared ``tile_packing`` that orders its kept tokens
    (``aux["spatial_rank"]``, ``vlmprune.anyres.onevision.spatial_ranks``) and the images' grids
    (``aux["tile_grid"]`` (NI, 2) rows, cols).

    Videos (``pixel_values_videos``, either kind of batch may be absent): frames take the tile axis, a visual
    pruner selects on each video's packed block with the budget of its frame count, ``min(budget(F), V)`` slots;
    a pruner that selects per tile is refused on videos (the frames are pooled 2x2 before the LLM, so a tile-token
    selection has no place in the video's block)."""
    pix = lay = None
    placeholders, slots, stride, aux = [], [], 0, {}
    if pixel_values is not None:
        pix, lay, placeholders = onevision_batch(c, pixel_values, image_sizes)
        slots, stride, aux = onevision_image_slots(c, pruner, pix, lay)
    vpix = vid = None
    vplace = VideoPlaceholders(c.video_token_id, (), (), 0)  # no videos: a stray <video> id is refused
    if videos is not None:
        if isinstance(pruner, VisualPruner) and pruner.selects_per_tile(c):
            raise NotImplementedError(
                f"{pruner.name} on LLaVA-OneVision videos is not implemented: it selects tokens per tile, and a "
                "video's frames are pooled 2x2 into its packed block before the LLM; use a method that selects on "
                "the packed block or inside the LLM (see docs/methods.md §9.5)"
            )
        vpix, vid = onevision_video_batch(c, videos)
        vslots, vstride = list(vid.counts), vid.length
        if isinstance(pruner, VisualPruner):
            vslots, vstride = packed_block_slots(c, pruner, vid.num_frames, vid.counts, max(vid.num_frames))
            vstride = min(vstride, vid.length)
        vplace = VideoPlaceholders(c.video_token_id, vid.counts, tuple(vslots), vstride)
    seq = plan_sequence(
        ids,
        mask,
        image_token_id=c.image_token_id,
        tokens_per_image=placeholders,
        num_images=0 if pix is None else pix.shape[0],
        slots=slots,
        slot_stride=stride,
        videos=vplace,
    )
    return Plan(seq, pix, lay, aux, stride, vpix, vid)


def shard_inputs(inputs: DeviceInputs, mesh, sharding_for: Callable) -> DeviceInputs:
    """Every array of ``inputs`` placed with ``sharding_for(mesh, shape)`` (the batch axis split)."""
    return jax.tree.map(lambda a: jax.device_put(a, sharding_for(mesh, a.shape)), inputs)
