"""Bad inputs raise clear errors before compiling; the CLI and the embedded demo run end to end."""

import numpy as np
import pytest

import vlmprune
from reference.hf_builders import demo_inputs


@pytest.fixture(scope="module")
def model_and_inputs(mha_dir):
    return vlmprune.load(mha_dir), demo_inputs(mha_dir)


def _no_compile(model, fn):
    before = dict(model.compile_counts())
    fn()
    assert model.compile_counts() == before


def test_wrong_pixel_shape(model_and_inputs):
    model, x = model_and_inputs
    bad = np.zeros((1, 3, 60, 60), np.float32)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(num_images, 3, 56, 56\)"):
        _no_compile(model, lambda: model(x["input_ids"], bad))


def test_placeholders_must_match_images(model_and_inputs):
    model, x = model_and_inputs
    two = np.concatenate([x["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="hold 16 image placeholder tokens .* 2 image"):
        model(x["input_ids"], two)
    ids = x["input_ids"].copy()
    ids[ids == model.config.image_token_id] = 5  # placeholder not expanded / removed
    with pytest.raises(ValueError, match="hold 0 image placeholder tokens"):
        model.generate(ids, x["pixel_values"], max_new_tokens=2)


def test_empty_prompt(model_and_inputs):
    model, x = model_and_inputs
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(np.zeros((1, 0), np.int64), x["pixel_values"])
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] of the batch have no real tokens \(empty prompt\)"):
        model(x["input_ids"], x["pixel_values"], attention_mask=np.zeros_like(x["input_ids"]))


def test_nan_pixels_and_bad_generation_settings(model_and_inputs):
    model, x = model_and_inputs
    pix = x["pixel_values"].copy()
    pix[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="pixel_values contains 1 NaN"):
        model(x["input_ids"], pix)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        model.generate(x["input_ids"], x["pixel_values"], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be <= 1"):
        model.generate(x["input_ids"], x["pixel_values"], do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(x["input_ids"], x["pixel_values"], do_sample=True, temperature=0.0)


def test_sampling_is_seeded_and_eos_pads(model_and_inputs):
    model, x = model_and_inputs
    a = model.generate(x["input_ids"], x["pixel_values"], max_new_tokens=8, do_sample=True, temperature=2.0, seed=1)
    b = model.generate(x["input_ids"], x["pixel_values"], max_new_tokens=8, do_sample=True, temperature=2.0, seed=1)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, 8)


def test_cli_generate_and_convert(mha_dir, tmp_path, capsys):
    from vlmprune.cli import main
    from vlmprune.tiny import demo_image

    img = tmp_path / "img.png"
    demo_image().save(img)
    assert (
        main(
            [
                "generate",
                "--model",
                mha_dir,
                "--image",
                str(img),
                "--prompt",
                "What is in the image?",
                "--max-new-tokens",
                "4",
                "--method",
                "vispruner",
                "--keep",
                "8",
                "--important-ratio",
                "0.5",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "visual tokens: 8/16" in err
    out = tmp_path / "conv"
    assert main(["convert", mha_dir, str(out)]) == 0
    assert (out / "vlmprune.json").exists()
    with pytest.raises(SystemExit, match="does not apply"):
        main(
            [
                "generate",
                "--model",
                mha_dir,
                "--image",
                str(img),
                "--prompt",
                "x",
                "--method",
                "fastervlm",
                "--important-ratio",
                "0.5",
            ]
        )


def test_demo_runs_end_to_end(tmp_path, capsys):
    from vlmprune import prune
    from vlmprune.demo import run_demo

    rows = run_demo(
        str(tmp_path / "tiny"), methods=[("none", None), ("vispruner", prune.VisPruner(num_keep=16))], max_new_tokens=4
    )
    out = capsys.readouterr().out
    assert "random weights" in out and "visual tokens" in out
    assert [r["visual_tokens"] for r in rows] == [64, 16]
    assert rows[1]["prefill_macs"] < rows[0]["prefill_macs"]
