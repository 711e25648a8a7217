"""RoPE inverse frequencies for every HF rope type we support equal transformers' own initialisers."""

import numpy as np
import pytest

from vlmprune.models.text.llama import LlamaConfig as OurConfig

VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inverse_frequencies_match_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kw = dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=10,
              max_position_embeddings=1024, rope_theta=500000.0)
    scaling = VARIANTS[name]
    if scaling is not None:
        kw["rope_scaling"] = dict(scaling)
    hf = LlamaConfig(**kw)
    ours = OurConfig.from_hf(hf)
    inv, scale = ours.rope()
    rope_type = hf.rope_parameters["rope_type"]
    init = LlamaRotaryEmbedding.compute_default_rope_parameters if rope_type == "default" else ROPE_INIT_FUNCTIONS[rope_type]
    ref_inv, ref_scale = init(hf)
    np.testing.assert_allclose(inv, ref_inv.numpy(), rtol=1e-6, atol=0)  # float32 arithmetic on both sides
    assert scale == pytest.approx(ref_scale, rel=1e-6)


@pytest.mark.parametrize("name", ["default", "yarn"])
def test_rotation_matches_transformers_apply_rotary_pos_emb(name):
    """rope_tables + apply_rope == HF's LlamaRotaryEmbedding + apply_rotary_pos_emb on padded, non-contiguous
    positions (float32; both sides compute the same products, so 1e-6)."""
    import jax.numpy as jnp
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from vlmprune.models.text.llama import apply_rope, rope_tables

    kw = dict(hidden_size=256, num_attention_heads=4, num_hidden_layers=1, intermediate_size=64, vocab_size=10,
              max_position_embeddings=1024, rope_theta=10000.0)
    if VARIANTS[name] is not None:
        kw["rope_scaling"] = dict(VARIANTS[name])
    hf = LlamaConfig(**kw)
    ours = OurConfig.from_hf(hf)
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 9, 4, 64
    q, k = (rng.standard_normal((b, t, h, d)).astype(np.float32) for _ in range(2))
    positions = np.stack([np.arange(t), np.r_[0, 0, 0, np.arange(1, 7) * 3]]).astype(np.int32)
    inv, scale = ours.rope()
    rope = rope_tables(jnp.asarray(positions), jnp.asarray(inv), scale, jnp.float32)
    got_q, got_k = np.asarray(apply_rope(jnp.asarray(q), rope)), np.asarray(apply_rope(jnp.asarray(k), rope))
    cos, sin = LlamaRotaryEmbedding(hf)(torch.from_numpy(q), torch.from_numpy(positions).long())
    want_q, want_k = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                          cos, sin)
    np.testing.assert_allclose(got_q, want_q.transpose(1, 2).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(got_k, want_k.transpose(1, 2).numpy(), atol=1e-6, rtol=0)
