"""Which visual tokens a pruner keeps, and pictures of them.

``kept_mask(model, image, prompt, pruner)`` runs the model's own pure pieces (the tower with exactly the taps the
pruner's ``request`` names, then its ``prune``, with the context the model gives it) and returns a boolean mask
over the patch tokens: (N,) for LLaVA-1.5, (tiles, N) for LLaVA-NeXT (base image first, then the grid tiles in
raster order). LLaVA-OneVision: (tiles, N) for a pruner that selects per tile (the spatial-compat layout), else a
mask over the image's packed slots, since a pruner there selects on the packed block the LLM receives
(``vlmprune.pipeline.packed_selection``). Nothing in the model is changed and the LLM does not run.

``plot_kept`` draws that mask over the *preprocessed* image (the processor resizes and center-crops; the picture
is ``pixel_values`` denormalised with the processor's ``image_mean``/``image_std``, so patches line up exactly):
dropped patches dimmed, kept ones at full brightness, optional patch grid. LLaVA-NeXT and LLaVA-OneVision get two
panels, the base image and the stitched tile grid (tile borders drawn, the region the official layout unpads away
outlined). On OneVision a kept slot of the packed grid map is drawn as its cell of that map laid over the cropped
region, so after anyres_max downsampling one cell spans several tile tokens.
``compare`` draws one panel per (method, budget), titled ``"method — k/N tokens"``.

Budgets (``make_pruner`` / the CLI's ``--compare vispruner:64,fastervlm:64``): a token count for the keep-N
methods (vispruner, fastervlm, divprune, random, uniform); a token count or a rate in (0, 1) for hired and hero;
the total (CLS included) for visionzip, split 54:10 as in its README; none for prumerge_plus (adaptive).
Settings follow the budget as in ``vlmprune.prune.parse_spec``: ``vispruner:64:important_ratio=0.25``.

matplotlib is needed for the drawing functions only (``pip install "vlmprune[viz]"``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlmprune import pipeline, prune
from vlmprune.anyres import batch_layout, max_tiles
from vlmprune.anyres.onevision import onevision_batch
from vlmprune.demo import prepare_inputs
from vlmprune.io.safe_output import staged_file
from vlmprune.pipeline.plan import onevision_image_slots, prepare_host
from vlmprune.prune import spec as spec_mod
from vlmprune.prune.base import LLMPruner, PruneContext, VisualPruner, tile_keep_mask
from vlmprune.types import VisionTaps

DEFAULT_PROMPT = "What is in the image?"
PANEL_INCHES = 3.0  # side of one image panel
TITLE_INCHES = 0.6  # room above a panel for its title
DIM = 0.25  # brightness of dropped patches

_MERGE_NOTES = {"visionzip": "dominant + merge targets (+CLS)", "prumerge_plus": "merge anchors (+1 pooled token)"}


# ----------------------------------------------------------------------------------------------- pruners


def parse_spec(spec: str) -> tuple[str, int | float | None]:
    """``"vispruner:64"`` -> ("vispruner", 64); ``"hired:0.25"`` -> ("hired", 0.25); ``"prumerge_plus"`` -> None
    budget (the method's defaults). The syntax is ``vlmprune.prune.parse_spec``'s; settings are not returned."""
    parts = spec_mod.split_spec(spec)
    if len(parts.budgets) > 1:
        raise ValueError(f"spec {spec!r} lists {len(parts.budgets)} budgets; give one per spec")
    return parts.name, (spec_mod.as_number(parts.budgets[0]) if parts.budgets else None)


def parse_specs(text: str) -> list[tuple[str, int | float | None]]:
    """``"vispruner:64,fastervlm:64"`` -> [("vispruner", 64), ("fastervlm", 64)]."""
    return [
        (p.name, spec_mod.as_number(b) if b is not None else None)
        for p in spec_mod.split_specs(text)
        for b in (p.budgets or (None,))
    ]


def make_pruner(method: str, budget: int | float | None = None, *, num_tokens: int, **settings):
    """A pruner for ``method`` at ``budget`` (see the module docstring), or None for ``"none"``.

    Args:
      method: a name from ``vlmprune.prune.REGISTRY`` or "none".
      budget: kept tokens per image (per tile on LLaVA-NeXT), a rate in (0, 1) for hired/hero, or None for the
        method's defaults.
      num_tokens: N, visual tokens per image (tile) before pruning: ``model.config.tokens_per_image``.
      settings: further method settings (``important_ratio=...``).

    Raises:
      ValueError: unknown method, a budget larger than N, a budget a method does not take.
    """
    return spec_mod.make(method, budget, num_tokens=num_tokens, **settings)


def _resolve_pruner(model, pruner):
    """Pruner | spec string | None -> a validated pruner (or None)."""
    if isinstance(pruner, str):
        pruner = prune.parse_spec(pruner, num_tokens=model.config.tokens_per_image)
    if pruner is None:
        return None
    if not isinstance(pruner, (VisualPruner, LLMPruner)):
        raise TypeError(f"pruner must be a vlmprune pruner, a spec like 'vispruner:64' or None, got {pruner!r}")
    if isinstance(pruner, LLMPruner):
        raise ValueError(
            f"{pruner.name} prunes inside the LLM (by the text's attention after decoder layer "
            f"{getattr(pruner, 'layer', '?')}); kept_mask shows pruning before the LLM only"
        )
    pruner.validate(model.config)
    return pruner


# ----------------------------------------------------------------------------------------------- inputs


def load_image(image):
    """PIL image, path, or uint8 array (H, W, 3) -> RGB PIL image. Raises FileNotFoundError for a missing file."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image {os.fspath(image)!r} not found")
        return Image.open(image).convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image array must be (H, W, 3), got shape {image.shape}")
        return Image.fromarray(np.asarray(image, np.uint8))
    if hasattr(image, "convert"):
        return image.convert("RGB")
    raise TypeError(f"image must be a PIL image, a path or an (H, W, 3) uint8 array, got {type(image).__name__}")


def preprocess(model, image, prompt: str = DEFAULT_PROMPT) -> dict:
    """Processor outputs (numpy) for one (image, prompt): input_ids (1, L), pixel_values (1, C, S, S) or, for
    LLaVA-NeXT, (1, T, C, S, S) plus image_sizes (1, 2)."""

    return prepare_inputs(model, [load_image(image)], [prompt])


def denormalize(pixel_values, image_mean=None, image_std=None) -> np.ndarray:
    """Processor pixels (..., C, S, S) -> float RGB (..., S, S, C) in [0, 1] (undoes ``(x - mean) / std``)."""
    px = np.asarray(pixel_values, np.float32)
    c = px.shape[-3]
    mean = np.zeros(c, np.float32) if image_mean is None else np.asarray(image_mean, np.float32).reshape(c)
    std = np.ones(c, np.float32) if image_std is None else np.asarray(image_std, np.float32).reshape(c)
    img = np.moveaxis(px, -3, -1) * std + mean
    return np.clip(img, 0.0, 1.0)


def processor_stats(model) -> tuple[Any, Any]:
    """(image_mean, image_std) the model's image processor normalises with (None, None when it does not)."""
    ip = getattr(getattr(model, "processor", None), "image_processor", None)
    if ip is None or not getattr(ip, "do_normalize", True):
        return None, None
    return getattr(ip, "image_mean", None), getattr(ip, "image_std", None)


# ----------------------------------------------------------------------------------------------- selection


def encode(model, pixel_values, pruner) -> VisionTaps:
    """The tower's ``VisionTaps`` with exactly the taps the pruner requests (``pruner.request``; the projected
    embeddings too when it asks for them). NeXT / OneVision tiles (NI, T, C, S, S) are encoded as NI·T images."""
    return model.taps(pixel_values, pipeline.tap_request(model.config, pruner))


def projector(model):
    """features (..., N, D_vision) -> LLM embeddings (..., N, D_llm): the model's multimodal projector."""
    return lambda f: pipeline.project(model.module, model.params, f)


def keep_mask_llava(model, pixel_values, pruner) -> np.ndarray:
    """LLaVA-1.5: bool (NI, N) kept patch tokens for pixel_values (NI, C, S, S); all True without a pruner."""
    n = model.config.tokens_per_image
    if pruner is None:
        return np.ones((np.shape(pixel_values)[0], n), bool)
    taps = encode(model, pixel_values, pruner)
    return np.asarray(pruner.prune(taps, PruneContext(config=model.config)).selection.mask(n))


def next_layout(model, image_sizes):
    """LLaVA-NeXT host layout (``vlmprune.anyres.BatchLayout``) for image_sizes (NI, 2) (height, width)."""
    c = model.config
    return batch_layout(
        np.asarray(image_sizes),
        c.image_grid_pinpoints,
        tile_size=c.vision.image_size,
        tokens_per_side=c.vision.image_size // c.vision.patch_size,
    )


def in_layout_mask(token: np.ndarray, num_tiles: int, n: int) -> np.ndarray:
    """bool (num_tiles, N): the tile tokens the official NeXT layout feeds (``token`` (F,), -1 newline, -2 pad);
    grid tokens outside the unpadded region are False."""
    out = np.zeros(num_tiles * n, bool)
    tok = np.asarray(token)
    out[tok[tok >= 0]] = True
    return out.reshape(num_tiles, n)


def keep_mask_next(model, pixel_values, image_sizes, pruner, text: Sequence[str] | None = None) -> list[np.ndarray]:
    """LLaVA-NeXT: per image, bool (tiles_i, N) over its base + grid tiles, True where the token reaches the LLM
    (kept by the pruner and inside the official, unpadded layout).

    pixel_values (NI, T, C, S, S) as the processor returns them; image_sizes (NI, 2); text: the instruction per
    image for text-guided pruners (HERO).
    """
    c = model.config
    n = c.tokens_per_image
    lay = next_layout(model, image_sizes)
    ni, t_max = len(lay.layouts), max_tiles(c.image_grid_pinpoints, c.vision.image_size)
    px = np.asarray(pixel_values, np.float32)
    if px.ndim != 5 or px.shape[0] != ni or px.shape[1] > t_max:
        raise ValueError(f"pixel_values must be (NI={ni}, T<={t_max}, C, S, S) for LLaVA-NeXT, got {px.shape}")
    pix = np.zeros((ni, t_max) + px.shape[2:], np.float32)  # the model pads tiles to the largest grid too
    pix[:, : px.shape[1]] = px
    if pruner is None:
        keep = np.ones((ni, t_max, n), bool)
    else:
        taps = encode(model, pix, pruner)
        texts = list(text) if text is not None else [""] * ni
        extra = prepare_host(pruner, c, pix, lay.layouts, lambda: texts, model.auxiliary_clip)
        ctx = PruneContext(layout=lay.tables(), aux={k: jnp.asarray(v) for k, v in extra.items()}, config=c)
        keep = np.asarray(tile_keep_mask(pruner.prune(taps, ctx), ctx, n))
    return [keep[i, : li.num_tiles] & in_layout_mask(li.token, li.num_tiles, n) for i, li in enumerate(lay.layouts)]


@dataclasses.dataclass(frozen=True)
class OnevisionKept:
    """What one LLaVA-OneVision image feeds the LLM under a pruner.

    Attributes:
      layout: the image's ``vlmprune.anyres.onevision.ImageLayout`` (grid, crop, packed grid size ``out_hw``).
      tiles: bool (tiles, N), a pruner that selects per tile (the spatial-compat layout: every tile token is a
        candidate, no unpad): its kept tokens, base tile first, then the grid tiles in raster order. None otherwise.
      slots: bool (V,) kept slots of the image's packed block (the base tile's N tokens, then the (oh, ow) grid
        map row by row, each row followed by its newline slot): no pruner (all True) or a pruner that selects on
        the packed block. None for a per-tile pruner.
    """

    layout: Any
    tiles: np.ndarray | None = None
    slots: np.ndarray | None = None

    @property
    def base(self) -> np.ndarray:
        """bool (N,): kept base-tile tokens."""
        n = self.layout.tokens_per_side**2
        return self.tiles[0] if self.slots is None else self.slots[:n]

    @property
    def cells(self) -> np.ndarray:
        """bool (oh, ow): kept cells of the packed grid map (packed-block selections only)."""
        n = self.layout.tokens_per_side**2
        oh, ow = self.layout.out_hw
        return self.slots[n : n + oh * (ow + 1)].reshape(oh, ow + 1)[:, :ow]

    @property
    def newlines(self) -> int:
        """Kept newline slots (packed-block selections only; 0 otherwise)."""
        if self.slots is None:
            return 0
        n = self.layout.tokens_per_side**2
        oh, ow = self.layout.out_hw
        return int(self.slots[n : n + oh * (ow + 1)].reshape(oh, ow + 1)[:, ow].sum())


def keep_onevision(model, pixel_values, image_sizes, pruner) -> OnevisionKept:
    """LLaVA-OneVision: what the first image of pixel_values (NI, T, C, S, S) (image_sizes (NI, 2)) feeds the LLM
    under ``pruner``, computed with the model's own stages and the planner's host arrays: a per-tile pruner
    (``selects_per_tile``) in the spatial-compat layout gives a mask per tile; in the official layout (mode B) and
    for a pruner on the packed block (``vlmprune.pipeline.packed_selection``) the kept slots of the packed block."""
    c = model.config
    n = c.tokens_per_image
    pix, batch, _ = onevision_batch(c, np.asarray(pixel_values), image_sizes)
    lay = batch.layouts[0]
    t = pix.shape[1]
    if pruner is None:
        return OnevisionKept(lay, slots=np.asarray(batch.pack.valid[0, : lay.num_tokens]))
    tables = batch.tables()
    _, _, aux = onevision_image_slots(c, pruner, pix, batch)  # the host arrays the planner gives the pruner
    ctx = PruneContext(layout=tables, aux=aux, config=c)
    if pruner.selects_per_tile(c) and pruner.spatial_compat(c):
        taps = encode(model, pix, pruner)
        sel = pruner.prune(taps, ctx).selection  # (NI·T, K) per tile, as the model runs it
        keep = np.asarray(sel.mask(n)).reshape(-1, t, n)[0, : lay.num_tiles]
        return OnevisionKept(lay, tiles=keep)
    request = pipeline.tap_request(c, pruner).replace(projected=False)  # the packed block is projected below
    taps = model.taps(pix, request)
    if pruner.selects_per_tile(c):  # the official layout (mode B): slots of the packed block, scored on the tiles
        sel = pruner.prune(taps, ctx).selection
        slots = np.asarray(sel.mask(batch.length))[0]
        return OnevisionKept(lay, slots=slots[: lay.num_tokens])
    packed = pipeline.packed_block(model.module, model.params, projector(model)(taps.features), tables)
    sel = pipeline.packed_selection(pruner, packed, taps, ctx)
    slots = np.asarray(sel.mask(packed.shape[1]))[0]
    return OnevisionKept(lay, slots=slots[: lay.num_tokens])


# ----------------------------------------------------------------------------------------------- views


@dataclasses.dataclass(frozen=True)
class KeptView:
    """What one pruner keeps of one preprocessed image, ready to draw.

    Attributes:
      label: the method name ("none" without pruning).
      mask: bool (N,) for LLaVA-1.5, (tiles, N) for LLaVA-NeXT and LLaVA-OneVision (base first, then the grid in
        raster order).
      images: float RGB in [0, 1]: (S, S, 3), or (tiles, S, S, 3) for NeXT and OneVision.
      side: tokens per image side (N = side²).
      grid: NeXT / OneVision (rows, cols) of the tile grid; None for 1.5.
      crop: NeXT / OneVision (top, bottom, left, right) of the unpadded region in stitched-grid token units; None for
        1.5 and for OneVision's per-tile views (their spatial-compat layout feeds every grid token).
      total: visual tokens the unpruned model feeds the LLM (image newlines excluded).
      cells: LLaVA-OneVision, no pruner or a pruner on the packed block: bool (oh, ow) kept cells of the packed
        grid map, drawn over the crop of the stitched tiles (one cell covers (uh / oh) x (uw / ow) tokens of the
        unpadded map when it was downsampled); ``mask`` then holds the base tile's tokens and False grid rows.
      newlines: kept newline slots (OneVision's packed block, where they are candidates like any token).
    """

    label: str
    mask: np.ndarray
    images: np.ndarray
    side: int
    grid: tuple[int, int] | None = None
    crop: tuple[int, int, int, int] | None = None
    total: int = 0
    cells: np.ndarray | None = None
    newlines: int = 0

    @property
    def kept(self) -> int:
        return int(self.mask.sum()) + (0 if self.cells is None else int(self.cells.sum()))

    @property
    def title(self) -> str:
        t = f"{self.label} — {self.kept}/{self.total} tokens"
        t += f" (+{self.newlines} newlines)" if self.newlines else ""
        return t + (f"\n{_MERGE_NOTES[self.label]}" if self.label in _MERGE_NOTES else "")


def kept_view(model, x: dict, pruner, *, text: str | None = None) -> KeptView:
    """The KeptView of the first image in processor outputs ``x`` (``preprocess``) under ``pruner``."""
    pruner = _resolve_pruner(model, pruner)
    c = model.config
    side = c.vision.image_size // c.vision.patch_size
    if c.tokens_per_image != side * side:
        raise ValueError(
            f"kept tokens can only be drawn on a square patch grid; this model feeds "
            f"{c.tokens_per_image} tokens per image for a {side}x{side} grid"
        )
    mean, std = processor_stats(model)
    label = "none" if pruner is None else pruner.name
    px = np.asarray(x["pixel_values"])[:1]
    if c.model_type == "llava_next":
        if "image_sizes" not in x:
            raise ValueError("LLaVA-NeXT inputs need image_sizes (use vlmprune.viz.preprocess)")
        sizes = np.asarray(x["image_sizes"])[:1]
        mask = keep_mask_next(model, px, sizes, pruner, text=None if text is None else [text])[0]
        li = next_layout(model, sizes).layouts[0]
        images = denormalize(px[0, : li.num_tiles], mean, std)
        total = int(in_layout_mask(li.token, li.num_tiles, c.tokens_per_image).sum())
        return KeptView(
            label, mask, images, side, (li.grid_rows, li.grid_cols), (li.top, li.bottom, li.left, li.right), total
        )
    if c.model_type == "llava_onevision":
        return onevision_view(model, x, pruner, label, denormalize(px[0], mean, std))
    mask = keep_mask_llava(model, px, pruner)[0]
    return KeptView(label, mask, denormalize(px[0], mean, std), side, total=c.tokens_per_image)


def onevision_view(model, x: dict, pruner, label: str, tiles: np.ndarray) -> KeptView:
    """LLaVA-OneVision's KeptView of the first image of ``x`` (``tiles`` (T, S, S, 3) its denormalised tiles):
    per tile for a per-tile pruner (the whole stitched grid is fed, no crop), else the packed block's kept cells
    over the crop of the stitched grid (see ``KeptView.cells``)."""
    if "image_sizes" not in x:
        raise ValueError("LLaVA-OneVision inputs need image_sizes (use vlmprune.viz.preprocess)")
    side = model.config.vision.image_size // model.config.vision.patch_size
    k = keep_onevision(model, np.asarray(x["pixel_values"])[:1], np.asarray(x["image_sizes"])[:1], pruner)
    lay = k.layout
    images, grid, n = tiles[: lay.num_tiles], (lay.rows, lay.cols), side * side
    if k.tiles is not None:
        return KeptView(label, k.tiles, images, side, grid, None, lay.num_tiles * n)
    oh, ow = lay.out_hw
    mask = np.zeros((lay.num_tiles, n), bool)
    mask[0] = k.base
    crop = (lay.top, lay.bottom, lay.left, lay.right)
    return KeptView(label, mask, images, side, grid, crop, n + oh * ow, cells=k.cells, newlines=k.newlines)


def kept_mask(model, image, prompt: str = DEFAULT_PROMPT, pruner=None) -> np.ndarray:
    """Which visual tokens ``pruner`` keeps for ``image``.

    Args:
      model: a ``vlmprune.load``-ed LLaVA-1.5 or LLaVA-NeXT model with its processor.
      image: PIL image, image path, or uint8 array (H, W, 3).
      prompt: the instruction (only text-guided pruners such as HERO read it).
      pruner: a model-facing pruner (``vlmprune.prune.get(...)``), a spec string (``"vispruner:64"``) or None.

    Returns:
      bool (N,) for LLaVA-1.5 in raster order over the preprocessed image's patch grid; bool (tiles, N) for
      LLaVA-NeXT (base image, then the grid tiles in raster order; tokens the official layout unpads away are
      False). All True without a pruner. LLaVA-OneVision: bool (tiles, N) for a pruner that selects per tile;
      otherwise bool (V,) over the image's packed slots (``OnevisionKept.slots``: base tile, then the possibly
      downsampled grid map row by row, a newline slot after each row).
    """
    x = preprocess(model, image, prompt)
    if model.config.model_type == "llava_onevision":
        k = keep_onevision(model, x["pixel_values"][:1], x["image_sizes"][:1], _resolve_pruner(model, pruner))
        return k.slots if k.tiles is None else k.tiles
    return kept_view(model, x, pruner, text=prompt).mask


# ----------------------------------------------------------------------------------------------- drawing


def token_grid(mask: np.ndarray, side: int) -> np.ndarray:
    """bool (N,) raster mask -> (side, side)."""
    mask = np.asarray(mask, bool)
    if mask.shape != (side * side,):
        raise ValueError(f"mask must have shape ({side * side},) for a {side}x{side} grid, got {mask.shape}")
    return mask.reshape(side, side)


def stitch(tiles: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """(rows·cols, h, w, ...) tiles in raster order -> (rows·h, cols·w, ...)."""
    tiles = np.asarray(tiles)
    if tiles.shape[0] != rows * cols:
        raise ValueError(f"need {rows * cols} tiles for a {rows}x{cols} grid, got {tiles.shape[0]}")
    h, w = tiles.shape[1:3]
    g = tiles.reshape((rows, cols, h, w) + tiles.shape[3:])
    return np.swapaxes(g, 1, 2).reshape((rows * h, cols * w) + tiles.shape[3:])


def shade(image: np.ndarray, grid_mask: np.ndarray, dim: float = DIM) -> np.ndarray:
    """Dim the dropped patches: image (H, W, 3) in [0, 1], grid_mask bool (gh, gw) -> (H, W, 3).

    Each token covers an (H / gh) x (W / gw) block; H and W must be multiples of the grid.
    """
    h, w = image.shape[:2]
    gh, gw = grid_mask.shape
    if h % gh or w % gw:
        raise ValueError(f"image {h}x{w} is not a multiple of the {gh}x{gw} token grid")
    up = np.repeat(np.repeat(np.asarray(grid_mask, bool), h // gh, axis=0), w // gw, axis=1)
    return image * np.where(up, 1.0, float(dim))[..., None]


def cell_mask(shape_hw: tuple[int, int], cells: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """bool (H, W): the pixels of the kept ``cells`` (gh, gw) of a grid laid over the pixel box (top, bottom,
    left, right) of an (H, W) image; False outside the box. Cell (i, j) covers the box pixels (y, x) (counted from
    the box's corner) with ``y·gh // box_h == i`` and ``x·gw // box_w == j``."""
    h, w = shape_hw
    top, bottom, left, right = box
    cells = np.asarray(cells, bool)
    gh, gw = cells.shape
    if not (0 <= top <= bottom <= h and 0 <= left <= right <= w):
        raise ValueError(f"box {box} is not inside the {h}x{w} image")
    out = np.zeros((h, w), bool)
    bh, bw = bottom - top, right - left
    if min(gh, gw, bh, bw) == 0:
        return out
    ry = (np.arange(bh) * gh) // bh
    rx = (np.arange(bw) * gw) // bw
    out[top:bottom, left:right] = cells[ry[:, None], rx[None, :]]
    return out


def _draw(ax, image, grid_mask, *, grid_lines: bool, dim: float, tile_grid=None, crop=None, cells=None):
    """One axes: the shaded image, optional patch lines, tile borders and the unpadded region (NeXT).

    ``cells`` (OneVision's packed grid map): shade by its cells laid over the crop instead of by ``grid_mask``
    (which then only gives the token grid of the crop's pixel box); the patch lines are the cells' edges."""
    h, w = image.shape[:2]
    gh, gw = grid_mask.shape
    if cells is None:
        ax.imshow(shade(image, grid_mask, dim), interpolation="nearest", extent=(0, w, h, 0))
    else:
        top, bottom, left, right = crop
        py, px = h // gh, w // gw
        box = (top * py, bottom * py, left * px, right * px)
        keep = cell_mask((h, w), cells, box)
        ax.imshow(image * np.where(keep, 1.0, float(dim))[..., None], interpolation="nearest", extent=(0, w, h, 0))
    if grid_lines and cells is None:
        ax.vlines(np.arange(1, gw) * (w / gw), 0, h, colors="white", linewidths=0.4, alpha=0.45)
        ax.hlines(np.arange(1, gh) * (h / gh), 0, w, colors="white", linewidths=0.4, alpha=0.45)
    elif grid_lines:
        ch, cw = cells.shape
        y0, y1, x0, x1 = box
        if ch and cw:
            ax.vlines(x0 + np.arange(1, cw) * ((x1 - x0) / cw), y0, y1, colors="white", linewidths=0.4, alpha=0.45)
            ax.hlines(y0 + np.arange(1, ch) * ((y1 - y0) / ch), x0, x1, colors="white", linewidths=0.4, alpha=0.45)
    if tile_grid is not None:
        rows, cols = tile_grid
        ax.vlines(np.arange(1, cols) * (w / cols), 0, h, colors="white", linewidths=1.6)
        ax.hlines(np.arange(1, rows) * (h / rows), 0, w, colors="white", linewidths=1.6)
    if crop is not None:
        import matplotlib.patches as mpatches

        top, bottom, left, right = crop
        py, px = h / gh, w / gw
        if (top, bottom, left, right) != (0, gh, 0, gw):
            ax.add_patch(
                mpatches.Rectangle(
                    (left * px, top * py),
                    (right - left) * px,
                    (bottom - top) * py,
                    fill=False,
                    edgecolor="yellow",
                    linestyle="--",
                    linewidth=1.2,
                )
            )
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def draw_view(view: KeptView, axes, *, grid_lines: bool = True, dim: float = DIM) -> None:
    """Draw a KeptView: one axes for LLaVA-1.5; two (base, tile grid) for LLaVA-NeXT and LLaVA-OneVision."""
    axes = list(np.atleast_1d(axes))
    if view.grid is None:
        _draw(axes[0], view.images, token_grid(view.mask, view.side), grid_lines=grid_lines, dim=dim)
        return
    rows, cols = view.grid
    _draw(axes[0], view.images[0], token_grid(view.mask[0], view.side), grid_lines=grid_lines, dim=dim)
    axes[0].set_xlabel("base image", fontsize=8)
    grid_img = stitch(view.images[1:], rows, cols)
    grid_mask = stitch(view.mask[1:].reshape(-1, view.side, view.side), rows, cols)
    _draw(
        axes[1],
        grid_img,
        grid_mask,
        grid_lines=grid_lines,
        dim=dim,
        tile_grid=(rows, cols),
        crop=view.crop,
        cells=view.cells,
    )
    label = f"{rows}x{cols} tiles"
    if view.cells is not None and view.crop is not None:
        top, bottom, left, right = view.crop
        (oh, ow), (uh, uw) = view.cells.shape, (bottom - top, right - left)
        if (oh, ow) != (uh, uw):
            label += f", {uh}x{uw} tokens downsampled to {oh}x{ow}"
    axes[1].set_xlabel(label, fontsize=8)


def figure(views: Sequence[KeptView], *, grid_lines: bool = True, dim: float = DIM):
    """A matplotlib Figure with one titled panel per view, side by side (no pyplot state involved).

    LLaVA-1.5: 1 row of square panels. LLaVA-NeXT: each panel is a column with the base image above the tile
    grid. Size: ``PANEL_INCHES`` per panel column, plus ``TITLE_INCHES`` for the titles.
    """
    from matplotlib.figure import Figure

    if not views:
        raise ValueError("nothing to draw: no views")
    nxt = views[0].grid is not None
    p = len(views)
    if not nxt:
        fig = Figure(figsize=(PANEL_INCHES * p, PANEL_INCHES + TITLE_INCHES))
        axes = fig.subplots(1, p, squeeze=False)[0]
        fig.subplots_adjust(
            left=0.02, right=0.98, bottom=0.02, top=PANEL_INCHES / (PANEL_INCHES + TITLE_INCHES), wspace=0.05
        )
        for ax, v in zip(axes, views):
            draw_view(v, ax, grid_lines=grid_lines, dim=dim)
            ax.set_title(v.title, fontsize=9)
        return fig
    rows, cols = views[0].grid
    grid_h = PANEL_INCHES * rows / cols
    height = PANEL_INCHES + grid_h + TITLE_INCHES + 0.4
    fig = Figure(figsize=(PANEL_INCHES * p, height))
    axes = fig.subplots(2, p, squeeze=False, gridspec_kw={"height_ratios": [PANEL_INCHES, grid_h]})
    fig.subplots_adjust(
        left=0.02, right=0.98, bottom=0.3 / height, top=1 - TITLE_INCHES / height, wspace=0.05, hspace=0.25
    )
    for j, v in enumerate(views):
        if v.grid != (rows, cols):
            raise ValueError("all views of one figure must come from the same image")
        draw_view(v, axes[:, j], grid_lines=grid_lines, dim=dim)
        axes[0, j].set_title(v.title, fontsize=9)
    return fig


#: file suffix -> the image format ``save`` writes for it
IMAGE_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}


def image_format(path: str) -> str:
    """The format for ``path``'s suffix (``IMAGE_FORMATS``); ValueError for any other suffix."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in IMAGE_FORMATS:
        raise ValueError(
            f"{os.fspath(path)}: unsupported image suffix {ext or '(none)'!r}; use one of {', '.join(IMAGE_FORMATS)}"
        )
    return IMAGE_FORMATS[ext]


def save(fig, path: str, *, dpi: int = 100, overwrite: bool = False, flag: str = "overwrite=True") -> str:
    """Write ``fig`` at exactly figsize·dpi pixels, in the format its suffix names (PNG, JPEG, PDF, SVG).

    An existing file is kept (``OutputExistsError``) unless ``overwrite``; the image is written to a temporary
    sibling and moved into place when complete. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fmt = image_format(path)
    FigureCanvasAgg(fig)
    with staged_file(os.fspath(path), overwrite=overwrite, flag=flag) as tmp:
        fig.savefig(tmp, dpi=dpi, format=fmt)
    return os.fspath(path)


def plot_kept(
    model,
    image,
    pruner=None,
    prompt: str = DEFAULT_PROMPT,
    *,
    out: str | None = None,
    grid_lines: bool = True,
    dim: float = DIM,
    dpi: int = 100,
    overwrite: bool = False,
):
    """Draw the tokens ``pruner`` keeps over the preprocessed ``image``; write it to ``out`` when given (see
    ``save``: the suffix picks the format, an existing file needs ``overwrite``).

    Returns the matplotlib Figure (one panel; LLaVA-NeXT: base image above the tile grid).
    """
    if out is not None:
        image_format(out)
    fig = figure(
        [kept_view(model, preprocess(model, image, prompt), pruner, text=prompt)], grid_lines=grid_lines, dim=dim
    )
    if out is not None:
        save(fig, out, dpi=dpi, overwrite=overwrite)
    return fig


def compare(
    model,
    image,
    methods: Iterable,
    prompt: str = DEFAULT_PROMPT,
    *,
    out: str | None = None,
    grid_lines: bool = True,
    dim: float = DIM,
    dpi: int = 100,
    overwrite: bool = False,
):
    """One panel per (method, budget), side by side, titled "method — k/N tokens".

    Args:
      methods: items of ``(method, budget)`` (budget None for defaults), spec strings ``"vispruner:64"``,
        pruners, or None (no pruning); or one comma-separated string ``"vispruner:64,fastervlm:64"``.
      out: image path to write (optional; see ``save``).

    Returns:
      The matplotlib Figure (``len(methods)`` titled panels).
    """
    n = model.config.tokens_per_image
    pruners = []
    for m in [methods] if isinstance(methods, str) else methods:
        if isinstance(m, tuple):
            pruners.append(make_pruner(*m, num_tokens=n))
        elif isinstance(m, str):
            pruners += prune.parse_specs(m, num_tokens=n)
        else:
            pruners.append(m)
    if not pruners:
        raise ValueError("compare needs at least one method")
    if out is not None:
        image_format(out)
    x = preprocess(model, image, prompt)
    fig = figure([kept_view(model, x, p, text=prompt) for p in pruners], grid_lines=grid_lines, dim=dim)
    if out is not None:
        save(fig, out, dpi=dpi, overwrite=overwrite)
    return fig


__all__ = [
    "IMAGE_FORMATS",
    "KeptView",
    "OnevisionKept",
    "cell_mask",
    "compare",
    "denormalize",
    "figure",
    "image_format",
    "kept_mask",
    "kept_view",
    "keep_onevision",
    "make_pruner",
    "parse_spec",
    "parse_specs",
    "plot_kept",
    "preprocess",
    "save",
    "shade",
    "stitch",
]
