"""Loading HF directories in every key layout, orbax round trips, and errors for broken checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import vlmprune
from reference.hf_builders import demo_inputs
from vlmprune.io.weights import CheckpointError


def _copy_with(src, dst, transform):
    """Copy a HF dir, rewriting its tensors through transform(dict) -> dict (single-file output)."""
    shutil.copytree(src, dst)
    tensors = {}
    for fn in os.listdir(dst):
        if fn.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(dst, fn)))
            os.remove(os.path.join(dst, fn))
    if os.path.exists(os.path.join(dst, "model.safetensors.index.json")):
        os.remove(os.path.join(dst, "model.safetensors.index.json"))
    save_file(transform(tensors), os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _logits(model, x):
    return np.asarray(model(x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"]).logits)


@pytest.fixture(scope="module")
def ref(mha_dir):
    model = vlmprune.load(mha_dir)
    x = demo_inputs(mha_dir)
    return model, x, _logits(model, x)


def _to_new_layout(t):
    out = {}
    for k, v in t.items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
        k = k.replace("multi_modal_projector.", "model.multi_modal_projector.")
        out[k] = v
    return out


def _to_old_layout(t):
    return {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in t.items()}


@pytest.mark.parametrize("layout", ["new", "old"])
def test_both_llava_hf_key_layouts_load_identically(mha_dir, ref, tmp_path, layout):
    model, x, want = ref
    fn = _to_new_layout if layout == "new" else _to_old_layout
    d = _copy_with(mha_dir, tmp_path / layout, fn)
    np.testing.assert_array_equal(_logits(vlmprune.load(d), x), want)


def test_sharded_checkpoint_with_index(mha_dir, ref, tmp_path):
    _, x, want = ref
    d = tmp_path / "sharded"
    shutil.copytree(mha_dir, d)
    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fn, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, os.path.join(d, fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in ks})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    np.testing.assert_array_equal(_logits(vlmprune.load(str(d)), x), want)


def test_orbax_round_trip_gives_identical_logits(ref, tmp_path):
    model, x, want = ref
    model.save(str(tmp_path / "converted"))
    again = vlmprune.load(str(tmp_path / "converted"))
    np.testing.assert_array_equal(_logits(again, x), want)
    assert again.processor is not None


def test_bfloat16_load_runs(mha_dir, ref):
    _, x, want = ref
    m = vlmprune.load(mha_dir, dtype="bfloat16")
    got = _logits(m, x)
    # bf16 keeps ~3 significant digits; tiny logits of a random model stay within 0.05 of fp32.
    assert np.abs(got - want).max() < 5e-2


def test_every_problem_is_reported_together(mha_dir, tmp_path):
    def break_it(t):
        t = dict(t)
        del t["multi_modal_projector.linear_1.bias"]
        t["language_model.model.norm.weight"] = np.ones((3,), np.float32)
        t["some.extra.tensor"] = np.zeros((2,), np.float32)
        return t

    d = _copy_with(mha_dir, tmp_path / "broken", break_it)
    with pytest.raises(CheckpointError) as e:
        vlmprune.load(d)
    msg = str(e.value)
    assert "missing tensor for parameter 'multi_modal_projector/linear_1/bias'" in msg
    assert "shape mismatch for 'language_model.model.norm.weight'" in msg
    assert "unexpected tensor 'some.extra.tensor'" in msg
    assert len(e.value.problems) == 3


def test_truncated_safetensors_file_is_named(mha_dir, tmp_path):
    d = tmp_path / "truncated"
    shutil.copytree(mha_dir, d)
    f = os.path.join(d, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        vlmprune.load(str(d))


def test_missing_files_are_reported(tmp_path, mha_dir):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        vlmprune.load(str(tmp_path / "nope"))
    d = tmp_path / "noweights"
    shutil.copytree(mha_dir, d)
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ValueError, match=r"no \*.safetensors files"):
        vlmprune.load(str(d))
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        vlmprune.load(str(d))


def test_sparse_legacy_config_gets_hf_defaults(mha_dir, tmp_path):
    """A transformers-4.36-era llava-hf config.json (sparse text_config, torch_dtype, no rope fields)."""
    from transformers import AutoConfig

    d = tmp_path / "sparse"
    shutil.copytree(mha_dir, d)
    full = json.load(open(os.path.join(d, "config.json")))
    v, t = full["vision_config"], full["text_config"]
    sparse = {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": full["image_token_index"],
        "model_type": "llava",
        "pad_token_id": full["pad_token_id"],
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": t["hidden_size"],
            "intermediate_size": t["intermediate_size"],
            "max_position_embeddings": t["max_position_embeddings"],
            "model_type": "llama",
            "num_attention_heads": t["num_attention_heads"],
            "num_hidden_layers": t["num_hidden_layers"],
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": t["vocab_size"],
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": v["hidden_size"],
            "image_size": v["image_size"],
            "intermediate_size": v["intermediate_size"],
            "model_type": "clip_vision_model",
            "num_attention_heads": v["num_attention_heads"],
            "num_hidden_layers": v["num_hidden_layers"],
            "patch_size": v["patch_size"],
            "projection_dim": v["projection_dim"],
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(sparse, f)
    hf = AutoConfig.from_pretrained(str(d))
    model = vlmprune.load(str(d))
    c = model.config
    assert c.text.num_key_value_heads == hf.text_config.num_key_value_heads == t["num_attention_heads"]
    assert c.text.rope_theta == 10000.0 and c.text.rope_scaling == ()
    assert c.text.rms_norm_eps == hf.text_config.rms_norm_eps
    assert c.vision.hidden_act == hf.vision_config.hidden_act == "quick_gelu"
    assert c.vision.layer_norm_eps == hf.vision_config.layer_norm_eps
    assert c.eos_token_ids == (hf.text_config.eos_token_id,)
    x = demo_inputs(mha_dir)
    assert np.isfinite(_logits(model, x)).all()
