"""Bad call inputs are refused on the host with the argument named, before anything compiles: token ids outside
the vocabulary, masks that are not 0/1, integer / ragged / huge pixels, and generation lengths whose KV cache
cannot exist."""

import numpy as np
import pytest

import vlmprune
from reference.hf_builders import demo_inputs
from vlmprune import inputs


@pytest.fixture(scope="module")
def mx(mha_dir):
    return vlmprune.load(mha_dir), demo_inputs(mha_dir)


def no_compile(model, fn):
    before = dict(model.compile_counts())
    fn()
    assert model.compile_counts() == before


@pytest.mark.parametrize("bad", [386, 391, 10**6, -1, -100])
def test_token_ids_outside_the_vocabulary(mx, bad):
    model, x = mx
    ids = x["input_ids"].copy()
    ids[0, 3] = bad
    for call in (
        lambda: model(ids, x["pixel_values"]),
        lambda: model.generate(ids, x["pixel_values"], max_new_tokens=2),
    ):
        with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, 386\): {bad} at \(0, 3\)"):
            no_compile(model, call)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_token_ids_are_refused(mx, dtype):
    model, x = mx
    with pytest.raises(ValueError, match="input_ids must hold integers"):
        no_compile(model, lambda: model(x["input_ids"].astype(dtype), x["pixel_values"]))


def test_token_ids_as_a_list_are_accepted(mx):
    model, x = mx
    a = np.asarray(model(x["input_ids"], x["pixel_values"]).logits)
    b = np.asarray(model(x["input_ids"].tolist(), x["pixel_values"]).logits)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", [2, -1, 0.5])
def test_attention_mask_must_be_zero_or_one(mx, value):
    model, x = mx
    mask = x["attention_mask"].astype(np.float64 if value == 0.5 else np.int64)
    mask[0, 0] = value
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        no_compile(model, lambda: model(x["input_ids"], x["pixel_values"], attention_mask=mask))


@pytest.mark.parametrize("kind", ["uint8", "int64", "bool", "int list"])
def test_integer_pixels_are_refused(mx, kind):
    model, x = mx
    px = x["pixel_values"]
    bad = {
        "uint8": (px * 50 + 100).clip(0, 255).astype(np.uint8),
        "int64": px.astype(np.int64),
        "bool": px > 0,
        "int list": px.astype(np.int32).tolist(),
    }[kind]
    for call in (lambda: model(x["input_ids"], bad), lambda: model.vision(bad)):
        with pytest.raises(ValueError, match="pixel_values has dtype .*processor"):
            no_compile(model, call)


def test_float_pixel_lists_are_converted(mx):
    model, x = mx
    a = np.asarray(model(x["input_ids"], x["pixel_values"]).logits)
    b = np.asarray(model(x["input_ids"], x["pixel_values"].tolist()).logits)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="ragged"):
        model(x["input_ids"], [[[[0.0] * 56] * 56] * 3, [[[0.0] * 56] * 2]])


@pytest.mark.parametrize("big", [1.5e4, 1e6, -1e30, 3e38])
def test_pixels_that_would_overflow(mx, big):
    model, x = mx
    px = x["pixel_values"].copy()
    px[0, 1, 2, 3] = big
    with pytest.raises(ValueError, match=r"1 value\(s\) of magnitude above 10000"):
        no_compile(model, lambda: model(x["input_ids"], px))


@pytest.mark.parametrize("n", [10**9, 2**40])
def test_max_new_tokens_whose_cache_cannot_exist(mx, n):
    model, x = mx
    with pytest.raises(ValueError, match=rf"max_new_tokens={n}: .*(needs [0-9.]+ GiB|int32 position range)"):
        no_compile(model, lambda: model.generate(x["input_ids"], x["pixel_values"], max_new_tokens=n))


def test_cache_estimate_against_available_memory(mx, monkeypatch):
    model, x = mx
    t = model.config.text
    per_pos = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 4  # float32 K and V per position
    length = model.prefill(x["input_ids"], x["pixel_values"], max_new_tokens=1)[3].length  # prompt positions
    assert inputs.kv_cache_bytes(t, 1, length + 8, np.float32) == (length + 8) * per_pos
    monkeypatch.setattr(inputs, "available_memory", lambda devices=None: ((length + 8) * per_pos, "test device"))
    model.generate(x["input_ids"], x["pixel_values"], max_new_tokens=8)  # fits exactly
    for n in (9, 5000, 10**6):
        with pytest.raises(
            ValueError,
            match=rf"max_new_tokens={n}: the KV cache for 1 row\(s\) x {length + n} "
            r"positions needs .* free on test device",
        ):
            no_compile(model, lambda n=n: model.generate(x["input_ids"], x["pixel_values"], max_new_tokens=n))


class FakeDevice:
    platform = "gpu"

    def __init__(self, limit, used):
        self.stats = {"bytes_limit": limit, "bytes_in_use": used}

    def memory_stats(self):
        return self.stats


def test_available_memory_reads_accelerator_stats():
    """The accelerator branch (no GPU in CI): free = bytes_limit - bytes_in_use, summed over a mesh's devices."""
    free, where = inputs.available_memory([FakeDevice(100 << 30, 30 << 30), FakeDevice(100 << 30, 10 << 30)])
    assert free == 160 << 30 and where == "2 gpu device(s)"

    class Cfg:
        num_hidden_layers, num_key_value_heads, head_dim = 32, 8, 128  # a 7B-sized cache: 128 KiB per position

    big = FakeDevice(41 << 30, 1 << 30)  # 40 GiB free
    inputs.check_generation_memory(
        Cfg, batch=1, prompt_len=600, max_new_tokens=300_000, dtype=np.float16, devices=[big]
    )  # 300 600 x 128 KiB = 36.7 GiB: fits
    for batch, n in [(1, 400_000), (2, 200_000), (64, 10_000)]:
        with pytest.raises(
            ValueError,
            match=rf"max_new_tokens={n}: .*needs [0-9.]+ GiB .* than the 40.0 GiB free on "
            r"1 gpu device\(s\)",
        ):
            inputs.check_generation_memory(
                Cfg, batch=batch, prompt_len=600, max_new_tokens=n, dtype=np.float16, devices=[big]
            )
