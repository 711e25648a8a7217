"""The papers' preprocessing: ``pad`` against a NumPy transcription of LLaVA's expand2square + CLIP
preprocessing on odd-sized images; ``crop`` is the checkpoint's processor untouched; both through loading."""

import numpy as np
import pytest
from PIL import Image

from vlmprune import preprocess
from vlmprune.tiny import build_processor, build_tokenizer, tiny_llava_config, write_random_llava


def _processor(size):
    tok = build_tokenizer()
    cfg = tiny_llava_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    proc = build_processor(tok, cfg)
    from transformers import CLIPImageProcessor

    # CLIP-L/336's settings (OpenAI mean/std, bicubic, shortest edge = crop = size)
    proc.image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return proc


def _numpy_reference(image, size, mean, std):
    """LLaVA's expand2square (canvas of the longer side in int(255*mean), image pasted at ((W-w)//2, (H-h)//2)),
    then CLIP: resize the square to size x size with PIL bicubic (the filter the original CLIP processor hands to
    PIL), centre crop (none left), /255, (x - mean) / std, channels first."""
    a = np.asarray(image.convert("RGB"))
    h, w, _ = a.shape
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = np.array([int(m * 255) for m in mean], np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = a
    r = np.asarray(Image.fromarray(canvas).resize((size, size), Image.Resampling.BICUBIC), np.float64)
    x = (r / 255.0 - np.asarray(mean)) / np.asarray(std)
    return x.transpose(2, 0, 1)


ODD = [(17, 30), (31, 12), (25, 25), (1, 9), (41, 40)]  # (width, height): either side longer, square, 1-pixel


@pytest.mark.parametrize("size", [30, 336])
def test_pad_matches_numpy_expand2square_and_clip(size):
    proc = _processor(size)
    ip = proc.image_processor
    rng = np.random.default_rng(size)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ODD]
    preprocess.set_image_aspect(proc, "pad")
    assert preprocess.image_aspect(proc) == "pad"
    got = proc.image_processor(images, return_tensors="np")["pixel_values"]
    want = np.stack([_numpy_reference(im, size, ip.image_mean, ip.image_std) for im in images])
    assert got.shape == (len(ODD), 3, size, size) and got.dtype == np.float32
    # float32 pixels vs the float64 transcription: |x| <= 2.2 after normalising, so float32 rounding of the
    # rescale and normalise steps is a few 1e-7; 1e-5 leaves room and is far below one grey level (1/255/std ~ 0.015)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # the canvas really is the mean colour: a 1-pixel-wide image is almost all padding, normalised to ~0
    mid_row = got[3][:, size // 2, : size // 4]
    assert np.abs(mid_row).max() < 0.02  # int(255*m) truncation leaves at most 1/255/std ~ 0.015
    # the processor call used by the model (images + text) gives the same pixels
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
    )
    x = proc(images=images[:2], text=[text, text], return_tensors="np", padding=True)
    np.testing.assert_array_equal(x["pixel_values"], got[:2])


def test_pad_agrees_with_transformers_pad_variant():
    """HF's LlavaImageProcessorPil(do_pad=True) is the same pipeline: pixels agree to float rounding."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = 30
    proc = _processor(size)
    ip = proc.image_processor
    hf = LlavaImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=ip.image_mean,
        image_std=ip.image_std,
    )
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ODD]
    ours = preprocess.pad_pixels(images, ip)
    theirs = np.asarray(hf(images, return_tensors="np")["pixel_values"])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # float32 rounding only, as above


def test_crop_is_the_checkpoint_processor_and_switches_back():
    proc = _processor(30)
    orig = proc.image_processor
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (12, 31, 3), dtype=np.uint8))
    crop = orig([img], return_tensors="np")["pixel_values"]
    preprocess.set_image_aspect(proc, "pad")
    pad = proc.image_processor([img], return_tensors="np")["pixel_values"]
    assert np.abs(pad - crop).max() > 0.1  # a 31x12 image: the two pipelines differ
    preprocess.set_image_aspect(proc, "crop")
    assert proc.image_processor is orig and preprocess.image_aspect(proc) == "crop"
    with pytest.raises(ValueError, match=r"image aspect must be one of \['crop', 'pad'\], got 'square'"):
        preprocess.set_image_aspect(proc, "square")
    with pytest.raises(ValueError, match="LLaVA-1.5 only"):
        preprocess.set_image_aspect(proc, "pad", is_next=True)


def test_load_with_image_aspect(tmp_path):
    import vlmprune

    d = write_random_llava(str(tmp_path / "m"))
    m = vlmprune.load(d, image_aspect="pad")
    assert preprocess.image_aspect(m.processor) == "pad"
    assert preprocess.image_aspect(vlmprune.load(d).processor) == "crop"
    # saving writes the checkpoint's own processor (the aspect is chosen at load time)
    m.save(str(tmp_path / "saved"))
    assert preprocess.image_aspect(vlmprune.load(str(tmp_path / "saved")).processor) == "crop"
    assert preprocess.image_aspect(vlmprune.load(str(tmp_path / "saved"), image_aspect="pad").processor) == "pad"
    with pytest.raises(ValueError, match="image aspect must be one of"):
        vlmprune.load(d, image_aspect="stretch")
