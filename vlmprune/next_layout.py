"""LLaVA-NeXT (anyres) token layout, computed on the host from the image size (NumPy, outside jit).

The official layout, as HF's ``pack_image_features`` builds it: the base image's tokens in raster order, then the
stitched tile grid ``(rows·n, cols·n)`` unpadded to the image's aspect ratio, row by row, each row followed by one
``image_newline``. Everything here depends only on the image size and the pinpoints, so the jitted model receives
it as small integer tables and compiles once for every grid (tiles are padded to the largest grid and masked).

Tables for one image, over its "full layout" of ``F`` entries:
  * ``token``: index into the image's tile-token table ``(max_tiles · N)`` (tile ``t``, patch ``p`` -> ``t·N + p``),
    ``-1`` for a newline kept when its row keeps a token, ``-3`` for a newline that is always kept;
  * ``row``: the stitched-grid row an entry belongs to (``-1`` for base-image tokens); a newline is kept when its
    row keeps at least one token (all rows when nothing is pruned, which reproduces HF exactly).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from vlmprune.prune.anyres import select_best_resolution


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    image_size_hw: tuple[int, int]
    grid_rows: int
    grid_cols: int
    top: int
    bottom: int
    left: int
    right: int
    token: np.ndarray  # int32 (F,)
    row: np.ndarray  # int32 (F,)

    @property
    def num_tiles(self) -> int:
        """Tiles including the base image."""
        return 1 + self.grid_rows * self.grid_cols

    @property
    def length(self) -> int:
        return int(self.token.shape[0])

    @property
    def num_rows(self) -> int:
        return self.bottom - self.top


def grid_shape(image_size_hw: Sequence[int], pinpoints, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of (height, width), HF's ``get_anyres_image_grid_shape``."""
    h, w = select_best_resolution(tuple(int(v) for v in image_size_hw), [tuple(p) for p in pinpoints],
                                  convention="height_width")
    return h // tile_size, w // tile_size


def unpad_crop(image_size_hw: Sequence[int], current_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """HF ``unpad_image`` (transformers >= 4.45: ``int(round(x, 7))``): (top, bottom, left, right) of the kept map."""
    oh, ow = (int(v) for v in image_size_hw)
    ch, cw = current_hw
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


# Layout styles. "official": HF's pack_image_features (unpad crop, a newline after every kept row; a row with no
# kept token loses its newline too). The papers' own layouts (algorithms.md §1.4), for like-for-like comparisons:
#   "uncropped": VisPruner / FasterVLM — no unpad, no newline (their 672x672 canvas: see reference_pinpoints);
#   "cropped": HiRED — unpadded, no newline;
#   "cropped_swapped": HiRED's fork as written — its grid dims are swapped (algorithms.md §3.7): the (rows x cols)
#     tiles, in their raster order, are stitched as a cols x rows grid and that map is unpadded. Same as "cropped"
#     for square grids; for 1x2 / 2x1 / 1x3 / 3x1 the stitched map is transposed in tile layout and the crop
#     can cut kept tokens away;
#   "uncropped_newlines": HERO — no crop, a newline closes every stitched row, kept or not.
STYLES = ("official", "uncropped", "cropped", "cropped_swapped", "uncropped_newlines")


def image_layout(image_size_hw: Sequence[int], pinpoints, *, tile_size: int, tokens_per_side: int,
                 style: str = "official") -> ImageLayout:
    """The layout of one image in ``style`` (see STYLES). Raises ValueError for a non-positive size."""
    if len(image_size_hw) != 2 or min(int(v) for v in image_size_hw) <= 0:
        raise ValueError(f"image size must be (height, width) with positive entries, got {tuple(image_size_hw)}")
    if style not in STYLES:
        raise ValueError(f"unknown layout style {style!r}; one of {STYLES}")
    n = tokens_per_side
    rows, cols = grid_shape(image_size_hw, pinpoints, tile_size)
    # the stitched tile grid: the true one, or HiRED's swapped one (tiles keep their raster order)
    g_rows, g_cols = (cols, rows) if style == "cropped_swapped" else (rows, cols)
    if style in ("official", "cropped", "cropped_swapped"):
        top, bottom, left, right = unpad_crop(image_size_hw, (g_rows * n, g_cols * n))
    else:
        top, bottom, left, right = 0, g_rows * n, 0, g_cols * n
    newline = {"official": [-1], "cropped": [], "cropped_swapped": [], "uncropped": [],
               "uncropped_newlines": [-3]}[style]
    base = np.arange(n * n, dtype=np.int32)
    tok, row = [base], [np.full(n * n, -1, np.int32)]
    xs = np.arange(left, right)
    for y in range(top, bottom):
        tile = 1 + (y // n) * g_cols + xs // n
        patch = (y % n) * n + xs % n
        tok.append((tile * n * n + patch).astype(np.int32))
        tok.append(np.array(newline, np.int32))
        row.append(np.full(xs.size + len(newline), y, np.int32))
    size = (int(image_size_hw[0]), int(image_size_hw[1]))
    return ImageLayout(size, rows, cols, top, bottom, left, right, np.concatenate(tok), np.concatenate(row))


def layout_keep(keep, token, row):
    """Which entries of the full layout survive (jnp, jit-friendly).

    keep: bool (NI, T·N) tile-token keep mask; token, row: int (NI, F) layout tables. A token entry survives when
    its tile token is kept; a ``-1`` newline when its grid row keeps a token; a ``-3`` newline always; padding
    (``-2``) never. Returns bool (NI, F).
    """
    import jax.numpy as jnp

    ni = token.shape[0]
    is_tok = token >= 0
    tok_keep = jnp.take_along_axis(keep, jnp.maximum(token, 0), axis=1) & is_tok
    n_rows = token.shape[1]  # static bound on the grid-row ids (< F)
    seg = jnp.where(is_tok & (row >= 0), row, n_rows)
    row_has = jnp.zeros((ni, n_rows + 1), jnp.int32).at[jnp.arange(ni)[:, None], seg].max(tok_keep.astype(jnp.int32))
    nl_keep = (token == -1) & (jnp.take_along_axis(row_has, jnp.maximum(row, 0), axis=1) > 0)
    return tok_keep | nl_keep | (token == -3)


def max_tiles(pinpoints, tile_size: int) -> int:
    """Largest tile count (base image included) over the pinpoint list: the static tile axis."""
    return 1 + max((h // tile_size) * (w // tile_size) for h, w in pinpoints)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    """Padded layout tables for a batch of images (NI images, F_max entries, R_max grid rows)."""

    token: np.ndarray  # int32 (NI, F_max); padding entries -2
    row: np.ndarray  # int32 (NI, F_max)
    tile_valid: np.ndarray  # bool (NI, T_max)
    layouts: tuple[ImageLayout, ...]

    @property
    def num_rows_max(self) -> int:
        return max(int(lay.bottom) for lay in self.layouts)


def reference_pinpoints(tile_size: int) -> list[list[int]]:
    """VisPruner's (and FasterVLM's evaluation) fixed 2x2 canvas, e.g. [[672, 672]] for 336-px tiles: preprocess
    with a processor using these pinpoints to get the papers' exactly-5·T layout (``reference_processor``)."""
    return [[2 * tile_size, 2 * tile_size]]


def reference_processor(processor, tile_size: int):
    """A copy of a LLaVA-NeXT HF processor whose image processor uses ``reference_pinpoints``."""
    import copy

    proc = copy.deepcopy(processor)
    proc.image_processor.image_grid_pinpoints = reference_pinpoints(tile_size)
    return proc


def batch_layout(image_sizes_hw, pinpoints, *, tile_size: int, tokens_per_side: int,
                 style: str = "official") -> BatchLayout:
    pinpoints = [tuple(int(v) for v in p) for p in pinpoints]
    t_max = max_tiles(pinpoints, tile_size)
    lays = tuple(image_layout(s, pinpoints, tile_size=tile_size, tokens_per_side=tokens_per_side, style=style)
                 for s in np.asarray(image_sizes_hw).tolist())
    f_max = max(lay.length for lay in lays)
    token = np.full((len(lays), f_max), -2, np.int32)
    row = np.full((len(lays), f_max), -1, np.int32)
    tile_valid = np.zeros((len(lays), t_max), bool)
    for i, lay in enumerate(lays):
        token[i, : lay.length] = lay.token
        row[i, : lay.length] = lay.row
        tile_valid[i, : lay.num_tiles] = True
    return BatchLayout(token, row, tile_valid, lays)
