"""Baselines (docs/methods.md §5): random, uniform, DivPrune, VisionZip, PruMerge(+), FastV selection.

DivPrune, VisionZip and PruMerge(+) are checked against small, literal torch/NumPy transcriptions of
docs/methods.md (loops, torch.topk / argmax) on random, tie-free inputs.
"""

from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from vlmprune.prune.baselines import (
    MergeResult,
    _divprune_jit,
    _prumerge_jit,
    _visionzip_jit,
    divprune,
    divprune_num_keep,
    fastv_select,
    prumerge_plus,
    prumerge_tables,
    random_keep,
    uniform,
    uniform_grid_indices,
    visionzip,
)

SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _softmax_rows(rng, shape, scale=2.0):
    logits = scale * rng.standard_t(3, size=shape)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _check_selection(sel, n, k):
    idx = np.asarray(sel.indices)
    assert idx.dtype == np.int32 and idx.shape[-1] == k and np.asarray(sel.valid).all()
    assert (np.diff(idx, axis=-1) > 0).all() and idx.min() >= 0 and idx.max() < n


# ------------------------------------------------------------------------------------------------------------
# References (literal transcriptions of docs/methods.md, one image at a time)
# ------------------------------------------------------------------------------------------------------------


def ref_divprune(x, k):
    """§5.6: D = 1 - cos; pick 0 = argmax of each column's second-smallest; then max-min."""
    x = torch.tensor(x, dtype=torch.float64)
    xn = x / x.norm(dim=1, keepdim=True)
    dist = 1.0 - xn @ xn.T
    picked = []
    for i in range(k):
        if i == 0:
            scores = torch.topk(dist, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(dist[torch.tensor(picked)], dim=0).values
        picked.append(int(torch.argmax(scores)))
    return sorted(picked)


def ref_visionzip(hidden, attn, keys, dominant, contextual):
    """§5.5 on one image: hidden (1+N, C), attn (H, N), keys (1+N, H, dh) -> (tokens, anchor patch ids)."""
    hidden, attn, keys = (torch.tensor(a, dtype=torch.float64) for a in (hidden, attn, keys))
    top = torch.topk(attn.sum(0), dominant - 1).indices + 1
    rest = torch.ones(hidden.shape[0], dtype=torch.bool)
    rest[0] = False
    rest[top] = False
    out = [hidden[~rest]]  # boolean indexing: ascending (CLS, then raster)
    anchors = (top - 1).tolist()
    if contextual:
        metric = keys.mean(1)[rest]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        hidden_rest = hidden[rest]
        rest_ids = torch.nonzero(rest)[:, 0]
        r = metric.shape[0]
        targets = torch.arange(0, r, max(1, r // contextual))[:contextual]
        others = ~torch.isin(torch.arange(r), targets)
        assign = (metric[others] @ metric[targets].T).argmax(dim=1)
        merged = []
        for t in range(contextual):
            members = hidden_rest[others][assign == t]
            mean = members.sum(0) / max(len(members), 1)
            merged.append(hidden_rest[targets[t]] + mean)
        out.append(torch.stack(merged))
        anchors += (rest_ids[targets] - 1).tolist()
    return torch.cat(out).numpy(), sorted(anchors)


def ref_prumerge(features, attn, keys, plus, neighbors=32):
    """§5.4 on one image, with the original's loop structure. Returns (tokens (K, C), kept ids)."""
    n = len(attn)
    q1, q3 = np.percentile(attn, 25), np.percentile(attn, 75)
    ratio = np.sum(attn > q3 + 1.5 * (q3 - q1)) / n
    idx = torch.topk(torch.tensor(attn), int(n * ratio)).indices.tolist()  # descending score
    if plus:
        stride = int(int(1 / ratio) / 3)
        idx += [s for s in range(0, n - 1, stride) if s not in idx]  # `575` = N - 1
    compl = [j for j in range(n) if j not in idx]
    f = features.astype(np.float64)
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    out = []
    for pos, i in enumerate(idx):
        rest = idx[:pos] + idx[pos + 1 :] + compl
        sims = torch.tensor(kn[rest] @ kn[i])
        cluster = [rest[t] for t in torch.topk(sims, neighbors).indices.tolist()]
        out.append(f[i] + sum(attn[j] * f[j] for j in cluster))
    out.append(sum((attn[j] * f[j] for j in compl), np.zeros(f.shape[1])))
    return np.stack(out), sorted(idx)


# ------------------------------------------------------------------------------------------------------------
# random_keep / uniform
# ------------------------------------------------------------------------------------------------------------


def test_random_keep_shapes_and_determinism():
    key = jax.random.PRNGKey(0)
    one = random_keep(key, 50, num_keep=7)
    _check_selection(one, 50, 7)
    assert one.indices.shape == (7,)
    many = random_keep(key, 50, num_keep=7, batch=4)
    _check_selection(many, 50, 7)
    assert many.indices.shape == (4, 7)
    assert len({tuple(r) for r in np.asarray(many.indices).tolist()}) > 1  # items are drawn independently
    np.testing.assert_array_equal(many.indices, random_keep(key, 50, num_keep=7, batch=4).indices)
    assert np.asarray(random_keep(jax.random.key(3), 5, num_keep=5).indices).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("rows,cols", [(24, 24), (5, 7), (1, 9), (6, 1)])
def test_uniform_exact_count_every_budget(rows, cols):
    n = rows * cols
    for k in range(1, n + 1):
        idx = uniform_grid_indices(k, rows, cols)
        assert len(idx) == k and len(np.unique(idx)) == k and idx.min() >= 0 and idx.max() < n


def test_uniform_examples():
    lattice = np.asarray(uniform(576, num_keep=64).indices).reshape(8, 8)
    expect = np.array([1, 4, 7, 10, 13, 16, 19, 22])
    np.testing.assert_array_equal(lattice, expect[:, None] * 24 + expect[None, :])
    lattice = np.asarray(uniform(576, num_keep=144).indices).reshape(12, 12)
    np.testing.assert_array_equal(lattice[0], np.arange(1, 24, 2) + 24)
    np.testing.assert_array_equal(uniform(576, num_keep=576).indices, np.arange(576))
    assert np.asarray(uniform(12, num_keep=5, grid=(3, 4)).indices).tolist() == [1, 3, 8, 10, 11]
    sel = jax.jit(lambda: uniform(16, num_keep=4))()  # a constant: fine under jit
    assert np.asarray(sel.indices).tolist() == [5, 7, 13, 15]


# ------------------------------------------------------------------------------------------------------------
# DivPrune
# ------------------------------------------------------------------------------------------------------------


@SLOW
@given(n=st.sampled_from([5, 12, 30]), data=st.data())
def test_divprune_matches_reference(n, data):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    x = rng.normal(size=(3, n, 6)).astype(np.float32)
    sel = divprune(jnp.asarray(x[:2]), num_keep=k)
    _check_selection(sel, n, k)
    for b in range(2):
        assert np.asarray(sel.indices[b]).tolist() == ref_divprune(x[b], k)
    other = divprune(jnp.asarray(x[[0, 2]]), num_keep=k)  # item 0 does not depend on item 1
    np.testing.assert_array_equal(other.indices[0], sel.indices[0])


def test_divprune_duplicates_still_give_k_distinct_tokens():
    x = np.repeat(np.random.default_rng(0).normal(size=(1, 3, 4)), 4, axis=1).astype(np.float32)  # 3 unique rows
    _check_selection(divprune(jnp.asarray(x), num_keep=8), 12, 8)


def test_divprune_budget_helper():
    assert divprune_num_keep(576) == 56
    assert divprune_num_keep(2880, 0.1) == 288


# ------------------------------------------------------------------------------------------------------------
# VisionZip
# ------------------------------------------------------------------------------------------------------------


def _visionzip_inputs(seed, batch, n, c=5, heads=3, dh=4):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, 1 + n, c)).astype(np.float32)
    attn = _softmax_rows(rng, (batch, heads, 1 + n))[:, :, 1:].astype(np.float32)
    keys = rng.normal(size=(batch, 1 + n, heads, dh)).astype(np.float32)
    return hidden, attn, keys


@SLOW
@given(n=st.sampled_from([9, 20]), data=st.data())
def test_visionzip_matches_reference(n, data):
    dominant = data.draw(st.integers(1, 1 + n))
    contextual = data.draw(st.integers(0, 1 + n - dominant))
    hidden, attn, keys = _visionzip_inputs(data.draw(st.integers(0, 2**31 - 1)), 3, n)
    res = visionzip(
        jnp.asarray(hidden[:2]), jnp.asarray(attn[:2]), jnp.asarray(keys[:2]), dominant=dominant, contextual=contextual
    )
    assert isinstance(res, MergeResult)
    assert res.tokens.shape == (2, dominant + contextual, hidden.shape[2]) and np.asarray(res.valid).all()
    for b in range(2):
        tokens, anchors = ref_visionzip(hidden[b], attn[b], keys[b], dominant, contextual)
        np.testing.assert_allclose(res.tokens[b], tokens, rtol=1e-5, atol=1e-5)
        assert np.asarray(res.selection.indices[b]).tolist() == anchors
    other = visionzip(
        jnp.asarray(hidden[[0, 2]]),
        jnp.asarray(attn[[0, 2]]),
        jnp.asarray(keys[[0, 2]]),
        dominant=dominant,
        contextual=contextual,
    )
    np.testing.assert_array_equal(other.tokens[0], res.tokens[0])


def test_visionzip_readme_setting_576():
    hidden, attn, keys = _visionzip_inputs(1, 1, 576, c=16, heads=4, dh=8)
    res = visionzip(jnp.asarray(hidden), jnp.asarray(attn), jnp.asarray(keys), dominant=54, contextual=10)
    tokens, anchors = ref_visionzip(hidden[0], attn[0], keys[0], 54, 10)
    np.testing.assert_allclose(res.tokens[0], tokens, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.tokens[0, 0], hidden[0, 0])  # CLS first
    assert np.asarray(res.selection.indices[0]).tolist() == anchors and len(anchors) == 63


# ------------------------------------------------------------------------------------------------------------
# PruMerge / PruMerge+
# ------------------------------------------------------------------------------------------------------------


def _prumerge_inputs(seed, batch, n, c=6, d=5):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, n, c)).astype(np.float32)
    attn = _softmax_rows(rng, (batch, n + 1), scale=1.5)[:, 1:].astype(np.float32)
    keys = rng.normal(size=(batch, n, d)).astype(np.float32)
    return features, attn, keys


@SLOW
@given(plus=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_prumerge_matches_reference(plus, seed):
    n = 48
    features, attn, keys = _prumerge_inputs(seed, 3, n)
    res = prumerge_plus(jnp.asarray(features[:2]), jnp.asarray(attn[:2]), jnp.asarray(keys[:2]), plus=plus)
    assert res.tokens.shape == (2, n + 1, features.shape[2])
    for b in range(2):
        tokens, kept = ref_prumerge(features[b], attn[b], keys[b], plus)
        count = int(np.asarray(res.valid[b]).sum())
        assert count == len(tokens) and np.asarray(res.valid[b, :count]).all()
        np.testing.assert_allclose(res.tokens[b, :count], tokens, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(res.tokens[b, count:], 0)
        assert int(res.selection.count[b]) == len(kept)
        assert np.asarray(res.selection.indices[b, : len(kept)]).tolist() == kept
    other = prumerge_plus(
        jnp.asarray(features[[0, 2]]), jnp.asarray(attn[[0, 2]]), jnp.asarray(keys[[0, 2]]), plus=plus
    )
    np.testing.assert_array_equal(other.tokens[0], res.tokens[0])


def test_prumerge_plus_576_single_image():
    features, attn, keys = _prumerge_inputs(5, 1, 576, c=8, d=8)
    res = prumerge_plus(jnp.asarray(features), jnp.asarray(attn), jnp.asarray(keys), plus=True)
    tokens, kept = ref_prumerge(features[0], attn[0], keys[0], True)
    count = int(res.valid[0].sum())
    assert count == len(tokens) and 1 < len(kept) < 576
    np.testing.assert_allclose(res.tokens[0, :count], tokens, rtol=1e-5, atol=1e-5)


def test_prumerge_tables():
    keep, samples = prumerge_tables(22, plus=True)
    assert keep[15] == 14  # int(22 * (15 / 22)) == 14: the original's float round trip, kept on purpose
    assert (keep[np.arange(23) != 15] == np.delete(np.arange(23), 15)).all()
    assert np.flatnonzero(samples[0]).tolist() == [0]  # c = 0: the original divides by zero
    assert np.flatnonzero(samples[2]).tolist() == list(range(0, 21, 3))  # int(int(11) / 3) = 3, up to N-1
    assert samples[22].sum() == 21  # stride 0 (the original raises) -> stride 1
    _, none = prumerge_tables(22, plus=False)
    assert not none.any()


def test_prumerge_no_outliers():
    """Equal attentions: IQR = 0 and nothing lies above Q3 -> c = 0."""
    features, _, keys = _prumerge_inputs(0, 2, 48)  # the shapes of test_prumerge_matches_reference
    attn = jnp.full((2, 48), 1 / 49, jnp.float32)
    plain = prumerge_plus(jnp.asarray(features), attn, jnp.asarray(keys), plus=False)
    assert np.asarray(plain.valid.sum(1)).tolist() == [1, 1] and np.asarray(plain.selection.count).tolist() == [0, 0]
    np.testing.assert_allclose(plain.tokens[:, 0], features.sum(1) / 49, rtol=1e-5, atol=1e-6)
    plus = prumerge_plus(jnp.asarray(features), attn, jnp.asarray(keys), plus=True)
    assert np.asarray(plus.valid.sum(1)).tolist() == [2, 2]
    assert np.asarray(plus.selection.indices[:, :1]).tolist() == [[0], [0]]


def test_prumerge_small_n_caps_neighbors():
    features, attn, keys = _prumerge_inputs(2, 1, 12)
    res = prumerge_plus(jnp.asarray(features), jnp.asarray(attn), jnp.asarray(keys), plus=False)
    tokens, _ = ref_prumerge(features[0], attn[0], keys[0], False, neighbors=11)
    np.testing.assert_allclose(res.tokens[0, : len(tokens)], tokens, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# FastV
# ------------------------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), data=st.data())
def test_fastv_select_is_topk_of_head_mean(n, data):
    k = data.draw(st.integers(1, n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    attn = rng.random((2, 4, n)).astype(np.float32)
    sel = fastv_select(jnp.asarray(attn), num_keep=k)
    _check_selection(sel, n, k)
    for b in range(2):
        expect = torch.topk(torch.tensor(attn[b], dtype=torch.float64).mean(0), k).indices
        assert np.asarray(sel.indices[b]).tolist() == sorted(expect.tolist())


# ------------------------------------------------------------------------------------------------------------
# jit / vmap / eager, compile counts
# ------------------------------------------------------------------------------------------------------------


def _calls():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 6)), jnp.float32)
    hidden, attn, keys = (jnp.asarray(a) for a in _visionzip_inputs(0, 2, 10))
    features, attn1, keys1 = (jnp.asarray(a) for a in _prumerge_inputs(0, 2, 48))
    return {
        "divprune": ((x,), lambda x: divprune(x, num_keep=4).indices),
        "visionzip": ((hidden, attn, keys), lambda h, a, k: visionzip(h, a, k, dominant=4, contextual=3).tokens),
        "prumerge_plus": ((features, attn1, keys1), lambda f, a, k: prumerge_plus(f, a, k).tokens),
        "fastv_select": ((attn,), lambda a: fastv_select(a, num_keep=3).indices),
    }


# Op-by-op execution (jax.disable_jit) compiles every primitive separately: 10-20 s for VisionZip/PruMerge on
# 2 CPU cores, so it is exercised on the two cheaper methods only (and on VisPruner in its own file).
EAGER = {"divprune", "fastv_select"}


@pytest.mark.parametrize("name", ["divprune", "visionzip", "prumerge_plus", "fastv_select"])
def test_jit_vmap_eager_agree(name):
    args, fn = _calls()[name]
    plain = fn(*args)
    np.testing.assert_array_equal(jax.jit(fn)(*args), plain)
    split = [a[:, None] for a in args]  # vmap over the batch, each call sees a batch of one
    vmapped = jax.vmap(fn)(*split)
    np.testing.assert_allclose(vmapped.reshape(plain.shape), plain, rtol=1e-6, atol=1e-6)
    if name in EAGER:
        with jax.disable_jit():
            eager = fn(*args)
        np.testing.assert_allclose(eager, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "name,jitted",
    [("divprune", _divprune_jit), ("visionzip", _visionzip_jit), ("prumerge_plus", _prumerge_jit)],
)
def test_compiles_once_per_configuration(name, jitted):
    args, fn = _calls()[name]
    fn(*args)
    before = jitted._cache_size()
    fn(*args)
    fn(*(a + 1 if a.dtype == jnp.float32 and i == 0 else a for i, a in enumerate(args)))
    assert jitted._cache_size() == before


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


def test_validation_errors():
    x = jnp.zeros((2, 16, 4), jnp.float32) + jnp.arange(4.0)
    with pytest.raises(ValueError, match=r"random_keep: num_keep must be in \[1, N=10\], got 11"):
        random_keep(jax.random.PRNGKey(0), 10, num_keep=11)
    with pytest.raises(ValueError, match="random_keep: batch must be >= 1"):
        random_keep(jax.random.PRNGKey(0), 10, num_keep=1, batch=0)
    with pytest.raises(ValueError, match="random_keep: key must be a JAX PRNG key"):
        random_keep(0, 10, num_keep=1)
    with pytest.raises(ValueError, match=r"uniform: num_keep must be in \[1, N=16\], got 0"):
        uniform(16, num_keep=0)
    with pytest.raises(ValueError, match="N=15 is not a perfect square"):
        uniform(15, num_keep=3)
    with pytest.raises(ValueError, match="grid 3x4 does not cover N=16"):
        uniform(16, num_keep=3, grid=(3, 4))
    with pytest.raises(ValueError, match=r"divprune: num_keep must be in \[1, N=16\], got 17"):
        divprune(x, num_keep=17)
    with pytest.raises(ValueError, match=r"divprune: embeddings must have rank 3 \(B, N, D\)"):
        divprune(x[0], num_keep=2)
    with pytest.raises(ValueError, match="divprune: embeddings contains 1 NaN/inf"):
        divprune(x.at[0, 0, 0].set(jnp.nan), num_keep=2)

    hidden, attn, keys = (jnp.asarray(a) for a in _visionzip_inputs(0, 2, 10))
    with pytest.raises(ValueError, match=r"dominant \(CLS included\) must be in \[1, 1\+N=11\], got 12"):
        visionzip(hidden, attn, keys, dominant=12, contextual=0)
    with pytest.raises(ValueError, match=r"contextual must be in \[0, 1\+N-dominant=6\], got 7"):
        visionzip(hidden, attn, keys, dominant=5, contextual=7)
    with pytest.raises(ValueError, match=r"tokens 1\+N \(11\) does not match 1 \+ cls_attn tokens N \(10\)"):
        visionzip(hidden, attn[:, :, :9], keys, dominant=5, contextual=1)
    with pytest.raises(ValueError, match=r"cls_attn heads H \(2\) does not match keys heads H \(3\)"):
        visionzip(hidden, attn[:, :2], keys, dominant=5, contextual=1)
    with pytest.raises(ValueError, match=r"keys must have rank 4 \(B, 1\+N, H, dh\)"):
        visionzip(hidden, attn, keys[..., 0], dominant=5, contextual=1)
    with pytest.raises(ValueError, match="visionzip: cls_attn contains 1 NaN/inf"):
        visionzip(hidden, attn.at[1, 1, 1].set(jnp.inf), keys, dominant=5, contextual=1)

    features, attn1, keys1 = (jnp.asarray(a) for a in _prumerge_inputs(0, 2, 36))
    with pytest.raises(ValueError, match=r"features batch \(2\) does not match cls_attn_1head batch \(1\)"):
        prumerge_plus(features, attn1[:1], keys1)
    with pytest.raises(ValueError, match=r"features tokens N \(36\) does not match keys tokens N \(35\)"):
        prumerge_plus(features, attn1, keys1[:, :35])
    with pytest.raises(ValueError, match=r"cls_attn_1head must have rank 2 \(B, N\)"):
        prumerge_plus(features, attn1[:, None], keys1)
    with pytest.raises(ValueError, match="plus must be a bool"):
        prumerge_plus(features, attn1, keys1, plus="yes")
    with pytest.raises(ValueError, match="num_neighbors must be >= 1"):
        prumerge_plus(features, attn1, keys1, num_neighbors=0)
    with pytest.raises(ValueError, match="prumerge_plus: keys contains 1 NaN/inf"):
        prumerge_plus(features, attn1, keys1.at[0, 0, 0].set(jnp.nan))

    with pytest.raises(ValueError, match=r"fastv_select: num_keep must be in \[1, N=10\], got 11"):
        fastv_select(attn, num_keep=11)
    with pytest.raises(ValueError, match=r"last_row_attn must have rank 3 \(B, H, N\)"):
        fastv_select(attn[0], num_keep=1)
