"""LLaVA-OneVision host layout and packing against HF (tiny random LlavaOnevisionForConditionalGeneration, fp32).

The geometry is read back from each model's saved ``config.json``; per-tile features are random, so the packing
is compared on its own (HF's ``model.model.pack_image_features`` / ``apply_pooling``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference.onevision_builders import build_hf_onevision
from vlmprune.anyres.onevision import (
    OnevisionGeometry,
    anyres_max,
    bilinear_axis,
    image_layout,
    max_tokens_per_image,
    pack_image_features,
    pack_tables,
    pack_video_features,
    read_processor_facts,
    resize_bilinear,
    video_num_tokens,
)

jax.config.update("jax_default_matmul_precision", "highest")

# (tile px, patch px, vision_aspect_ratio, kv heads, tied): n = 4 tokens per side with a budget that never, sometimes
# or almost always downsamples; and the real 27 x 27 geometry at tiny width
MODELS = {
    "n4_max9_gqa_untied": (28, 7, "anyres_max_9", 2, False),
    "n4_max1_gqa_tied": (28, 7, "anyres_max_1", 2, True),
    "n4_max2_mha_untied": (28, 7, "anyres_max_2", 4, False),
    "n27_max2_gqa_tied": (54, 2, "anyres_max_2", 2, True),
}
SIZES_N4 = [
    (28, 28),
    (30, 50),
    (50, 30),
    (84, 84),
    (17, 83),
    (100, 37),
    (61, 29),
    (5, 90),
    (90, 5),
    (57, 57),
    (56, 29),
    (83, 84),
]
SIZES_N27 = [(54, 54), (40, 90), (161, 107), (99, 160), (108, 55), (37, 150)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def ov_model(request, tmp_path_factory):
    from transformers import AutoConfig

    d = tmp_path_factory.mktemp(request.param)
    tile, patch, aspect, kv, tied = MODELS[request.param]
    hf = build_hf_onevision(d, aspect, tied, tile=tile, patch=patch, kv_heads=kv)
    geom = OnevisionGeometry.from_hf(AutoConfig.from_pretrained(str(d)))
    return request.param, hf, geom


def _hf_pack(hf, feats, size_hw):
    import torch

    with torch.no_grad():
        out, lens = hf.model.pack_image_features(
            [torch.tensor(feats)],
            torch.tensor([list(size_hw)]),
            image_newline=hf.model.image_newline,
            vision_aspect_ratio=hf.config.vision_aspect_ratio,
        )
    return out[0].numpy(), int(lens[0])


def test_packing_matches_hf(ov_model):
    name, hf, geom = ov_model
    sizes = SIZES_N27 if geom.tokens_per_side == 27 else SIZES_N4
    rng = np.random.default_rng(1)
    d = hf.config.text_config.hidden_size
    n2 = geom.tokens_per_tile
    tables = pack_tables(sizes, geom)
    feats = np.zeros((len(sizes), geom.max_tiles, n2, d), np.float32)
    refs, n_down = [], 0
    for i, s in enumerate(sizes):
        lay = image_layout(s, geom)
        feats[i, : lay.num_tiles] = rng.standard_normal((lay.num_tiles, n2, d), dtype=np.float32)
        feats[i, lay.num_tiles :] = np.nan  # padding tiles must never be read
        refs.append(_hf_pack(hf, feats[i, : lay.num_tiles], s))
        n_down += lay.downsampled
    newline = jnp.asarray(hf.model.image_newline.detach().numpy())
    got = np.asarray(jax.jit(pack_image_features)(jnp.asarray(feats), newline, jax.tree.map(jnp.asarray, tables)))
    worst = 0.0
    for i, (s, (ref, v)) in enumerate(zip(sizes, refs)):
        lay = image_layout(s, geom)
        assert v == lay.num_tokens == int(tables.valid[i].sum()), (s, v, lay.num_tokens)
        assert v <= max_tokens_per_image(geom)
        np.testing.assert_array_equal(got[i, v:], 0)
        e = float(np.max(np.abs(got[i, :v] - ref))) if v else 0.0
        worst = max(worst, e)
    print(f"{name}: {len(sizes)} sizes, {n_down} downsampled, max |packed - HF| = {worst:.2e}")
    # fp32: copies are exact; a bilinear blend is four float32 products summed in torch's order (XLA may fuse
    # them into FMAs): a few ulps of values of size ~3
    assert worst < 1e-5, worst
    if name != "n4_max9_gqa_untied":
        assert n_down > 0  # the small budgets exercise the downsampling branch


def test_one_program_for_every_grid(ov_model):
    """Tables of different image sizes share one shape: the jitted pack compiles once."""
    _, hf, geom = ov_model
    d = hf.config.text_config.hidden_size
    fn = jax.jit(lambda *a: pack_image_features(*a))  # a fresh function: its own compilation cache
    feats = jnp.zeros((2, geom.max_tiles, geom.tokens_per_tile, d))
    sizes = SIZES_N27 if geom.tokens_per_side == 27 else SIZES_N4
    for a, b in zip(sizes[::2], sizes[1::2]):
        fn(feats, jnp.zeros(d), jax.tree.map(jnp.asarray, pack_tables([a, b], geom)))
    assert fn._cache_size() == 1


def test_video_pooling_matches_hf(ov_model):
    import torch

    _, hf, geom = ov_model
    d = hf.config.text_config.hidden_size
    frames = np.random.default_rng(2).standard_normal((3, geom.tokens_per_tile, d), dtype=np.float32)
    with torch.no_grad():
        pooled = hf.model.apply_pooling(torch.tensor(frames)).reshape(1, -1, d)
        ref = torch.cat([pooled, hf.model.image_newline[None, None]], dim=1)[0].numpy()
    got = np.asarray(
        pack_video_features(jnp.asarray(frames[None]), jnp.asarray(hf.model.image_newline.detach().numpy()))
    )[0]
    assert got.shape == ref.shape == (video_num_tokens(3, geom.tokens_per_side), d)
    assert float(np.max(np.abs(got - ref))) < 1e-5  # fp32 bilinear blends: a few ulps


@pytest.mark.parametrize("n_in,n_out", [(27, 14), (4, 2), (81, 37), (162, 99), (5, 5), (40, 13), (3, 7)])
def test_bilinear_equals_torch_and_jax_image_resize(n_in, n_out):
    import torch

    x = np.random.default_rng(n_in * 100 + n_out).standard_normal((n_in, n_in + 3, 5), dtype=np.float32)
    ref = (
        torch.nn.functional.interpolate(torch.tensor(x).permute(2, 0, 1)[None], [n_out, n_out + 1], mode="bilinear")[0]
        .permute(1, 2, 0)
        .numpy()
    )
    got = np.asarray(resize_bilinear(jnp.asarray(x), (n_out, n_out + 1)))
    jres = np.asarray(jax.image.resize(jnp.asarray(x), (n_out, n_out + 1, 5), "linear", antialias=False))
    err, jerr = float(np.max(np.abs(got - ref))), float(np.max(np.abs(jres - ref)))
    print(f"{n_in}->{n_out}: ours {err:.1e}, jax.image.resize {jerr:.1e}")
    assert err < 2e-6  # same float32 weights as torch (below); only the blend's rounding order differs: ~1 ulp of |x|<5
    # jax.image.resize computes its weights in float32 along another path: errors grow with the source index
    # (~n_in · 2**-24 per weight, times |x| < 5)
    assert jerr < n_in * 6e-8 * 5 + 2e-6
    # the weights themselves, read off torch with one-hot inputs, are bit-identical
    onehot = torch.eye(n_in).reshape(1, n_in, n_in, 1)
    w_torch = torch.nn.functional.interpolate(onehot, [n_out, 1], mode="bilinear")[0, :, :, 0].numpy()
    i0, i1, l0, l1 = bilinear_axis(n_in, n_out)
    w_ours = np.zeros((n_in, n_out), np.float32)
    np.add.at(w_ours, (i0, np.arange(n_out)), l0)
    np.add.at(w_ours, (i1, np.arange(n_out)), l1)
    np.testing.assert_array_equal(w_ours, w_torch)


def test_antialias_default_of_jax_image_resize_differs_from_torch():
    """The trip-wire the port avoids: jax.image.resize's default antialias=True is not torch's bilinear."""
    import torch

    x = np.random.default_rng(0).standard_normal((27, 27, 3), dtype=np.float32)
    ref = (
        torch.nn.functional.interpolate(torch.tensor(x).permute(2, 0, 1)[None], [14, 14], mode="bilinear")[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert float(np.max(np.abs(np.asarray(jax.image.resize(jnp.asarray(x), (14, 14, 3), "linear")) - ref))) > 1e-2


def _hf_counting_processor(geom, aspect):
    """HF's LlavaOnevisionProcessor with only what its placeholder count reads (the image processor and the budget).
    A full instance cannot be built here: its constructor resolves a video processor, which needs torchvision."""
    from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    proc.image_processor = LlavaOnevisionImageProcessorPil(
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"height": geom.tile_size, "width": geom.tile_size},
        image_grid_pinpoints=[list(p) for p in geom.pinpoints],
    )
    proc.num_image_tokens = geom.tokens_per_tile
    proc.vision_feature_select_strategy = "full"
    proc.vision_aspect_ratio = aspect
    return proc


def test_layout_count_equals_hf_processor(ov_model):
    """num_tokens equals the number of placeholders HF's processor writes (its counting method), over a scan of
    image sizes covering every grid; tile counts equal the image processor's on real images."""
    from PIL import Image

    _, hf, geom = ov_model
    proc = _hf_counting_processor(geom, hf.config.vision_aspect_ratio)
    s = geom.tile_size
    worst, n_down = 0, 0
    for h in range(1, 3 * s + 20, 5):
        for w in range(1, 3 * s + 20, 7):
            lay = image_layout((h, w), geom)
            assert lay.num_tokens == proc._get_number_of_features(h, w, s, s), (h, w)
            worst, n_down = max(worst, lay.num_tokens), n_down + lay.downsampled
    assert worst <= max_tokens_per_image(geom)
    rng = np.random.default_rng(0)
    for h, w in [(37, 61), (83, 29), (5, 77), (71, 70), (160, 33)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        out = proc.image_processor(images=img, return_tensors="np")
        assert out["pixel_values"].shape[1] == image_layout((h, w), geom).num_tiles, (h, w)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        anyres_max("anyres")
    with pytest.raises(ValueError, match="vision_aspect_ratio"):
        anyres_max("anyres_max_0")
    assert anyres_max("anyres_max_9") == 9
    with pytest.raises(ValueError, match="pinpoints"):
        OnevisionGeometry(tile_size=28, tokens_per_side=4, pinpoints=((28, 30),))
    geom = OnevisionGeometry(tile_size=28, tokens_per_side=4, pinpoints=((28, 28), (56, 56)))
    with pytest.raises(ValueError, match="positive"):
        image_layout((0, 10), geom)
    with pytest.raises(ValueError, match="table length"):
        pack_tables([(56, 56)], geom, length=20)


def test_processor_facts_against_hf_processor(tmp_path):
    """Mean/std and the tile count read from the checkpoint's own file equal what HF's processor does."""
    from PIL import Image
    from transformers import AutoImageProcessor, LlavaOnevisionImageProcessorPil

    from vlmprune.anyres.onevision import CLASS_DEFAULT_MEAN

    tile = 28
    pins = [[tile * a, tile * b] for a in (1, 2, 3) for b in (1, 2, 3)]
    LlavaOnevisionImageProcessorPil(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": tile, "width": tile}, image_grid_pinpoints=pins
    ).save_pretrained(tmp_path)
    facts = read_processor_facts(str(tmp_path))
    hf = AutoImageProcessor.from_pretrained(str(tmp_path))
    assert facts.image_mean == tuple(hf.image_mean) == (0.5, 0.5, 0.5) != CLASS_DEFAULT_MEAN
    assert facts.image_std == tuple(hf.image_std) and facts.tile_size == tile
    geom = OnevisionGeometry(tile_size=tile, tokens_per_side=4, pinpoints=facts.pinpoints)
    rng = np.random.default_rng(0)
    for h, w in [(37, 61), (83, 29), (29, 29), (5, 77), (71, 70)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        out = hf(images=img, return_tensors="np")
        assert out["pixel_values"].shape[1] == facts.num_tiles((h, w)) == image_layout((h, w), geom).num_tiles
        assert tuple(out["image_sizes"][0]) == (h, w)
        # the base tile (tile 0) is the whole image squashed and normalised with the file's statistics
        base = np.asarray(img.resize((tile, tile), Image.BICUBIC), np.float32) / 255
        want = ((base - np.array(facts.image_mean)) / np.array(facts.image_std)).transpose(2, 0, 1)
        assert float(np.max(np.abs(out["pixel_values"][0, 0] - want))) < 1e-5  # same PIL resize, fp32 normalise


def test_untiled_images_of_a_multi_image_prompt(ov_model):
    """Images of a several-image prompt are one tile each: its n² tokens and one newline, mixed in one batch with
    tiled images."""
    _, hf, geom = ov_model
    d = hf.config.text_config.hidden_size
    sizes, tiled = [(30, 50), (30, 50), (61, 29), (61, 29)], [True, False, True, False]
    tables = pack_tables(sizes, geom, tiled=tiled)
    rng = np.random.default_rng(4)
    feats = np.zeros((4, geom.max_tiles, geom.tokens_per_tile, d), np.float32)
    newline = jnp.asarray(hf.model.image_newline.detach().numpy())
    for i, (s, t) in enumerate(zip(sizes, tiled)):
        k = image_layout(s, geom, tiled=t).num_tiles
        feats[i, :k] = rng.standard_normal((k, geom.tokens_per_tile, d), dtype=np.float32)
    got = np.asarray(pack_image_features(jnp.asarray(feats), newline, jax.tree.map(jnp.asarray, tables)))
    for i, (s, t) in enumerate(zip(sizes, tiled)):
        lay = image_layout(s, geom, tiled=t)
        ref, v = _hf_pack(hf, feats[i, : lay.num_tiles], s)
        assert v == lay.num_tokens == int(tables.valid[i].sum())
        assert (v == geom.tokens_per_tile + 1) == (not t)
        assert float(np.max(np.abs(got[i, :v] - ref))) < 1e-5  # fp32 (copies are exact; tiled ones may blend)


def test_static_bound_on_the_real_geometry():
    """OneVision's own geometry (384 px tiles, 27 x 27 tokens, 6 x 6 pinpoints, anyres_max_9): the bound covers a
    scan of image sizes up to 4096 px, and downsampling keeps every scanned count far below the undownsampled one."""
    geom = OnevisionGeometry(
        tile_size=384, tokens_per_side=27, pinpoints=tuple((384 * a, 384 * b) for a in range(1, 7) for b in range(1, 7))
    )
    bound = max_tokens_per_image(geom)
    counts = [image_layout((h, w), geom).num_tokens for h in range(64, 4097, 96) for w in range(64, 4097, 80)]
    assert max(counts) <= bound
    assert bound < 729 + 9 * 1.1**2 * 729 + 27 * 6 + 1  # anyres_max_9 caps the grid near 9·1.1²·729 tokens
    assert bound - max(counts) < 200  # the bound is tight: the scan comes close
