"""CPU attention paths: the blocked causal prefill and the heads-first cached (decode) attention equal the plain
masked softmax attention (float32: reordered sums only, so 1e-6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmprune.models import attention as att
from vlmprune.models.text.llama import _prefill_mask

ATOL = 1e-6  # float32, same products summed in another order


def _reference(q, k, v, mask):
    """Straight numpy float64 softmax attention; q (B,T,H,D), k/v (B,S,KVH,D), mask (B,1,T,S)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.asarray(mask), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


@pytest.mark.parametrize("t,kvh", [(300, 4), (129, 2), (128, 4), (40, 1)])
def test_blocked_causal_prefill_equals_full(t, kvh):
    rng = np.random.default_rng(t)
    b, h, d = 2, 4, 16
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, kvh, d)).astype(np.float32) for _ in range(2))
    key_mask = np.ones((b, t), bool)
    key_mask[1, :7] = False  # left padding in row 1
    mask = _prefill_mask(jnp.asarray(key_mask))
    got = jax.jit(lambda q, k, v: att.attention(q, k, v, mask=mask, causal=True))(q, k, v)
    full = jax.jit(lambda q, k, v: att.attention(q, k, v, mask=mask))(q, k, v)
    ref = _reference(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(got), ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(full), ref, atol=ATOL, rtol=0)


def test_cached_attention_equals_reference_on_heads_first_cache():
    rng = np.random.default_rng(0)
    b, s, h, kvh, d = 3, 50, 8, 2, 16
    q = rng.standard_normal((b, 1, h, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, kvh, d)).astype(np.float32) for _ in range(2))
    key_mask = rng.random((b, s)) < 0.7
    key_mask[:, 0] = True
    mask = jnp.asarray(key_mask)[:, None, None, :]
    got = att.cached_attention(jnp.asarray(q), jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=mask)
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("t", [300, 577])
def test_blocked_unmasked_attention_equals_reference(t):
    """The CLIP path (no mask, no causality) runs in query blocks too."""
    rng = np.random.default_rng(t)
    q, k, v = (rng.standard_normal((1, t, 3, 16)).astype(np.float32) for _ in range(3))
    got = jax.jit(lambda q, k, v: att.attention(q, k, v))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, np.ones((1, 1, t, t), bool)), atol=ATOL, rtol=0)


def test_query_with_every_key_masked_gets_mean_of_values():
    """A query that may see no key (a padding row) gets the mean of v, as softmax over finfo.min scores does,
    never NaN."""
    rng = np.random.default_rng(1)
    t = 200
    q, k, v = (rng.standard_normal((1, t, 2, 8)).astype(np.float32) for _ in range(3))
    mask = np.ones((1, 1, t, t), bool)
    mask[..., 150, :] = False
    got = np.asarray(jax.jit(lambda q, k, v: att.attention(q, k, v, mask=jnp.asarray(mask)))(q, k, v))
    np.testing.assert_allclose(got[0, 150], v[0].mean(0), atol=ATOL, rtol=0)
    keep = np.arange(t) != 150
    np.testing.assert_allclose(got[:, keep], _reference(q, k, v, mask)[:, keep], atol=ATOL, rtol=0)
