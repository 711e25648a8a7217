"""LLaVA-OneVision video input loaded with ``vlmprune.load`` against HF's ``LlavaOnevisionForConditionalGeneration``
(tiny random checkpoints, fp32, highest matmul precision): the host video preprocessing, the packed video block
(per-frame 2x2 bilinear pooling, one newline), logits of a left-padded batch of two videos, greedy generation,
DivPrune on the packed block and FastV in the LLM, and the refusals of bad video inputs."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlmprune
from reference.onevision_builders import IMAGE, PAD, TILE, build_hf_onevision, build_hf_onevision_with_processor
from vlmprune import prune
from vlmprune.anyres.onevision import (
    geometry,
    image_layout,
    pack_image_features,
    pack_video_features,
    video_num_tokens,
    video_tables,
)
from vlmprune.models.onevision_processor import (
    VideoProcessorFacts,
    preprocess_video,
    preprocess_videos,
    read_video_processor_facts,
)
from vlmprune.pipeline.forward import visual_tokens
from vlmprune.prune.baselines import divprune_masked

jax.config.update("jax_default_matmul_precision", "highest")

VIDEO = 101  # the builder's video_token_index
LOGITS_ATOL = 1e-4  # fp32 end to end (tower, projector, pooling blend, decoder) vs torch fp32 on CPU
BLOCK_ATOL = 1e-5  # fp32 packed block (tower + projector + bilinear blend) vs HF's get_video_features
FRAMES = 3

# name -> (vision_aspect_ratio, tied, tile px, patch px): 4 x 4 tokens per frame (pooled to 2 x 2) and OneVision's
# real 27 x 27 map at tiny width (pooled to 14 x 14, torch's uneven bilinear weights)
VARIANTS = {"n4_untied": ("anyres_max_9", False, TILE, 7), "real27_tied": ("anyres_max_2", True, 54, 2)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request, tmp_path_factory):
    aspect, tied, tile, patch = VARIANTS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    hf = build_hf_onevision(d, aspect, tied, tile=tile, patch=patch)
    return request.param, vlmprune.load(str(d)), hf


def _video_batch(model, seed=0, frames=FRAMES):
    """Left-padded batch of two videos: row 0 = [text, video 0, text], row 1 = [pad..., text, video 1, text]."""
    rng = np.random.default_rng(seed)
    tile = model.config.vision.image_size
    n = tile // model.config.vision.patch_size
    v = video_num_tokens(frames, n)
    pix = rng.standard_normal((2, frames, 3, tile, tile)).astype(np.float32)
    rows = [[5, 6] + [VIDEO] * v + [7, 8, 9, 10], [11] + [VIDEO] * v + [12, 13]]
    return _pad(rows) | dict(pixel_values_videos=pix), v


def _pad(rows):
    length = max(map(len, rows))
    ids = np.full((len(rows), length), PAD, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for r, row in enumerate(rows):
        ids[r, length - len(row) :] = row
        mask[r, length - len(row) :] = 1
    return dict(input_ids=ids, attention_mask=mask)


def _torch(x):
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.items()}


def _positions(mask):
    m = mask.astype(bool)
    return np.maximum(np.cumsum(m, 1) - 1, 0)  # HF positions of a left-padded batch count real tokens only


def _hf_video_block(hf, pix):
    with torch.no_grad():
        out = hf.model.get_video_features(
            torch.from_numpy(pix),
            vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        )
    return out.pooler_output


# ------------------------------------------------------------------------------------------------ the tables


@pytest.mark.parametrize("n", [4, 5, 27])
def test_video_tables_gather_equals_pooling(n):
    """The gather tables (frames on the tile axis) give exactly ``pack_video_features``'s resize, frame by frame;
    videos with fewer frames than the batch's longest end with their newline and padding."""
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.standard_normal((2, 3, n * n, 8)), jnp.float32)
    newline = jnp.asarray(rng.standard_normal(8), jnp.float32)
    ref = pack_video_features(x, newline)
    got = pack_image_features(x, newline, jax.tree.map(jnp.asarray, video_tables([3, 3], n)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    short = video_tables([3, 1], n)
    v1 = video_num_tokens(1, n)
    got = np.asarray(pack_image_features(x, newline, jax.tree.map(jnp.asarray, short)))
    np.testing.assert_array_equal(got[1, :v1], np.asarray(pack_video_features(x[1:, :1], newline))[0])
    assert short.valid[1].sum() == v1 and not got[1, v1:].any() and short.tile_valid[1].tolist() == [True, False, False]


# ------------------------------------------------------------------------------------------------ the model


def test_packed_video_block_matches_hf(models):
    name, model, hf = models
    x, v = _video_batch(model)
    pix = x["pixel_values_videos"]
    n = model.config.vision.image_size // model.config.vision.patch_size
    tables = jax.tree.map(jnp.asarray, video_tables([FRAMES, FRAMES], n))
    ours, valid = visual_tokens(model.module, model.params, jnp.asarray(pix), None, tables)
    ref = _hf_video_block(hf, pix).numpy()
    assert ref.shape[1] == v == ours.shape[1]  # F·ceil(n/2)² + 1, one newline after the last frame
    assert np.asarray(valid).all()
    err = np.abs(np.asarray(ours) - ref).max()
    print(name, "packed video block", ref.shape, "max |ours - HF|:", err)
    chex.assert_trees_all_close(np.asarray(ours), ref, atol=BLOCK_ATOL, rtol=0)


def test_video_logits_match_hf_left_padded(models):
    name, model, hf = models
    x, _ = _video_batch(model)
    out = model(x["input_ids"], attention_mask=x["attention_mask"], pixel_values_videos=x["pixel_values_videos"])
    m = x["attention_mask"].astype(bool)
    with torch.no_grad():
        ref = hf(**_torch(x), position_ids=torch.from_numpy(_positions(x["attention_mask"]))).logits.numpy()
    ours = np.asarray(out.logits)
    assert ours.shape == ref.shape
    print(name, "video batch max |logits - HF|:", np.abs(ours[m] - ref[m]).max())
    chex.assert_trees_all_close(ours[m], ref[m], atol=LOGITS_ATOL, rtol=0)


def test_video_greedy_generation_matches_hf(models):
    _, model, hf = models
    x, _ = _video_batch(model, seed=1)
    ours = model.generate(
        x["input_ids"],
        attention_mask=x["attention_mask"],
        pixel_values_videos=x["pixel_values_videos"],
        max_new_tokens=12,
    )
    with torch.no_grad():
        gen = hf.generate(**_torch(x), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=PAD)
    np.testing.assert_array_equal(ours, gen[:, x["input_ids"].shape[1] :].numpy())


def test_image_and_video_rows_in_one_batch_match_hf(models):
    """Row 0 holds an image, row 1 a video: both inputs of one call, as HF's forward takes them."""
    name, model, hf = models
    geom = geometry(model.config)
    size = (40 * geom.tile_size // TILE, 90 * geom.tile_size // TILE)
    lay = image_layout(size, geom)
    rng = np.random.default_rng(7)
    img = np.zeros((1, lay.num_tiles, 3, geom.tile_size, geom.tile_size), np.float32)
    img[0] = rng.standard_normal(img.shape[1:])
    vx, v = _video_batch(model, seed=7, frames=2)
    x = _pad([[5] + [IMAGE] * lay.num_tokens + [7, 8], [11, 12] + [VIDEO] * v + [13]])
    x |= dict(pixel_values=img, image_sizes=np.array([size]), pixel_values_videos=vx["pixel_values_videos"][1:])
    out = model(
        x["input_ids"],
        x["pixel_values"],
        image_sizes=x["image_sizes"],
        attention_mask=x["attention_mask"],
        pixel_values_videos=x["pixel_values_videos"],
    )
    m = x["attention_mask"].astype(bool)
    with torch.no_grad():
        ref = hf(**_torch(x), position_ids=torch.from_numpy(_positions(x["attention_mask"]))).logits.numpy()
    ours = np.asarray(out.logits)
    print(name, "image + video batch max |logits - HF|:", np.abs(ours[m] - ref[m]).max())
    chex.assert_trees_all_close(ours[m], ref[m], atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ pruning


def _hf_row(hf, x, r):
    """Row r's unpadded prompt embeddings with HF's packed video block at its placeholders: (embeds (1, L, D),
    video slots, block (V, D))."""
    m = x["attention_mask"][r].astype(bool)
    ids = torch.from_numpy(x["input_ids"][r][m])[None]
    block = _hf_video_block(hf, x["pixel_values_videos"][r : r + 1])[0]
    with torch.no_grad():
        embeds = hf.model.get_input_embeddings()(ids)
    slots = (ids[0] == VIDEO).nonzero()[:, 0]
    embeds[0, slots] = block
    return embeds, slots, block


def test_divprune_on_video_block_matches_hf_language_model(models):
    """DivPrune on a video: the max-min rule over the video's packed block (pooled frames and the newline),
    min(num_keep·F, V) tokens in packed order; the pruned model's logits equal HF's language model fed the same
    pruned sequence (the selection recomputed with the same function on HF's own block)."""
    name, model, hf = models
    keep = 2
    x, v = _video_batch(model, seed=3)
    out = model(
        x["input_ids"],
        attention_mask=x["attention_mask"],
        pixel_values_videos=x["pixel_values_videos"],
        pruner=prune.get("divprune", num_keep=keep),
    )
    logits, mask = np.asarray(out.logits), np.asarray(out.mask)
    k = min(keep * FRAMES, v)
    for r in range(2):
        embeds, slots, block = _hf_row(hf, x, r)
        sel = divprune_masked(block.numpy()[None], np.ones((1, v), bool), np.array([k]), max_keep=k)
        kept = torch.from_numpy(np.asarray(sel.indices[0]).astype(np.int64))
        start, end = int(slots[0]), int(slots[-1]) + 1
        pruned = torch.cat([embeds[:, :start], block[kept][None], embeds[:, end:]], dim=1)
        with torch.no_grad():
            ref = hf(inputs_embeds=pruned, attention_mask=torch.ones(pruned.shape[:2], dtype=torch.long)).logits[0]
        ours = logits[r][mask[r]]
        assert ours.shape == tuple(ref.shape)  # text + min(num_keep·F, V) video tokens
        print(name, "row", r, "divprune video max |logits - HF LM|:", np.abs(ours - ref.numpy()).max())
        chex.assert_trees_all_close(ours, ref.numpy(), atol=LOGITS_ATOL, rtol=0)


def _fastv_reference(hf, embeds, slots, layer, keep):
    """FastV in place on HF's own Qwen2 layers for one unpadded row: score the video slots by the head-mean
    attention of the last token at layer ``layer - 1``, keep the ``keep`` best, run the later layers on the kept
    slots at their original positions."""
    lm = hf.model.language_model
    n = embeds.shape[1]
    pos = torch.arange(n)[None]
    with torch.no_grad():
        out = lm(inputs_embeds=embeds, output_attentions=True, output_hidden_states=True)
        scores = out.attentions[layer - 1][0, :, -1, :].mean(0)[slots]
        kept = slots[torch.topk(scores, keep).indices]
        others = torch.tensor([s for s in range(n) if s not in set(slots.tolist())])
        order = torch.sort(torch.cat([others, kept])).values
        h, p = out.hidden_states[layer][:, order], pos[:, order]
        t = h.shape[1]
        causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
        pe = lm.rotary_emb(h, p)
        for blk in lm.layers[layer:]:
            h = blk(h, attention_mask=causal, position_ids=p, position_embeddings=pe)
            h = h[0] if isinstance(h, tuple) else h
        return hf.lm_head(lm.norm(h))[0].numpy()


def test_fastv_on_video_matches_hf_layers(models):
    """FastV on a video: each row keeps floor(ratio·V) of its video tokens after layer 1; row by row equal to HF's
    layers run the same way on HF's packed block."""
    name, model, hf = models
    ratio = 0.3
    x, v = _video_batch(model, seed=2)
    out = model(
        x["input_ids"],
        attention_mask=x["attention_mask"],
        pixel_values_videos=x["pixel_values_videos"],
        pruner=prune.FastV(layer=1, keep_ratio=ratio),
    )
    logits, mask = np.asarray(out.logits), np.asarray(out.mask)
    for r in range(2):
        embeds, slots, _ = _hf_row(hf, x, r)
        ref = _fastv_reference(hf, embeds, slots, 1, int(ratio * v))
        ours = logits[r][mask[r]]
        assert ours.shape == ref.shape
        print(name, "row", r, "fastv video max |logits - HF layers|:", np.abs(ours - ref).max())
        chex.assert_trees_all_close(ours, ref, atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ refusals


def _bad_cases(model):
    x, v = _video_batch(model)
    pix = x["pixel_values_videos"]
    nan = pix.copy()
    nan[1, 0, 0, 0, 0] = np.nan
    tile = model.config.vision.image_size
    return [
        ("NaN", dict(pixel_values_videos=nan), ValueError, "pixel_values_videos contains 1 NaN"),
        ("int", dict(pixel_values_videos=(pix * 0).astype(np.uint8)), ValueError, "pixel_values_videos has dtype"),
        ("4-D", dict(pixel_values_videos=pix[0]), ValueError, r"pixel_values_videos must have shape \(num_videos"),
        (
            "tile size",
            dict(pixel_values_videos=np.zeros((2, FRAMES, 3, tile + 1, tile + 1), np.float32)),
            ValueError,
            "pixel_values_videos must have shape",
        ),
        ("no frames", dict(pixel_values_videos=pix[:, :0]), ValueError, "at least one video and one frame"),
        ("one video for two", dict(pixel_values_videos=pix[:1]), ValueError, "video placeholder tokens"),
        ("frame count", dict(pixel_values_videos=pix[:, :2]), ValueError, "video placeholder tokens"),
        ("no videos", dict(pixel_values=None), ValueError, "pixel_values is required"),
        (
            "per-tile pruner",
            dict(pixel_values_videos=pix, pruner=prune.get("uniform", num_keep=2)),
            NotImplementedError,
            "uniform on LLaVA-OneVision videos is not implemented",
        ),
    ], x


def test_bad_video_inputs_refused_before_compile(models):
    _, model, _ = models
    cases, x = _bad_cases(model)
    before = model.compile_counts()
    for label, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            model(x["input_ids"], attention_mask=x["attention_mask"], **kwargs)
        print("refused:", label)
    stray = x["input_ids"].copy()
    stray[0, -1] = VIDEO  # a <video> id among the text of an image-free call
    with pytest.raises(ValueError, match="video placeholder tokens"):
        model(stray, attention_mask=x["attention_mask"], pixel_values_videos=x["pixel_values_videos"])
    assert model.compile_counts() == before


# ------------------------------------------------------------------------------------------------ preprocessing


def _torch_video_reference(frames_u8, facts):
    """HF's torchvision path of LlavaOnevisionVideoProcessor, step by step on CPU: the uint8 frames (F, H, W, 3)
    channels first, torch's antialiased bicubic resize on uint8 (what torchvision's resize runs on CPU for uint8
    bicubic), then the fused rescale-normalise in float32 ((x - mean/r) / (std/r))."""
    t = torch.from_numpy(frames_u8).permute(0, 3, 1, 2).contiguous()
    h, w = facts.size_hw
    if t.shape[-2:] != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(facts.image_mean) * (1.0 / facts.rescale_factor)
    std = torch.tensor(facts.image_std) * (1.0 / facts.rescale_factor)
    return ((t.to(torch.float32) - mean[:, None, None]) / std[:, None, None]).numpy()


def test_video_preprocessing_matches_hf_torch_path():
    """Frames already at the model's size: exactly HF's float32 normalisation. Frames resized: PIL's bicubic
    filter against torch's uint8 one (two fixed-point versions of the same antialiased filter, which round a few
    pixels differently): within one level of 255 everywhere, exact on >= 98% of the values, on video-like
    reductions (a 480 x 640 frame to 384 x 384 included). (Strong reductions, e.g. 100 -> 28 rows, can differ by
    up to 3 levels.)"""
    mean, std = (0.5, 0.4, 0.3), (0.5, 0.25, 0.2)
    rng = np.random.default_rng(0)
    facts = VideoProcessorFacts(image_mean=mean, image_std=std, size_hw=(28, 28))
    same = rng.integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess_video(same, facts), _torch_video_reference(same, facts))
    level = (1 / (255 * np.asarray(std, np.float32)))[:, None, None]  # one uint8 level per channel, normalised
    for shape, size in [((2, 60, 80, 3), 28), ((2, 17, 33, 3), 28), ((2, 40, 70, 3), 28), ((1, 480, 640, 3), 384)]:
        facts = VideoProcessorFacts(image_mean=mean, image_std=std, size_hw=(size, size))
        frames = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = preprocess_video([Image.fromarray(f) for f in frames], facts)
        ref = _torch_video_reference(frames, facts)
        assert ours.shape == ref.shape == (shape[0], 3, size, size) and ours.dtype == np.float32
        levels = np.abs(ours - ref) / level
        print(shape, "->", size, "max |ours - torch| in levels:", levels.max(), "exact:", (levels < 1e-3).mean())
        assert levels.max() <= 1 + 1e-4  # one uint8 rounding step (float32 normalisation exact otherwise)
        assert (levels < 1e-3).mean() >= 0.98


def test_video_settings_read_in_hf_order(tmp_path):
    """HF's order of files (VideoProcessorMixin.get_video_processor_dict, which needs no torchvision): the nested
    entry of processor_config.json, then video_preprocessor_config.json, then preprocessor_config.json."""
    from transformers.video_processing_utils import VideoProcessorMixin

    def write(name, data):
        (tmp_path / name).write_text(json.dumps(data))

    write(
        "preprocessor_config.json",
        {"image_mean": [0.1] * 3, "image_std": [0.2] * 3, "size": {"height": 28, "width": 28}},
    )
    steps = [
        ("preprocessor_config.json", None),
        ("video_preprocessor_config.json", {"image_mean": [0.3] * 3, "size": {"height": 14, "width": 21}}),
        ("processor_config.json", {"video_processor": {"image_std": [0.7] * 3, "resample": 2}}),
    ]
    for name, data in steps:
        if data is not None:
            write(name, data)
        hf, _ = VideoProcessorMixin.get_video_processor_dict(str(tmp_path), local_files_only=True)
        facts = read_video_processor_facts(str(tmp_path))
        assert facts.source.endswith(name)
        assert facts.image_mean == tuple(hf.get("image_mean", VideoProcessorFacts.image_mean))
        assert facts.image_std == tuple(hf.get("image_std", VideoProcessorFacts.image_std))
        size = hf.get("size", {"height": 384, "width": 384})
        assert facts.size_hw == (size["height"], size["width"])
        assert facts.resample == hf.get("resample", 3)


@pytest.mark.parametrize(
    "video, match",
    [
        (np.zeros((0, 8, 8, 3), np.uint8), "video has no frames"),
        ([], "video has no frames"),
        (np.zeros((2, 8, 8), np.uint8), r"video must have shape \(frames, height, width, 3\)"),
        (np.zeros((2, 8, 8, 4), np.uint8), r"video must have shape \(frames, height, width, 3\)"),
        (np.zeros((2, 8, 8, 3), np.int32), "video must be uint8"),
        (np.full((2, 8, 8, 3), np.nan, np.float32), "NaN/inf"),
        (np.full((2, 8, 8, 3), 0.5, np.float32), "whole numbers in 0..255"),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)], "frame 1 is"),
        ("clip.mp4", "must be a"),
    ],
)
def test_bad_videos_refused_by_preprocessing(video, match):
    with pytest.raises(ValueError, match=match):
        preprocess_video(video, VideoProcessorFacts(size_hw=(28, 28)))


def test_videos_with_different_frame_counts_refused():
    facts = VideoProcessorFacts(size_hw=(28, 28))
    with pytest.raises(ValueError, match=r"same number of frames, got \[2, 3\]"):
        preprocess_videos([np.zeros((2, 28, 28, 3), np.uint8), np.zeros((3, 28, 28, 3), np.uint8)], facts)


@pytest.fixture(scope="module")
def with_processor(tmp_path_factory):
    d = tmp_path_factory.mktemp("ov_video_proc")
    hf = build_hf_onevision_with_processor(d, seed=3)
    return vlmprune.load(str(d)), hf


def test_processor_video_prompts_match_hf(with_processor):
    """The checkpoint's processor on two videos (PIL frames and a uint8 array) and prompts with <video>: the
    placeholders expand to F·ceil(n/2)² + 1 and the logits equal HF's on the same arrays."""
    model, hf = with_processor
    proc = model.processor
    assert proc.video_facts.image_mean == (0.5, 0.5, 0.5)  # the checkpoint's values, not CLIP's class defaults
    rng = np.random.default_rng(5)
    videos = [
        [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(2)],
        rng.integers(0, 255, (2, 30, 30, 3), dtype=np.uint8),
    ]
    # (the tiny checkpoint's chat template has no video entry: the prompts are written out)
    texts = [f"USER: <video>\n{q} ASSISTANT:" for q in ("What happens in the video?", "Why?")]
    x = proc(videos=videos, text=texts, padding=True)
    n = model.config.vision.image_size // model.config.vision.patch_size
    vid = hf.config.video_token_index
    assert ((x["input_ids"] == vid).sum(1) == video_num_tokens(2, n)).all()
    assert x["pixel_values_videos"].shape == (2, 2, 3, TILE, TILE)
    out = model(x["input_ids"], attention_mask=x["attention_mask"], pixel_values_videos=x["pixel_values_videos"])
    m = x["attention_mask"].astype(bool)
    with torch.no_grad():
        ref = hf(**_torch(x), position_ids=torch.from_numpy(_positions(x["attention_mask"]))).logits.numpy()
    print("processor video batch max |logits - HF|:", np.abs(np.asarray(out.logits)[m] - ref[m]).max())
    chex.assert_trees_all_close(np.asarray(out.logits)[m], ref[m], atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ command line

VIDEO_TEMPLATE = (  # the tiny chat template with a video entry, as OneVision's own template has
    "{% for message in messages %}USER: {% for c in message['content'] %}{% if c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("ov_video_cli")
    hf = build_hf_onevision_with_processor(d, seed=4)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    tok.chat_template = VIDEO_TEMPLATE
    tok.save_pretrained(str(d))
    return d, hf


@pytest.mark.slow  # end to end: three runs of the command, each loading and compiling the model
def test_cli_generate_video_matches_hf(cli_checkpoint, tmp_path, capsys):
    """``vlmprune generate --video`` with frame files, a frame directory and a .npy: the printed answer is HF's
    greedy answer on the same processor inputs."""
    from vlmprune.cli import main
    from vlmprune.video_input import read_frames, video_prompt_inputs

    d, hf = cli_checkpoint
    rng = np.random.default_rng(9)
    frames = rng.integers(0, 256, (2, 36, 50, 3), dtype=np.uint8)
    (tmp_path / "frames").mkdir()
    files = []
    for i, f in enumerate(frames):
        files.append(str(tmp_path / "frames" / f"{i:03d}.png"))
        Image.fromarray(f).save(files[-1])
    np.save(tmp_path / "video.npy", frames)
    model = vlmprune.load(str(d))
    x = video_prompt_inputs(model, read_frames(files), "What happens?")
    with torch.no_grad():
        gen = hf.generate(**_torch(x), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)
    want = model.processor.tokenizer.decode(gen[0, x["input_ids"].shape[1] :], skip_special_tokens=True)
    for video in (files, [str(tmp_path / "frames")], [str(tmp_path / "video.npy")]):
        args = ["generate", "--model", str(d), "--video", *video, "--prompt", "What happens?", "--max-new-tokens", "4"]
        assert main(args) == 0
        out = capsys.readouterr()
        assert out.out.strip() == want.strip()
        assert "video of 2 frames" in out.err


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: [str(p / "missing.png")], "video frame .* not found"),
        (lambda p: [str(p)], "holds no frame images"),
        (lambda p: [str(p / "bad.npy")], "--video must be uint8"),
    ],
)
def test_cli_bad_video_refused(cli_checkpoint, tmp_path, make, match):
    from vlmprune.cli import main

    d, _ = cli_checkpoint
    np.save(tmp_path / "bad.npy", np.zeros((2, 8, 8, 3), np.int64))
    (tmp_path / "empty").mkdir()
    target = tmp_path / "empty" if match == "holds no frame images" else tmp_path
    with pytest.raises(SystemExit, match=match):
        main(["generate", "--model", str(d), "--video", *make(target), "--prompt", "hi"])
