"""The shared numerics of vlmprune.prune.ops round like torch: correctly rounded division (no rounded reciprocal),
half-precision sums accumulated in float32, torch's two-step mean. Compared bit for bit with torch on random rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlmprune.prune import ops

DTYPES = {
    "float32": (jnp.float32, torch.float32),
    "float16": (jnp.float16, torch.float16),
    "bfloat16": (jnp.bfloat16, torch.bfloat16),
}


def _rows(seed, shape, scale_spread=True):
    """Random rows with per-row scales spread over a few binades (so the norms are not all alike)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    if scale_spread:
        x *= np.exp2(rng.uniform(-3, 3, size=shape[:-1] + (1,)))
    return x.astype(np.float32)


def _to_torch(x, tdtype):
    return torch.from_numpy(np.asarray(x, np.float32)).to(tdtype)


def _bits(a):
    """The raw bits of a float array (torch tensor or JAX/NumPy array), for exact comparison incl. -0.0."""
    if isinstance(a, torch.Tensor):
        a = a.float().numpy() if a.dtype == torch.bfloat16 else a.numpy()
    else:
        a = np.asarray(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a)
    return a.view(np.uint32 if a.dtype == np.float32 else np.uint16)


@pytest.mark.parametrize("name", list(DTYPES))
def test_divide_is_torch_division_bit_for_bit(name):
    """x / d with d broadcast over rows: every quotient equals torch's (correctly rounded) one."""
    jdtype, tdtype = DTYPES[name]
    x = _rows(0, (256, 96))
    d = np.abs(_rows(1, (256, 1), scale_spread=False)) + 0.5
    xt, dt = _to_torch(x, tdtype), _to_torch(d, tdtype)
    ours = jax.jit(ops.divide)(jnp.asarray(xt.float().numpy(), jdtype), jnp.asarray(dt.float().numpy(), jdtype))
    np.testing.assert_array_equal(_bits(ours), _bits(xt / dt))


def test_plain_division_by_a_broadcast_is_rewritten_by_xla_and_divide_is_not():
    """Why ops.divide exists: on XLA:CPU a plain ``x / d[:, None]`` compiles to a multiplication by a reciprocal
    (wrong in the last bit for many entries), ``ops.divide`` keeps the division. Checked in the compiled HLO."""
    x = jnp.ones((8, 16), jnp.float32)
    d = jnp.ones((8, 1), jnp.float32)
    plain = jax.jit(lambda a, b: a / b).lower(x, d).compile().as_text()
    ours = jax.jit(ops.divide).lower(x, d).compile().as_text()
    if jax.default_backend() == "cpu":
        # the rewrite guarded against: the (8, 16) result is a multiply, the only divide forms the (8, 1) reciprocal
        assert "f32[8,16]{1,0} multiply(" in plain and "f32[8,16]{1,0} divide(" not in plain
    assert "f32[8,16]{1,0} divide(" in ours
    # numerically: the plain form differs from true division somewhere, ops.divide nowhere
    xs = _rows(2, (512, 64))
    ds = np.abs(_rows(3, (512, 1), scale_spread=False)) + 0.5
    exact = (xs.astype(np.float64) / ds.astype(np.float64)).astype(np.float32)  # correctly rounded quotient
    np.testing.assert_array_equal(np.asarray(jax.jit(ops.divide)(xs, ds)), exact)
    rewritten = np.asarray(jax.jit(lambda a, b: a / b)(xs, ds))
    if jax.default_backend() == "cpu":
        assert (rewritten != exact).mean() > 0.05  # about a fifth of the quotients are one ulp off


def _ulps(a, b, tdtype):
    """|a - b| in units of the last place of b's dtype (both torch tensors)."""
    a64, b64 = a.double(), b.double()
    spacing = torch.from_numpy(
        np.spacing(np.abs(b.float().numpy()).astype(np.float16 if tdtype == torch.float16 else np.float32))
    ).double()
    if tdtype == torch.bfloat16:
        spacing = spacing * 2.0**16  # 8 significand bits instead of 24
    return ((a64 - b64).abs() / spacing.clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("name", list(DTYPES))
def test_l2_normalize_matches_torch_bit_for_bit(name):
    """``x / x.norm(dim=-1, keepdim=True)`` in torch, on random rows. The division is torch's exactly: every row
    whose norm has torch's bits is identical bit for bit. The norm itself is a float32 sum whose order torch picks
    per CPU and shape (vector lanes), so a float32 norm differs from torch's by an ulp in a fraction of the rows;
    rounded to fp16/bf16 that almost never shows. Elsewhere the difference stays within the bound of a reordered sum."""
    jdtype, tdtype = DTYPES[name]
    for c in (16, 64, 1024):
        x = _to_torch(_rows(c, (300, c)), tdtype)
        norm = x.norm(dim=-1, keepdim=True)
        expected = x / norm
        xj = jnp.asarray(x.float().numpy(), jdtype)
        ours = jax.jit(ops.l2_normalize)(xj)
        same_norm = (_bits(jax.jit(ops.row_norm)(xj)) == _bits(norm))[:, 0]
        assert same_norm.mean() > (0.99 if name != "float32" else 0.5), (name, c, same_norm.mean())
        np.testing.assert_array_equal(_bits(ours)[same_norm], _bits(expected)[same_norm], err_msg=f"{name}, C={c}")
        ours_t = torch.from_numpy(np.array(ours.astype(jnp.float32))).to(tdtype)
        if name == "float32":
            # two float32 sums of C positive squares in different orders differ by at most 2 (C - 1) u relative,
            # the square root halves that, and each quotient rounds once more: |q - q'| <= (C + 1) u |q|
            rel = (ours_t.double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-30)
            assert rel.max().item() <= (c + 1) * 2.0**-24
        else:
            # the float32 norms round to the same half-precision norm or a neighbour: at most 2 ulps per quotient
            assert _ulps(ours_t, expected, tdtype) <= 2.0


def test_l2_normalize_with_eps_is_torch_functional_normalize():
    """``F.normalize`` (HERO): the norm clamped to eps, then torch's division; a zero row stays zero."""
    x = _rows(5, (64, 32))
    x[3] = 0.0
    xt = torch.from_numpy(x)
    expected = torch.nn.functional.normalize(xt, dim=-1)
    ours = jax.jit(lambda a: ops.l2_normalize(a, eps=1e-12))(jnp.asarray(x))
    same_norm = (_bits(jax.jit(ops.row_norm)(jnp.asarray(x))) == _bits(xt.norm(dim=-1, keepdim=True)))[:, 0]
    assert same_norm[3] and same_norm.mean() > 0.5
    np.testing.assert_array_equal(_bits(ours)[same_norm], _bits(expected)[same_norm])
    assert not np.asarray(ours[3]).any()


@pytest.mark.parametrize("name", list(DTYPES))
def test_head_mean_matches_torch_mean_bit_for_bit(name):
    """``attn.mean(dim=1)`` of (B, H, N) attention in torch (the originals' head mean), for power-of-two and other
    head counts."""
    jdtype, tdtype = DTYPES[name]
    rng = np.random.default_rng(7)
    for heads in (2, 12, 16, 32, 40):
        # batch of 2: torch's CPU order for a contiguous (B >= 2, H, N) mean (B = 1 takes another kernel path)
        logits = rng.normal(size=(2, heads, 577)) * 2
        attn = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))[:, :, 1:].astype(np.float32)
        at = _to_torch(attn, tdtype)
        ours = jax.jit(ops.head_mean)(jnp.asarray(at.float().numpy(), jdtype))
        np.testing.assert_array_equal(_bits(ours), _bits(at.mean(dim=1)), err_msg=f"{name}, H={heads}")
        summed = jax.jit(ops.head_sum)(jnp.asarray(at.float().numpy(), jdtype))
        np.testing.assert_array_equal(_bits(summed), _bits(at.sum(dim=1)), err_msg=f"sum {name}, H={heads}")


def test_cosine_gram_of_normalised_fp16_rows_matches_torch():
    """DivPrune's ``1 - mm(xn, xn.T)`` in fp16: the normalised rows agree bit for bit (above) and so does the
    product (fp32 accumulation, one rounding to fp16) on random rows."""
    x = _to_torch(_rows(11, (200, 256)), torch.float16)
    xn = x / x.norm(dim=-1, keepdim=True)
    expected = 1.0 - torch.mm(xn, xn.t())
    ours = jax.jit(lambda a: 1 - ops.gram(ops.l2_normalize(a)))(jnp.asarray(x.float().numpy(), jnp.float16))
    np.testing.assert_array_equal(_bits(ours), _bits(expected))


def test_no_fma_keeps_the_product_rounded():
    """XLA:CPU fuses ``a * b + c`` into a fused multiply-add; with ``ops.no_fma`` on the product the result is
    the twice-rounded one of separate kernels (NumPy here, torch alike)."""
    rng = np.random.default_rng(13)
    a, b, c = (rng.normal(size=20000).astype(np.float32) for _ in range(3))
    separate = a * b + c  # NumPy: two ufuncs, two roundings
    ours = np.asarray(jax.jit(lambda x, y, z: ops.no_fma(x * y) + z)(a, b, c))
    np.testing.assert_array_equal(ours, separate)
    fused = np.asarray(jax.jit(lambda x, y, z: x * y + z)(a, b, c))
    if jax.default_backend() == "cpu":
        assert (fused != separate).mean() > 0.05  # the contraction no_fma prevents
    assert np.isnan(np.asarray(ops.no_fma(jnp.asarray([np.nan], jnp.float32)))).all()


def test_numpy_percentile_and_iqr_bound_match_numpy_bit_for_bit():
    """PruMerge's outlier test: NumPy's linear percentiles of float32 attention and its float32 bound
    ``Q3 + 1.5 (Q3 - Q1)``, reproduced exactly (``jnp.percentile`` rounds differently in ~30 % of draws)."""
    from vlmprune.prune.baselines import numpy_percentile

    rng = np.random.default_rng(17)
    quartiles = jax.jit(lambda x: (numpy_percentile(x, 25.0), numpy_percentile(x, 75.0)))
    iqr_bound = jax.jit(lambda a, b: b + ops.no_fma(jnp.float32(1.5) * (b - a)))
    for n in (36, 100, 144, 576, 577):
        for _ in range(20):
            attn = np.exp(1.3 * rng.normal(size=n)).astype(np.float32)
            attn /= attn.sum()
            q1, q3 = np.percentile(attn, 25), np.percentile(attn, 75)
            bound = q3 + 1.5 * (q3 - q1)
            assert bound.dtype == np.float32
            ours = quartiles(jnp.asarray(attn))
            assert np.asarray(ours[0]) == q1 and np.asarray(ours[1]) == q3
            ours_bound = iqr_bound(q1, q3)
            assert np.asarray(ours_bound) == bound
