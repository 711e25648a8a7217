"""LLaVA-NeXT "anyres" geometry on the host (plain Python / NumPy on static values, before tracing).

One grid convention: :class:`Grid` ``(rows, cols)``, tiles down then across, whatever the source spells. Image
sizes are ``(height, width)`` unless a function takes ``convention=`` (the canvas choice, where the two original
code bases read the same literal pinpoint list in opposite orders and can pick different canvases on ties):

* ``"height_width"``: HF transformers (``LlavaNextImageProcessor``; also HiRED). Sizes and pinpoints (h, w).
* ``"width_height"``: the LLaVA / LLaVA-NeXT repository (HERO, VisPruner). Sizes (PIL ``.size``) and pinpoints
  (w, h).

One unpad rule, :func:`unpad_bounds`, with the originals' rounding variants (:data:`UNPAD_RULES`):

* ``"hf"``: transformers >= 4.45 ``unpad_image``: ``int(round(h * scale, 7))``, symmetric crop;
* ``"llava"``: the LLaVA repository and the HiRED fork: ``int(h * scale)``, symmetric crop (an odd padding total
  keeps ``new + 1`` lines);
* ``"hero"``: HERO's valid-token mask: ``int(h * scale)`` and exactly ``new`` lines from ``(total - new) // 2``
  (the extra padding line goes to the bottom / right).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np

Convention = Literal["height_width", "width_height"]
CONVENTIONS: tuple[str, ...] = ("height_width", "width_height")

#: LLaVA-v1.6 pinpoints as the literal list both repositories ship (read it with either convention).
LLAVA_V16_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

#: unpad variants: name -> (rounding, band); see the module docstring.
UNPAD_RULES: dict[str, tuple[str, str]] = {
    "hf": ("round7", "symmetric"),
    "llava": ("int", "symmetric"),
    "hero": ("int", "exact"),
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """The tile grid of one image: ``rows`` tiles down, ``cols`` tiles across (base image not counted)."""

    rows: int
    cols: int

    @property
    def num_tiles(self) -> int:
        """Grid tiles plus the base image."""
        return 1 + self.rows * self.cols

    def transposed(self) -> Grid:
        return Grid(self.cols, self.rows)


def positive_int(name: str, value, where: str) -> int:
    """``value`` as an int; ValueError naming ``name`` unless it is a positive integer (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")
    if int(value) <= 0:
        raise ValueError(f"{where}: {name} must be positive, got {value}")
    return int(value)


def positive_pair(name: str, value, where: str) -> tuple[int, int]:
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{where}: {name} must be a pair of positive ints, got {value!r}") from None
    if len(items) != 2:
        raise ValueError(f"{where}: {name} must be a pair of positive ints, got {value!r}")
    return positive_int(f"{name}[0]", items[0], where), positive_int(f"{name}[1]", items[1], where)


def as_grid(grid, where: str) -> Grid:
    if isinstance(grid, Grid):
        rows, cols = grid.rows, grid.cols
    else:
        rows, cols = positive_pair("grid (rows, cols)", grid, where)
    return Grid(positive_int("grid.rows", rows, where), positive_int("grid.cols", cols, where))


def _check_convention(convention, where: str) -> str:
    if convention not in CONVENTIONS:
        raise ValueError(
            f"{where}: convention must be 'height_width' (HF transformers) or 'width_height' (LLaVA repo), "
            f"got {convention!r}"
        )
    return convention


def _to_hw(pair: tuple[int, int], convention: str) -> tuple[int, int]:
    return pair if convention == "height_width" else (pair[1], pair[0])


def select_best_resolution(
    image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], *, convention: Convention
) -> tuple[int, int]:
    """The anyres canvas for an image: the pinpoint with the largest effective resolution
    ``min(int(w·s)·int(h·s), w·h)`` (``s = min(W/w, H/h)``), ties to the smaller waste, then to the first listed.

    ``image_size`` and every pinpoint are spelled in ``convention``; the chosen pinpoint is returned as listed.
    """
    where = "select_best_resolution"
    convention = _check_convention(convention, where)
    h, w = _to_hw(positive_pair("image_size", image_size, where), convention)
    cands = list(pinpoints) if pinpoints is not None else []
    if not cands:
        raise ValueError(f"{where}: pinpoints must be a non-empty list of pairs")
    cands = [positive_pair(f"pinpoints[{i}]", p, where) for i, p in enumerate(cands)]
    best, max_effective, min_wasted = None, 0, math.inf
    for cand in cands:
        ch, cw = _to_hw(cand, convention)
        scale = min(cw / w, ch / h)  # Python float64, as both originals
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = cw * ch - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = cand, effective, wasted
    return best


def grid_for(
    image_size: Sequence[int],
    pinpoints: Sequence[Sequence[int]],
    *,
    tile_size: int,
    convention: Convention = "height_width",
) -> Grid:
    """The tile :class:`Grid` of an image: its best canvas divided by ``tile_size``.

    Raises ValueError for non-positive sizes, empty pinpoints, or a canvas that is not a multiple of the tile.
    """
    where = "grid_for"
    tile_size = positive_int("tile_size", tile_size, where)
    ch, cw = _to_hw(select_best_resolution(image_size, pinpoints, convention=convention), convention)
    if cw % tile_size or ch % tile_size:
        raise ValueError(f"{where}: canvas {ch}x{cw} (h x w) is not a multiple of the tile size {tile_size}")
    return Grid(ch // tile_size, cw // tile_size)


def max_tiles(pinpoints, tile_size: int) -> int:
    """Largest tile count (base image included) over the pinpoints: the static tile axis of a batch."""
    return 1 + max((int(h) // tile_size) * (int(w) // tile_size) for h, w in pinpoints)


def unpad_bounds(image_size_hw: Sequence[int], map_hw: Sequence[int], *, rule: str = "hf") -> tuple[int, int, int, int]:
    """The part of a stitched ``(Hc, Wc)`` token map that holds the image, as ``(top, bottom, left, right)``.

    Wider than the map (``w / h > Wc / Hc``): rows are cropped, ``new = h·Wc/w`` rounded per ``rule``; otherwise
    (equal aspect included) columns, ``new = w·Hc/h``. ``rule`` is one of :data:`UNPAD_RULES`.
    """
    where = "unpad_bounds"
    if rule not in UNPAD_RULES:
        raise ValueError(f"{where}: rule must be one of {sorted(UNPAD_RULES)}, got {rule!r}")
    rounding, band = UNPAD_RULES[rule]
    h, w = positive_pair("image_size_hw", image_size_hw, where)
    hc, wc = positive_pair("map_hw", map_hw, where)

    def size(x: float) -> int:
        return int(round(x, 7)) if rounding == "round7" else int(x)

    def crop(total: int, new: int) -> tuple[int, int]:
        start = (total - new) // 2
        return (start, start + new) if band == "exact" else (start, total - start)

    if w / h > wc / hc:
        top, bottom = crop(hc, size(h * (wc / w)))
        return top, bottom, 0, wc
    left, right = crop(wc, size(w * (hc / h)))
    return 0, hc, left, right


def unpad_grid(image_size_hw: Sequence[int], grid, *, tokens_per_side: int, rule: str = "hf") -> np.ndarray:
    """bool ``(rows·s, cols·s)``: the stitched-map tokens inside :func:`unpad_bounds` (``s = tokens_per_side``)."""
    g = as_grid(grid, "unpad_grid")
    s = positive_int("tokens_per_side", tokens_per_side, "unpad_grid")
    top, bottom, left, right = unpad_bounds(image_size_hw, (g.rows * s, g.cols * s), rule=rule)
    out = np.zeros((g.rows * s, g.cols * s), bool)
    out[top:bottom, left:right] = True
    return out


def grid_to_tiles(grid_map: np.ndarray, grid, tokens_per_side: int) -> np.ndarray:
    """Cut a stitched ``(rows·s, cols·s, ...)`` array into tiles ``(rows·cols, s·s, ...)``: tile ``r·cols + c``,
    raster order inside a tile."""
    where = "grid_to_tiles"
    g = as_grid(grid, where)
    s = positive_int("tokens_per_side", tokens_per_side, where)
    grid_map = np.asarray(grid_map)
    if grid_map.shape[:2] != (g.rows * s, g.cols * s):
        raise ValueError(
            f"{where}: map shape {grid_map.shape[:2]} does not match (rows·s, cols·s) = {(g.rows * s, g.cols * s)}"
        )
    rest = grid_map.shape[2:]
    t = np.moveaxis(grid_map.reshape((g.rows, s, g.cols, s) + rest), 2, 1)
    return t.reshape((g.rows * g.cols, s * s) + rest)


def tiles_to_grid(tiles: np.ndarray, grid, tokens_per_side: int) -> np.ndarray:
    """Inverse of :func:`grid_to_tiles`: ``(rows·cols, s·s, ...)`` -> ``(rows·s, cols·s, ...)``."""
    where = "tiles_to_grid"
    g = as_grid(grid, where)
    s = positive_int("tokens_per_side", tokens_per_side, where)
    tiles = np.asarray(tiles)
    if tiles.shape[:2] != (g.rows * g.cols, s * s):
        raise ValueError(
            f"{where}: tiles shape {tiles.shape[:2]} does not match (rows·cols, s·s) = {(g.rows * g.cols, s * s)}"
        )
    rest = tiles.shape[2:]
    t = np.moveaxis(tiles.reshape((g.rows, g.cols, s, s) + rest), 1, 2)
    return t.reshape((g.rows * s, g.cols * s) + rest)


def hero_valid_mask(image_size_hw: Sequence[int], grid, tokens_per_side: int = 24) -> np.ndarray:
    """HERO's non-padding tokens per grid tile, bool ``(rows·cols, s·s)`` (thumbnail excluded): the ``"hero"``
    unpad rule on the stitched map, cut into tiles (the ``valid`` input of :func:`vlmprune.prune.hero.hero`)."""
    valid = unpad_grid(image_size_hw, grid, tokens_per_side=tokens_per_side, rule="hero")
    return grid_to_tiles(valid, grid, tokens_per_side)
