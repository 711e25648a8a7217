"""Per-tile pruners in LLaVA-OneVision's official layout (docs/methods.md §9.4 mode B) [PROPOSED]: the masked
VisPruner against the static one per image, the packed score maps against an independent torch computation, and
VisPruner / FasterVLM / random / uniform end to end against HF's language model fed the same pruned sequence built
from HF's own packed block."""

import math

import chex
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

import vlmprune
from reference.batch_calls import hf_greedy
from reference.onevision_builders import IMAGE, PAD, TILE, build_hf_onevision
from vlmprune import prune
from vlmprune.anyres.onevision import OnevisionGeometry, image_layout, pack_tables
from vlmprune.prune.baselines import uniform, uniform_grid_indices
from vlmprune.prune.onevision_grid import (
    grid_budgets,
    grid_slot_table,
    grid_values,
    pack_tile_values,
    packed_selection,
)
from vlmprune.prune.vispruner import vispruner, vispruner_masked, vispruner_masked_plans, vispruner_plan
from vlmprune.prune.vispruner_siglip import vispruner_siglip

jax.config.update("jax_default_matmul_precision", "highest")

N_SIDE = 4  # 4 x 4 tokens per tile (TILE = 28 px, 7-px patches)
PINS = tuple((TILE * a, TILE * b) for a in (1, 2, 3) for b in (1, 2, 3))
# (height, width) images of one batch: 1x2, 3x1, 3x3, 2x3 and 1x1 grids with crops of rows and of columns
SIZES = [(40, 90), (110, 35), (84, 84), (60, 80), (28, 20)]


def _geometry(max_num):
    return OnevisionGeometry(tile_size=TILE, tokens_per_side=N_SIDE, pinpoints=PINS, max_num=max_num)


def _packed_batch(max_num, channels, seed):
    """Random per-tile features (NI, T, n², C) and scores (NI, T, n²) of SIZES, their layouts and pack tables."""
    geom = _geometry(max_num)
    lays = [image_layout(s, geom) for s in SIZES]
    tables = pack_tables(SIZES, geom, length=max(lay.num_tokens for lay in lays))
    rng = np.random.default_rng(seed)
    t = geom.max_tiles
    feats = rng.standard_normal((len(SIZES), t, N_SIDE**2, channels)).astype(np.float32)
    scores = rng.random((len(SIZES), t, N_SIDE**2)).astype(np.float32)
    return lays, tables, feats, scores


def _static_grid(features, scores, count, budget, ratio):
    """The static VisPruner on one image's unpadded list: sorted kept positions."""
    sel = vispruner(features[None, :count], scores[None, None, :count], num_keep=budget, important_ratio=ratio)
    return np.sort(np.asarray(sel.indices[0]))


def _assert_masked_equals_static(feats, scores, counts, budgets, ratio):
    plans = vispruner_masked_plans(counts, budgets, ratio)
    keep = np.asarray(vispruner_masked(feats, scores, counts, budgets, plans["important"], plans["rounds"]), dtype=bool)
    for i, (n, k) in enumerate(zip(counts, budgets)):
        assert keep[i].sum() == k and not keep[i, n:].any()
        np.testing.assert_array_equal(np.flatnonzero(keep[i]), _static_grid(feats[i], scores[i], n, k, ratio))


def test_masked_vispruner_equals_static_on_lists_of_many_lengths():
    """One padded batch of lists of different lengths and budgets, odd residual counts and capped rounds
    included, equals the static function on each list alone, element for element."""
    ratio = 0.5
    rng = np.random.default_rng(1)
    counts = np.array([37, 64, 5, 50, 61, 12], np.int32)
    budgets = np.array([11, 20, 5, 3, 60, 1], np.int32)
    m = 70
    feats = rng.standard_normal((len(counts), m, 16)).astype(np.float32)
    scores = rng.random((len(counts), m)).astype(np.float32)
    feats[0, 40:] = 1e3  # padding rows: any finite value, never read
    plans = [vispruner_plan(int(n), int(k), ratio) for n, k in zip(counts, budgets)]
    residuals = [int(n) - p.num_important for n, p in zip(counts, plans)]
    # the generalised budgets are exercised: odd residual lists and a round capped at len(A)
    assert any(r % 2 for r, p in zip(residuals, plans) if p.rounds) and not all(p.matches_original for p in plans)
    _assert_masked_equals_static(feats, scores, counts, budgets, ratio)


@pytest.mark.parametrize("max_num", [9, 1])
def test_masked_vispruner_equals_static_on_packed_grids(max_num):
    """Packed grids of five image sizes in one batch (max 9: none downsampled; 1 and 2: all but the 1x1 grid), budgets
    min(K·T, oh·ow): masked VisPruner on the resampled scores and features equals the static one per image."""
    lays, tables, feats, scores = _packed_batch(max_num, 8, seed=max_num)
    down = [lay.downsampled for lay in lays]
    assert any(down) == (max_num != 9) and not all(down)
    slots = grid_slot_table(lays)
    gf = np.asarray(grid_values(pack_tile_values(feats, tables), slots))
    gs = np.asarray(grid_values(pack_tile_values(scores[..., None], tables), slots))[..., 0]
    counts, budgets = grid_budgets(lays, {9: 5, 1: 3}[max_num])
    _assert_masked_equals_static(gf, gs, counts, budgets, 0.5)


def _hf_grid_map(tile_values, lay, image_size, max_num):
    """An image's packed grid map written with torch and HF's own unpad: stitch the grid tiles' (n, n, C) maps
    row-major, ``unpad_image``, bilinear ``F.interpolate`` (align_corners=False) at HF's size rule -> (oh·ow, C)."""
    n, rows, cols = N_SIDE, lay.rows, lay.cols
    x = torch.from_numpy(tile_values[1 : 1 + rows * cols]).reshape(rows, cols, n, n, -1)
    x = x.permute(4, 0, 2, 1, 3).reshape(-1, rows * n, cols * n)  # (C, rows·n, cols·n)
    x = unpad_image(x, torch.tensor(image_size))
    c, h, w = x.shape
    ratio = math.sqrt(h * w / (max_num * n**2))
    if ratio > 1.1:
        x = F.interpolate(x[None], [int(h // ratio), int(w // ratio)], mode="bilinear", align_corners=False)[0]
    return x.permute(1, 2, 0).reshape(-1, c).numpy()


@pytest.mark.parametrize("max_num", [9, 1, 2])
def test_packed_scores_equal_torch_stitch_unpad_interpolate(max_num):
    lays, tables, _, scores = _packed_batch(max_num, 1, seed=10 + max_num)
    slots = grid_slot_table(lays)
    got = np.asarray(grid_values(pack_tile_values(scores[..., None], tables), slots))[..., 0]
    for i, lay in enumerate(lays):
        want = _hf_grid_map(scores[i, ..., None], lay, SIZES[i], max_num)[:, 0]
        assert want.shape == (lay.out_hw[0] * lay.out_hw[1],)
        # same float32 source weights as torch (test_onevision_layout); a blend of four values in [0, 1) whose
        # weights sum to 1 may round in another order: a few ulps of 1 (2**-24 each), copies exactly
        np.testing.assert_allclose(got[i, : want.shape[0]], want, atol=4 * 2.0**-24, rtol=0)
        if not lay.downsampled:
            np.testing.assert_array_equal(got[i, : want.shape[0]], want)


def test_packed_selection_keeps_a_newline_iff_its_row_keeps_a_token():
    lays, tables, _, _ = _packed_batch(2, 1, seed=0)
    slots = grid_slot_table(lays)
    rng = np.random.default_rng(4)
    counts, _ = grid_budgets(lays, 1)
    grid_keep = (rng.random(slots.shape) < 0.2) & (np.arange(slots.shape[1]) < counts[:, None])
    base = np.tile(np.array([0, 5, 15], np.int32), (len(lays), 1))
    sel = packed_selection(base, grid_keep, slots, jax.tree.map(np.asarray, tables))
    idx, valid = np.asarray(sel.indices), np.asarray(sel.valid)
    n2 = N_SIDE**2
    for i, lay in enumerate(lays):
        oh, ow = lay.out_hw
        want = [0, 5, 15]
        for r in range(oh):
            kept = [n2 + r * (ow + 1) + c for c in range(ow) if grid_keep[i, r * ow + c]]
            want += kept + ([n2 + r * (ow + 1) + ow] if kept else [])
        np.testing.assert_array_equal(idx[i, : valid[i].sum()], want)
        assert np.all(np.diff(idx[i, : valid[i].sum()]) > 0)


# ----------------------------------------------------------------------------------------------- end to end

LOGITS_ATOL = 1e-4  # fp32 end to end (tower, projector, packing blend, decoder) vs torch fp32 on CPU
RECEIVED_ATOL = 1e-6  # fp32 received attention (entries up to ~0.3 at N = 16) vs HF eager, as test_siglip holds it
E2E_SIZES = [(50, 30), (110, 35)]  # 2x2 and 3x1 grids, both cropped; at anyres_max_2 only the second is downsampled

# name -> (vision_aspect_ratio, tied)
VARIANTS = {"max2_untied": ("anyres_max_2", False), "max1_tied": ("anyres_max_1", True)}
METHODS = {
    "vispruner": dict(num_keep=5, important_ratio=0.5),
    "fastervlm": dict(num_keep=5),
    "random": dict(num_keep=5, seed=3),
    "uniform": dict(num_keep=4),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request, tmp_path_factory):
    aspect, tied = VARIANTS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = build_hf_onevision(d, aspect, tied)
    return request.param, vlmprune.load(str(d)), hf


def _batch(model, seed):
    """Left-padded batch: row 0 = [text, image 0, text], row 1 = [pad..., text, image 1, text]."""
    rng = np.random.default_rng(seed)
    geom = _geometry(int(model.config.vision_aspect_ratio.rsplit("_", 1)[1]))
    lays = [image_layout(s, geom) for s in E2E_SIZES]
    t_max = max(lay.num_tiles for lay in lays)
    pix = np.zeros((2, t_max, 3, TILE, TILE), np.float32)
    for i, lay in enumerate(lays):
        pix[i, : lay.num_tiles] = rng.standard_normal((lay.num_tiles, 3, TILE, TILE))
    rows = [[5, 6] + [IMAGE] * lays[0].num_tokens + [7, 8, 9, 10], [11] + [IMAGE] * lays[1].num_tokens + [12, 13]]
    length = max(map(len, rows))
    ids = np.full((2, length), PAD, np.int64)
    mask = np.zeros((2, length), np.int64)
    for r, row in enumerate(rows):
        ids[r, length - len(row) :] = row
        mask[r, length - len(row) :] = 1
    x = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, image_sizes=np.array(E2E_SIZES, np.int64))
    return x, lays


def _call(model, x, pruner):
    return dict(
        input_ids=x["input_ids"],
        pixel_values=x["pixel_values"],
        image_sizes=x["image_sizes"],
        attention_mask=x["attention_mask"],
        pruner=pruner,
    )


def _hf_row(hf, x, r):
    """Row r without padding: (prompt embeddings, image slots, HF's packed block (V, D) from get_image_features)."""
    m = x["attention_mask"][r].astype(bool)
    ids = torch.from_numpy(x["input_ids"][r][m])[None]
    with torch.no_grad():
        embeds = hf.model.get_input_embeddings()(ids)
        feats = hf.model.get_image_features(
            torch.from_numpy(x["pixel_values"][r : r + 1]),
            torch.from_numpy(x["image_sizes"][r : r + 1]),
            vision_aspect_ratio=hf.config.vision_aspect_ratio,
        )
    feats = getattr(feats, "pooler_output", feats)[0]
    return embeds, (ids[0] == IMAGE).nonzero()[:, 0], feats


def _hf_kept_slots(hf, method, settings, x, r, lay, received, max_num):
    """The packed slots image r keeps, written out independently: HF's eager tower (features, and our received
    attention tap, checked against HF's), the grid maps by torch stitch/unpad/interpolate, the static selection
    functions per image, the newline rule by rows. None for random (its draws are the pruner's)."""
    n = N_SIDE
    pix = torch.from_numpy(x["pixel_values"][r, : lay.num_tiles])
    with torch.no_grad():
        out = hf.model.vision_tower(pix, output_hidden_states=True, output_attentions=True)
    feats = out.hidden_states[-1].numpy()
    chex.assert_trees_all_close(received, out.attentions[-1].mean(-2).numpy(), atol=RECEIVED_ATOL, rtol=0)
    t = settings["num_keep"]
    oh, ow = lay.out_hw
    g = oh * ow
    budget = min((lay.num_tiles - 1) * t, g)
    score = received.mean(1, dtype=np.float64).astype(np.float32)  # (T, n²) head mean
    if method == "random":
        return None
    if method == "uniform":
        base = np.asarray(uniform(n * n, num_keep=t).indices)
        grid = uniform_grid_indices(budget, oh, ow)
    elif method in ("vispruner", "fastervlm"):
        ratio = settings.get("important_ratio", 1.0)
        base = np.asarray(vispruner_siglip(feats[:1], received[:1], num_keep=t, important_ratio=ratio).indices[0])
        gs = _hf_grid_map(score[..., None], lay, E2E_SIZES[r], max_num)[:, 0]
        gf = _hf_grid_map(feats, lay, E2E_SIZES[r], max_num)
        grid = _static_grid(gf, gs, g, budget, ratio)
    slots = list(np.sort(base))
    for row in range(oh):
        kept = [n * n + row * (ow + 1) + c for c in range(ow) if row * ow + c in set(grid.tolist())]
        slots += kept + ([n * n + row * (ow + 1) + ow] if kept else [])
    return np.asarray(slots)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_official_layout_matches_hf_language_model(models, method):
    """Default layout (official, mode B): the pruned model's logits equal HF's language model (eager) fed the
    pruned sequence built from HF's own packed block and the kept slots (computed independently), per row of a
    left-padded batch of a downsampled and a non-downsampled image (at anyres_max_2)."""
    name, model, hf = models
    settings = METHODS[method]
    pruner = prune.get(method, **settings)
    assert pruner.layout == "official"
    max_num = int(model.config.vision_aspect_ratio.rsplit("_", 1)[1])
    x, lays = _batch(model, seed=4)
    if name == "max2_untied":
        assert [lay.downsampled for lay in lays] == [False, True]
    plan = model.plan(**_call(model, x, pruner))
    t_max = plan.pixel_values.shape[1]
    taps = model.taps(plan.pixel_values, prune.get("fastervlm").request(model.config))  # the received attention
    received_all = np.asarray(taps.received_attention())
    if method == "random":  # its draws: the pruner's own selection on the packed block (the rest is independent)
        ctx = prune.PruneContext(layout=plan.layout.tables(), aux=dict(plan.aux), config=model.config)
        ours_sel = pruner.prune(taps, ctx).selection
    out = model(**_call(model, x, pruner))
    logits, valid = np.asarray(out.logits), np.asarray(out.mask)
    t = settings["num_keep"]
    for r, lay in enumerate(lays):
        received = received_all[r * t_max : r * t_max + lay.num_tiles]
        slots = _hf_kept_slots(hf, method, settings, x, r, lay, received, max_num)
        embeds, img_slots, feats = _hf_row(hf, x, r)
        oh, ow = lay.out_hw
        text = int(x["attention_mask"][r].sum()) - lay.num_tokens
        n_visual = int(valid[r].sum()) - text
        assert n_visual <= t + min((lay.num_tiles - 1) * t, oh * ow) + oh  # the planner's slot bound
        if slots is None:  # random: T + the grid budget, plus the newlines of the rows that keep a token
            slots = np.asarray(ours_sel.indices[r])[: int(ours_sel.valid[r].sum())]
            assert t + min((lay.num_tiles - 1) * t, oh * ow) < len(slots)
        assert n_visual == len(slots)
        keep = torch.from_numpy(slots.astype(np.int64))
        start, end = int(img_slots[0]), int(img_slots[-1]) + 1
        pruned = torch.cat([embeds[:, :start], feats[keep][None], embeds[:, end:]], dim=1)
        with torch.no_grad():
            ref = hf(inputs_embeds=pruned, attention_mask=torch.ones(pruned.shape[:2], dtype=torch.long)).logits[0]
        ours = logits[r][valid[r]]
        assert ours.shape == tuple(ref.shape)
        print(name, method, "row", r, "visual", n_visual, "max |logits - HF LM|:", np.abs(ours - ref.numpy()).max())
        chex.assert_trees_all_close(ours, ref.numpy(), atol=LOGITS_ATOL, rtol=0)  # fp32, as the unpruned test


def test_official_layout_greedy_matches_hf(models):
    """VisPruner in the default (official) layout under ``generate``: greedy tokens equal HF's generate on the same
    pruned sequence (HF's packed block at the independently computed kept slots), row by row."""
    name, model, hf = models
    settings = METHODS["vispruner"]
    pruner = prune.get("vispruner", **settings)
    max_num = int(model.config.vision_aspect_ratio.rsplit("_", 1)[1])
    x, lays = _batch(model, seed=5)
    ours = model.generate(**_call(model, x, pruner), max_new_tokens=8)
    plan = model.plan(**_call(model, x, pruner))
    t_max = plan.pixel_values.shape[1]
    received_all = np.asarray(model.taps(plan.pixel_values, pruner.request(model.config)).received_attention())
    for r, lay in enumerate(lays):
        received = received_all[r * t_max : r * t_max + lay.num_tiles]
        slots = _hf_kept_slots(hf, "vispruner", settings, x, r, lay, received, max_num)
        embeds, img_slots, feats = _hf_row(hf, x, r)
        start, end = int(img_slots[0]), int(img_slots[-1]) + 1
        pruned = torch.cat(
            [embeds[:, :start], feats[torch.from_numpy(slots.astype(np.int64))][None], embeds[:, end:]], 1
        )
        want = hf_greedy(
            hf, 8, PAD, inputs_embeds=pruned, attention_mask=torch.ones(pruned.shape[:2], dtype=torch.long)
        )
        np.testing.assert_array_equal(np.asarray(ours[r]), want[0])


@pytest.mark.parametrize(
    "method, settings",
    [
        ("vispruner", dict(num_keep=0)),
        ("fastervlm", dict(num_keep=10**6)),
        ("vispruner", dict(num_keep=4, important_ratio=1.5)),
        ("random", dict(num_keep=4, layout="spatial")),
        ("uniform", dict(num_keep=0)),
    ],
)
def test_official_layout_bad_settings_raise_before_compile(models, method, settings):
    _, model, _ = models
    x, _ = _batch(model, seed=0)
    before = model.compile_counts()
    with pytest.raises(ValueError):
        model(**_call(model, x, prune.get(method, **settings)))
    assert model.compile_counts() == before
