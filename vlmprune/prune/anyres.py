"""Host-side LLaVA-NeXT "anyres" geometry shared by HiRED, HERO and the LLaVA-NeXT packer.

Everything here runs in plain Python / NumPy on static values (image sizes, pinpoints, grids) and returns Python
ints or NumPy arrays. It is meant to be called *before* tracing: the results are static configuration (the grid)
or small constant inputs (HERO's valid-token mask), never traced values.

Size conventions (``algorithms.md`` §1.4). The two original code bases spell image sizes and pinpoints in
opposite orders, and both read the *same* literal pinpoint list ``[[336, 672], [672, 336], ...]`` in their own
order, so the first-wins tie rule can pick a different canvas for the same image:

* ``"height_width"``: HF transformers (``LlavaNextImageProcessor``, used by HiRED). ``image_size = (height, width)``
  and each pinpoint is ``(height, width)``.
* ``"width_height"``: the LLaVA / LLaVA-NeXT repository (used by HERO, VisPruner). ``image_size = (width, height)``
  (PIL ``.size``) and each pinpoint is ``(width, height)``.

There is no default: every function that reads a size takes ``convention=`` explicitly. Grids are always returned
as ``(cols, rows)`` (tiles across, tiles down), whatever the input convention.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, Sequence

import numpy as np

Convention = Literal["height_width", "width_height"]
CONVENTIONS: tuple[str, ...] = ("height_width", "width_height")

#: LLaVA-v1.6 pinpoints as the literal list both repositories ship (read it with either convention).
LLAVA_V16_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def _positive_int(name: str, value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if int(value) <= 0:
        raise ValueError(f"{where}: {name} must be positive, got {value}")
    return int(value)


def _pair(name: str, value, where: str) -> tuple[int, int]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{where}: {name} must be a pair of positive ints, got {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{where}: {name} must be a pair of positive ints, got {value!r}")
    return _positive_int(f"{name}[0]", items[0], where), _positive_int(f"{name}[1]", items[1], where)


def _check_convention(convention, where: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(
            f"{where}: convention must be 'height_width' (HF transformers) or 'width_height' (LLaVA repo), "
            f"got {convention!r}"
        )
    return convention


def _to_wh(pair: tuple[int, int], convention: str) -> tuple[int, int]:
    """(width, height) from a pair spelled in ``convention``."""
    return (pair[1], pair[0]) if convention == "height_width" else pair


def select_best_resolution(
    image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], *, convention: Convention
) -> tuple[int, int]:
    """The anyres canvas for an image (``algorithms.md`` §1.4 step 1).

    For each candidate canvas ``(W, H)``: ``scale = min(W / w, H / h)``, effective resolution
    ``min(int(w * scale) * int(h * scale), w * h)``, wasted ``W * H - effective``. The largest effective resolution
    wins; ties go to the smaller waste, and remaining ties to the *first* candidate in list order.

    Args:
      image_size: the original image size, spelled in ``convention``.
      pinpoints: candidate canvases in pixels, each spelled in ``convention``.
      convention: ``"height_width"`` (HF) or ``"width_height"`` (LLaVA repo); see the module docstring.

    Returns:
      The chosen pinpoint, spelled in the same ``convention`` as the inputs.
    """
    where = "select_best_resolution"
    convention = _check_convention(convention, where)
    size = _pair("image_size", image_size, where)
    cands = list(pinpoints) if pinpoints is not None else []
    if not cands:
        raise ValueError(f"{where}: pinpoints must be a non-empty list of pairs")
    cands = [_pair(f"pinpoints[{i}]", p, where) for i, p in enumerate(cands)]

    w, h = _to_wh(size, convention)
    best = None
    max_effective, min_wasted = 0, math.inf
    for cand in cands:
        cw, ch = _to_wh(cand, convention)
        scale = min(cw / w, ch / h)  # Python float64, as both originals
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = cw * ch - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = cand, effective, wasted
    assert best is not None  # every candidate has effective >= 1 > 0
    return best


def anyres_grid_shape(
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    *,
    convention: Convention,
    patch_size: int = 336,
) -> tuple[int, int]:
    """Tile grid ``(cols, rows)`` of an image: the best canvas divided by the tile size ``patch_size``.

    The number of tiles *including* the base image (HiRED's ``P``) is ``1 + cols * rows``. The LLaVA repo's
    ``get_anyres_image_grid_shape`` returns ``(cols, rows)``; HF's returns ``(rows, cols)``. This function always
    returns ``(cols, rows)``.

    Raises:
      ValueError: non-positive sizes, empty pinpoints, or a chosen canvas that is not a multiple of ``patch_size``.
    """
    where = "anyres_grid_shape"
    patch_size = _positive_int("patch_size", patch_size, where)
    best = select_best_resolution(image_size, pinpoints, convention=convention)
    cw, ch = _to_wh(best, convention)
    if cw % patch_size or ch % patch_size:
        raise ValueError(f"{where}: canvas {cw}x{ch} (w x h) is not a multiple of patch_size {patch_size}")
    return cw // patch_size, ch // patch_size


def _grid(grid_cols_rows, where: str) -> tuple[int, int]:
    return _pair("grid_cols_rows", grid_cols_rows, where)


def hero_valid_grid(
    image_size_wh: Sequence[int], grid_cols_rows: Sequence[int], tokens_per_side: int = 24
) -> np.ndarray:
    """HERO's non-padding tokens of the stitched tile grid, bool ``(rows * s, cols * s)`` with ``s = tokens_per_side``.

    Exactly ``algorithms.md`` §4.3 step 4 (HERO's ``get_valid_token_mask_for_unpadding``), in Python float64:
    with ``Hg = rows * s``, ``Wg = cols * s`` and the image ``(w, h)``:

    * ``w / h > Wg / Hg`` (padding above and below): ``nh = int(h * (Wg / w))``, ``top = (Hg - nh) // 2``;
      rows ``[top, top + nh)`` are valid, all columns.
    * otherwise, *including equal aspect* (padding left and right): ``nw = int(w * (Hg / h))``,
      ``left = (Wg - nw) // 2``; columns ``[left, left + nw)`` are valid, all rows.

    Quirks kept on purpose (§4.3-4, §4.6): the valid band is exactly ``nh`` (``nw``) wide, so an odd padding total
    puts the extra padding line at the bottom/right (vanilla ``unpad_image`` keeps ``nh + 1``); and the float
    truncation is inherited (710x710 on 2x2: ``int(710 * (48 / 710)) == 47``, the last column counts as padding).

    Args:
      image_size_wh: original image ``(width, height)`` in pixels (LLaVA-repo order; HERO has no other).
      grid_cols_rows: the tile grid ``(cols, rows)`` (see :func:`anyres_grid_shape`).
      tokens_per_side: tokens along one tile side (24 for CLIP-L/14-336).
    """
    where = "hero_valid_grid"
    w, h = _pair("image_size_wh", image_size_wh, where)
    cols, rows = _grid(grid_cols_rows, where)
    s = _positive_int("tokens_per_side", tokens_per_side, where)
    hg, wg = rows * s, cols * s
    grid = np.zeros((hg, wg), dtype=bool)
    if w / h > wg / hg:
        nh = int(h * (wg / w))
        top = (hg - nh) // 2
        grid[top : top + nh, :] = True
    else:
        nw = int(w * (hg / h))
        left = (wg - nw) // 2
        grid[:, left : left + nw] = True
    return grid


def grid_to_tiles(grid: np.ndarray, grid_cols_rows: Sequence[int], tokens_per_side: int = 24) -> np.ndarray:
    """Cut a stitched ``(rows * s, cols * s, ...)`` array into tiles ``(cols * rows, s * s, ...)``.

    Tiles are row-major (tile ``r * cols + c``), raster order inside a tile (HERO's reshape, §4.3-4).
    """
    where = "grid_to_tiles"
    cols, rows = _grid(grid_cols_rows, where)
    s = _positive_int("tokens_per_side", tokens_per_side, where)
    grid = np.asarray(grid)
    if grid.shape[:2] != (rows * s, cols * s):
        raise ValueError(
            f"{where}: grid shape {grid.shape[:2]} does not match (rows*s, cols*s) = {(rows * s, cols * s)}"
        )
    rest = grid.shape[2:]
    t = grid.reshape((rows, s, cols, s) + rest)
    t = np.moveaxis(t, 2, 1)  # (rows, cols, s, s, ...)
    return t.reshape((rows * cols, s * s) + rest)


def tiles_to_grid(tiles: np.ndarray, grid_cols_rows: Sequence[int], tokens_per_side: int = 24) -> np.ndarray:
    """Inverse of :func:`grid_to_tiles`: ``(cols * rows, s * s, ...)`` -> ``(rows * s, cols * s, ...)``."""
    where = "tiles_to_grid"
    cols, rows = _grid(grid_cols_rows, where)
    s = _positive_int("tokens_per_side", tokens_per_side, where)
    tiles = np.asarray(tiles)
    if tiles.shape[:2] != (rows * cols, s * s):
        raise ValueError(
            f"{where}: tiles shape {tiles.shape[:2]} does not match (cols*rows, s*s) = {(rows * cols, s * s)}"
        )
    rest = tiles.shape[2:]
    t = tiles.reshape((rows, cols, s, s) + rest)
    t = np.moveaxis(t, 1, 2)  # (rows, s, cols, s, ...)
    return t.reshape((rows * s, cols * s) + rest)


def hero_valid_mask(
    image_size_wh: Sequence[int], grid_cols_rows: Sequence[int], tokens_per_side: int = 24
) -> np.ndarray:
    """HERO's valid-token mask per tile, bool ``(K, s * s)`` with ``K = cols * rows`` (thumbnail excluded).

    :func:`hero_valid_grid` cut into tiles (row-major tiles, raster inside a tile), exactly the ``valid`` input of
    :func:`vlmprune.prune.hero.hero` and the golden ``c{i}_valid_mask``.
    """
    grid = hero_valid_grid(image_size_wh, grid_cols_rows, tokens_per_side)
    return grid_to_tiles(grid, grid_cols_rows, tokens_per_side)


def unpad_bounds(
    image_size: Sequence[int], current_size_hw: Sequence[int], *, convention: Convention
) -> tuple[int, int, int, int]:
    """Vanilla LLaVA-NeXT ``unpad_image`` crop of a ``(Hc, Wc)`` stitched map, as ``(top, bottom, left, right)``.

    HF / LLaVA ``unpad_image`` semantics with ``int()`` truncation (§3.4 step 2): if the original aspect ratio
    ``w / h`` exceeds the current ``Wc / Hc``, ``new_h = int(h * (Wc / w))``, ``pad = (Hc - new_h) // 2`` and rows
    ``[pad, Hc - pad)`` survive (``new_h + 1`` rows when the padding total is odd); otherwise the same on columns.
    Newer HF releases round ``h * scale`` to 7 decimals before truncating; this helper follows the int() form the
    HiRED fork and the LLaVA repo use.

    Args:
      image_size: the original image size, spelled in ``convention``.
      current_size_hw: the stitched map size ``(Hc, Wc)`` in tokens (always height first).
      convention: how ``image_size`` is spelled.

    Returns:
      Python ints ``(top, bottom, left, right)``: keep ``map[top:bottom, left:right]``.
    """
    where = "unpad_bounds"
    convention = _check_convention(convention, where)
    w, h = _to_wh(_pair("image_size", image_size, where), convention)
    hc, wc = _pair("current_size_hw", current_size_hw, where)
    if w / h > wc / hc:
        new_h = int(h * (wc / w))
        pad = (hc - new_h) // 2
        return pad, hc - pad, 0, wc
    new_w = int(w * (hc / h))
    pad = (wc - new_w) // 2
    return 0, hc, pad, wc - pad


def vanilla_unpad_grid(
    image_size: Sequence[int],
    grid_cols_rows: Sequence[int],
    *,
    convention: Convention,
    tokens_per_side: int = 24,
) -> np.ndarray:
    """Bool ``(rows * s, cols * s)``: tokens that survive vanilla ``unpad_image`` (see :func:`unpad_bounds`)."""
    where = "vanilla_unpad_grid"
    cols, rows = _grid(grid_cols_rows, where)
    s = _positive_int("tokens_per_side", tokens_per_side, where)
    top, bottom, left, right = unpad_bounds(image_size, (rows * s, cols * s), convention=convention)
    grid = np.zeros((rows * s, cols * s), dtype=bool)
    grid[top:bottom, left:right] = True
    return grid
