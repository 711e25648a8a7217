"""HiRED's and HERO's golden masks, reproduced through the LLaVA-NeXT pipeline's own path: the model-facing
pruners' ``prune`` (as a keep mask over the tiles, ``tile_keep_mask``) on encoder taps laid out as the model lays
them out (tiles padded to the largest grid, host layout tables), with the golden attention rows fed in place of the
tower's."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from reference.paths import GOLDEN_DIR
from vlmprune import prune
from vlmprune.anyres import batch_layout, hero_valid_mask
from vlmprune.models.llava_config import LlavaConfig
from vlmprune.models.text.llama import LlamaConfig
from vlmprune.models.vision.clip import CLIPVisionConfig
from vlmprune.prune.base import PruneContext, tile_keep_mask
from vlmprune.types import NextLayout, VisionTaps

GOLDEN = GOLDEN_DIR
CASES = json.load(open(os.path.join(GOLDEN, "cases_public.json")))
HERO_CASES = json.load(open(os.path.join(GOLDEN, "cases_hero_public.json")))["hero"]


def _cfg(pinpoints_hw):
    return LlavaConfig(
        vision=CLIPVisionConfig(),
        text=LlamaConfig(),
        model_type="llava_next",
        image_grid_pinpoints=tuple(tuple(p) for p in pinpoints_hw),
    )


@pytest.mark.parametrize("case", range(len(CASES["hired"]["cases"])))
def test_hired_golden_through_next_path(case):
    meta = CASES["hired"]["cases"][case]
    g = np.load(os.path.join(GOLDEN, "hired_public.npz"))
    cfg = _cfg(CASES["hired"]["image_grid_pinpoints"])
    lay = batch_layout(meta["image_sizes"], cfg.image_grid_pinpoints, tile_size=336, tokens_per_side=24)
    assert [li.num_tiles for li in lay.layouts] == meta["num_patches"]
    ni, t = lay.tile_valid.shape
    h = meta["heads"]
    shallow = np.zeros((ni, t, h, 576), np.float32)
    deep = np.zeros_like(shallow)
    off = 0
    for i, p in enumerate(meta["num_patches"]):
        shallow[i, :p] = g[f"c{case}_top_cls_attn"][off : off + p]
        deep[i, :p] = g[f"c{case}_bottom_cls_attn"][off : off + p]
        off += p
    taps = VisionTaps(
        features=jnp.zeros((ni * t, 576, 1)),
        cls_attn={0: jnp.asarray(shallow.reshape(ni * t, h, 576)), 22: jnp.asarray(deep.reshape(ni * t, h, 576))},
    )
    pruner = prune.HiRED(budget_rate=meta["token_budget_rate"], alpha=meta["alpha"], shallow_layer=0, deep_layer=22)
    ctx = PruneContext(layout=NextLayout(token=None, row=None, tile_valid=jnp.asarray(lay.tile_valid)), config=cfg)
    mask = np.asarray(tile_keep_mask(pruner.prune(taps, ctx), ctx, 576))
    for i, p in enumerate(meta["num_patches"]):
        np.testing.assert_array_equal(mask[i, :p], g[f"c{case}_mask{i}"])
        assert not mask[i, p:].any()


@pytest.mark.parametrize("case", range(len(HERO_CASES["cases"])))
def test_hero_golden_through_next_path(case):
    meta = HERO_CASES["cases"][case]
    g = np.load(os.path.join(GOLDEN, "hero_public.npz"))
    pin_hw = [[h, w] for w, h in HERO_CASES["image_grid_pinpoints_wh"]]
    cfg = _cfg(pin_hw)
    w, h = meta["image_size_wh"]
    lay = batch_layout([[h, w]], cfg.image_grid_pinpoints, tile_size=336, tokens_per_side=24)
    li = lay.layouts[0]
    assert [li.grid_cols, li.grid_rows] == meta["grid_cols_rows"]
    t = lay.tile_valid.shape[1]
    k = li.num_tiles - 1
    heads = meta["heads"]
    low = [l % 24 for l in meta["low_layers"]]
    high = [l % 24 for l in meta["high_layers"]]
    attn = {l: np.zeros((t, heads, 576), np.float32) for l in set(low) | set(high)}
    for j, l in enumerate(high):
        attn[l][0] = g[f"c{case}_attn_high"][j]
    for j, l in enumerate(low):
        attn[l][1 : 1 + k] = g[f"c{case}_attn_low"][:, j]
    last = np.zeros((t, 577, 1024), np.float32)
    last[: 1 + k, 0] = g[f"c{case}_cls_last"]
    img = np.zeros((1, t - 1, 768), np.float32)
    img[0, :k] = g[f"c{case}_clip_image_embeds"]
    valid = np.zeros((1, t - 1, 576), bool)
    valid[0, :k] = hero_valid_mask((h, w), li.grid)  # (height, width) on the (rows, cols) grid
    np.testing.assert_array_equal(valid[0, :k], g[f"c{case}_valid_mask"])
    taps = VisionTaps(
        features=jnp.zeros((t, 576, 1)),
        cls_attn={l: jnp.asarray(a) for l, a in attn.items()},
        hidden_states={24: jnp.asarray(last)},
    )
    aux = {
        "clip_image": jnp.asarray(img),
        "clip_text": jnp.asarray(g[f"c{case}_clip_text_embeds"][None]),
        "hero_valid": jnp.asarray(valid),
    }
    ctx = PruneContext(
        layout=NextLayout(token=None, row=None, tile_valid=jnp.asarray(lay.tile_valid)), aux=aux, config=cfg
    )
    pruner = prune.HERO(
        keep_ratio=meta["R"],
        alpha=meta["alpha"],
        t_cls=meta["T_cls"],
        t_clip=meta["T_clip"],
        low_layers=tuple(meta["low_layers"]),
        high_layers=tuple(meta["high_layers"]),
        clip_path="-",
    )
    mask = np.asarray(tile_keep_mask(pruner.prune(taps, ctx), ctx, 576))[0]
    np.testing.assert_array_equal(mask[: 1 + k], g[f"c{case}_mask"])
    assert not mask[1 + k :].any()
