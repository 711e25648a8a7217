"""HERO's own packer of the visual block (its full layout with a newline closing every stitched row), kept as a
test reference: the library packs every method with ``vlmprune.anyres.pack``; this is the authors' order written
independently, in HERO's (cols, rows) spelling, and checked against their recorded sequences."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import checks
from vlmprune.prune.hero import hero_budget_sizes


def _check_grid(grid, where: str) -> tuple[int, int]:
    try:
        cols, rows = grid
    except (TypeError, ValueError):
        raise ValueError(f"{where}: grid_cols_rows must be a (cols, rows) pair of ints, got {grid!r}") from None
    return (
        checks.check_int("grid cols", cols, lo=1, where=where),
        checks.check_int("grid rows", rows, lo=1, where=where),
    )


#: Fill value of ``HeroPackOrder.tile`` / ``.patch`` in slots past the packed length.
PACK_PAD = -2
#: ``HeroPackOrder.tile`` value of an ``image_newline`` slot.
PACK_NEWLINE = -1


@flax.struct.dataclass
class HeroPackOrder:
    """The packed visual block of one image (§4.3-9) under a static maximum length ``V_max``.

    Slot ``v < length`` holds, in LLM order: a thumbnail token (``tile == 0``), a sub-tile token (``tile`` in 1..K)
    or an ``image_newline`` (``tile == -1``). Slots ``v >= length`` are padding (``valid`` False, ``tile`` and
    ``patch`` = :data:`PACK_PAD`, ``layout_index`` = F).

    Attributes:
      tile: int32 (..., V_max). Tile id, -1 for a newline.
      patch: int32 (..., V_max). Raster patch index within the tile; for a newline, the stitched-grid row it closes.
      layout_index: int32 (..., V_max). Position in the full layout of length ``F = N + Hg * (Wg + 1)``:
        thumbnail token j at j, grid token (y, x) at ``N + y * (Wg + 1) + x``, the newline of row y at
        ``N + y * (Wg + 1) + Wg``; F for padding. :func:`hero_pack_features` gathers with it.
      valid: bool (..., V_max).
      length: int32 (...). Number of valid slots, ``N_global + Σ b_t + Hg``.
    """

    tile: jax.Array
    patch: jax.Array
    layout_index: jax.Array
    valid: jax.Array
    length: jax.Array


def hero_max_visual_len(grid_cols_rows: Sequence[int], keep_ratio: float, tokens_per_side: int = 24) -> int:
    """Tight static bound on the packed visual length: ``N_global + min(N_local, K * N) + Hg``."""
    cols, rows = _check_grid(grid_cols_rows, "hero_max_visual_len")
    s = checks.check_int("tokens_per_side", tokens_per_side, lo=1, where="hero_max_visual_len")
    k, n = cols * rows, s * s
    n_global, n_local = hero_budget_sizes(k, keep_ratio, n)
    return n_global + min(n_local, k * n) + rows * s


def hero_layout_length(grid_cols_rows: Sequence[int], tokens_per_side: int = 24) -> int:
    """Length ``F = N + Hg * (Wg + 1)`` of the full (unpruned) layout, newlines included."""
    cols, rows = _check_grid(grid_cols_rows, "hero_layout_length")
    s = checks.check_int("tokens_per_side", tokens_per_side, lo=1, where="hero_layout_length")
    return s * s + rows * s * (cols * s + 1)


def _layout_tables(cols: int, rows: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """Static (tile, patch) of every full-layout position, plus one trailing PACK_PAD entry; int32 (F + 1,)."""
    n, hg, wg = s * s, rows * s, cols * s
    y, x = np.meshgrid(np.arange(hg), np.arange(wg + 1), indexing="ij")  # x == wg is the newline column
    grid_tile = np.where(x < wg, 1 + (y // s) * cols + np.minimum(x, wg - 1) // s, PACK_NEWLINE)
    grid_patch = np.where(x < wg, (y % s) * s + x % s, y)
    tile = np.concatenate([np.zeros(n), grid_tile.ravel(), [PACK_PAD]]).astype(np.int32)
    patch = np.concatenate([np.arange(n), grid_patch.ravel(), [PACK_PAD]]).astype(np.int32)
    return tile, patch


@functools.partial(jax.jit, static_argnames=("grid", "max_len", "tokens_per_side"))
def _pack_core(mask, *, grid, max_len, tokens_per_side):
    cols, rows = grid
    s = tokens_per_side
    hg, wg = rows * s, cols * s
    tile_tab, patch_tab = _layout_tables(cols, rows, s)
    f = tile_tab.shape[0] - 1

    def one(m):
        # Tiles row-major -> stitched (Hg, Wg) grid; a newline column closes every row (§4.5 full layout).
        grid_keep = m[1:].reshape(rows, cols, s, s).transpose(0, 2, 1, 3).reshape(hg, wg)
        rows_nl = jnp.concatenate([grid_keep, jnp.ones((hg, 1), bool)], axis=1)
        full = jnp.concatenate([m[0], rows_nl.reshape(-1)])  # (F,)
        (src,) = jnp.nonzero(full, size=max_len, fill_value=f)  # ascending = LLM order (§1.5 P3)
        src = src.astype(jnp.int32)
        return HeroPackOrder(
            tile=jnp.asarray(tile_tab)[src],
            patch=jnp.asarray(patch_tab)[src],
            layout_index=src,
            valid=src < f,
            length=jnp.minimum(jnp.sum(full, dtype=jnp.int32), max_len),
        )

    lead = mask.shape[:-2]
    flat = mask.reshape((-1,) + mask.shape[-2:])
    out = jax.vmap(one)(flat)
    return jax.tree_util.tree_map(lambda a: a.reshape(lead + a.shape[1:]), out)


def hero_pack_order(
    mask: jax.Array, grid_cols_rows: Sequence[int], *, max_len: int | None = None, tokens_per_side: int = 24
) -> HeroPackOrder:
    """The packed visual block order of HERO / LLaVA-NeXT with a newline after every stitched row (§4.3-9).

    Args:
      mask: bool (..., 1+K, N) keep mask, row 0 the thumbnail (e.g. ``HeroSelection.mask(N)``); any leading dims.
      grid_cols_rows: static ``(cols, rows)``, ``cols * rows == K``.
      max_len: static slot count ``V_max``. Default: the full layout length F (always enough);
        :func:`hero_max_visual_len` gives the tight bound for a keep ratio. If the mask keeps more than
        ``max_len`` positions the block is truncated and ``length`` is capped at ``max_len``.
      tokens_per_side: tokens along a tile side (N = its square).

    Returns:
      :class:`HeroPackOrder`: the first ``length`` slots are ``N_global`` thumbnail tokens, then per grid row
      y = 0..Hg-1 the kept tokens of that row (grid column ``x = 24 c + i`` ascending) and one newline.
    """
    where = "hero_pack_order"
    cols, rows = _check_grid(grid_cols_rows, where)
    s = checks.check_int("tokens_per_side", tokens_per_side, lo=1, where=where)
    shape = getattr(mask, "shape", None)
    if shape is None or len(shape) < 2:
        raise ValueError(f"{where}: mask must be an array of shape (..., 1+K, N), got {shape}")
    if shape[-2:] != (1 + cols * rows, s * s):
        raise ValueError(
            f"{where}: mask shape {tuple(shape)} does not match (..., 1+K, N) = (..., {1 + cols * rows}, {s * s}) "
            f"for grid {cols}x{rows}"
        )
    if mask.dtype != jnp.bool_:
        raise ValueError(f"{where}: mask must be bool, got {mask.dtype}")
    f = hero_layout_length((cols, rows), s)
    max_len = f if max_len is None else checks.check_int("max_len", max_len, lo=0, hi=f, where=where)
    return _pack_core(jnp.asarray(mask), grid=(cols, rows), max_len=max_len, tokens_per_side=s)


def hero_pack_features(
    features: jax.Array, image_newline: jax.Array, order: HeroPackOrder, grid_cols_rows: Sequence[int]
) -> jax.Array:
    """Gather the packed visual block ``(V_max, C)`` from per-tile features, zeros in padding slots.

    Args:
      features: (1+K, N, C) projected tile features, thumbnail first (unpruned).
      image_newline: (C,) the LLaVA-NeXT ``image_newline`` embedding.
      order: :class:`HeroPackOrder` of this image (no batch dims).
      grid_cols_rows: static ``(cols, rows)``.
    """
    where = "hero_pack_features"
    cols, rows = _check_grid(grid_cols_rows, where)
    checks.check_rank("features", features, 3, where=where, dims="(1+K, N, C)")
    checks.check_rank("image_newline", image_newline, 1, where=where, dims="(C,)")
    k1, n, c = features.shape
    s = math.isqrt(n)
    if s * s != n or k1 != 1 + cols * rows:
        raise ValueError(f"{where}: features {tuple(features.shape)} do not match grid {cols}x{rows} (1+K, s*s, C)")
    checks.check_dims_equal([("image_newline C", image_newline.shape[0], "features C", c)], where=where)
    if order.layout_index.ndim != 1:
        raise ValueError(f"{where}: order must describe one image (1-D fields), got {order.layout_index.shape}")
    return _gather_layout(features, image_newline, order.layout_index, grid=(cols, rows))


@functools.partial(jax.jit, static_argnames=("grid",))
def _gather_layout(features, image_newline, layout_index, *, grid):
    cols, rows = grid
    _, n, c = features.shape
    s = math.isqrt(n)
    hg, wg = rows * s, cols * s
    x_grid = features[1:].reshape(rows, cols, s, s, c).transpose(0, 2, 1, 3, 4).reshape(hg, wg, c)
    nl = jnp.broadcast_to(image_newline.astype(features.dtype), (hg, 1, c))
    full = jnp.concatenate(
        [features[0], jnp.concatenate([x_grid, nl], axis=1).reshape(-1, c), jnp.zeros((1, c), features.dtype)]
    )  # (F + 1, C); row F is the zero row read by padding slots
    return full[layout_index]
