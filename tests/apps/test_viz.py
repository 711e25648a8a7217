"""vlmprune.viz: kept-token masks through the model's own pieces, the pictures, the CLI subcommand."""

import os

import numpy as np
import pytest

import vlmprune
from vlmprune import pipeline, prune, viz
from vlmprune.prune.base import slot_count
from vlmprune.tiny import demo_image

pytest.importorskip("matplotlib")

KEEP = 16  # of the demo checkpoint's 64 tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from vlmprune.demo import ensure_tiny_checkpoint

    return ensure_tiny_checkpoint(str(tmp_path_factory.mktemp("viz") / "tiny-llava-1.5"))


@pytest.fixture(scope="module")
def model(tiny_dir):
    return vlmprune.load(tiny_dir)


def write_tiny_next(directory, seed=0):
    """A tiny random LLaVA-NeXT in HF format, written with NumPy (tile 56 px, 16 tokens per tile)."""
    from safetensors.numpy import save_file

    from vlmprune.tiny import build_next_processor, build_tokenizer, random_llava_tensors, tiny_llava_next_config

    os.makedirs(directory, exist_ok=True)
    tok = build_tokenizer()
    cfg = tiny_llava_next_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    tensors = random_llava_tensors(cfg, seed)
    rng = np.random.default_rng(seed)
    tensors["model.image_newline"] = (rng.standard_normal(cfg.text_config.hidden_size) * 0.05).astype(np.float32)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(directory)
    build_next_processor(tok, cfg).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def next_model(tmp_path_factory):
    return vlmprune.load(write_tiny_next(tmp_path_factory.mktemp("viz_next")))


GATHER = [
    ("vispruner", KEEP),
    ("fastervlm", KEEP),
    ("hired", KEEP),
    ("divprune", KEEP),
    ("random", KEEP),
    ("uniform", KEEP),
]


@pytest.mark.parametrize("method,budget", GATHER)
def test_kept_mask_count_equals_budget(model, method, budget):
    pruner = viz.make_pruner(method, budget, num_tokens=model.config.tokens_per_image)
    mask = viz.kept_mask(model, demo_image(), "What is in the image?", pruner)
    assert mask.shape == (model.config.tokens_per_image,) and mask.dtype == bool
    assert int(mask.sum()) == budget == slot_count(pruner, model.config, None, model.config.tokens_per_image, 0)


def _apply(model, pruner):
    """What the model feeds the LLM for the demo image: (tokens, valid, every projected feature)."""
    x = viz.preprocess(model, demo_image())
    taps = viz.encode(model, x["pixel_values"], pruner)
    tokens, valid = pipeline.tokens_from_taps(model.module, model.params, taps, pruner)
    return np.asarray(tokens), np.asarray(valid), np.asarray(viz.projector(model)(taps.features))


@pytest.mark.parametrize("method,budget", GATHER)
def test_kept_mask_is_what_apply_feeds_the_llm(model, method, budget):
    """The kept rows of the projected features, in raster order, are exactly the tokens the model feeds the LLM
    (``vlmprune.pipeline.tokens_from_taps``)."""
    pruner = viz.make_pruner(method, budget, num_tokens=model.config.tokens_per_image)
    mask = viz.kept_mask(model, demo_image(), pruner=pruner)
    tokens, valid, projected = _apply(model, pruner)
    assert valid.all()
    np.testing.assert_allclose(tokens[0], projected[0][mask], rtol=1e-5, atol=1e-5)


def test_merging_methods_show_their_anchors(model):
    vz = viz.make_pruner("visionzip", KEEP, num_tokens=64)
    assert (vz.dominant, vz.contextual) == (14, 2)
    assert viz.kept_mask(model, demo_image(), pruner=vz).sum() == vz.dominant - 1 + vz.contextual  # CLS is no patch
    pm = prune.get("prumerge_plus")
    _, valid, _ = _apply(model, pm)
    assert viz.kept_mask(model, demo_image(), pruner=pm).sum() == valid.sum() - 1  # + one pooled token


def test_no_pruner_keeps_everything(model):
    assert viz.kept_mask(model, demo_image()).all()
    assert viz.kept_mask(model, demo_image(), pruner="none").all()


def test_png_written_with_expected_size(model, tmp_path):
    from PIL import Image

    out = tmp_path / "sub" / "kept.png"
    fig = viz.plot_kept(model, demo_image(), f"vispruner:{KEEP}", out=str(out), dpi=80)
    assert out.is_file()
    w, h = (fig.get_size_inches() * 80).round().astype(int)
    expected = (round(viz.PANEL_INCHES * 80), round((viz.PANEL_INCHES + viz.TITLE_INCHES) * 80))
    assert Image.open(out).size == (w, h) == expected
    assert fig.axes[0].get_title() == f"vispruner — {KEEP}/64 tokens"


def test_compare_draws_one_titled_panel_per_method(model, tmp_path):
    specs = [("none", None), ("vispruner", KEEP), ("fastervlm", 8), "hired:0.25"]
    fig = viz.compare(model, demo_image(), specs, out=str(tmp_path / "cmp.png"))
    assert len(fig.axes) == len(specs)
    assert [a.get_title() for a in fig.axes] == [
        "none — 64/64 tokens",
        f"vispruner — {KEEP}/64 tokens",
        "fastervlm — 8/64 tokens",
        "hired — 16/64 tokens",
    ]
    assert len(viz.compare(model, demo_image(), "vispruner:4,uniform:4").axes) == 2


def test_picture_is_the_preprocessed_image(model):
    """Denormalised pixel_values are the processor's resized + center-cropped image; dropped patches are dimmed."""
    x = viz.preprocess(model, demo_image())
    view = viz.kept_view(model, x, f"fastervlm:{KEEP}")
    s = model.config.vision.image_size
    assert view.images.shape == (s, s, 3) and 0 <= view.images.min() and view.images.max() <= 1
    ip = model.processor.image_processor
    plain = np.asarray(ip(images=[demo_image()], do_normalize=False, return_tensors="np")["pixel_values"][0])
    np.testing.assert_allclose(view.images, np.moveaxis(plain, 0, -1), atol=1e-5)
    shaded = viz.shade(view.images, viz.token_grid(view.mask, view.side), dim=0.5)
    p = model.config.vision.patch_size
    kept_patch = np.argmax(view.mask)
    r, c = divmod(int(kept_patch), view.side)
    block = (slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
    np.testing.assert_allclose(shaded[block], view.images[block])
    dropped = np.argmin(view.mask)
    r, c = divmod(int(dropped), view.side)
    np.testing.assert_allclose(shaded[r * p, c * p], 0.5 * view.images[r * p, c * p])


def test_stitch_and_grid_helpers():
    tiles = np.arange(6 * 2 * 2).reshape(6, 2, 2)
    out = viz.stitch(tiles, 2, 3)
    assert out.shape == (4, 6)
    np.testing.assert_array_equal(out[2:, 2:4], tiles[4])
    with pytest.raises(ValueError, match="need 6 tiles"):
        viz.stitch(tiles[:5], 2, 3)
    with pytest.raises(ValueError, match="shape"):
        viz.token_grid(np.ones(10, bool), 3)


def test_parse_and_make_pruner():
    assert viz.parse_specs("vispruner:64, hired:0.2,prumerge_plus") == [
        ("vispruner", 64),
        ("hired", 0.2),
        ("prumerge_plus", None),
    ]
    h = viz.make_pruner("hired", 115, num_tokens=576)
    assert min(576, int(576 * h.budget_rate)) == 115
    assert viz.make_pruner("none", num_tokens=576) is None


def test_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match="unknown pruning method 'nope'"):
        viz.make_pruner("nope", 4, num_tokens=64)
    with pytest.raises(ValueError, match="budget 65 is larger than the 64 visual tokens"):
        viz.compare(model, demo_image(), "vispruner:65")
    with pytest.raises(ValueError, match="token count"):
        viz.make_pruner("vispruner", 0.5, num_tokens=64)
    with pytest.raises(ValueError, match="takes no budget"):
        viz.make_pruner("prumerge_plus", 8, num_tokens=64)
    with pytest.raises(FileNotFoundError, match="not found"):
        viz.kept_mask(model, str(tmp_path / "missing.png"), pruner="vispruner:4")
    with pytest.raises(ValueError, match="inside the LLM"):
        viz.kept_mask(model, demo_image(), pruner=prune.get("fastv"))
    with pytest.raises(ValueError, match="num_keep must be <= 64"):
        viz.kept_mask(model, demo_image(), pruner=prune.get("vispruner", num_keep=100))


def test_cli_visualize(tiny_dir, tmp_path):
    from PIL import Image

    from vlmprune.cli import main

    img = tmp_path / "img.png"
    demo_image().save(img)
    out = tmp_path / "kept.png"
    assert (
        main(
            [
                "visualize",
                "--model",
                tiny_dir,
                "--image",
                str(img),
                "--method",
                "vispruner",
                "--keep",
                "8",
                "--out",
                str(out),
                "--dpi",
                "50",
            ]
        )
        == 0
    )
    assert Image.open(out).size == (150, round((viz.PANEL_INCHES + viz.TITLE_INCHES) * 50))
    out2 = tmp_path / "cmp.png"
    assert (
        main(
            [
                "visualize",
                "--model",
                tiny_dir,
                "--image",
                str(img),
                "--compare",
                "vispruner:8,fastervlm:8,none",
                "--no-grid",
                "--out",
                str(out2),
                "--dpi",
                "50",
            ]
        )
        == 0
    )
    assert Image.open(out2).size[0] == 3 * 150
    with pytest.raises(SystemExit, match="not found"):
        main(["visualize", "--model", tiny_dir, "--image", str(tmp_path / "x.png"), "--method", "vispruner"])
    with pytest.raises(SystemExit, match="unknown method"):
        main(["visualize", "--model", tiny_dir, "--image", str(img), "--compare", "bogus:3"])
    with pytest.raises(SystemExit, match="larger than the 64"):
        main(["visualize", "--model", tiny_dir, "--image", str(img), "--compare", "fastervlm:99"])


def test_next_masks_per_tile(next_model, tmp_path):
    """LLaVA-NeXT: (tiles, N) masks; a 1:2 image fills its 1x2 grid exactly, so every tile keeps num_keep."""
    img = demo_image().resize((112, 56))
    mask = viz.kept_mask(next_model, img, pruner="vispruner:4")
    assert mask.shape == (3, next_model.config.tokens_per_image)
    np.testing.assert_array_equal(mask.sum(1), [4, 4, 4])
    assert viz.kept_mask(next_model, img, pruner="divprune:4").sum() == 4 * 3  # whole-image budget, 4 per tile
    full = viz.kept_mask(next_model, demo_image(), pruner=None)  # 4:3 image on a 2x2 grid: a row unpadded away
    assert full.shape == (5, 16) and full[0].all() and full[1:].sum() == 48
    fig = viz.compare(next_model, demo_image(), "none,fastervlm:4", out=str(tmp_path / "next.png"))
    assert len(fig.axes) == 4  # base image + tile grid per panel
    assert fig.axes[0].get_title() == "none — 64/64 tokens"
    assert os.path.isfile(tmp_path / "next.png")


# ----------------------------------------------------------------------------------------------- LLaVA-OneVision


@pytest.fixture(scope="module")
def ov_dir(tmp_path_factory):
    from reference.onevision_builders import build_hf_onevision_with_processor

    d = tmp_path_factory.mktemp("viz_ov")
    build_hf_onevision_with_processor(d, seed=3)  # 28-px tiles of 4x4 tokens, grids up to 3x3, anyres_max_2
    return str(d)


@pytest.fixture(scope="module")
def ov_model(ov_dir):
    return vlmprune.load(ov_dir)


#: (width, height): a 1x2 grid whose 4x8 map is kept as is, and a 2x2 grid whose cropped map is downsampled
OV_IMAGES = {"plain": (56, 28), "downsampled": (80, 60)}


def _ov_inputs(model, size):
    x = viz.preprocess(model, demo_image().resize(size))
    from vlmprune.anyres.onevision import onevision_batch

    _, batch, _ = onevision_batch(model.config, x["pixel_values"], x["image_sizes"])
    return x, batch


def _fed_rows(model, x, pruner):
    """What the model feeds the LLM for image 0: (tokens (K, D) of the valid slots, the unpruned packed block
    (V, D), every projected tile token (T·N, D)), through the model's own plan and ``visual_tokens``."""
    plan = model.plan(x["input_ids"], x["pixel_values"], image_sizes=x["image_sizes"], pruner=pruner)
    inputs = model.device_inputs(x["input_ids"], plan)
    args = (model.module, model.params, inputs.pixel_values)
    tok, valid = pipeline.visual_tokens(*args, pruner, inputs.layout, inputs.aux, plan.stride)
    packed, pvalid = pipeline.visual_tokens(*args, None, inputs.layout, inputs.aux, None)
    tiles = viz.projector(model)(viz.encode(model, inputs.pixel_values, None).features)
    keep = np.asarray(valid[0])
    return np.asarray(tok[0])[keep], np.asarray(packed[0])[np.asarray(pvalid[0])], np.asarray(tiles).reshape(-1, 32)


def _rows_in(rows, table, repeated=None):
    """Index into ``table`` of each row of ``rows``, each found exactly once (random features are distinct), except
    the rows equal to ``table[repeated]`` (the newline slots of a packed block), returned as -1."""
    hit = np.abs(rows[:, None, :] - table[None, :, :]).max(-1) < 1e-5  # float32 copies of the same computation
    if repeated is not None:
        other = hit[:, repeated].copy()
        hit[other] = False
    assert (hit.sum(1) == 1).all() if repeated is None else (hit[~other].sum(1) == 1).all()
    return np.where(hit.any(1), np.argmax(hit, axis=1), -1)


@pytest.mark.parametrize("method", ["divprune", "vispruner"])
@pytest.mark.parametrize("image", sorted(OV_IMAGES))
def test_onevision_packed_cells_are_the_kept_slots(ov_model, image, method):
    """DivPrune selects on the packed block, VisPruner in the official layout (mode B) on its slots: the view's kept
    slots are the rows the LLM receives, the base tile's kept tokens are marked on the base view, and each kept
    grid slot lights exactly its cell of the packed map, found through the pack tables (the point its bilinear
    weights sample: the cell's centre)."""
    m = ov_model
    x, batch = _ov_inputs(m, OV_IMAGES[image])
    lay, tables = batch.layouts[0], batch.pack
    assert lay.downsampled == (image == "downsampled")
    pruner = prune.get(method, num_keep=4)
    k = viz.keep_onevision(m, x["pixel_values"], x["image_sizes"], pruner)
    fed, packed, _ = _fed_rows(m, x, pruner)
    newline = tables.newline[0, : lay.num_tokens]
    found = _rows_in(fed, packed, repeated=np.nonzero(newline)[0][0])  # the newlines are one embedding
    want = np.zeros(lay.num_tokens, bool)
    want[found[found >= 0]] = True
    np.testing.assert_array_equal(k.slots & ~newline, want)
    assert (k.slots & newline).sum() == (found < 0).sum()
    want = k.slots
    np.testing.assert_array_equal(viz.kept_mask(m, demo_image().resize(OV_IMAGES[image]), pruner=pruner), want)

    view = viz.kept_view(m, x, pruner)
    n, p = 16, m.config.vision.patch_size
    oh, ow = lay.out_hw
    assert view.cells.shape == (oh, ow) and view.crop == (lay.top, lay.bottom, lay.left, lay.right)
    np.testing.assert_array_equal(view.mask[0], want[:n])
    assert not view.mask[1:].any()
    assert view.cells.sum() == (want[n:] & ~newline[n:]).sum() and view.newlines == (want & newline).sum()
    if method == "divprune":  # min(num_keep·T, V) of the packed block, newlines among the candidates
        assert view.kept + view.newlines == len(fed) == min(4 * lay.num_tiles, lay.num_tokens)
    else:  # mode B: T of the base, min(K·T, oh·ow) of the grid, the newline of every row that keeps a token
        assert view.kept == 4 + min(4 * (lay.num_tiles - 1), oh * ow) and view.kept + view.newlines == len(fed)
        assert view.newlines == view.cells.any(axis=1).sum()
    assert view.total == n + oh * ow

    # the grid panel's pixels: bright exactly over the kept cells, inside the crop
    h, w = lay.rows * 28, lay.cols * 28
    box = (lay.top * p, lay.bottom * p, lay.left * p, lay.right * p)
    bright = viz.cell_mask((h, w), view.cells, box)
    assert not bright[: box[0]].any() and not bright[box[1] :].any()
    assert not bright[:, : box[2]].any() and not bright[:, box[3] :].any()
    for j in np.nonzero(~newline[n:])[0] + n:
        tile, patch = divmod(int(tables.src[0, j, 0]), n)
        y = (tile - 1) // lay.cols * 4 + patch // 4 + float(tables.hw[0, j, 1])  # the blend's sample point
        x_ = (tile - 1) % lay.cols * 4 + patch % 4 + float(tables.ww[0, j, 1])
        assert bright[int((y + 0.5) * p), int((x_ + 0.5) * p)] == want[j], j
    # pixels per kept slot: one p x p token block without downsampling; an (uh/oh) x (uw/ow) share of the crop
    uh, uw = lay.unpadded_hw
    rows_px = np.diff(np.ceil(np.arange(oh + 1) * (uh * p) / oh).astype(int))
    cols_px = np.diff(np.ceil(np.arange(ow + 1) * (uw * p) / ow).astype(int))
    assert bright.sum() == sum(rows_px[r] * cols_px[c] for r, c in zip(*np.nonzero(view.cells)))
    if not lay.downsampled:
        assert bright.sum() == view.cells.sum() * p * p


@pytest.mark.parametrize("spec", ["uniform:4:layout=reference", "vispruner:4:layout=reference"])
def test_onevision_per_tile_masks(ov_model, spec):
    """A per-tile pruner (spatial-compat layout): a (tiles, N) mask, num_keep per tile, exactly the tile tokens
    the LLM receives; the whole stitched grid is fed (no crop outline)."""
    m = ov_model
    x, batch = _ov_inputs(m, OV_IMAGES["downsampled"])
    lay = batch.layouts[0]
    pruner = prune.parse_spec(spec, num_tokens=16)
    view = viz.kept_view(m, x, pruner)
    assert view.mask.shape == (lay.num_tiles, 16) and view.cells is None and view.crop is None
    np.testing.assert_array_equal(view.mask.sum(1), [4] * lay.num_tiles)
    fed, _, tiles = _fed_rows(m, x, pruner)
    want = np.zeros(tiles.shape[0], bool)
    want[_rows_in(fed, tiles)] = True
    np.testing.assert_array_equal(view.mask, want.reshape(-1, 16)[: lay.num_tiles])
    assert view.title == f"{pruner.name} — {4 * lay.num_tiles}/{16 * lay.num_tiles} tokens"


def test_onevision_figures_and_errors(ov_model, tmp_path):
    m = ov_model
    img = demo_image().resize(OV_IMAGES["downsampled"])
    x, batch = _ov_inputs(m, OV_IMAGES["downsampled"])
    lay = batch.layouts[0]
    full = viz.kept_view(m, x, None)
    assert full.cells.all() and full.mask[0].all() and full.kept == full.total == 16 + lay.out_hw[0] * lay.out_hw[1]
    fig = viz.compare(m, img, "none,divprune:4,uniform:4", out=str(tmp_path / "ov.png"))
    assert len(fig.axes) == 6 and os.path.isfile(tmp_path / "ov.png")  # base view + tile grid per panel
    # every grid row's newline reaches the LLM too (on OneVision a pruner of the packed block may keep them)
    assert fig.axes[0].get_title() == f"none — {full.total}/{full.total} tokens (+{lay.out_hw[0]} newlines)"
    assert "downsampled to" in fig.axes[3].get_xlabel()
    with pytest.raises(ValueError, match="inside the LLM"):
        viz.kept_mask(m, img, pruner=prune.get("fastv", layer=1))
    with pytest.raises(NotImplementedError, match="OneVision"):
        viz.kept_mask(m, img, pruner="hired:0.25")


def test_cli_visualize_onevision(ov_dir, tmp_path):
    from PIL import Image

    from vlmprune.cli import main

    img = tmp_path / "img.png"
    demo_image().resize(OV_IMAGES["downsampled"]).save(img)
    out = tmp_path / "ov.png"
    argv = ["visualize", "--model", ov_dir, "--image", str(img), "--out", str(out), "--dpi", "40"]
    assert main(argv + ["--compare", "none,divprune:4,uniform:4"]) == 0
    assert Image.open(out).size[0] == 3 * round(viz.PANEL_INCHES * 40)
    assert main(argv + ["--method", "vispruner:4:layout=reference", "--overwrite"]) == 0
    assert Image.open(out).size[0] == round(viz.PANEL_INCHES * 40)
    with pytest.raises(SystemExit, match="error: .*OneVision"):
        main(argv + ["--method", "hired", "--budget-rate", "0.25", "--overwrite"])
    with pytest.raises(SystemExit, match="error: fastv prunes inside the LLM"):
        main(argv + ["--method", "fastv", "--overwrite"])
