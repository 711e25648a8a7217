"""Nothing loads silently wrong: non-float or non-finite weights, corrupt files and out-of-range config fields
are refused by name (tensor, file, field), with the cause first."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import vlmprune
from reference.hf_builders import demo_inputs
from vlmprune.io.weights import CheckpointError

# key names as transformers' save_pretrained writes them for the conftest checkpoint
EMBED = "language_model.model.embed_tokens.weight"
Q0 = "language_model.model.layers.0.self_attn.q_proj.weight"
FC1 = "vision_tower.encoder.layers.1.mlp.fc1.weight"
PROJ = "multi_modal_projector.linear_2.weight"


def _tensors(src):
    out = {}
    for fn in sorted(os.listdir(src)):
        if fn.endswith(".safetensors"):
            out.update(load_file(os.path.join(src, fn)))
    return out


def copy_with(src, dst, edit):
    """A copy of a HF checkpoint whose tensors went through ``edit(dict)`` (single file)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    t = _tensors(src)
    edit(t)
    save_file(t, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def key(t, name):
    assert name in t, sorted(t)[:5]
    return name


@pytest.mark.parametrize(
    "name,dtype", [(Q0, np.int8), (EMBED, np.int32), (FC1, np.uint8), (PROJ, np.int64), (Q0, np.bool_)]
)
def test_non_float_weights_are_refused_by_name(mha_dir, tmp_path, name, dtype):
    holder = {}

    def edit(t):
        k = key(t, name)
        holder["k"] = k
        t[k] = np.ones(t[k].shape, dtype)

    d = copy_with(mha_dir, tmp_path / "q", edit)
    with pytest.raises(CheckpointError, match="not a floating-point type") as e:
        vlmprune.load(d)
    assert holder["k"] in str(e.value) and "model.safetensors" in str(e.value)
    assert len(e.value.problems) == 1


@pytest.mark.parametrize("values", [[np.nan], [np.inf], [-np.inf, np.nan, 1.0]])
def test_non_finite_weights_are_reported_by_tensor(mha_dir, tmp_path, values):
    names = {}

    def edit(t):
        for i, (n, v) in enumerate(zip((Q0, FC1, PROJ), values)):
            k = key(t, n)
            if np.isfinite(v):
                continue
            t[k] = t[k].copy()
            t[k].flat[i] = v
            names[k] = True

    d = copy_with(mha_dir, tmp_path / "nan", edit)
    with pytest.raises(CheckpointError) as e:
        vlmprune.load(d)
    msg = str(e.value)
    for k in names:
        assert f"tensor {k!r} in model.safetensors holds 1 NaN/inf value(s)" in msg
    assert len(e.value.problems) == len(names)
    # the scan can be skipped; then the first NaN logits are reported instead of garbage tokens
    model = vlmprune.load(d, check_finite=False)
    x = demo_inputs(d)
    with pytest.raises(ValueError, match="NaN/inf logit"):
        model.generate(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], max_new_tokens=2)


@pytest.mark.parametrize("big", [7e4, 1e6, -3e38])
def test_float16_overflow_is_reported(mha_dir, tmp_path, big):
    def edit(t):
        k = key(t, PROJ)
        t[k] = t[k].copy()
        t[k].flat[3] = big

    d = copy_with(mha_dir, tmp_path / "big", edit)
    with pytest.raises(CheckpointError, match=r"beyond the float16 range"):
        vlmprune.load(d, dtype="float16")
    vlmprune.load(d, dtype="float32")  # fits float32: fine


def test_non_finite_orbax_params_are_named(mha_dir, tmp_path):
    import jax.numpy as jnp

    model = vlmprune.load(mha_dir)
    w = model.params["language_model"]["norm"]["weight"]
    model.params["language_model"]["norm"]["weight"] = w.at[0].set(jnp.nan)
    model.save(str(tmp_path / "ckpt"))
    with pytest.raises(CheckpointError, match=r"'language_model/norm/weight' in params holds 1 NaN/inf"):
        vlmprune.load(str(tmp_path / "ckpt"))


def _truncate_to(n):
    return lambda path: open(path, "r+b").truncate(n)


def _garbage_header(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    open(path, "wb").write(data[:8] + b"{" * n + data[8 + n :])


def _drop_offsets(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    k = next(k for k in header if k != "__metadata__")
    del header[k]["data_offsets"]
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _wrong_span(path):
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    k = next(k for k in header if k != "__metadata__")
    header[k]["shape"] = [s + 1 for s in header[k]["shape"]]
    raw = json.dumps(header).encode()
    open(path, "wb").write(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


CORRUPTIONS = {
    "empty file": (_truncate_to(0), "truncated safetensors file"),
    "no header": (_truncate_to(5), "truncated safetensors file"),
    "cut in the header": (_truncate_to(40), "truncated or corrupt safetensors header"),
    "cut in the data": (lambda p: open(p, "r+b").truncate(os.path.getsize(p) * 2 // 3), "truncated safetensors file"),
    "garbage header": (_garbage_header, "corrupt safetensors header"),
    "entry without offsets": (_drop_offsets, "lacks dtype/shape/data_offsets"),
    "shape and span disagree": (_wrong_span, "data_offsets span"),
}


@pytest.fixture(scope="module")
def sharded(mha_dir, tmp_path_factory):
    from reference.hf_builders import sharded_copy

    return sharded_copy(mha_dir, tmp_path_factory.mktemp("sh") / "sharded")


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_shard_leads_with_the_cause(sharded, tmp_path, case):
    d = tmp_path / "c"
    shutil.copytree(sharded, d)
    shard = os.path.join(d, "model-00002-of-00002.safetensors")
    corrupt, msg = CORRUPTIONS[case]
    corrupt(shard)
    with pytest.raises(CheckpointError) as e:
        vlmprune.load(str(d))
    problems = e.value.problems
    assert "model-00002-of-00002.safetensors" in problems[0] and msg in problems[0]
    assert "were not loaded because of the unreadable file(s) above" in problems[1]
    assert len(problems) == 2  # not one "missing tensor" line per lost tensor


@pytest.mark.parametrize(
    "text,msg",
    [
        ("{not json", "not a readable JSON file"),
        ('{"weights": {}}', "weight_map"),
        ('{"weight_map": {"a": 3}}', "weight_map"),
        ('{"weight_map": {"a": "model-9.safetensors"}}', "are missing"),
    ],
)
def test_bad_index_json_is_named(sharded, tmp_path, text, msg):
    d = tmp_path / "i"
    shutil.copytree(sharded, d)
    (d / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=msg) as e:
        vlmprune.load(str(d))
    assert "model.safetensors.index.json" in str(e.value) or "index.json" in str(e.value)


def with_config(src, dst, edit):
    shutil.copytree(src, dst)
    p = os.path.join(dst, "config.json")
    cfg = json.load(open(p))
    edit(cfg)
    json.dump(cfg, open(p, "w"))
    return str(dst)


def _set(path, value):
    def edit(cfg):
        node = cfg
        *head, last = path.split(".")
        for h in head:
            node = node[h]
        node[last] = value

    return edit


CONFIG_CASES = [
    ("vision_feature_layer", 4, "vision_feature_layer=4 is out of range"),
    ("vision_feature_layer", -5, "vision_feature_layer=-5 is out of range"),
    ("vision_feature_layer", 100, "vision_feature_layer=100 is out of range"),
    ("vision_feature_layer", [0, 9], r"vision_feature_layer\[1\]=9 is out of range"),
    ("vision_feature_layer", [-2, -1], "multi-layer feature concatenation"),
    ("image_token_index", 386, "image_token_index=386 is not a token id"),
    ("image_token_index", -1, "image_token_index=-1 is not a token id"),
    ("pad_token_id", 10**6, "pad_token_id=1000000 is not a token id"),
    ("text_config.eos_token_id", 999, "eos_token_id=999 is not a token id"),
    ("text_config.eos_token_id", [2, -3], "eos_token_id=-3 is not a token id"),
    ("text_config.bos_token_id", 386, "bos_token_id=386 is not a token id"),
    ("text_config.num_key_value_heads", 3, "num_key_value_heads=3 must be a positive divisor"),
    ("vision_config.image_size", 50, "image_size=50 is not a multiple of patch_size=14"),
    ("vision_config.num_hidden_layers", 0, "num_hidden_layers=0 must be a positive integer"),
    ("vision_feature_select_strategy", "cls", "vision_feature_select_strategy.*cls"),
]


@pytest.mark.parametrize("field,value,msg", CONFIG_CASES, ids=[f"{f}={v}" for f, v, _ in CONFIG_CASES])
def test_config_fields_are_range_checked_with_file_and_field(mha_dir, tmp_path, field, value, msg):
    d = with_config(mha_dir, tmp_path / "cfg", _set(field, value))
    with pytest.raises(ValueError, match=msg) as e:
        vlmprune.load(d)
    assert os.path.join(d, "config.json") in str(e.value)


def test_next_pinpoints_are_checked(tmp_path):
    from vlmprune.models.llava_config import LlavaConfig
    from vlmprune.tiny import tiny_llava_next_config

    for pins, msg in [
        ([[0, 56]], r"image_grid_pinpoints\[0\]"),
        ([[56, 112, 3]], r"image_grid_pinpoints\[0\]"),
        ([[56, -112]], r"image_grid_pinpoints\[0\]"),
    ]:
        cfg = tiny_llava_next_config(386, 385, 384)
        cfg.image_grid_pinpoints = pins
        with pytest.raises(ValueError, match=msg):
            LlavaConfig.from_hf(cfg, source="x/config.json")


def test_bad_json_files_are_named(mha_dir, tmp_path):
    for fn in ("config.json", "tokenizer_config.json", "processor_config.json", "tokenizer.json"):
        d = tmp_path / fn
        shutil.copytree(mha_dir, d)
        assert (d / fn).exists()
        (d / fn).write_text("{ this is not json")
        with pytest.raises(ValueError, match="not valid JSON") as e:
            vlmprune.load(str(d))
        assert str(e.value).startswith(str(d / fn) + ": not valid JSON"), str(e.value)[:300]
