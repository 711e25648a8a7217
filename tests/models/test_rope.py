"""RoPE inverse frequencies for every HF rope type we support equal transformers' own initialisers."""

import numpy as np
import pytest

from vlmprune.models.text.llama import LlamaConfig as OurConfig

VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inverse_frequencies_match_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kw = dict(
        hidden_size=256,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=10,
        max_position_embeddings=1024,
        rope_theta=500000.0,
    )
    scaling = VARIANTS[name]
    if scaling is not None:
        kw["rope_scaling"] = dict(scaling)
    hf = LlamaConfig(**kw)
    ours = OurConfig.from_hf(hf)
    inv, scale = ours.rope()
    rope_type = hf.rope_parameters["rope_type"]
    init = (
        LlamaRotaryEmbedding.compute_default_rope_parameters
        if rope_type == "default"
        else ROPE_INIT_FUNCTIONS[rope_type]
    )
    ref_inv, ref_scale = init(hf)
    # float32 on both sides; HF's torch float32 pow is within one ulp of our correctly rounded power, and the
    # reciprocal (and yarn's blend) can add one more ulp: at most 2 ulp apart. llama3's smoothing runs five more
    # float32 ops on the frequency (wavelength, ratio, shift, two products), each rounding on both sides: 4 ulp.
    maxulp = 4 if name == "llama3" else 2
    np.testing.assert_array_max_ulp(inv, ref_inv.numpy().astype(np.float32), maxulp=maxulp)
    assert scale == pytest.approx(ref_scale, rel=1e-6)


@pytest.mark.parametrize("name", ["default", "yarn"])
def test_rotation_matches_transformers_apply_rotary_pos_emb(name):
    """rope_tables + apply_rope == HF's LlamaRotaryEmbedding + apply_rotary_pos_emb on padded, non-contiguous
    positions, within a float32 error bound derived element by element (see ``rotation_error_bound``)."""
    import jax.numpy as jnp
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from vlmprune.models.text.llama import apply_rope, rope_tables

    kw = dict(
        hidden_size=256,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=10,
        max_position_embeddings=1024,
        rope_theta=10000.0,
    )
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
    want_q, want_k = apply_rotary_pos_emb(
        torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2), cos, sin
    )
    freqs = positions[..., None].astype(np.float64) * np.asarray(inv, np.float64)  # (B, T, D/2)
    for x, got, want in ((q, got_q, want_q), (k, got_k, want_k)):
        want = want.transpose(1, 2).numpy()
        bound = rotation_error_bound(x, freqs, scale)
        assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))
        # The bound is not vacuous: it stays far below the size of the rotated values.
        assert float(np.max(bound)) < 1e-4 * float(np.max(np.abs(want)))


def rotation_error_bound(x: np.ndarray, freqs: np.ndarray, scale: float) -> np.ndarray:
    """Largest float32 difference between two RoPE implementations that follow HF's formula, per element of x.

    With ``u = 2**-23`` (one float32 ulp at 1): the two sides' inverse frequencies may differ by 2 ulp (see the
    test above), so the angles ``f = pos * inv`` differ by at most ``f * 2u`` plus each side's rounding of the
    product (``f * u / 2`` each): ``|df| <= 3u * f``. Each side's cos / sin is within one ulp (``u / 2`` for values
    below 1) of the exact value of its own angle, and cos / sin are 1-Lipschitz, so the tables differ by at most
    ``(|df| + u) * scale`` plus the scaling's rounding (``u`` each). The output ``x1 * cos - x2 * sin`` then
    differs by ``(|x1| + |x2|) * table error`` plus the two products' and the sum's roundings on each side
    (``2u`` times that magnitude per side).
    """
    u = 2.0**-23
    half = x.shape[-1] // 2
    df = 3 * u * freqs[:, :, None, :]  # (B, T, 1, D/2)
    table_err = (df + u) * scale + 2 * u * scale
    mag = np.abs(x[..., :half]) + np.abs(x[..., half:])  # |x1| + |x2| pairs the two halves, (B, T, H, D/2)
    per_pair = mag * (table_err + 4 * u * scale)
    return np.concatenate([per_pair, per_pair], axis=-1)
