"""Visual-token counts on LLaVA-NeXT-7B geometry (CLIP-L/14-336 tiles, v1.6 pinpoints) per method and budget, for a
672x672 and a 1008x336 image, in the official (HF) layout and in each paper's own layout.

Counts of fixed-budget methods depend on the data only through the official layout's newlines (a row that keeps no
token loses its newline) and through HiRED/HERO's data-dependent budgets: the attention rows and features here are
seeded random draws fed to the model-facing pruners' own ``prune`` on the NeXT layout, so every number comes from the
same code the model runs. HERO's CLIP embeddings are random too. Prints a markdown table and writes
experiments/results/next_token_counts.md.

    python experiments/next_token_counts.py
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from vlmprune import prune
from vlmprune.anyres import batch_layout, hero_valid_mask, layout_keep, max_tiles
from vlmprune.models.llava_config import LlavaConfig
from vlmprune.models.text.llama import LlamaConfig
from vlmprune.models.vision.clip import CLIPVisionConfig
from vlmprune.prune.base import PruneContext, tile_keep_mask
from vlmprune.types import NextLayout, VisionTaps

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))  # HF (height, width)
IMAGES = {"672x672": (672, 672), "1008x336 (w x h)": (336, 1008)}  # (height, width)
N, H, LAYERS = 576, 16, 24


def _cfg():
    return LlavaConfig(
        vision=CLIPVisionConfig(), text=LlamaConfig(), model_type="llava_next", image_grid_pinpoints=PINPOINTS
    )


def _taps(t, rng):
    logits = rng.normal(size=(LAYERS, t, H, N + 1)) * 2
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    features = jnp.asarray(rng.normal(size=(t, N, 64)).astype(np.float32))
    return VisionTaps(
        features=features,
        cls_attn={l: jnp.asarray(attn[l, :, :, 1:].astype(np.float32)) for l in range(LAYERS)},
        hidden_states={LAYERS: jnp.asarray(rng.normal(size=(t, N + 1, 32)).astype(np.float32))},
        embeddings=features,  # DivPrune's input (random, like the rest)
    )


def count(pruner, hw, cfg, rng):
    style, pins = ("official", cfg.image_grid_pinpoints) if pruner is None else pruner.layout_style(cfg)
    lay = batch_layout([hw], pins, tile_size=336, tokens_per_side=24, style=style)
    t = max_tiles(cfg.image_grid_pinpoints, 336)
    tile_valid = np.zeros((1, t), bool)
    tile_valid[0, : lay.layouts[0].num_tiles] = True
    layout = NextLayout(token=jnp.asarray(lay.token), row=jnp.asarray(lay.row), tile_valid=jnp.asarray(tile_valid))
    taps = _taps(t, rng)
    if pruner is None:
        keep = np.ones((1, t, N), bool)
    else:
        aux = {}
        if isinstance(pruner, prune.HERO):
            li = lay.layouts[0]
            k = li.grid_rows * li.grid_cols
            valid = np.zeros((1, t - 1, N), bool)
            valid[0, :k] = hero_valid_mask(hw, li.grid)
            aux = dict(
                clip_image=jnp.asarray(rng.normal(size=(1, t - 1, 768)).astype(np.float32)),
                clip_text=jnp.asarray(rng.normal(size=(1, 1, 768)).astype(np.float32)),
                hero_valid=jnp.asarray(valid),
            )
        req = pruner.request(cfg)
        taps = taps.replace(cls_attn={l: taps.cls_attn[l] for l in req.cls_attention_layers})  # as the model taps
        if req.key_layers:  # VisionZip's merge: keys and the feature layer's hidden state (CLS first), own draws
            extra = np.random.default_rng(1)
            taps = taps.replace(
                keys={l: jnp.asarray(extra.normal(size=(t, N + 1, 8 * H)).astype(np.float32)) for l in req.key_layers},
                feature_hidden=jnp.asarray(extra.normal(size=(t, N + 1, 64)).astype(np.float32)),
            )
        ctx = PruneContext(layout=layout, aux=aux, config=cfg)
        keep = np.asarray(tile_keep_mask(pruner.prune(taps, ctx), ctx, N))
    keep = keep & tile_valid[..., None]
    kept = layout_keep(jnp.asarray(keep.reshape(1, -1)), jnp.asarray(lay.token), jnp.asarray(lay.row))
    nl = int(np.asarray(kept & (jnp.asarray(lay.token) < 0)).sum())
    # tokens appended after the packed block (VisionZip: one CLS and `contextual` merged tokens per tile)
    extra = pruner.budget(cfg, lay.layouts[0].num_tiles).appended if pruner is not None else 0
    return int(np.asarray(kept).sum()) + extra, nl


def main():
    cfg = _cfg()
    methods = [("none", None)]
    for k in (32, 64, 128):
        methods.append((f"vispruner T={k}/tile", prune.VisPruner(num_keep=k, layout="official")))
        methods.append((f"fastervlm T={k}/tile", prune.FasterVLM(num_keep=k, layout="official")))
    for r in (0.2, 0.4):
        methods.append((f"hired rate={r}", prune.HiRED(budget_rate=r, alpha=0.5, shallow_layer=0, deep_layer=22)))
    for r in (0.1, 0.2):
        methods.append((f"hero R={r}", prune.HERO(keep_ratio=r, clip_path="-")))
    for k in (32, 64):
        methods.append((f"divprune T={k}/tile (whole image)", prune.DivPrune(num_keep=k)))
    methods.append(("visionzip 54+10/tile", prune.VisionZip(dominant=54, contextual=10)))
    rows = []
    for label, p in methods:
        for img, hw in IMAGES.items():
            cells = []
            for layout in ("official", "reference"):
                if p is None:
                    q = None
                else:
                    import dataclasses

                    q = dataclasses.replace(p, layout=layout)
                if p is None and layout == "reference":
                    cells.append("—")
                    continue
                if q is not None and layout == "reference" and isinstance(q, (prune.DivPrune, prune.VisionZip)):
                    cells.append("— (no paper layout)")
                    continue
                rng = np.random.default_rng(0)
                total, nl = count(q, hw, cfg, rng)
                cells.append(f"{total} ({nl} newlines)")
            rows.append(f"| {label} | {img} | {cells[0]} | {cells[1]} |")
    head = "| method | image | official layout | paper's layout |\n|---|---|---|---|"
    text = "\n".join([head, *rows])
    note = (
        "\nReference layouts: VisPruner/FasterVLM = fixed 672x672 canvas (2x2 tiles) without unpad or newline "
        "(exactly 5·T); HiRED = unpadded, no newline, with its fork's swapped grid dims (for the 1x3 grid of "
        "1008x336 the transposed stitch is unpadded along the wrong axis, which drops about half the kept "
        "tokens); HERO = no crop, a newline after every stitched row. DivPrune keeps min(T·tiles, candidates) "
        "over the whole image; VisionZip's counts include each tile's CLS and merged tokens, appended after the "
        "packed block. Seeded random attention (same draw for every method).\n"
    )
    print(text + note)
    os.makedirs("experiments/results", exist_ok=True)
    with open("experiments/results/next_token_counts.md", "w") as f:
        f.write("# LLaVA-NeXT-7B geometry: visual tokens per method\n\n" + text + "\n" + note)


if __name__ == "__main__":
    main()
