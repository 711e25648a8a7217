"""Per-tile pruners in LLaVA-OneVision's official layout (docs/methods.md §9.4 mode B) [PROPOSED].

HF's packed block of an image is kept as it is: the base tile's ``n²`` tokens, then the unpadded (and, when
``anyres_max`` asks for it, bilinearly downsampled) ``oh × ow`` grid with a newline after each of its rows. A
method that scores tile tokens selects on that block:

* the base tile (its ``n²`` packed slots are the base tile's tokens, copied) keeps ``T`` tokens by the method's
  unchanged per-tile rule;
* the ``G = oh·ow`` grid slots get the budget ``min(K·T, G)`` (K grid tiles). Their scores (and, for VisPruner's
  dedup, their pre-projector features) are the tile values put through the same gather-and-blend as the features
  (:func:`vlmprune.anyres.onevision.pack_image_features`: up to four tile tokens with torch's bilinear weights, in
  torch's order), and the method's rule runs over them;
* the kept slots, in packed order (base first, then the grid in raster order), index the post-projector packed
  block HF builds; a grid row's newline is kept iff the row keeps a token (the rule of the project's NeXT
  official layout).

Grid sizes differ between the images of a batch; the host (this module's NumPy functions, from the images'
:class:`~vlmprune.anyres.onevision.ImageLayout`) lists every image's grid slots in a table padded to the batch's
largest grid, with the per-image counts and budgets, so one compiled program serves the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune.anyres.onevision import ImageLayout, PackTables, pack_image_features
from vlmprune.prune.baselines import uniform_grid_indices
from vlmprune.prune.ops import argsort_descending
from vlmprune.prune.selection import Selection

Array = jax.Array

# --- host ----------------------------------------------------------------------------------------------------


def grid_budgets(layouts: Sequence[ImageLayout], per_tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts int32 (NI,) ``oh·ow`` grid slots per image, budgets int32 (NI,) ``min(K·per_tile, oh·ow)``).

    Raises ValueError for an untiled image (a several-image prompt has no grid) or a non-positive ``per_tile``."""
    if isinstance(per_tile, bool) or not isinstance(per_tile, int) or per_tile < 1:
        raise ValueError(f"grid_budgets: per_tile must be a positive int, got {per_tile!r}")
    counts, budgets = [], []
    for i, lay in enumerate(layouts):
        if not lay.tiled:
            raise ValueError(f"grid_budgets: image {i} is untiled (several-image prompt); it has no packed grid")
        oh, ow = lay.out_hw
        counts.append(oh * ow)
        budgets.append(min((lay.num_tiles - 1) * per_tile, oh * ow))
    return np.asarray(counts, np.int32), np.asarray(budgets, np.int32)


def official_slots(lay: ImageLayout, per_tile: int) -> int:
    """Static visual slots of one image: ``T`` base tokens, the grid budget and at most one newline per row."""
    _, budget = grid_budgets([lay], per_tile)
    return per_tile + int(budget[0]) + lay.out_hw[0]


def grid_slot_table(layouts: Sequence[ImageLayout]) -> np.ndarray:
    """int32 (NI, G_max): image i's first ``oh·ow`` entries are its grid's packed slots in raster order
    (``n² + r·(ow + 1) + c``); the rest 0 (never read as grid slots). ``G_max``: the batch's largest grid (>= 1)."""
    counts = [lay.out_hw[0] * lay.out_hw[1] for lay in layouts]
    table = np.zeros((len(layouts), max(counts + [1])), np.int32)
    for i, lay in enumerate(layouts):
        oh, ow = lay.out_hw
        r, c = np.divmod(np.arange(oh * ow), max(ow, 1))
        table[i, : oh * ow] = lay.tokens_per_side**2 + r * (ow + 1) + c
    return table


def grid_host_arrays(layouts: Sequence[ImageLayout], per_tile: int) -> dict[str, np.ndarray]:
    """The host arrays every mode-B pruner reads: ``grid_slots`` (:func:`grid_slot_table`), ``grid_count`` and
    ``grid_budget`` (:func:`grid_budgets`)."""
    counts, budgets = grid_budgets(layouts, per_tile)
    return {"grid_slots": grid_slot_table(layouts), "grid_count": counts, "grid_budget": budgets}


def uniform_grid_table(layouts: Sequence[ImageLayout], budgets) -> np.ndarray:
    """int32 (NI, B_max): image i's first ``budgets[i]`` entries are the grid positions (raster index into its
    ``oh × ow`` map) of ``baselines.uniform_grid_indices(budgets[i], oh, ow)``; the rest -1."""
    budgets = [int(b) for b in np.asarray(budgets).reshape(-1)]
    table = np.full((len(layouts), max(budgets + [1])), -1, np.int32)
    for i, (lay, k) in enumerate(zip(layouts, budgets)):
        if k:
            table[i, :k] = uniform_grid_indices(k, *lay.out_hw)
    return table


# --- device --------------------------------------------------------------------------------------------------


def pack_tile_values(values: Array, tables: PackTables) -> Array:
    """Per-tile values (NI, T_max, n², C) through the packing's gather-and-blend -> (NI, V, C) (newline and
    padding slots 0). With C = 1 this resamples score maps exactly as the features are resampled."""
    chex.assert_rank(values, 4)
    return pack_image_features(values, jnp.zeros((values.shape[-1],), values.dtype), tables)


def grid_values(packed: Array, grid_slots: Array) -> Array:
    """Rows of a packed array (NI, V, ...) at the grid slots (NI, G) -> (NI, G, ...)."""
    idx = grid_slots.reshape(grid_slots.shape + (1,) * (packed.ndim - 2))
    return jnp.take_along_axis(packed, idx, axis=1)


def top_count(scores: Array, count: Array, budget: Array) -> Array:
    """bool (NI, G): the ``budget[i]`` highest of list i's first ``count[i]`` scores (stable: among equal scores
    the lower position first)."""
    chex.assert_rank(scores, 2)
    g = scores.shape[1]
    pos = jnp.arange(g, dtype=jnp.int32)
    real = pos[None] < count[:, None]
    order = argsort_descending(jnp.where(real, scores, -jnp.inf)).astype(jnp.int32)
    rank = jnp.zeros_like(order).at[jnp.arange(order.shape[0])[:, None], order].set(pos[None])
    return real & (rank < budget[:, None])


def listed_keep(positions: Array, size: int) -> Array:
    """bool (NI, size) True at the non-negative entries of ``positions`` (NI, K)."""
    rows = jnp.arange(positions.shape[0])[:, None]
    return jnp.zeros((positions.shape[0], size), bool).at[rows, jnp.maximum(positions, 0)].max(positions >= 0)


def packed_selection(base: Array, grid_keep: Array, grid_slots: Array, tables: PackTables) -> Selection:
    """The kept slots of each image's packed block, in packed order -> Selection (NI, V).

    base: int32 (NI, T) kept base-tile tokens (= their packed slots); grid_keep: bool (NI, G) over the grid slot
    table ``grid_slots`` int32 (NI, G). A newline is kept iff its grid row keeps a token. The first
    ``valid.sum()`` entries are the kept slots ascending (base raster, then grid rows with their newlines); the
    rest are the other slots, invalid."""
    ni, v = tables.valid.shape
    chex.assert_shape(grid_keep, grid_slots.shape)
    rows = jnp.arange(ni)[:, None]
    grid = jnp.zeros((ni, v), bool).at[rows, grid_slots].max(grid_keep)
    seen = jnp.cumsum(grid, axis=1, dtype=jnp.int32)  # grid tokens kept up to each slot
    at_newline = jax.lax.cummax(jnp.where(tables.newline, seen, 0), axis=1)
    before = jnp.concatenate([jnp.zeros((ni, 1), jnp.int32), at_newline[:, :-1]], axis=1)  # at the previous newline
    newline = tables.newline & tables.valid & (seen > before)
    keep = grid | newline | jnp.zeros((ni, v), bool).at[rows, base].set(True)
    order = jnp.argsort(~keep, axis=1, stable=True).astype(jnp.int32)
    valid = jnp.arange(v)[None] < jnp.sum(keep, axis=1, keepdims=True)
    return Selection(indices=order, valid=valid)
