"""vlmprune.viz: kept-token masks through the model's own pieces, the pictures, the CLI subcommand."""

import os

import numpy as np
import pytest

import vlmprune
from vlmprune import prune, viz
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
    assert int(mask.sum()) == budget == pruner.num_slots(model.config)


def _apply(model, pruner):
    x = viz.preprocess(model, demo_image())
    enc = viz.encode(model, x["pixel_values"], pruner)
    project = viz.projector(model)
    tokens, valid = pruner.apply(enc, project)
    return np.asarray(tokens), np.asarray(valid), np.asarray(project(enc["features"]))


@pytest.mark.parametrize("method,budget", GATHER)
def test_kept_mask_is_what_apply_feeds_the_llm(model, method, budget):
    """The kept rows of the projected features, in raster order, are exactly the tokens ``apply`` returns."""
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
