"""LLaVA-NeXT (anyres): parity with HF's LlavaNextForConditionalGeneration for every grid of the pinpoint list,
mixed-grid batches, one compile for all grids, and per-tile pruning in the official layout."""

import chex
import numpy as np
import pytest
import torch
from PIL import Image

import vlmprune
from reference.batch_calls import hf_greedy, model_call, model_generate, torch_batch
from reference.hf_builders import build_hf_clip, build_hf_llava_next
from vlmprune import prune
from vlmprune.anyres import Grid, grid_for

LOGITS_ATOL = 1e-4  # fp32 through the whole stack

# (height, width) of test images -> the grid (rows, cols) they select with the scaled v1.6 pinpoints.
SIZES = {(40, 90): (1, 2), (90, 40): (2, 1), (100, 100): (2, 2), (30, 120): (1, 3), (120, 30): (3, 1)}


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return build_hf_llava_next(tmp_path_factory.mktemp("next"), seed=11)


@pytest.fixture(scope="module")
def models(next_dir):
    from transformers import LlavaNextForConditionalGeneration

    hf = LlavaNextForConditionalGeneration.from_pretrained(next_dir, attn_implementation="eager").eval()
    return vlmprune.load(next_dir), hf


def _image(hw, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (hw[0], hw[1], 3), dtype=np.uint8))


def _inputs(model, sizes, prompts=None):
    proc = model.processor
    prompts = prompts or ["What is in the image?"] * len(sizes)
    texts = [
        proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    imgs = [_image(s, i) for i, s in enumerate(sizes)]
    return dict(proc(images=imgs, text=texts, return_tensors="np", padding=True))


def test_sizes_select_every_grid(models):
    model, _ = models
    c = model.config
    for hw, grid in SIZES.items():
        assert grid_for(hw, c.image_grid_pinpoints, tile_size=c.vision.image_size) == Grid(*grid)


def _hf_logits(hf, x):
    with torch.no_grad():
        return hf(**torch_batch(x)).logits.numpy()


@pytest.mark.parametrize("hw", sorted(SIZES))
def test_logits_match_hf_for_every_grid(models, hw):
    model, hf = models
    x = _inputs(model, [hw])
    out = model_call(model, x)
    ref = _hf_logits(hf, x)
    print(hw, "max |logits - HF|:", np.abs(np.asarray(out.logits) - ref).max())
    chex.assert_trees_all_close(np.asarray(out.logits), ref, atol=LOGITS_ATOL, rtol=0)


def test_mixed_grid_batch_and_generation_match_hf(models):
    model, hf = models
    x = _inputs(model, [(100, 100), (30, 120)], ["What is in the image?", "How many objects are there?"])
    out = model_call(model, x)
    ref = _hf_logits(hf, x)
    m = x["attention_mask"].astype(bool)
    chex.assert_trees_all_close(np.asarray(out.logits)[m], ref[m], atol=LOGITS_ATOL, rtol=0)
    ours = model_generate(model, x, max_new_tokens=10)
    np.testing.assert_array_equal(ours, hf_greedy(hf, 10, model.config.pad_token_id, **torch_batch(x)))


def test_one_compile_serves_every_grid(models):
    model, _ = models
    before = model.compile_counts()["forward"]
    lens = set()
    for hw in [(100, 100), (40, 90), (120, 30)]:
        x = _inputs(model, [hw])
        lens.add(x["input_ids"].shape[1])
        model(x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"])
    # one program per distinct prompt length (the visual block lengths differ by grid), none per grid itself
    assert model.compile_counts()["forward"] - before <= len(lens)


def test_pruned_next_matches_hf_language_model(models):
    """VisPruner per tile in the official layout == HF LM fed the same packed, pruned sequence."""
    model, hf = models
    pruner = prune.VisPruner(num_keep=8, important_ratio=0.5)
    x = _inputs(model, [(100, 100)])
    out = model(x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], pruner=pruner)
    pix = torch.from_numpy(x["pixel_values"][0])  # (5, 3, S, S)
    with torch.no_grad():
        vo = hf.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
        feats, attn = vo.hidden_states[-2][:, 1:], vo.attentions[-2][:, :, 0, 1:]
        keep = np.asarray(prune.vispruner(feats.numpy(), attn.numpy(), num_keep=8, important_ratio=0.5).mask(16))
        proj = hf.model.multi_modal_projector(feats)  # (5, 16, D)
        nl = hf.model.image_newline
        # official layout: base (raster), then the 8x8 stitched grid row by row + newline for rows keeping a token
        seq = [proj[0, j] for j in range(16) if keep[0, j]]
        for y in range(8):
            row = []
            for xg in range(8):
                t, p = 1 + (y // 4) * 2 + xg // 4, (y % 4) * 4 + xg % 4
                if keep[t, p]:
                    row.append(proj[t, p])
            if row:
                seq.extend(row + [nl])
        vis = torch.stack(seq)
        ids = torch.from_numpy(x["input_ids"][0])
        img = (ids == hf.config.image_token_id).nonzero()[:, 0]
        text = hf.get_input_embeddings()(ids)
        embeds = torch.cat([text[: img[0]], vis, text[img[-1] + 1 :]])[None]
        ref = hf(inputs_embeds=embeds).logits.numpy()
    got = np.asarray(out.logits)[np.asarray(out.mask)]
    assert got.shape[0] == ref.shape[1]
    chex.assert_trees_all_close(got, ref[0], atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("pruner", [prune.FasterVLM(num_keep=6), prune.HiRED(budget_rate=0.3, shallow_layer=0)])
def test_other_per_tile_methods_run_on_next(models, pruner):
    model, _ = models
    x = _inputs(model, [(90, 40), (100, 100)])  # 1 and 4 sub-tiles... and a 2-tile grid: N=16 splits evenly
    out = model_call(model, x, pruner=pruner)
    assert np.isfinite(np.asarray(out.logits)).all()
    full = model_call(model, x)
    assert np.asarray(out.mask).sum() < np.asarray(full.mask).sum()


def test_next_bad_inputs(models):
    model, _ = models
    x = _inputs(model, [(100, 100)])
    with pytest.raises(ValueError, match="image_sizes .* is required"):
        model(x["input_ids"], x["pixel_values"])
    with pytest.raises(ValueError, match=r"image_sizes must have shape \(1, 2\)"):
        model(x["input_ids"], x["pixel_values"], image_sizes=np.array([[100, 100], [50, 50]]))
    with pytest.raises(ValueError, match="needs 5 tiles"):
        model(x["input_ids"], x["pixel_values"][:, :3], image_sizes=x["image_sizes"])
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model(x["input_ids"], x["pixel_values"], image_sizes=np.array([[30, 120]]))  # wrong size for the prompt
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, num_tiles"):
        model(x["input_ids"], x["pixel_values"][0], image_sizes=x["image_sizes"])


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, models):
    """A full CLIP (both towers) whose image tower takes the NeXT tiles, with the demo tokenizer."""
    model, _ = models
    return build_hf_clip(tmp_path_factory.mktemp("clip_hero"), image_size=model.config.vision.image_size, seed=3)


def test_hero_on_next_equals_per_image_reference(models, tiny_clip_dir):
    model, _ = models
    pruner = prune.HERO(
        keep_ratio=0.3, alpha=0.5, t_cls=0.1, t_clip=0.1, low_layers=(0, 1), high_layers=(1, 2), clip_path=tiny_clip_dir
    )
    sizes = [(100, 100), (30, 120)]
    x = _inputs(model, sizes, ["What is in the image?", "Is there a cat?"])
    out = model_call(model, x, pruner=pruner, text=["What is in the image?", "Is there a cat?"])
    assert np.isfinite(np.asarray(out.logits)).all()
    # Reference: the unpadded per-image hero() on the model's own tower outputs and the same CLIP embeddings.
    from vlmprune.anyres import hero_valid_mask, image_layout

    clip = model.auxiliary_clip(tiny_clip_dir)
    text_emb = np.asarray(clip.text_features(["What is in the image?", "Is there a cat?"]))
    n_text = int(((x["input_ids"] != model.config.image_token_id) & (x["attention_mask"] == 1)).sum())
    expected_visual = 0
    for i, hw in enumerate(sizes):
        lay = image_layout(hw, model.config.image_grid_pinpoints, tile_size=56, tokens_per_side=4)
        pix = x["pixel_values"][i, : lay.num_tiles]
        enc = model.vision(pix[None], cls_attention_layers=(0, 1, 2), hidden_state_layers=(3,))
        a = enc["cls_attn"]
        sel = prune.hero(
            np.stack([a[1][0], a[2][0]]),
            np.stack([a[0][1:], a[1][1:]], axis=1),
            np.asarray(enc["hidden_states"][3][:, 0]),
            np.asarray(clip.image_features(pix[1:])),
            text_emb[i : i + 1],
            hero_valid_mask(hw, lay.grid, 4),
            keep_ratio=0.3,
            alpha=0.5,
            t_cls=0.1,
            t_clip=0.1,
            tokens_per_side=4,
        )
        mask = np.asarray(sel.mask(16))
        grid = (
            mask[1:]
            .reshape(lay.grid_rows, lay.grid_cols, 4, 4)
            .transpose(0, 2, 1, 3)
            .reshape(lay.grid_rows * 4, lay.grid_cols * 4)[lay.top : lay.bottom, lay.left : lay.right]
        )
        expected_visual += int(mask.sum()) + int(grid.any(axis=1).sum())
    assert int(np.asarray(out.mask).sum()) == n_text + expected_visual


def test_hero_needs_next_and_clip(mha_dir, models):
    model, _ = models
    x = _inputs(model, [(100, 100)])
    with pytest.raises(ValueError, match="clip_path"):
        model(
            x["input_ids"],
            x["pixel_values"],
            image_sizes=x["image_sizes"],
            pruner=prune.HERO(low_layers=(0,), high_layers=(1,)),
        )


def _reference_sequence(hf, x, keep, style):
    """Packed visual block built independently in torch: HF's own unpad_image for the crop, explicit loops."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    pix = torch.from_numpy(x["pixel_values"][0])
    size = [int(v) for v in x["image_sizes"][0]]
    rows, cols = get_anyres_image_grid_shape(size, hf.config.image_grid_pinpoints, hf.config.vision_config.image_size)
    with torch.no_grad():
        feats = hf.model.vision_tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
        proj = hf.model.multi_modal_projector(feats)
    nl = hf.model.image_newline
    n = 4
    g_rows, g_cols = (cols, rows) if style == "cropped_swapped" else (rows, cols)  # the fork's swapped dims
    grid_idx = torch.arange(g_rows * n * g_cols * n).reshape(1, g_rows * n, g_cols * n).float()
    if style in ("cropped", "cropped_swapped"):
        kept_rows = unpad_image(grid_idx, size)[0].long()
    else:
        kept_rows = grid_idx[0].long()
    seq = [proj[0, j] for j in range(16) if keep[0, j]]
    for r in kept_rows:
        row = []
        for g in r.tolist():
            y, xg = divmod(g, g_cols * n)
            t, p = 1 + (y // n) * g_cols + xg // n, (y % n) * n + xg % n
            if keep[t, p]:
                row.append(proj[t, p])
        seq.extend(row)
        if style == "uncropped_newlines":
            seq.append(nl)
    with torch.no_grad():
        vis = torch.stack(seq)
        ids = torch.from_numpy(x["input_ids"][0])
        img = (ids == hf.config.image_token_id).nonzero()[:, 0]
        text = hf.get_input_embeddings()(ids)
        embeds = torch.cat([text[: img[0]], vis, text[img[-1] + 1 :]])[None]
        return hf(inputs_embeds=embeds).logits.numpy()[0], len(seq)


@pytest.mark.parametrize("hw", [(100, 100), (30, 120)])
def test_reference_layouts_match_hf_language_model(models, hw):
    from vlmprune.anyres import reference_processor

    model, hf = models
    # VisPruner's own layout: fixed 2x2 canvas (reference processor), no unpad, no newline, exactly 5·T tokens.
    vp = prune.VisPruner(num_keep=6, important_ratio=0.5, layout="reference")
    ref_model_proc = model.processor
    model.processor = reference_processor(ref_model_proc, model.config.vision.image_size)
    try:
        x = _inputs(model, [hw])
    finally:
        model.processor = ref_model_proc
    assert x["pixel_values"].shape[1] == 5
    out = model(x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], pruner=vp)
    pix = torch.from_numpy(x["pixel_values"][0])
    with torch.no_grad():
        vo = hf.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
    keep = np.asarray(
        prune.vispruner(
            vo.hidden_states[-2][:, 1:].numpy(), vo.attentions[-2][:, :, 0, 1:].numpy(), num_keep=6, important_ratio=0.5
        ).mask(16)
    )
    hf_ref = hf.config.image_grid_pinpoints
    hf.config.image_grid_pinpoints = [[112, 112]]
    try:
        ref, n_vis = _reference_sequence(hf, x, keep, "uncropped")
    finally:
        hf.config.image_grid_pinpoints = hf_ref
    assert n_vis == 5 * 6
    got = np.asarray(out.logits)[np.asarray(out.mask)]
    chex.assert_trees_all_close(got, ref, atol=LOGITS_ATOL, rtol=0)

    # HiRED's own layout: unpadded, no newline. (Its band allocation needs N % sub-tiles == 0: 16 tokens per tile
    # here, so 3-tile grids are refused with a clear error.)
    x = _inputs(model, [hw])
    if hw == (30, 120):
        with pytest.raises(ValueError, match="raster bands"):
            model(
                x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], pruner=prune.HiRED(layout="reference")
            )
        return
    hr = prune.HiRED(budget_rate=0.3, alpha=0.5, shallow_layer=0, layout="reference")
    out = model(x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], pruner=hr)
    k = int(x["image_sizes"].shape[0])
    t = 1 + {(100, 100): 4, (30, 120): 3}[hw]
    with torch.no_grad():
        vo = hf.model.vision_tower(
            torch.from_numpy(x["pixel_values"][0][:t]), output_hidden_states=True, output_attentions=True
        )
    sel = prune.hired(
        vo.attentions[0][:, :, 0, 1:].numpy(), vo.attentions[-2][:, :, 0, 1:].numpy(), budget_rate=0.3, alpha=0.5
    )
    keep = np.asarray(sel.mask(16))
    ref, _ = _reference_sequence(hf, x, keep, "cropped")
    got = np.asarray(out.logits)[np.asarray(out.mask)]
    assert k == 1
    chex.assert_trees_all_close(got, ref, atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------------- DivPrune and VisionZip on LLaVA-NeXT

TWO_GRIDS = [(100, 100), (20, 120)]  # 2x2 grid, no crop; 1x3 grid, unpad keeps rows 1-2 of the 4x12 map
TWO_PROMPTS = ["What is in the image?", "How many objects are there?"]


def _hf_tiles(hf, x, r):
    """HF vision-tower outputs of image r's valid tiles: (hidden_states[-2] with CLS, CLS attention of that layer
    (T, H, N), its raw k_proj keys (T, 1+N, C), projected patch features (T, N, D), grid (rows, cols))."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    size = [int(v) for v in x["image_sizes"][r]]
    rows, cols = get_anyres_image_grid_shape(size, hf.config.image_grid_pinpoints, hf.config.vision_config.image_size)
    pix = torch.from_numpy(x["pixel_values"][r][: 1 + rows * cols])
    tower = hf.model.vision_tower
    enc_layers = (tower.vision_model if hasattr(tower, "vision_model") else tower).encoder.layers
    layer = len(enc_layers) - 2  # vision_feature_layer=-2 -> encoder layer L-2 (0-based)
    keys = {}
    hook = enc_layers[layer].self_attn.k_proj.register_forward_hook(lambda m, i, o: keys.setdefault("k", o))
    try:
        with torch.no_grad():
            vo = hf.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
            hidden = vo.hidden_states[-2]
            proj = hf.model.multi_modal_projector(hidden[:, 1:])
    finally:
        hook.remove()
    return hidden, vo.attentions[layer][:, :, 0, 1:], keys["k"], proj, (rows, cols)


def _grid_in_layout(size_hw, rows, cols, n_side):
    """HF's own unpad_image applied to the stitched index map: the kept (tile, patch) pairs, row by row."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    idx = torch.arange(rows * n_side * cols * n_side).reshape(1, rows * n_side, cols * n_side).float()
    out = []
    for r in unpad_image(idx, list(size_hw))[0].long():
        row = []
        for g in r.tolist():
            y, xg = divmod(g, cols * n_side)
            row.append((1 + (y // n_side) * cols + xg // n_side, (y % n_side) * n_side + xg % n_side))
        out.append(row)
    return out


def _hf_official_logits(hf, x, r, keep, proj, grid_rows, tail=None):
    """HF language model on batch row r (its real tokens) with the visual block built by hand in the official
    layout: kept base tokens (raster), kept grid tokens row by row + a newline after every row keeping one, then
    ``tail`` (appended tokens). Returns (logits (L_r, V), visual length)."""
    n = keep.shape[1]
    seq = [proj[0, j] for j in range(n) if keep[0, j]]
    for row in grid_rows:
        kept = [proj[t, p] for t, p in row if keep[t, p]]
        if kept:
            seq.extend(kept + [hf.model.image_newline])
    if tail is not None:
        seq.extend(list(tail))
    m = x["attention_mask"][r].astype(bool)
    with torch.no_grad():
        vis = torch.stack(seq)
        ids = torch.from_numpy(x["input_ids"][r][m])
        img = (ids == hf.config.image_token_id).nonzero()[:, 0]
        text = hf.get_input_embeddings()(ids)
        embeds = torch.cat([text[: img[0]], vis, text[img[-1] + 1 :]])[None]
        return hf(inputs_embeds=embeds).logits.numpy()[0], len(seq)


def _compare_rows(out, refs):
    worst = 0.0
    for r, ref in enumerate(refs):
        got = np.asarray(out.logits[r])[np.asarray(out.mask[r])]
        assert got.shape == ref.shape, (r, got.shape, ref.shape)
        chex.assert_trees_all_close(got, ref, atol=LOGITS_ATOL, rtol=0)
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def test_divprune_next_matches_hf_language_model(models):
    """DivPrune on the whole image (candidates = tokens in the official layout, num_keep per tile) for a batch of
    two grids == the HF LM fed the packed sequence built from plain ``divprune`` over each image's candidates."""
    from vlmprune.prune.baselines import divprune

    model, hf = models
    num_keep = 3
    x = _inputs(model, TWO_GRIDS, TWO_PROMPTS)
    out = model_call(model, x, pruner=prune.DivPrune(num_keep=num_keep))
    refs = []
    for r, hw in enumerate(TWO_GRIDS):
        _, _, _, proj, (rows, cols) = _hf_tiles(hf, x, r)
        grid_rows = _grid_in_layout(hw, rows, cols, 4)
        cand = sorted(
            [(0, j) for j in range(16)] + [tp for row in grid_rows for tp in row], key=lambda tp: tp[0] * 16 + tp[1]
        )  # tile-token order, as the model indexes them
        k = min(num_keep * (1 + rows * cols), len(cand))
        emb = torch.stack([proj[t, p] for t, p in cand]).numpy()[None]
        picked = np.asarray(divprune(emb, num_keep=k).indices[0])
        keep = np.zeros((1 + rows * cols, 16), bool)
        for i in picked:
            keep[cand[i]] = True
        assert keep.sum() == k
        ref, _ = _hf_official_logits(hf, x, r, keep, proj, grid_rows)
        refs.append(ref)
    print("divprune NeXT max |logits - HF|:", _compare_rows(out, refs))


def _next_enc(model, x, pruner):
    """Encoder taps + post-projector embeddings and the prune context (layout tables) exactly as the model builds
    them."""
    from vlmprune.prune.base import PruneContext
    from vlmprune.viz import encode, projector

    pix, lay, _ = model._next_layout(x["pixel_values"], x["image_sizes"], pruner)
    taps = encode(model, pix, pruner)
    taps = taps.replace(embeddings=projector(model)(taps.features))
    return taps, PruneContext(layout=lay.tables(), config=model.config), lay


def _tile_keep(pruner, taps, ctx):
    """bool (NI, T, N): the pruner's keep mask over every tile's tokens."""
    from vlmprune.prune.base import tile_keep_mask

    return np.asarray(tile_keep_mask(pruner.prune(taps, ctx), ctx, taps.num_tokens))


def test_divprune_next_whole_image_equals_divprune_when_all_tokens_are_candidates(models):
    """A square image on the 2x2 grid has no unpad crop: every tile token is a candidate, and the whole-image
    selection is exactly ``divprune`` over the 5·16 embeddings with num_keep·5 tokens."""
    import jax.numpy as jnp

    from vlmprune.prune.baselines import divprune, divprune_masked

    model, _ = models
    pruner = prune.DivPrune(num_keep=5)
    x = _inputs(model, [(100, 100)])
    taps, ctx, lay = _next_enc(model, x, pruner)
    assert lay.layouts[0].num_tiles == 5 and lay.layouts[0].length == 16 + 8 * 9  # full 8x8 grid + 8 newlines
    keep = _tile_keep(pruner, taps, ctx)[0]  # (T, N)
    emb = taps.embeddings.reshape(1, 5 * 16, -1)
    want = np.asarray(divprune(emb, num_keep=25).mask(80)).reshape(5, 16)
    np.testing.assert_array_equal(keep, want)
    # and the function itself, on random embeddings: all candidates + count = K  ==  divprune
    rng = np.random.default_rng(0)
    e = jnp.asarray(rng.standard_normal((3, 40, 8)), jnp.float32)
    a = divprune_masked(e, jnp.ones((3, 40), bool), jnp.full((3,), 12), max_keep=12)
    b = divprune(e, num_keep=12)
    np.testing.assert_array_equal(np.asarray(a.indices), np.asarray(b.indices))
    assert np.asarray(a.valid).all()


def test_divprune_masked_never_picks_non_candidates_and_keeps_count():
    import jax.numpy as jnp

    from vlmprune.prune.baselines import divprune, divprune_masked

    rng = np.random.default_rng(1)
    e = rng.standard_normal((3, 30, 6)).astype(np.float32)
    cand = rng.random((3, 30)) < 0.5
    cand[2] = False
    cand[2, [4, 9, 17]] = True  # 3 candidates, budget 10 -> all 3
    sel = divprune_masked(jnp.asarray(e), jnp.asarray(cand), jnp.asarray([10, 4, 10]), max_keep=10)
    idx, valid = np.asarray(sel.indices), np.asarray(sel.valid)
    assert valid.sum(1).tolist() == [10, 4, 3]
    for b in range(3):
        assert cand[b, idx[b][valid[b]]].all()
        # equals plain divprune on the candidate rows alone (tie-free random data)
        rows = np.where(cand[b])[0]
        k = int(valid[b].sum())
        ref = rows[np.asarray(divprune(jnp.asarray(e[b, rows][None]), num_keep=k).indices[0])]
        np.testing.assert_array_equal(idx[b][valid[b]], np.sort(ref))
    with pytest.raises(ValueError, match="at least one candidate"):
        divprune_masked(jnp.asarray(e), jnp.zeros((3, 30), bool), jnp.asarray([1, 1, 1]), max_keep=2)


@pytest.mark.parametrize("num_keep", [2, 16])
def test_divprune_next_keeps_min_budget_candidates(models, num_keep):
    """Each image keeps exactly min(num_keep·T_valid, tokens in its official layout), in a mixed-grid batch;
    the sequence length follows (kept tokens + a newline per non-empty grid row)."""
    model, _ = models
    sizes = [(100, 100), (20, 120), (100, 60)]  # no crop; rows 1-2 of 4; columns 2-5 of 8
    pruner = prune.DivPrune(num_keep=num_keep)
    x = _inputs(model, sizes)
    taps, ctx, lay = _next_enc(model, x, pruner)
    keep = _tile_keep(pruner, taps, ctx)
    out = model_call(model, x, pruner=pruner)
    for i, li in enumerate(lay.layouts):
        in_layout = np.zeros(keep.shape[1] * 16, bool)
        in_layout[li.token[li.token >= 0]] = True
        in_layout = in_layout.reshape(keep.shape[1:])
        assert not (keep[i] & ~in_layout).any()  # only candidates (no cropped token, no padded tile)
        assert keep[i].sum() == min(num_keep * li.num_tiles, in_layout.sum())
        rows_kept = {int(r) for tk, r in zip(li.token, li.row) if tk >= 16 and keep[i].reshape(-1)[tk]}
        n_text = int(((x["input_ids"][i] != model.config.image_token_id) & (x["attention_mask"][i] == 1)).sum())
        assert int(np.asarray(out.mask[i]).sum()) == n_text + keep[i].sum() + len(rows_kept)
    if num_keep == 16:  # budget 16 per tile exceeds the cropped images' candidates: all of them are kept
        assert keep.sum(axis=(1, 2)).tolist() == [80, 16 + 2 * 12, 16 + 8 * 4]


@pytest.mark.parametrize(
    "pruner",
    [prune.DivPrune(num_keep=4, layout="reference"), prune.VisionZip(dominant=6, contextual=2, layout="reference")],
)
def test_divprune_visionzip_reference_layout_raises_before_compile(models, pruner):
    model, _ = models
    x = _inputs(model, [(100, 100)])
    before = model.compile_counts()["forward"]
    with pytest.raises(ValueError, match="layout must be 'official'"):
        model(x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], pruner=pruner)
    assert model.compile_counts()["forward"] == before


def test_visionzip_next_matches_hf_language_model(models):
    """VisionZip per tile: dominant patches in the official layout, then the tiles' CLS tokens and their
    contextual tokens (tile by tile) after the image block == the HF LM fed that sequence, built from HF's
    tower outputs and the LLaVA-1.5 ``visionzip`` function on each tile."""
    from vlmprune.prune.baselines import visionzip

    model, hf = models
    dominant, contextual = 5, 2
    x = _inputs(model, TWO_GRIDS, TWO_PROMPTS)
    out = model_call(model, x, pruner=prune.VisionZip(dominant=dominant, contextual=contextual))
    refs, dropped = [], 0
    for r, hw in enumerate(TWO_GRIDS):
        hidden, attn, keys, proj, (rows, cols) = _hf_tiles(hf, x, r)
        t = 1 + rows * cols
        score = attn.sum(1).numpy()  # head-sum CLS attention (T, N)
        keep = np.zeros((t, 16), bool)
        for i in range(t):
            keep[i, np.argsort(-score[i], kind="stable")[: dominant - 1]] = True
        heads = attn.shape[1]
        res = visionzip(
            hidden.numpy(),
            attn.numpy(),
            keys.numpy().reshape(t, 17, heads, -1),
            dominant=dominant,
            contextual=contextual,
        )
        merged = torch.from_numpy(np.array(res.tokens))
        with torch.no_grad():
            tail = hf.model.multi_modal_projector(torch.cat([merged[:, 0], merged[:, dominant:].reshape(-1, 32)]))
        assert tail.shape[0] == t * (1 + contextual)
        grid_rows = _grid_in_layout(hw, rows, cols, 4)
        dropped += int(keep[1:].sum()) - sum(int(keep[t, p]) for row in grid_rows for t, p in row)
        ref, _ = _hf_official_logits(hf, x, r, keep, proj, grid_rows, tail)
        refs.append(ref)
    print("visionzip NeXT max |logits - HF|:", _compare_rows(out, refs), "dominant patches cropped away:", dropped)
    assert dropped > 0  # the 1x3 image's unpad crop removes some dominant patches: that case is covered


# ------------------------------------------------------------------------- HiRED's swapped grid (reference layout)


@pytest.mark.parametrize("hw", [(400, 200), (200, 400), (600, 200), (200, 600), (300, 300), (333, 500)])
def test_hired_swapped_grid_layout_equals_the_forks_stitching(hw):
    """``cropped_swapped`` = the HiRED fork's packing as written (docs/methods.md §3.7): tiles viewed as
    (num_patch_height, num_patch_width) = (cols, rows), stitched, then HF's own ``unpad_image``."""
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    from vlmprune.anyres import grid_for, image_layout

    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    n, ts = 24, 336
    lay = image_layout(hw, pins, tile_size=ts, tokens_per_side=n, style="cropped_swapped")
    g = grid_for(hw, pins, tile_size=ts)
    rows, cols = g.rows, g.cols
    ids = torch.arange(1, 1 + rows * cols)[:, None, None] * n * n + torch.arange(n * n).reshape(1, n, n)
    feat = ids.reshape(rows * cols, n * n, 1)  # (tiles, N, D=1): the value is the tile-token index
    num_patch_width, num_patch_height = rows, cols  # the fork's assignment of (rows, cols)
    f = feat.view(num_patch_height, num_patch_width, n, n, -1).permute(4, 0, 2, 1, 3).contiguous()
    f = f.flatten(1, 2).flatten(2, 3)
    f = unpad_image(f, torch.tensor(hw))
    fork = f.flatten(1, 2).transpose(0, 1)[:, 0].numpy()
    np.testing.assert_array_equal(lay.token[n * n :], fork)
    np.testing.assert_array_equal(lay.token[: n * n], np.arange(n * n))  # base tile first, unchanged
    plain = image_layout(hw, pins, tile_size=ts, tokens_per_side=n, style="cropped")
    if rows == cols:
        np.testing.assert_array_equal(lay.token, plain.token)
    else:
        assert not np.array_equal(lay.token, plain.token)


def test_hired_reference_layout_uses_swapped_grid_by_default(models):
    model, _ = models
    cfg = model.config
    assert prune.HiRED(layout="reference").layout_style(cfg)[0] == "cropped_swapped"
    assert prune.HiRED(layout="reference", swapped_grid=False).layout_style(cfg)[0] == "cropped"
    assert prune.HiRED().layout_style(cfg)[0] == "official"


@pytest.mark.parametrize("hw", [(40, 90), (90, 40)])
@pytest.mark.parametrize("swapped", [True, False])
def test_hired_reference_two_tile_grids_match_hf_language_model(models, hw, swapped):
    """HiRED's own layout on 1x2 / 2x1 grids, where the fork's swapped grid dims change the packing."""
    model, hf = models
    x = _inputs(model, [hw])
    hr = prune.HiRED(budget_rate=0.3, alpha=0.5, shallow_layer=0, layout="reference", swapped_grid=swapped)
    out = model(x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], pruner=hr)
    with torch.no_grad():
        vo = hf.model.vision_tower(
            torch.from_numpy(x["pixel_values"][0][:3]), output_hidden_states=True, output_attentions=True
        )
    keep = np.asarray(
        prune.hired(
            vo.attentions[0][:, :, 0, 1:].numpy(), vo.attentions[-2][:, :, 0, 1:].numpy(), budget_rate=0.3, alpha=0.5
        ).mask(16)
    )
    ref, n_vis = _reference_sequence(hf, x, keep, "cropped_swapped" if swapped else "cropped")
    got = np.asarray(out.logits)[np.asarray(out.mask)]
    chex.assert_trees_all_close(got, ref, atol=LOGITS_ATOL, rtol=0)
