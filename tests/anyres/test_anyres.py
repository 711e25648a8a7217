"""vlmprune.anyres: one grid convention (rows, cols) equal to HF's, the unpad rules, the device packer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from vlmprune import anyres
from vlmprune.prune import Selection

PINS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # HF (height, width)
SIZES = [
    (400, 200),
    (200, 400),
    (600, 200),
    (200, 600),
    (300, 300),
    (333, 500),
    (710, 710),
    (610, 700),
    (1000, 37),
    (37, 1000),
    (481, 640),
]


@pytest.mark.parametrize("hw", SIZES)
def test_grid_is_hf_rows_cols(hw):
    rows, cols = get_anyres_image_grid_shape(hw, PINS, 336)
    g = anyres.grid_for(hw, PINS, tile_size=336)
    assert (g.rows, g.cols) == (rows, cols) and g.num_tiles == 1 + rows * cols


@pytest.mark.parametrize("hw", SIZES)
def test_hf_unpad_rule_equals_transformers(hw):
    g = anyres.grid_for(hw, PINS, tile_size=336)
    n = 24
    ids = torch.arange(g.rows * n * g.cols * n).reshape(1, g.rows * n, g.cols * n)
    kept = unpad_image(ids, torch.tensor(hw))
    top, bottom, left, right = anyres.unpad_bounds(hw, (g.rows * n, g.cols * n), rule="hf")
    np.testing.assert_array_equal(ids[0, top:bottom, left:right].numpy(), kept[0].numpy())


def test_unpad_variants_differ_where_the_originals_do():
    # odd padding total: 610x700 (h x w) on a 48x48 map -> new height 41; the symmetric crop keeps 42 rows,
    # HERO's band exactly 41 (the extra padding line goes to the bottom)
    assert anyres.unpad_bounds((610, 700), (48, 48), rule="llava") == (3, 45, 0, 48)
    assert anyres.unpad_bounds((610, 700), (48, 48), rule="hero") == (3, 44, 0, 48)
    # truncation: 710x710 on 48x48 -> int(710 * (48 / 710)) = 47 columns for int(), 48 after rounding
    assert anyres.unpad_bounds((710, 710), (48, 48), rule="hero") == (0, 48, 0, 47)
    assert anyres.unpad_bounds((710, 710), (48, 48), rule="hf") == (0, 48, 0, 48)
    with pytest.raises(ValueError, match="rule must be one of"):
        anyres.unpad_bounds((10, 10), (4, 4), rule="round")


def test_grid_to_tiles_round_trip_and_order():
    g = anyres.Grid(2, 3)
    m = np.arange(48 * 72).reshape(48, 72)
    tiles = anyres.grid_to_tiles(m, g, 24)
    np.testing.assert_array_equal(anyres.tiles_to_grid(tiles, g, 24), m)
    assert tiles[4, 0] == m[24, 24]  # tile 4 = row 1, col 1
    with pytest.raises(ValueError, match="does not match"):
        anyres.grid_to_tiles(np.zeros((48, 48)), anyres.Grid(1, 2), 24)


def test_selection_mask_and_per_image_indices():
    rng = np.random.default_rng(0)
    ni, t, n, k = 2, 3, 10, 4
    idx = np.sort(np.stack([[rng.choice(n, k, replace=False) for _ in range(t)] for _ in range(ni)]), axis=-1)
    valid = rng.random((ni, t, k)) < 0.7
    sel = Selection(indices=jnp.asarray(idx, jnp.int32), valid=jnp.asarray(valid))
    dense = np.asarray(sel.mask(n)).reshape(ni, t * n)
    flat, fvalid = anyres.tiles_to_image_indices(sel.indices, sel.valid, n)
    np.testing.assert_array_equal(np.asarray(anyres.selection_mask(flat, fvalid, t * n)), dense)


def test_pack_without_pruning_is_the_layout():
    """All tokens kept: the packed block lists the layout's entries in order (newline rows read the newline)."""
    lay = anyres.batch_layout(
        [(200, 600), (300, 300)],
        [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]],
        tile_size=56,
        tokens_per_side=4,
    )
    tables = lay.tables()
    ni, t = lay.tile_valid.shape
    n = 16
    emb = jnp.broadcast_to(jnp.arange(t * n, dtype=jnp.float32)[None, :, None], (ni, t * n, 1))
    stride = max(li.length for li in lay.layouts)
    tokens, valid = anyres.pack(emb, jnp.ones((ni, t * n), bool), jnp.asarray([-1.0]), tables, stride=stride)
    for i, li in enumerate(lay.layouts):
        assert int(np.asarray(valid[i]).sum()) == li.length
        want = np.where(li.token >= 0, li.token, -1).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(tokens[i, : li.length, 0]), want)
