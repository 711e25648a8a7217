"""Flax CLIP (both towers + projections) against HF ``CLIPModel`` (CPU, float32, highest precision)."""

import chex
import numpy as np
import pytest
import torch

import vlmprune
from reference.hf_builders import build_hf_clip

ATOL = 1e-5  # fp32: a few layers of rounding on O(1) activations


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPModel

    d = build_hf_clip(
        tmp_path_factory.mktemp("clip"),
        image_size=28,
        seed=0,
        with_tokenizer=False,
        noise=0.02,
        max_position_embeddings=20,
        eos_token_id=98,
    )
    return d, CLIPModel.from_pretrained(d).eval()


def test_image_and_text_embeddings_match_hf(clip_dir):
    path, ref = clip_dir
    clip = vlmprune.load_clip(path)
    rng = np.random.default_rng(0)
    pix = rng.standard_normal((3, 3, 28, 28)).astype(np.float32)
    ids = np.array([[5, 17, 30, 98, 0, 0], [7, 8, 9, 10, 11, 98]], np.int64)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.int64)
    with torch.no_grad():
        ref_img = ref.get_image_features(pixel_values=torch.from_numpy(pix))
        ref_txt = ref.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ref_img = getattr(ref_img, "pooler_output", ref_img).numpy()
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt).numpy()
    chex.assert_trees_all_close(np.asarray(clip.image_features(pix)), ref_img, atol=ATOL, rtol=0)
    chex.assert_trees_all_close(np.asarray(clip.text_features(ids, mask)), ref_txt, atol=ATOL, rtol=0)


def test_text_longer_than_context_is_rejected(clip_dir):
    clip = vlmprune.load_clip(clip_dir[0])
    with pytest.raises(ValueError, match="at most 20"):
        clip.text_features(np.ones((1, 21), np.int64))


def test_wrong_pixel_shape_is_rejected(clip_dir):
    clip = vlmprune.load_clip(clip_dir[0])
    with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 28, 28\)"):
        clip.image_features(np.zeros((1, 3, 30, 30), np.float32))
