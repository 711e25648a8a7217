"""OneVision config parsing (``LlavaConfig`` of model type ``llava_onevision``): read back from a tiny random HF
model's saved config.json; bad fields are named."""

import pytest

from vlmprune.anyres.onevision import OnevisionGeometry, anyres_max, geometry
from vlmprune.models.llava import load_config


def _save(directory, **top):
    from transformers import LlavaOnevisionConfig

    vision = {
        "model_type": "siglip_vision_model",
        "image_size": 28,
        "patch_size": 7,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vision_use_head": False,
    }
    text = {
        "model_type": "qwen2",
        "vocab_size": 120,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    }
    kw = {
        "image_token_index": 100,
        "video_token_index": 101,
        "vision_aspect_ratio": "anyres_max_2",
        "image_grid_pinpoints": [[28 * a, 28 * b] for a in (1, 2) for b in (1, 2)],
    }
    kw.update(top)
    LlavaOnevisionConfig(vision_config=vision, text_config=text, **kw).save_pretrained(directory)
    return str(directory)


def test_reads_the_saved_config(tmp_path):
    hf, cfg = load_config(_save(tmp_path))
    assert cfg.model_type == "llava_onevision"
    assert cfg.vision.grid == 4 and cfg.vision.num_hidden_layers == 2 and not cfg.vision.use_head
    assert cfg.text.num_key_value_heads == 2 and cfg.text.tie_word_embeddings
    assert (cfg.image_token_id, cfg.video_token_id) == (100, 101)
    assert cfg.vision_feature_layer == hf.vision_feature_layer == -1
    assert cfg.vision_feature_select_strategy == hf.vision_feature_select_strategy == "full"
    assert geometry(cfg) == OnevisionGeometry.from_hf(hf)
    assert anyres_max(cfg.vision_aspect_ratio) == 2
    hash(cfg)  # static argument of jitted functions


@pytest.mark.parametrize(
    "top,field",
    [
        ({"image_token_index": 500}, "image_token_index"),
        ({"video_token_index": 100}, "video_token_index"),
        ({"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio"),
        ({"vision_feature_layer": 7}, "vision_feature_layer"),
        ({"vision_feature_layer": [-1, -2]}, "vision_feature_layer"),
        ({"image_grid_pinpoints": [[28, 30]]}, "image_grid_pinpoints"),
    ],
)
def test_bad_fields_are_named(tmp_path, top, field):
    with pytest.raises(ValueError, match=field):
        load_config(_save(tmp_path, **top))
