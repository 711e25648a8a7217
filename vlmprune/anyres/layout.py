"""LLaVA-NeXT token layouts (packing styles) on the host: image sizes -> :class:`vlmprune.types.NextLayout`.

The official layout, as HF's ``pack_image_features`` builds it: the base image's tokens in raster order, then the
stitched tile grid ``(rows·n, cols·n)`` unpadded to the image's aspect ratio, row by row, each row followed by one
``image_newline``. It depends only on the image size and the pinpoints, so the jitted model receives it as small
integer tables and compiles once for every grid (tiles are padded to the largest grid and masked). The table
encoding is documented on :class:`vlmprune.types.NextLayout`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from vlmprune.anyres.geometry import Grid, grid_for, max_tiles, unpad_bounds
from vlmprune.types import NextLayout

# Packing styles. "official": HF's pack_image_features (unpad crop, a newline after every kept row; a row with no
# kept token loses its newline too). The papers' own layouts, for like-for-like comparisons:
#   "uncropped": VisPruner / FasterVLM: no unpad, no newline (their 672x672 canvas: see reference_pinpoints);
#   "cropped": HiRED: unpadded, no newline;
#   "cropped_swapped": HiRED's fork as written: its grid dims are swapped; the (rows x cols) tiles, in their raster
#     order, are stitched as a cols x rows grid and that map is unpadded. Same as "cropped" for square grids;
#   "uncropped_newlines": HERO: no crop, a newline closes every stitched row, kept or not.
STYLES = ("official", "uncropped", "cropped", "cropped_swapped", "uncropped_newlines")
_NEWLINE = {"official": [-1], "cropped": [], "cropped_swapped": [], "uncropped": [], "uncropped_newlines": [-3]}


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """One image's layout: its size (h, w), tile :class:`Grid`, the unpad crop of the stitched map and the tables
    ``token`` / ``row`` int32 (F,) (see :class:`vlmprune.types.NextLayout`)."""

    image_size_hw: tuple[int, int]
    grid: Grid
    top: int
    bottom: int
    left: int
    right: int
    token: np.ndarray
    row: np.ndarray

    @property
    def grid_rows(self) -> int:
        return self.grid.rows

    @property
    def grid_cols(self) -> int:
        return self.grid.cols

    @property
    def num_tiles(self) -> int:
        """Tiles including the base image."""
        return self.grid.num_tiles

    @property
    def length(self) -> int:
        return int(self.token.shape[0])

    @property
    def num_rows(self) -> int:
        return self.bottom - self.top

    @property
    def num_newlines(self) -> int:
        return int((self.token < 0).sum())


def image_layout(
    image_size_hw: Sequence[int], pinpoints, *, tile_size: int, tokens_per_side: int, style: str = "official"
) -> ImageLayout:
    """The layout of one image in ``style`` (see STYLES). Raises ValueError for a non-positive size."""
    if len(image_size_hw) != 2 or min(int(v) for v in image_size_hw) <= 0:
        raise ValueError(f"image size must be (height, width) with positive entries, got {tuple(image_size_hw)}")
    if style not in STYLES:
        raise ValueError(f"unknown layout style {style!r}; one of {STYLES}")
    n = tokens_per_side
    size = (int(image_size_hw[0]), int(image_size_hw[1]))
    grid = grid_for(size, pinpoints, tile_size=tile_size)
    stitched = grid.transposed() if style == "cropped_swapped" else grid  # tiles keep their raster order
    if style in ("official", "cropped", "cropped_swapped"):
        top, bottom, left, right = unpad_bounds(size, (stitched.rows * n, stitched.cols * n), rule="hf")
    else:
        top, bottom, left, right = 0, stitched.rows * n, 0, stitched.cols * n
    newline = _NEWLINE[style]
    tok, row = [np.arange(n * n, dtype=np.int32)], [np.full(n * n, -1, np.int32)]
    xs = np.arange(left, right)
    for y in range(top, bottom):
        tile = 1 + (y // n) * stitched.cols + xs // n
        patch = (y % n) * n + xs % n
        tok.append((tile * n * n + patch).astype(np.int32))
        tok.append(np.array(newline, np.int32))
        row.append(np.full(xs.size + len(newline), y, np.int32))
    return ImageLayout(size, grid, top, bottom, left, right, np.concatenate(tok), np.concatenate(row))


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Padded layout tables for a batch of NI images (F_max entries, T_max tiles), host side."""

    token: np.ndarray  # int32 (NI, F_max); padding entries -2
    row: np.ndarray  # int32 (NI, F_max)
    tile_valid: np.ndarray  # bool (NI, T_max)
    layouts: tuple[ImageLayout, ...]

    @property
    def num_rows_max(self) -> int:
        return max(int(lay.bottom) for lay in self.layouts)

    def tables(self) -> NextLayout:
        """The device-side :class:`NextLayout` pytree."""
        return NextLayout(
            token=jnp.asarray(self.token), row=jnp.asarray(self.row), tile_valid=jnp.asarray(self.tile_valid)
        )


def batch_layout(
    image_sizes_hw, pinpoints, *, tile_size: int, tokens_per_side: int, style: str = "official"
) -> BatchLayout:
    """Layouts of a batch of images (NI, 2) (height, width), padded to the longest and to the largest grid."""
    pinpoints = [tuple(int(v) for v in p) for p in pinpoints]
    t_max = max_tiles(pinpoints, tile_size)
    lays = tuple(
        image_layout(s, pinpoints, tile_size=tile_size, tokens_per_side=tokens_per_side, style=style)
        for s in np.asarray(image_sizes_hw).tolist()
    )
    f_max = max(lay.length for lay in lays)
    token = np.full((len(lays), f_max), -2, np.int32)
    row = np.full((len(lays), f_max), -1, np.int32)
    tile_valid = np.zeros((len(lays), t_max), bool)
    for i, lay in enumerate(lays):
        token[i, : lay.length] = lay.token
        row[i, : lay.length] = lay.row
        tile_valid[i, : lay.num_tiles] = True
    return BatchLayout(token, row, tile_valid, lays)


def reference_pinpoints(tile_size: int) -> list[list[int]]:
    """VisPruner's (and FasterVLM's evaluation) fixed 2x2 canvas, e.g. [[672, 672]] for 336-px tiles: preprocess
    with a processor using these pinpoints to get the papers' exactly-5·T layout (``reference_processor``)."""
    return [[2 * tile_size, 2 * tile_size]]


def reference_processor(processor, tile_size: int):
    """A copy of a LLaVA-NeXT HF processor whose image processor uses ``reference_pinpoints``."""
    proc = copy.deepcopy(processor)
    proc.image_processor.image_grid_pinpoints = reference_pinpoints(tile_size)
    return proc
