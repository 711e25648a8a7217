"""The CLS-attention tap computes one query row per head: it adds no (T, T) array to the program."""

import jax
import jax.numpy as jnp

from vlmprune.models.vision.clip import CLIPVisionConfig, CLIPVisionTransformer


def _square_outputs(jaxpr, t):
    """Count equations (recursively) producing an array whose last two dims are (t, t)."""
    n = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            if len(shape) >= 2 and shape[-2:] == (t, t):
                n += 1
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else []:
            n += _square_outputs(sub, t)
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                n += _square_outputs(inner, t)
    return n


def test_cls_taps_add_no_square_attention_map():
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14
    )
    module = CLIPVisionTransformer(cfg)
    pix = jnp.zeros((2, 3, 56, 56))
    params = module.init(jax.random.PRNGKey(0), pix)
    t = cfg.num_patches + 1

    def run(layers):
        return jax.make_jaxpr(lambda p, x: module.apply(p, x, hidden_state_layers=(-2,), cls_attention_layers=layers))(
            params, pix
        )

    plain, tapped = run(()), run((0, 1))  # both run the first 2 layers (hidden state -2)
    out = jax.eval_shape(lambda p, x: module.apply(p, x, cls_attention_layers=(0, 1, 2)), params, pix)
    assert {k: v.shape for k, v in out["cls_attn"].items()} == {i: (2, 4, t - 1) for i in range(3)}
    # Whatever the fused attention does internally is the same with and without taps; the taps add only rows.
    assert _square_outputs(plain.jaxpr, t) > 0  # the detector sees the fused attention's (T, T) logits
    assert _square_outputs(tapped.jaxpr, t) == _square_outputs(plain.jaxpr, t)
