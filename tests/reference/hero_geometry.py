"""HERO's and the LLaVA repository's spelling of the anyres geometry, over ``vlmprune.anyres``.

The originals spell grids ``(cols, rows)`` (``get_anyres_image_grid_shape``) and HERO spells image sizes
``(width, height)``; the library has one convention (``Grid(rows, cols)``, sizes ``(height, width)``). These thin
adapters let the golden tests read the authors' recorded values as they were written.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlmprune import anyres
from vlmprune.anyres import LLAVA_V16_PINPOINTS, Grid, select_best_resolution  # noqa: F401


def _grid(grid_cols_rows) -> Grid:
    cols, rows = grid_cols_rows
    return anyres.geometry.as_grid((rows, cols), "grid_cols_rows")


def anyres_grid_shape(image_size, pinpoints, *, convention, patch_size: int = 336) -> tuple[int, int]:
    """``(cols, rows)`` as the LLaVA repository's ``get_anyres_image_grid_shape`` returns it."""
    g = anyres.grid_for(image_size, pinpoints, tile_size=patch_size, convention=convention)
    return g.cols, g.rows


def hero_valid_grid(image_size_wh: Sequence[int], grid_cols_rows, tokens_per_side: int = 24) -> np.ndarray:
    w, h = image_size_wh
    return anyres.unpad_grid((h, w), _grid(grid_cols_rows), tokens_per_side=tokens_per_side, rule="hero")


def hero_valid_mask(image_size_wh: Sequence[int], grid_cols_rows, tokens_per_side: int = 24) -> np.ndarray:
    w, h = image_size_wh
    return anyres.hero_valid_mask((h, w), _grid(grid_cols_rows), tokens_per_side)


def unpad_bounds(image_size, current_size_hw, *, convention) -> tuple[int, int, int, int]:
    """The LLaVA repository's ``unpad_image`` (``int()`` truncation) with the image size in ``convention``."""
    hw = tuple(image_size) if convention == "height_width" else tuple(image_size)[::-1]
    return anyres.unpad_bounds(hw, current_size_hw, rule="llava")


def vanilla_unpad_grid(image_size, grid_cols_rows, *, convention, tokens_per_side: int = 24) -> np.ndarray:
    hw = tuple(image_size) if convention == "height_width" else tuple(image_size)[::-1]
    return anyres.unpad_grid(hw, _grid(grid_cols_rows), tokens_per_side=tokens_per_side, rule="llava")


def grid_to_tiles(grid_map, grid_cols_rows, tokens_per_side: int = 24) -> np.ndarray:
    return anyres.grid_to_tiles(grid_map, _grid(grid_cols_rows), tokens_per_side)


def tiles_to_grid(tiles, grid_cols_rows, tokens_per_side: int = 24) -> np.ndarray:
    return anyres.tiles_to_grid(tiles, _grid(grid_cols_rows), tokens_per_side)
