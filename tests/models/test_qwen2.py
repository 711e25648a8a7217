"""Qwen2 decoder parity against HF ``Qwen2ForCausalLM`` (tiny random checkpoints, fp32, highest precision).

Each checkpoint is written by transformers' own ``save_pretrained`` and read back through
``vlmprune.models.text.qwen2.load`` (config.json + safetensors through the weight rules).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference.batch_calls import hf_greedy
from vlmprune.io.weights import CheckpointError
from vlmprune.models.text.llama import KVCache
from vlmprune.models.text.qwen2 import (
    SHARDING_RULES,
    Qwen2Config,
    Qwen2ForCausalLM,
    load,
)

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 120
VARIANTS = {
    # grouped-query attention (4 query heads share 2 key/value heads), untied head: the OV-7B shape
    "gqa_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    # tied embeddings: the OV-0.5B shape
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=5000.0),
}


def build_hf_qwen2(directory, seed, **overrides):
    import torch
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2ForCausalLM as HFQwen2

    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    cfg = HFQwen2Config(**kw)
    torch.manual_seed(seed)
    model = HFQwen2(cfg).eval()
    with torch.no_grad():  # HF's init leaves biases at 0 and norms at 1: perturb every parameter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def qwen2_pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = build_hf_qwen2(d, seed=7, **VARIANTS[request.param])
    cfg, module, params = load(str(d))
    return request.param, hf, cfg, module, params


def _batch():
    """Two rows, the second left padded by 3: ids int (2, 11), mask bool (2, 11)."""
    rng = np.random.default_rng(3)
    ids = rng.integers(3, VOCAB, size=(2, 11))
    mask = np.ones((2, 11), bool)
    mask[1, :3] = False
    ids[1, :3] = 0
    return ids, mask


def _positions(mask):
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)


def test_config_read_from_checkpoint(qwen2_pair):
    name, _hf, cfg, _, params = qwen2_pair
    v = VARIANTS[name]
    assert cfg.num_key_value_heads == v["num_key_value_heads"]
    assert cfg.tie_word_embeddings == v["tie_word_embeddings"]
    assert cfg.rope_theta == v.get("rope_theta", 1e6)
    assert cfg.rms_norm_eps == 1e-6 and cfg.head_dim == 8
    assert ("lm_head" in params) == (not v["tie_word_embeddings"])
    attn = params["layers_0"]["self_attn"]
    assert set(attn["q_proj"]) == {"kernel", "bias"} and set(attn["o_proj"]) == {"kernel"}


def test_logits_left_padded(qwen2_pair):
    import torch

    _, hf, _cfg, module, params = qwen2_pair
    ids, mask = _batch()
    pos = _positions(mask)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(pos, dtype=torch.long),
        ).logits.numpy()
    embeds = module.apply({"params": params}, jnp.asarray(ids), method=Qwen2ForCausalLM.embed)
    logits, _, _ = module.apply({"params": params}, embeds, jnp.asarray(pos), jnp.asarray(mask))
    err = float(np.max(np.abs(np.asarray(logits)[mask] - ref[mask])))
    print(f"max |logits - HF| = {err:.2e}")
    assert np.std(ref[mask]) > 0.1  # the logits vary: the comparison can fail
    assert err < 1e-4, err  # fp32 both sides, highest matmul precision: float rounding over 2 layers only


def test_cached_greedy_decode_matches_hf_generate(qwen2_pair):
    import torch

    _, hf, cfg, module, params = qwen2_pair
    ids, mask = _batch()
    new = 16
    inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)))
    ref = hf_greedy(hf, new, 0, **inputs, eos_token_id=None)

    b, t = ids.shape
    apply = jax.jit(module.apply, static_argnames=("method", "last_only"))
    cache = KVCache.zeros(cfg, b, t + new, jnp.float32)
    embeds = apply({"params": params}, jnp.asarray(ids), method=Qwen2ForCausalLM.embed)
    pos = jnp.asarray(_positions(mask))
    logits, _, cache = apply({"params": params}, embeds, pos, jnp.asarray(mask), cache, last_only=True)
    last = pos[:, -1]
    got = []
    for i in range(new):
        tok = jnp.argmax(logits[:, -1], axis=-1)
        got.append(np.asarray(tok))
        if i == new - 1:
            break
        emb = apply({"params": params}, tok[:, None], method=Qwen2ForCausalLM.embed)
        logits, cache = apply(
            {"params": params},
            emb,
            (last + 1 + i)[:, None],
            cache,
            jnp.int32(t + i),
            method=Qwen2ForCausalLM.decode_step,
        )
    got = np.stack(got, axis=1)
    assert len(set(ref.ravel().tolist())) > 3  # not a degenerate repeat of one token
    np.testing.assert_array_equal(got, ref)


def test_from_hf_refuses_sliding_window_and_other_families():
    from transformers import LlamaConfig as HFLlama
    from transformers import Qwen2Config as HFQwen2Config

    with pytest.raises(ValueError, match="use_sliding_window"):
        Qwen2Config.from_hf(HFQwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=0))
    with pytest.raises(ValueError, match="model_type"):
        Qwen2Config.from_hf(HFLlama())
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Qwen2Config(num_attention_heads=14, num_key_value_heads=4)


def test_stray_o_proj_bias_is_reported(tmp_path):
    """A checkpoint with an o_proj bias (which Qwen2 does not have) is an error, not a silently dropped tensor."""
    from safetensors.numpy import load_file, save_file

    build_hf_qwen2(tmp_path, seed=1)
    f = tmp_path / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="o_proj.bias"):
        load(str(tmp_path))


def test_sharding_rules_cover_every_matrix(qwen2_pair):
    """Every 2-D param (and every q/k/v bias) has a rule whose spec has one entry per dim."""
    import re

    from flax.traverse_util import flatten_dict

    _, _, _, _, params = qwen2_pair
    for path, v in flatten_dict(params).items():
        p = "/".join(path)
        spec = next((s for r, s in SHARDING_RULES if re.match(r, p)), None)
        if v.ndim == 2 or p.endswith("_proj/bias"):
            assert spec is not None, p
            assert len(spec) == v.ndim and "model" in spec, (p, spec)
        else:
            assert spec is None, p  # norms stay replicated


def test_weight_rules_map_a_onevision_checkpoint(tmp_path):
    """A tiny HF LlavaOnevision model's own safetensors: its text keys, normalised by the LLaVA renames (5.24 writes
    the legacy ``language_model.model.*`` / ``language_model.lm_head.*`` names on disk), map one to one onto a
    Qwen2 param tree under ``language_model/`` with the right shapes."""
    import re

    from flax.traverse_util import flatten_dict
    from safetensors import safe_open
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
    )

    from vlmprune.models.llava import LLAVA_RENAMES
    from vlmprune.models.text.qwen2 import weight_rules

    vision = {
        "model_type": "siglip_vision_model",
        "image_size": 28,
        "patch_size": 7,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    text = {
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    }
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=100,
        video_token_index=101,
        image_grid_pinpoints=[[28, 28], [28, 56]],
    )
    LlavaOnevisionForConditionalGeneration(cfg).save_pretrained(tmp_path)
    ours = Qwen2Config.from_hf(cfg.text_config)
    module = Qwen2ForCausalLM(ours)
    one = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), one, one, one.astype(bool), method=Qwen2ForCausalLM.forward_ids)
    )["params"]
    expected = {"language_model/" + "/".join(k): v.shape for k, v in flatten_dict(shapes).items()}
    ours_rules = weight_rules("language_model.model.", "language_model/", "language_model.lm_head.")
    rules = [(re.compile(p + "$"), t, f) for p, t, f in ours_rules]
    mapped = {}
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        for stored in f.keys():  # noqa: SIM118 - safe_open is not a dict
            key = stored
            for pat, rep in LLAVA_RENAMES:
                key = re.sub(pat, rep, key)
            if not key.startswith("language_model."):
                continue
            hit = [(m.expand(t), fn) for r, t, fn in rules if (m := r.match(key))]
            assert len(hit) == 1, key
            target, fn = hit[0]
            assert fn(f.get_tensor(stored)).shape == expected[target], key
            mapped[target] = key
    assert set(mapped) == set(expected)
