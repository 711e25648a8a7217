"""SigLIP vision tower: parity with HF ``SiglipVisionModel`` (eager attention), the received-attention tap
(values and memory), the weight and sharding tables, and input validation.

Checkpoints are tiny random HF models (seeded, every parameter perturbed), written with ``save_pretrained`` and
read back through ``vlmprune.io.weights.load_params`` with the tower's own rules, as a user's directory would be.
Two geometries: 30 px / patch 7 (4 x 4 tokens, with the pooling head) and OneVision's 27 x 27 = 729 tokens at
tiny width (54 px / patch 2, no head), as docs/methods.md §9.5 prescribes.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from reference.siglip_builders import build_hf_siglip, load_tower
from vlmprune import sharding
from vlmprune.io.weights import CheckpointError, abstract_params, load_params
from vlmprune.models.vision.siglip import (
    SIGLIP_SHARDING_RULES,
    SiglipVisionConfig,
    SiglipVisionTransformer,
    attention_and_received,
    received_attention,
    siglip_vision_rules,
)

GEOMETRIES = {
    # name: (image_size, patch_size, vision_use_head, query_block): blocks smaller than N so that the tap
    # streams over several blocks, the last one padded (16 = 5+5+5+1; 729 = 5*128 + 89). 30 / 7 leaves 2 pixel
    # rows and columns outside the patches, as OneVision's 384 / 14 leaves 6.
    "p16_head": (30, 7, True, 5),
    "p729": (54, 2, False, 128),
}


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def tower(request, tmp_path_factory):
    image_size, patch_size, use_head, block = GEOMETRIES[request.param]
    d = tmp_path_factory.mktemp(f"siglip_{request.param}")
    hf, hf_cfg = build_hf_siglip(d, image_size, patch_size, use_head, seed=7)
    module, params = load_tower(d, hf_cfg, query_block=block)
    pix = np.random.default_rng(1).standard_normal((2, 3, image_size, image_size)).astype(np.float32)
    # q/k projections of every layer, captured by forward hooks
    captured = {}
    hooks = []
    for i, layer in enumerate(hf.encoder.layers):
        for name in ("q_proj", "k_proj"):
            mod = getattr(layer.self_attn, name)
            hooks.append(
                mod.register_forward_hook(
                    lambda m, a, out, key=(name, i): captured.__setitem__(key, out.detach().numpy())
                )
            )
    with torch.no_grad():
        ref = hf(torch.from_numpy(pix), output_hidden_states=True, output_attentions=True)
    for h in hooks:
        h.remove()
    return {
        "name": request.param,
        "dir": str(d),
        "hf": hf,
        "hf_cfg": hf_cfg,
        "module": module,
        "params": params,
        "pix": pix,
        "ref": ref,
        "qk": captured,
        "block": block,
    }


def test_every_hidden_state_matches_hf(tower):
    ref, module, params = tower["ref"], tower["module"], tower["params"]
    out = module.apply({"params": params}, tower["pix"], output_hidden_states=True, post_layernorm=True)
    assert len(ref.hidden_states) == 4 and sorted(out["hidden_states"]) == [0, 1, 2, 3]
    errs = []
    for i, h in enumerate(ref.hidden_states):
        errs.append(float(np.max(np.abs(np.asarray(out["hidden_states"][i]) - h.numpy()))))
    # float32 vs float32 (highest matmul precision), values O(1): a 32-wide, 3-layer tower rounds to ~1e-6
    assert max(errs) < 1e-5, errs
    # OneVision's feature = hidden_states[-1], which is *not* HF's post-layernormed last_hidden_state
    last = np.asarray(out["last_hidden_state"])
    assert np.max(np.abs(last - ref.last_hidden_state.numpy())) < 1e-5  # float32, as above
    assert np.max(np.abs(np.asarray(out["hidden_states"][3]) - ref.last_hidden_state.numpy())) > 1e-2
    if tower["hf_cfg"].vision_use_head:
        assert np.max(np.abs(np.asarray(out["pooled"]) - ref.pooler_output.numpy())) < 1e-5  # float32
    else:
        assert "pooled" not in out and ref.pooler_output is None


def test_received_attention_matches_hf_eager(tower):
    ref, module, params = tower["ref"], tower["module"], tower["params"]
    out = module.apply({"params": params}, tower["pix"], received_attention_layers=(0, 1, -1))
    assert sorted(out["received_attn"]) == [0, 1, 2]
    b, h, n = 2, 4, module.config.num_patches
    for layer, r in out["received_attn"].items():
        want = ref.attentions[layer].mean(-2).numpy()  # (B, H, N): HF eager probabilities, mean over queries
        assert r.shape == (b, h, n) and r.dtype == jnp.float32
        # float32 probabilities ~1/N summed over N queries in another order: ~1e-8 apart; 1e-6 is the bar
        assert np.max(np.abs(np.asarray(r) - want)) < 1e-6
        np.testing.assert_allclose(np.asarray(r).sum(-1), 1.0, atol=1e-5)  # each head's column means sum to 1


def test_taps_are_consistent_and_do_not_change_the_output(tower):
    module, params, pix = tower["module"], tower["params"], tower["pix"]
    plain = module.apply({"params": params}, pix, hidden_state_layers=(1, 2, 3))
    tapped = module.apply(
        {"params": params},
        pix,
        hidden_state_layers=(1, 2, 3),
        received_attention_layers=(0, 2),
        key_layers=(2,),
        query_layers=(2,),
    )
    for i in (1, 2, 3):
        # the tapped layers' outputs come from the blocked probabilities, the others from the fused path:
        # float32 rounding only
        assert np.max(np.abs(np.asarray(plain["hidden_states"][i]) - np.asarray(tapped["hidden_states"][i]))) < 2e-6
    # raw projections equal HF's q_proj / k_proj outputs (forward hooks)
    for name, key in (("queries", "q_proj"), ("keys", "k_proj")):
        assert np.max(np.abs(np.asarray(tapped[name][2]) - tower["qk"][(key, 2)])) < 1e-5  # float32, O(1) values
    # the standalone streaming function on the tower's own q/k taps gives the tower's received attention
    cfg = module.config
    q4 = tapped["queries"][2].reshape(2, cfg.num_patches, cfg.num_attention_heads, cfg.head_dim)
    k4 = tapped["keys"][2].reshape(q4.shape)
    r = received_attention(q4, k4, block=tower["block"])
    np.testing.assert_allclose(np.asarray(r), np.asarray(tapped["received_attn"][2]), rtol=0, atol=1e-9)


def test_attention_and_received_against_dense_numpy():
    rng = np.random.default_rng(3)
    b, n, h, d = 2, 37, 3, 8
    q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) * 2 for _ in range(3))
    s = np.einsum("bihd,bjhd->bhij", q.astype(np.float64), k.astype(np.float64)) * d**-0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want_out = np.einsum("bhij,bjhd->bihd", p, v.astype(np.float64))
    for block in (1, 6, 37, 64):  # one query per block, ragged blocks, exactly one block, one padded block
        out, r = attention_and_received(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), block=block)
        assert out.shape == (b, n, h, d) and r.shape == (b, h, n)
        # float32 against a float64 reference, O(1) outputs and ~1/37 probabilities
        assert np.max(np.abs(np.asarray(out) - want_out)) < 1e-5
        assert np.max(np.abs(np.asarray(r) - p.mean(-2))) < 1e-7
    with pytest.raises(ValueError, match="query block must be a positive int"):
        received_attention(jnp.asarray(q), jnp.asarray(k), block=0)
    with pytest.raises(ValueError, match=r"received_attention: q must have rank 4 \(B, N, H, d\)"):
        received_attention(jnp.asarray(q[0]), jnp.asarray(k))
    with pytest.raises(ValueError, match="q, k must have one shape"):
        received_attention(jnp.asarray(q), jnp.asarray(k[:, :5]))
    with pytest.raises(ValueError, match="q, k, v must share one floating dtype"):
        attention_and_received(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v, jnp.float16))


def test_bfloat16_tower_rounds_probabilities_like_hf(tower):
    """In bfloat16 the tap returns bfloat16 column means of bfloat16-rounded probabilities (HF's eager
    attention casts the float32 softmax to the query dtype): close to the float32 tap, columns summing to 1."""
    cfg = tower["module"].config
    module16 = SiglipVisionTransformer(cfg, query_block=tower["block"], dtype=jnp.bfloat16)
    r16 = module16.apply({"params": tower["params"]}, tower["pix"], received_attention_layers=(-1,))["received_attn"][2]
    r32 = tower["module"].apply({"params": tower["params"]}, tower["pix"], received_attention_layers=(-1,))[
        "received_attn"
    ][2]
    assert r16.dtype == jnp.bfloat16
    r16 = np.asarray(r16, np.float32)
    # bfloat16 keeps 8 bits: the inputs, weights and probabilities each round at ~4e-3 relative through 3
    # layers; the column means (values ~1/N) stay within a few percent
    np.testing.assert_allclose(r16, np.asarray(r32), rtol=0.1, atol=2e-4)
    np.testing.assert_allclose(r16.sum(-1), 1.0, atol=2e-2)


# ---------------------------------------------------------------------------------------------------------
# Memory: no N x N map per head survives a block
# ---------------------------------------------------------------------------------------------------------


def _square_outputs(jaxpr, n):
    """Equations (recursively, into scan/pjit bodies) whose output's last two dims are (n, n)."""
    count = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            if len(shape) >= 2 and tuple(shape[-2:]) == (n, n):
                count += 1
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += _square_outputs(inner, n)
    return count


def test_received_tap_keeps_no_square_map():
    """At OneVision's N = 729 the tapped tower program has no (729, 729) array anywhere (the CPU attention path
    is blocked too), and the tap's compiled scratch memory scales with the query block, not with N x N."""
    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=54, patch_size=2
    )
    n, h = cfg.num_patches, cfg.num_attention_heads
    module = SiglipVisionTransformer(cfg)
    pix = jnp.zeros((2, 3, 54, 54))
    params = module.init(jax.random.PRNGKey(0), pix)

    def fn(layers):
        return lambda p, x: module.apply(p, x, hidden_state_layers=(-1,), received_attention_layers=layers)

    plain, tapped = (jax.make_jaxpr(fn(layers))(params, pix) for layers in ((), (0, 1)))
    assert _square_outputs(tapped.jaxpr, n) == _square_outputs(plain.jaxpr, n) == 0
    # the detector does see a square map where one exists
    dense = jax.make_jaxpr(lambda q, k: jnp.einsum("bihd,bjhd->bhij", q, k))(
        jnp.zeros((2, n, h, 8)), jnp.zeros((2, n, h, 8))
    )
    assert _square_outputs(dense.jaxpr, n) == 1

    full_map_bytes = 2 * h * n * n * 4  # one layer's float32 probabilities, all heads, B = 2
    q = jnp.zeros((2, n, h, 8))

    def temp_bytes(f, *args):
        stats = jax.jit(f).lower(*args).compile().memory_analysis()
        assert stats is not None, "this backend reports no compiled memory"
        return stats.temp_size_in_bytes

    small, default = (temp_bytes(lambda a, b, blk=blk: received_attention(a, b, block=blk), q, q) for blk in (32, 128))
    # measured on XLA:CPU: 1.9 MB (block 32) and 6.4 MB (block 128), i.e. ~2 blocks of (B, H, block, N) float32,
    # against 17 MB for one full map; a single 729-query block needs 34 MB
    assert small < default < full_map_bytes / 2, (small, default, full_map_bytes)
    assert temp_bytes(fn((0, 1)), params, pix) < full_map_bytes


# ---------------------------------------------------------------------------------------------------------
# Weights, renames, sharding
# ---------------------------------------------------------------------------------------------------------


def test_older_key_layout_loads_the_same(tmp_path, tower):
    """transformers 4.x saved the tower under ``vision_model.``; the renames map it onto the same params."""
    tensors = load_file(os.path.join(tower["dir"], "model.safetensors"))
    old = tmp_path / "old"
    old.mkdir()
    save_file({f"vision_model.{k}": v for k, v in tensors.items()}, str(old / "model.safetensors"))
    with open(old / "config.json", "w") as f:
        json.dump(tower["hf_cfg"].to_dict(), f)
    _, params = load_tower(str(old), tower["hf_cfg"])
    flat_a = jax.tree_util.tree_leaves_with_path(params)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(tower["params"]))
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]))


def test_prefixed_rules_and_checkpoint_errors(tmp_path, tower):
    tensors = load_file(os.path.join(tower["dir"], "model.safetensors"))
    cfg = SiglipVisionConfig.from_hf(tower["hf_cfg"])
    module = SiglipVisionTransformer(cfg)
    pix = jnp.zeros((1, 3, cfg.image_size, cfg.image_size))
    # inside a composed model: HF prefix -> param prefix
    nested = tmp_path / "nested"
    nested.mkdir()
    save_file({f"model.vision_tower.{k}": v for k, v in tensors.items()}, str(nested / "model.safetensors"))
    abstract = {"vision_tower": abstract_params(module, pix)}
    params = load_params(str(nested), abstract, siglip_vision_rules("model.vision_tower.", "vision_tower"))
    np.testing.assert_array_equal(
        np.asarray(params["vision_tower"]["position_embedding"]), tensors["embeddings.position_embedding.weight"]
    )
    # a missing and a mis-shaped tensor are both reported, in one error
    broken = tmp_path / "broken"
    broken.mkdir()
    bad = dict(tensors)
    del bad["encoder.layers.1.mlp.fc2.bias"]
    bad["encoder.layers.0.self_attn.q_proj.weight"] = bad["encoder.layers.0.self_attn.q_proj.weight"][:, :31]
    save_file(bad, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_params(str(broken), abstract_params(module, pix), siglip_vision_rules())
    msg = str(err.value)
    assert "missing tensor for parameter 'layers_1/fc2/bias'" in msg and "shape mismatch" in msg
    assert len(err.value.problems) == 2


def test_head_tensors_without_head_config_are_reported(tmp_path):
    """A stock SigLIP checkpoint (with the pooling head) loaded with OneVision's head-less config: the head's
    tensors are listed as unexpected rather than dropped."""
    d = tmp_path / "with_head"
    _, hf_cfg = build_hf_siglip(d, 28, 7, use_head=True, seed=2)
    hf_cfg.vision_use_head = False
    with pytest.raises(CheckpointError, match=r"head\.probe"):
        load_tower(str(d), hf_cfg)


def test_sharding_rules_cover_the_projections():
    cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        use_head=True,
    )
    module = SiglipVisionTransformer(cfg)
    shapes = abstract_params(module, jnp.zeros((1, 3, 28, 28)))
    matched = {}
    for prefix in ("", "vision_tower/"):
        # family rules are relative to the tower; a composite model prefixes them (as models/llava.py does)
        rules = SIGLIP_SHARDING_RULES if not prefix else sharding.prefix_rules(SIGLIP_SHARDING_RULES, prefix[:-1])
        for path, leaf in flatten_dict(shapes).items():
            key = prefix + "/".join(path)
            hits = [spec for pat, spec in rules if re.match(pat + "$", key)]
            assert len(hits) <= 1, key
            if hits:
                assert len(hits[0]) == len(leaf.shape), key
                matched[key] = hits[0]
    for prefix in ("", "vision_tower/"):
        for i in range(2):
            for name in ("q_proj", "k_proj", "v_proj"):
                assert matched[f"{prefix}layers_{i}/self_attn/{name}/kernel"] == (None, "model")
            assert matched[f"{prefix}layers_{i}/self_attn/out_proj/kernel"] == ("model", None)
            assert matched[f"{prefix}layers_{i}/fc1/kernel"] == (None, "model")
            assert matched[f"{prefix}layers_{i}/fc2/kernel"] == ("model", None)
    assert not any("head/" in k or "position_embedding" in k for k in matched)


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: named errors at trace time (eval_shape never compiles)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dtype, kwargs, message",
    [
        ((2, 3, 28), jnp.float32, {}, "rank 4"),
        ((2, 1, 28, 28), jnp.float32, {}, r"must be \(B, 3, 28, 28\)"),
        ((2, 3, 56, 56), jnp.float32, {}, "no position interpolation"),
        ((2, 3, 28, 28), jnp.uint8, {}, "floating dtype"),
        ((2, 3, 28, 28), jnp.float32, {"received_attention_layers": (3,)}, r"index 3 is out of range \[-3, 2\]"),
        ((2, 3, 28, 28), jnp.float32, {"received_attention_layers": (-4,)}, "out of range"),
        ((2, 3, 28, 28), jnp.float32, {"hidden_state_layers": (5,)}, r"hidden_state_layers index 5"),
        ((2, 3, 28, 28), jnp.float32, {"key_layers": (1.0,)}, "must hold Python ints"),
        ((2, 3, 28, 28), jnp.float32, {"query_layers": (True,)}, "must hold Python ints"),
        ((2, 3, 28, 28), jnp.float32, {"received_attention_layers": (2,), "num_layers": 2}, r"num_layers 2 must be"),
    ],
)
def test_bad_inputs_raise_named_errors_before_compile(shape, dtype, kwargs, message):
    cfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7
    )
    module = SiglipVisionTransformer(cfg)
    params = abstract_params(module, jnp.zeros((1, 3, 28, 28)))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(
            lambda p, x: module.apply({"params": p}, x, **kwargs), params, jax.ShapeDtypeStruct(shape, dtype)
        )


def test_config_rejects_what_the_port_cannot_run():
    with pytest.raises(ValueError, match="not a multiple of num_attention_heads"):
        SiglipVisionConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="exceeds image_size"):
        SiglipVisionConfig(image_size=6, patch_size=7)
    assert SiglipVisionConfig().num_patches == 729  # OneVision's 384 / 14: 27 x 27, 6 border pixels unused
    with pytest.raises(ValueError, match="unsupported activation"):
        SiglipVisionConfig(hidden_act="swish_beta")
    with pytest.raises(ValueError, match="query block"):
        SiglipVisionTransformer(
            SiglipVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=28,
                patch_size=7,
            ),
            query_block=0,
        ).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 28, 28)))
