"""RoPE inverse frequencies for every HF rope type we support equal transformers' own initialisers."""

import numpy as np
import pytest

from vlmprune.models.llama import LlamaConfig as OurConfig

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
