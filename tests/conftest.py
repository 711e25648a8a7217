"""Shared fixtures: tiny random HF LLaVA checkpoints written with transformers' own ``save_pretrained``.

Every model is seeded, saved in the real HF format, and loaded by ``vlmprune.load`` through the same code path a
real ``llava-hf/*`` directory takes. Parity runs on CPU in float32 with the highest matmul precision.
"""

import jax
import numpy as np
import pytest

from reference.hf_builders import build_hf_llava

jax.config.update("jax_default_matmul_precision", "highest")

# Config variants exercised by the parity tests: multi-head vs grouped-query attention, feature layer -2 / -1,
# select strategy "default" / "full".
CONFIGS = {
    "mha_default": dict(),
    "gqa_full": dict(
        text_num_key_value_heads=2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        text_rope_theta=5000.0,
    ),
}


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def hf_llava_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return build_hf_llava(d, seed=1, **CONFIGS[request.param])


@pytest.fixture(scope="session")
def mha_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mha")
    return build_hf_llava(d, seed=3)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
