"""HiRED on LLaVA-OneVision [PROPOSED] (docs/methods.md §9.3.6): received attention summed over heads in place of
the CLS rows (layer 0 for the budget split, the feature layer for the selection), N_budget = int(P·N·rate), the
paper's footprint split of the tile budget, and HiRED's packing (base, then the stitched grid inside HF's unpad
crop, no newline, no anyres_max downsampling).

* the budget split and the selection equal a NumPy float64 transcription of the rule on random inputs (real
  27 x 27 geometry and the tiny 4 x 4 one, mixed grids in one batch), exactly;
* the cropped packing order equals HF's own stitch + ``unpad_image`` of a token-index map;
* end to end on tiny random OneVision checkpoints: the pruned model's logits equal HF's language model fed the same
  pruned sequence, built from HF's own tower outputs, projector, stitching and unpad; greedy generation is
  identical; bad settings are refused before any compile.
"""

import math

import chex
import jax
import numpy as np
import pytest
import torch
from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

import vlmprune
from reference.batch_calls import hf_greedy
from reference.onevision_builders import IMAGE, PAD, TILE, build_hf_onevision
from vlmprune import prune
from vlmprune.anyres.onevision import OnevisionGeometry, image_layout, spatial_ranks
from vlmprune.prune.hired import hired_batched

jax.config.update("jax_default_matmul_precision", "highest")

LOGITS_ATOL = 1e-4  # fp32 end to end (tower, projector, decoder) vs torch fp32 on CPU, as tests/models/test_onevision
RECEIVED_ATOL = 1e-7  # fp32 received attention (~1/N per entry) vs HF eager; tests/models/test_siglip holds 1e-6
# draws that come this close to a decision are redrawn: a budget product N_sub·s_i/Σs within BUDGET_MARGIN of an
# integer (float32 mass sums err by ~1e-7 relative, i.e. < 1e-3 absolute for N_sub < 10^4) or a kept/dropped score
# pair at a top-k cut within SCORE_MARGIN relative (a float32 sum of 4 heads errs by < 1e-6 relative)
BUDGET_MARGIN, SCORE_MARGIN = 1e-3, 1e-5


# ----------------------------------------------------------------------------------------------- NumPy transcription


def np_hired_onevision(shallow, deep, rows, cols, *, rate, alpha):
    """One image, written out from the rule in float64: shallow, deep (P, H, N) received attention per head.

    Returns (budgets (P,) int, masks (P, N) bool, margins): the smallest distance of a budget product
    ``N_sub·s_i/Σs`` to an integer, and the smallest relative gap of a kept/dropped score pair at a top-k cut, so
    that a draw can be checked for being clear of every decision."""
    p, _, n = shallow.shape
    side = math.isqrt(n)
    n_budget = int(p * n * rate)
    n_full = min(int(n_budget * alpha), n)
    n_sub = min(n_budget - n_full, (p - 1) * n)
    f0 = shallow[0].astype(np.float64).sum(axis=0)  # base tile, heads summed
    f22 = deep.astype(np.float64).sum(axis=1)  # (P, N)
    mass = np.zeros(rows * cols)
    for y in range(side):
        for x in range(side):  # thumbnail token (y, x) lies under grid tile (y·rows/n, x·cols/n), tiles row-major
            mass[(y * rows // side) * cols + x * cols // side] += f0[y * side + x]
    share = mass * n_sub / mass.sum()
    budgets = [n_full] + [min(int(np.floor(v)), n) for v in share]
    budget_margin = score_margin = np.inf
    frac = np.abs(share - np.round(share))
    frac = frac[frac > 0]  # an exact integer (the whole N_sub of a 1x1 grid) is no near-decision
    if n_sub > 0 and frac.size:
        budget_margin = np.min(frac)
    masks = np.zeros((p, n), bool)
    for t, b in enumerate(budgets):
        order = np.argsort(-f22[t], kind="stable")
        masks[t, order[:b]] = True
        if 0 < b < n:
            hi, lo = f22[t, order[b - 1]], f22[t, order[b]]
            score_margin = min(score_margin, (hi - lo) / abs(hi))
    return np.asarray(budgets), masks, (budget_margin, score_margin)


def _draw(rng, p, heads, n):
    """Positive attention-like values (P, H, N), float32. Head 0 holds a random permutation of evenly spaced
    levels, the other heads noise below a tenth of that spacing, so the head sums of a tile are distinct by
    construction (relative gaps of at least ~0.5/N)."""
    levels = (np.arange(n) + n) / (2 * n * n)  # spacing 1/(2n²), values ~1/n as received attention
    x = rng.random((p, heads, n)) * (0.1 / (2 * n * n * heads))
    x[:, 0] += np.stack([rng.permutation(levels) for _ in range(p)])
    return x.astype(np.float32)


@pytest.mark.parametrize(
    "side, grids, rate, alpha",
    [
        (27, [(2, 3), (1, 1), (6, 6)], 0.2, 0.5),  # OneVision's 729 tokens, up to the 6x6 grid (37 tiles)
        (27, [(3, 1), (1, 4)], 0.35, 0.3),
        (4, [(1, 2), (3, 1), (3, 3)], 0.5, 0.5),  # the tiny checkpoints' 16 tokens
        (4, [(2, 2)], 1.0, 0.0),  # everything to the tiles, every token budgeted
    ],
)
def test_budget_split_and_selection_match_numpy(side, grids, rate, alpha):
    n, heads = side * side, 4
    t_max = 1 + max(r * c for r, c in grids)
    rng = np.random.default_rng(side * 1000 + len(grids))
    for _ in range(50):  # redraw until every image is clear of all decisions
        shallow = np.zeros((len(grids), t_max, heads, n), np.float32)
        deep = np.zeros_like(shallow)
        want = []
        for i, (r, c) in enumerate(grids):
            p = 1 + r * c
            shallow[i, :p], deep[i, :p] = _draw(rng, p, heads, n), _draw(rng, p, heads, n)
            want.append(np_hired_onevision(shallow[i, :p], deep[i, :p], r, c, rate=rate, alpha=alpha))
        if all(w[2][0] > BUDGET_MARGIN and w[2][1] > SCORE_MARGIN for w in want):
            break
    else:
        pytest.fail("no decision-free draw found")
    sel = hired_batched(
        shallow,
        deep,
        np.asarray([1 + r * c for r, c in grids], np.int32),
        budget_rate=rate,
        alpha=alpha,
        variant="paper",
        grids=np.asarray([(c, r) for r, c in grids], np.int32),  # hired's (cols, rows)
    )
    masks = np.asarray(sel.mask(n))
    for i, ((r, c), (budgets, mask, _)) in enumerate(zip(grids, want)):
        p = 1 + r * c
        np.testing.assert_array_equal(np.asarray(sel.budgets[i, :p]), budgets)
        np.testing.assert_array_equal(masks[i, :p], mask)
        assert not masks[i, p:].any() and not np.asarray(sel.budgets[i, p:]).any()  # padding tiles keep nothing


def _hf_cropped_order(size_hw, rows, cols, n):
    """Tile-token ids (tile·n² + patch) of the stitched grid inside HF's unpad crop, in packed (raster) order, from
    HF's own stitching permute and ``unpad_image``."""
    ids = torch.arange((1 + rows * cols) * n * n).reshape(1 + rows * cols, n * n, 1)
    grid = ids[1:].view(rows, cols, n, n, 1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
    return unpad_image(grid, list(size_hw))[0].reshape(-1).numpy()


@pytest.mark.parametrize("size_hw", [(480, 640), (1024, 768), (1080, 1920), (768, 2304), (1640, 1107), (384, 384)])
def test_cropped_ranks_follow_hf_unpad(size_hw):
    pins = tuple((384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7))
    geom = OnevisionGeometry(tile_size=384, tokens_per_side=27, pinpoints=pins)
    lay = image_layout(size_hw, geom)
    rows, cols = get_anyres_image_grid_shape(list(size_hw), [list(p) for p in pins], 384)
    assert (lay.rows, lay.cols) == (rows, cols)
    n, t_max = 27, geom.max_tiles
    ranks = spatial_ranks([lay], t_max, "cropped")[0]
    p = lay.num_tiles
    order = np.argsort(np.where(ranks[: p * n * n] >= 0, ranks[: p * n * n], np.iinfo(np.int32).max), kind="stable")
    kept = order[: int((ranks[: p * n * n] >= 0).sum())]
    want = np.concatenate([np.arange(n * n), _hf_cropped_order(size_hw, rows, cols, n)])
    np.testing.assert_array_equal(kept, want)
    np.testing.assert_array_equal(spatial_ranks([lay], t_max)[0][ranks >= 0], ranks[ranks >= 0])  # same order
    with pytest.raises(ValueError, match="packing"):
        spatial_ranks([lay], t_max, "official")


# ----------------------------------------------------------------------------------------------- end to end

# name -> (vision_aspect_ratio, tied, tile px, patch px, budget_rate, alpha); anyres_max_1 downsamples every grid
# in HF's official packing (HiRED's packing does not); "real27" has OneVision's 27 x 27 tokens at tiny width
VARIANTS = {
    "max1_tied": ("anyres_max_1", True, TILE, 7, 0.5, 0.5),
    "max9_untied": ("anyres_max_9", False, TILE, 7, 0.4, 0.3),
    "real27_tied": ("anyres_max_2", True, 54, 2, 0.2, 0.5),
}
SIZES = [(40, 90), (110, 35)]  # (height, width) at TILE: a 1x2 grid (rows cropped) and a 3x1 grid (columns cropped)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request, tmp_path_factory):
    aspect, tied, tile, patch, rate, alpha = VARIANTS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = build_hf_onevision(d, aspect, tied, tile=tile, patch=patch)
    pruner = prune.get("hired", budget_rate=rate, alpha=alpha, layout="reference")
    return request.param, vlmprune.load(str(d)), hf, pruner


def _batch(model, seed):
    """Left-padded batch of two images of different grids: row 0 = [text, image 0, text], row 1 = [pad, text,
    image 1, text]; the placeholders are HF's official counts (what the processor writes)."""
    rng = np.random.default_rng(seed)
    geom = OnevisionGeometry(
        tile_size=model.config.vision.image_size,
        tokens_per_side=model.config.vision.grid,
        pinpoints=tuple(tuple(p) for p in model.config.image_grid_pinpoints),
        max_num=int(model.config.vision_aspect_ratio.rsplit("_", 1)[1]),
    )
    tile = geom.tile_size
    sizes = [(h * tile // TILE, w * tile // TILE) for h, w in SIZES]
    lays = [image_layout(s, geom) for s in sizes]
    t_max = max(lay.num_tiles for lay in lays)
    pix = np.zeros((2, t_max, 3, tile, tile), np.float32)
    for i, lay in enumerate(lays):
        pix[i, : lay.num_tiles] = rng.standard_normal((lay.num_tiles, 3, tile, tile))
    rows = [[5, 6] + [IMAGE] * lays[0].num_tokens + [7, 8, 9], [11] + [IMAGE] * lays[1].num_tokens + [12, 13]]
    length = max(map(len, rows))
    ids = np.full((2, length), PAD, np.int64)
    mask = np.zeros((2, length), np.int64)
    for r, row in enumerate(rows):
        ids[r, length - len(row) :] = row
        mask[r, length - len(row) :] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, image_sizes=np.array(sizes, np.int64)), sizes


def _hf_reference(hf, x, r, size_hw, pruner, tap=None):
    """Row r: (HF keep masks (P, N), the pruned prompt embeddings (1, L', D) built from HF's own tower, projector,
    stitching and unpad). ``tap`` = (shallow, deep) received attention to use instead of HF's (checked against it)."""
    cfg = hf.config
    rows, cols = get_anyres_image_grid_shape(list(size_hw), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    p = 1 + rows * cols
    pix = torch.from_numpy(x["pixel_values"][r, :p])
    with torch.no_grad():
        out = hf.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
        shallow = out.attentions[pruner.shallow_layer].mean(-2).numpy()  # (P, H, N) received attention
        deep = out.attentions[-1].mean(-2).numpy()  # the feature layer (the tower's last)
        feats = hf.model.multi_modal_projector(out.hidden_states[-1])  # (P, N, D)
    if tap is not None:
        chex.assert_trees_all_close(tap[0], shallow, atol=RECEIVED_ATOL, rtol=0)
        chex.assert_trees_all_close(tap[1], deep, atol=RECEIVED_ATOL, rtol=0)
        shallow, deep = tap
    _, mask, _ = np_hired_onevision(shallow, deep, rows, cols, rate=pruner.budget_rate, alpha=pruner.alpha)
    n, d = feats.shape[1], feats.shape[2]
    side = math.isqrt(n)
    base = feats[0][torch.from_numpy(mask[0])]
    stitch = lambda a: a[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # noqa: E731
    grid = unpad_image(stitch(feats), list(size_hw))  # (D, uh, uw), HF's own crop
    keep = unpad_image(stitch(torch.from_numpy(mask)[..., None]), list(size_hw))[0]
    kept = torch.cat([base, grid.permute(1, 2, 0)[keep]], dim=0)
    m = x["attention_mask"][r].astype(bool)
    ids = torch.from_numpy(x["input_ids"][r][m])[None]
    with torch.no_grad():
        embeds = hf.model.get_input_embeddings()(ids)
    slots = (ids[0] == IMAGE).nonzero()[:, 0]
    start, end = int(slots[0]), int(slots[-1]) + 1
    assert kept.shape[1] == d
    dropped = int(mask[1:].sum()) - int(keep.sum())  # selected grid tokens the unpad crop removes
    return mask, torch.cat([embeds[:, :start], kept[None], embeds[:, end:]], dim=1), dropped


def _our_masks(model, plan, pruner):
    """Our per-tile keep masks (NI, T_max, N) and received-attention taps (NI, T_max, H, N) x 2."""
    taps = model.taps(plan.pixel_values, pruner.request(model.config))
    ctx = prune.PruneContext(
        layout=plan.layout.tables(), aux={k: np.asarray(v) for k, v in plan.aux.items()}, config=model.config
    )
    sel = pruner.prune(taps, ctx).selection
    ni, t = plan.pixel_values.shape[:2]
    n = taps.num_tokens
    mask = np.asarray(sel.mask(n)).reshape(ni, t, n)
    cfg = model.config
    shallow = np.asarray(taps.received_attention(pruner.shallow_layer)).reshape(ni, t, -1, n)
    deep = np.asarray(taps.received_attention(cfg.vision.num_hidden_layers - 1)).reshape(ni, t, -1, n)
    return mask, shallow, deep


def test_logits_match_hf_language_model(models):
    """The pruned model's logits equal HF's language model fed the pruned sequence that HF's own tower, projector,
    stitching and unpad give for the same masks; the masks equal the NumPy rule on HF's eager attention."""
    name, model, hf, pruner = models
    x, sizes = _batch(model, seed=4)
    kw = dict(image_sizes=x["image_sizes"], attention_mask=x["attention_mask"], pruner=pruner)
    plan = model.plan(x["input_ids"], x["pixel_values"], **kw)
    ours_mask, shallow, deep = _our_masks(model, plan, pruner)
    out = model(x["input_ids"], x["pixel_values"], **kw)
    logits, valid = np.asarray(out.logits), np.asarray(out.mask)
    cropped = 0
    for r, size in enumerate(sizes):
        p = plan.layout.layouts[r].num_tiles
        # real27: 729 near-uniform received-attention scores of a random tower sit ~1e-8 apart, below the fp32 tap
        # error, so HF's own scores could reorder a top-k cut; there the reference takes our tap (checked against
        # HF's within RECEIVED_ATOL) and the rule is checked exactly by test_budget_split_and_selection_match_numpy
        tap = (shallow[r, :p], deep[r, :p]) if name.startswith("real27") else None
        want_mask, pruned, dropped = _hf_reference(hf, x, r, size, pruner, tap)
        cropped += dropped
        np.testing.assert_array_equal(ours_mask[r, :p], want_mask)
        assert not ours_mask[r, p:].any()
        with torch.no_grad():
            ref = hf(inputs_embeds=pruned, attention_mask=torch.ones(pruned.shape[:2], dtype=torch.long)).logits[0]
        ours = logits[r][valid[r]]
        assert ours.shape == tuple(ref.shape)
        print(
            name, "row", r, "sequence", int(valid[r].sum()), "max |logits - HF LM|:", np.abs(ours - ref.numpy()).max()
        )
        chex.assert_trees_all_close(ours, ref.numpy(), atol=LOGITS_ATOL, rtol=0)
    assert cropped > 0  # the crop removed selected tokens: the packing's unpad is exercised


@pytest.mark.parametrize("models", ["max1_tied", "max9_untied"], indirect=True)  # the 4 x 4 checkpoints (the
# 729-token geometry's logits are covered above; its generate compile alone costs ~40 s on CPU)
def test_greedy_generation_matches_hf(models):
    name, model, hf, pruner = models
    x, sizes = _batch(model, seed=5)
    plan = model.plan(
        x["input_ids"],
        x["pixel_values"],
        image_sizes=x["image_sizes"],
        attention_mask=x["attention_mask"],
        pruner=pruner,
    )
    ours_mask, _, _ = _our_masks(model, plan, pruner)
    ours = model.generate(
        x["input_ids"],
        x["pixel_values"],
        image_sizes=x["image_sizes"],
        attention_mask=x["attention_mask"],
        pruner=pruner,
        max_new_tokens=8,
    )
    for r, size in enumerate(sizes):
        p = plan.layout.layouts[r].num_tiles
        want_mask, pruned, _ = _hf_reference(hf, x, r, size, pruner)
        np.testing.assert_array_equal(ours_mask[r, :p], want_mask)
        want = hf_greedy(
            hf, 8, PAD, inputs_embeds=pruned, attention_mask=torch.ones(pruned.shape[:2], dtype=torch.long)
        )
        np.testing.assert_array_equal(np.asarray(ours[r]), want[0])


@pytest.mark.parametrize(
    "settings, error, match",
    [
        (dict(budget_rate=0.5), NotImplementedError, "OneVision"),  # official layout: HF's downsampled packing
        (dict(budget_rate=0.5, layout="reference", swapped_grid=True), ValueError, "swapped_grid"),
        (dict(budget_rate=0.0, layout="reference"), ValueError, "budget_rate"),
        (dict(budget_rate=1.5, layout="reference"), ValueError, "budget_rate"),
        (dict(alpha=-0.1, layout="reference"), ValueError, "alpha"),
        (dict(shallow_layer=7, layout="reference"), ValueError, "shallow_layer"),
        (dict(deep_layer=-9, layout="reference"), ValueError, "deep_layer"),
        (dict(layout="cropped"), ValueError, "layout"),
    ],
)
def test_bad_settings_refused_before_compile(models, settings, error, match):
    _, model, _, _ = models
    x, _ = _batch(model, seed=0)
    before = model.compile_counts()
    with pytest.raises(error, match=match):
        model(
            x["input_ids"],
            x["pixel_values"],
            image_sizes=x["image_sizes"],
            attention_mask=x["attention_mask"],
            pruner=prune.get("hired", **settings),
        )
    assert model.compile_counts() == before


def test_hero_refused_before_compile_naming_why(models):
    """HERO on OneVision (§9.3.7, not implemented): a NotImplementedError from ``validate`` that names the missing
    pieces (CLS signals, a SigLIP text tower, the 576-token geometry), before any compile."""
    _, model, _, _ = models
    x, _ = _batch(model, seed=0)
    pruner = prune.get("hero", clip_path="/nonexistent/clip")
    with pytest.raises(NotImplementedError, match="OneVision") as e:
        pruner.validate(model.config)
    for part in ("CLS", "text tower", "576", f"{model.config.tokens_per_image} tokens"):
        assert part in str(e.value)
    before = model.compile_counts()
    with pytest.raises(NotImplementedError, match="SigLIP"):
        model(
            x["input_ids"],
            x["pixel_values"],
            image_sizes=x["image_sizes"],
            attention_mask=x["attention_mask"],
            pruner=pruner,
        )
    assert model.compile_counts() == before
