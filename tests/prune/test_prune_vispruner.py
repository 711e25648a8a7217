"""VisPruner (docs/methods.md §2) and FasterVLM (§5.1): golden parity, crash-case generalisation, properties."""

from __future__ import annotations

import json
import pathlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from reference.paths import TESTS_DIR
from vlmprune import prune
from vlmprune.prune.base import PruneContext, tokens_for_llm
from vlmprune.prune.ops import argsort_descending
from vlmprune.prune.vispruner import _vispruner_jit, fastervlm, vispruner, vispruner_plan
from vlmprune.types import VisionTaps

GOLDEN = pathlib.Path(TESTS_DIR) / "golden"
CASES = json.loads((GOLDEN / "cases_public.json").read_text())["vispruner"]


@pytest.fixture(scope="module")
def npz():
    return np.load(GOLDEN / "vispruner_public.npz")


def _inputs(npz, case):
    i = case["case"]
    return npz[f"c{i}_features"], npz[f"c{i}_cls_attn"], npz[f"c{i}_mask"]


def _random_inputs(seed, batch, n, c=8, heads=3):
    """Continuous random features (B, N, C) and softmax CLS-attention rows (B, H, N), float32."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, n, c)).astype(np.float32)
    logits = 2.0 * rng.normal(size=(batch, heads, n + 1))
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return features, attn[:, :, 1:].astype(np.float32)  # CLS row, patch columns (sums to < 1)


# ------------------------------------------------------------------------------------------------------------
# Independent NumPy transcription of §2.2 (lists and loops, float64), with the documented generalisation for
# the configurations where the original crashes (A = even positions, r capped at len(A)).
# ------------------------------------------------------------------------------------------------------------


def reference_vispruner(features, cls_attn, num_keep, ratio):
    """One tile: features (N, C), cls_attn (H, N) -> sorted list of kept indices."""
    score = cls_attn.astype(np.float64).mean(axis=0)
    order = [int(i) for i in np.argsort(-score, kind="stable")]
    t_imp = int(num_keep * ratio)
    t_div = num_keep - t_imp
    important, residual = order[:t_imp], order[t_imp:]
    # normalise in float32 like the implementation, then take exact (float64) dot products
    norm = np.sqrt(np.sum(features * features, axis=-1, keepdims=True, dtype=np.float32))
    x = (features / norm).astype(np.float64)
    while t_div > 0:
        r = min(8, len(residual) - t_div)
        if r <= 0:
            break
        side_a, side_b = residual[0::2], residual[1::2]
        r = min(r, len(side_a))
        best = (x[side_a] @ x[side_b].T).max(axis=1)
        survivors = np.argsort(-best, kind="stable")[r:]
        residual = [side_a[k] for k in survivors] + side_b
    return sorted(important + (residual if t_div > 0 else []))


def _important(cls_attn, num_keep, ratio):
    """The T_imp most-attended tokens of one tile (set)."""
    t_imp = int(num_keep * ratio)
    return set(np.argsort(-cls_attn.astype(np.float64).mean(0), kind="stable")[:t_imp].tolist())


def _check_selection(sel, n, num_keep):
    idx, valid = np.asarray(sel.indices), np.asarray(sel.valid)
    assert idx.dtype == np.int32 and idx.shape[-1] == num_keep
    assert valid.all()
    assert (np.diff(idx, axis=-1) > 0).all(), "indices must be strictly ascending (hence unique)"
    assert idx.min() >= 0 and idx.max() < n


# ------------------------------------------------------------------------------------------------------------
# Golden parity
# ------------------------------------------------------------------------------------------------------------


def _golden_param(case):
    return pytest.param(case, id=f"case{case['case']}")


def _torch_port(features, cls_attn, num_keep, ratio):
    """Literal float32 torch transcription of the original's selection (§2.2), with torch's own
    ``argsort(descending=True)``: a control that the golden cases need no particular tie order."""
    import torch

    feat, attn = torch.from_numpy(features), torch.from_numpy(cls_attn)
    t_imp = int(num_keep * ratio)
    t_div = num_keep - t_imp
    order = torch.argsort(attn.mean(0), descending=True)
    imp, res = order[:t_imp], order[t_imp:]
    xn = feat / feat.norm(dim=-1, keepdim=True)
    while t_div > 0:
        r = min(8, res.shape[0] - t_div)
        if r <= 0:
            break
        a, b = res[0::2], res[1::2]
        best = (xn[a] @ xn[b].T).max(dim=-1).values
        res = torch.cat([a[torch.argsort(best, descending=True)[r:]], b])
    sel = torch.cat([imp, res]) if t_div > 0 else imp
    mask = np.zeros(features.shape[0], bool)
    mask[sel.numpy()] = True
    return mask


def test_golden_cases_are_reproduced_by_a_literal_torch_port(npz):
    """Control: the original's computation, transcribed in torch, reproduces every golden mask on this machine."""
    for case in CASES:
        features, cls_attn, golden = _inputs(npz, case)
        for b in range(case["B"]):
            mask = _torch_port(features[b], cls_attn[b], case["visual_token_num"], case["important_ratio"])
            np.testing.assert_array_equal(mask, golden[b], err_msg=f"case {case['case']} item {b}")


def test_golden_has_all_eight_cases():
    assert [c["case"] for c in CASES] == list(range(8))


@pytest.mark.parametrize("case", [_golden_param(c) for c in CASES])
def test_golden_mask_parity(npz, case):
    """All 8 golden cases, element for element, through the pure function."""
    features, cls_attn, golden = _inputs(npz, case)
    sel = vispruner(
        jnp.asarray(features),
        jnp.asarray(cls_attn),
        num_keep=case["visual_token_num"],
        important_ratio=case["important_ratio"],
    )
    mask = np.asarray(sel.mask(case["N"]))
    assert mask.shape == golden.shape
    for b in range(case["B"]):
        np.testing.assert_array_equal(mask[b], golden[b], err_msg=f"case {case['case']} item {b}")


@pytest.mark.parametrize("case", [_golden_param(c) for c in CASES])
def test_golden_mask_parity_through_the_model_facing_pruner(npz, case):
    """All 8 golden cases through ``prune.VisPruner`` as the model calls it: ``prune`` on the taps (features, CLS
    attention keyed by layer), then ``tokens_for_llm`` with a projector (identity here), which must hand the LLM
    exactly the golden kept features in raster order."""
    features, cls_attn, golden = _inputs(npz, case)
    pruner = prune.VisPruner(num_keep=case["visual_token_num"], important_ratio=case["important_ratio"])
    taps = VisionTaps(features=jnp.asarray(features), cls_attn={-2: jnp.asarray(cls_attn)})
    result = pruner.prune(taps, PruneContext())
    mask = np.asarray(result.selection.mask(case["N"]))
    np.testing.assert_array_equal(mask, golden)
    tokens, valid = tokens_for_llm(result, taps, lambda x: x)
    assert np.asarray(valid).all()
    for b in range(case["B"]):
        np.testing.assert_array_equal(np.asarray(tokens[b]), features[b][golden[b]])


def test_golden_plans_match_original():
    """Every golden configuration is one the original runs (so no generalisation is involved)."""
    for case in CASES:
        assert vispruner_plan(case["N"], case["visual_token_num"], case["important_ratio"]).matches_original


def test_fastervlm_equals_golden_ratio_one(npz):
    """FasterVLM = VisPruner with important_ratio = 1.0: the golden case with r = 1 (case 4)."""
    (case,) = [c for c in CASES if c["important_ratio"] == 1.0]
    _, cls_attn, golden = _inputs(npz, case)
    sel = fastervlm(jnp.asarray(cls_attn), num_keep=case["visual_token_num"])
    np.testing.assert_array_equal(np.asarray(sel.mask(case["N"])), golden)


# ------------------------------------------------------------------------------------------------------------
# The static plan and the crash-case generalisation
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_keep,ratio,rounds",
    [(192, 0.5, 48), (128, 0.5, 56), (64, 0.5, 64), (32, 0.5, 68), (64, 0.75, 64), (576, 0.5, 0)],
)
def test_plan_round_counts_match_spec_table(num_keep, ratio, rounds):
    plan = vispruner_plan(576, num_keep, ratio)
    assert len(plan.rounds) == rounds and plan.matches_original
    assert all(r.removed == 8 for r in plan.rounds[:-1])
    size = plan.rounds[-1].size - plan.rounds[-1].removed if plan.rounds else 576 - plan.num_important
    assert size == plan.num_diverse


def test_plan_generalises_crashes():
    odd = vispruner_plan(576, 58, 0.5)  # T_imp = 29: R0 = 547 is odd
    assert not odd.matches_original and odd.rounds[0].size % 2 == 1
    small = vispruner_plan(576, 8, 0.5)  # T_div = 4: the last round has R = 12 and would remove 8 > 6
    assert not small.matches_original
    assert small.rounds[-2:] == ((12, 6), (6, 2))  # capped at len(A) = 6; the 2 left over go next round
    for plan in (odd, small):
        assert all(1 <= r.removed <= -(-r.size // 2) for r in plan.rounds)
        assert plan.rounds[-1].size - plan.rounds[-1].removed == plan.num_diverse


@pytest.mark.parametrize("num_keep,ratio", [(58, 0.5), (8, 0.5), (1, 0.0)])
def test_crash_configurations_return_exact_count_and_match_reference(num_keep, ratio):
    assert not vispruner_plan(576, num_keep, ratio).matches_original
    features, cls_attn = _random_inputs(seed=num_keep, batch=2, n=576, c=32, heads=4)
    sel = vispruner(jnp.asarray(features), jnp.asarray(cls_attn), num_keep=num_keep, important_ratio=ratio)
    _check_selection(sel, 576, num_keep)
    for b in range(2):
        kept = np.asarray(sel.indices[b]).tolist()
        assert _important(cls_attn[b], num_keep, ratio) <= set(kept)
        assert kept == reference_vispruner(features[b], cls_attn[b], num_keep, ratio)


# ------------------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------------------

RATIOS = st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.75, 1.0])


@st.composite
def configs(draw):
    n = draw(st.sampled_from([6, 13, 16, 24, 37]))
    return n, draw(st.integers(1, n)), draw(RATIOS), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_properties_and_reference(cfg):
    """Exact count; unique, ascending, in range; important tokens kept; equal to the NumPy reference; a batch
    item's selection does not depend on the other items."""
    n, num_keep, ratio, seed = cfg
    features, cls_attn = _random_inputs(seed, batch=3, n=n)
    sel = vispruner(jnp.asarray(features[:2]), jnp.asarray(cls_attn[:2]), num_keep=num_keep, important_ratio=ratio)
    _check_selection(sel, n, num_keep)
    for b in range(2):
        kept = np.asarray(sel.indices[b]).tolist()
        assert _important(cls_attn[b], num_keep, ratio) <= set(kept)
        assert kept == reference_vispruner(features[b], cls_attn[b], num_keep, ratio)
    swapped = vispruner(
        jnp.asarray(features[[0, 2]]), jnp.asarray(cls_attn[[0, 2]]), num_keep=num_keep, important_ratio=ratio
    )  # same shapes: no recompilation
    np.testing.assert_array_equal(swapped.indices[0], sel.indices[0])


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 24), data=st.data())
def test_fastervlm_equals_vispruner_ratio_one(n, data):
    num_keep = data.draw(st.integers(1, n))
    features, cls_attn = _random_inputs(data.draw(st.integers(0, 2**31 - 1)), batch=2, n=n)
    a = fastervlm(jnp.asarray(cls_attn), num_keep=num_keep)
    b = vispruner(jnp.asarray(features), jnp.asarray(cls_attn), num_keep=num_keep, important_ratio=1.0)
    np.testing.assert_array_equal(a.indices, b.indices)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 700), levels=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_argsort_descending_is_stable(n, levels, seed):
    """The rounds' and the attention order's argsort (a whole-axis ``lax.top_k``) equals NumPy's stable
    descending argsort, ties (few distinct levels, -inf padding) included: lower position first."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, size=(2, n)).astype(np.float32)
    x[rng.random((2, n)) < 0.2] = -np.inf
    got = np.asarray(jax.jit(argsort_descending)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.argsort(-x, axis=-1, kind="stable"))


def test_ties_resolve_to_lower_index():
    cls_attn = jnp.ones((1, 2, 10), jnp.float32)  # all scores equal
    features = jnp.asarray(_random_inputs(0, 1, 10)[0])
    assert np.asarray(fastervlm(cls_attn, num_keep=3).indices).tolist() == [[0, 1, 2]]
    assert np.asarray(vispruner(features, cls_attn, num_keep=3, important_ratio=1.0).indices).tolist() == [[0, 1, 2]]


def test_jit_vmap_eager_agree():
    n, num_keep, ratio = 16, 5, 0.5  # T_imp = 2; the single round is a generalised one (r = 8 > R/2 = 7)
    features, cls_attn = _random_inputs(7, batch=4, n=n)
    f, a = jnp.asarray(features), jnp.asarray(cls_attn)
    run = lambda f, a: vispruner(f, a, num_keep=num_keep, important_ratio=ratio).indices  # noqa: E731
    plain = run(f, a)
    jitted = jax.jit(run)(f, a)
    vmapped = jax.vmap(run)(f.reshape(2, 2, n, -1), a.reshape(2, 2, -1, n)).reshape(4, num_keep)
    with jax.disable_jit():
        eager = run(f, a)
    for other in (jitted, vmapped, eager):
        np.testing.assert_array_equal(plain, other)


def test_float16_features_run_and_keep_count():
    features, cls_attn = _random_inputs(3, batch=2, n=24)
    sel = vispruner(jnp.asarray(features, jnp.float16), jnp.asarray(cls_attn), num_keep=7, important_ratio=0.5)
    _check_selection(sel, 24, 7)


def test_compiles_once_per_configuration():
    features, cls_attn = _random_inputs(11, batch=2, n=20)
    f, a = jnp.asarray(features), jnp.asarray(cls_attn)
    before = _vispruner_jit._cache_size()
    vispruner(f, a, num_keep=6, important_ratio=0.5)
    vispruner(f + 1, a, num_keep=6, important_ratio=0.5)
    assert _vispruner_jit._cache_size() == before + 1


# ------------------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------------------


def test_validation_errors():
    features, cls_attn = (jnp.asarray(x) for x in _random_inputs(0, batch=2, n=16))
    with pytest.raises(ValueError, match=r"num_keep must be in \[1, N=16\], got 17"):
        vispruner(features, cls_attn, num_keep=17, important_ratio=0.5)
    with pytest.raises(ValueError, match=r"num_keep must be in \[1, N=16\], got 0"):
        vispruner(features, cls_attn, num_keep=0, important_ratio=0.5)
    with pytest.raises(ValueError, match="num_keep must be a Python int"):
        vispruner(features, cls_attn, num_keep=4.0, important_ratio=0.5)
    with pytest.raises(ValueError, match=r"important_ratio must be <= 1.0, got 1.5"):
        vispruner(features, cls_attn, num_keep=4, important_ratio=1.5)
    with pytest.raises(ValueError, match=r"important_ratio must be >= 0.0"):
        vispruner(features, cls_attn, num_keep=4, important_ratio=-0.1)
    with pytest.raises(ValueError, match=r"features must have rank 3 \(B, N, C\)"):
        vispruner(features[0], cls_attn, num_keep=4, important_ratio=0.5)
    with pytest.raises(ValueError, match=r"cls_attn must have rank 3 \(B, H, N\)"):
        vispruner(features, cls_attn[:, 0], num_keep=4, important_ratio=0.5)
    with pytest.raises(ValueError, match=r"features batch \(2\) does not match cls_attn batch \(1\)"):
        vispruner(features, cls_attn[:1], num_keep=4, important_ratio=0.5)
    with pytest.raises(ValueError, match=r"features tokens N \(16\) does not match cls_attn tokens N \(15\)"):
        vispruner(features, cls_attn[:, :, :15], num_keep=4, important_ratio=0.5)
    with pytest.raises(ValueError, match="cls_attn contains 1 NaN/inf"):
        vispruner(features, cls_attn.at[0, 0, 0].set(jnp.nan), num_keep=4, important_ratio=0.5)
    with pytest.raises(ValueError, match="features contains 1 NaN/inf"):
        vispruner(features.at[1, 2, 3].set(jnp.inf), cls_attn, num_keep=4, important_ratio=0.5)
    with pytest.raises(ValueError, match=r"fastervlm: num_keep must be in \[1, N=16\], got 20"):
        fastervlm(cls_attn, num_keep=20)
    with pytest.raises(ValueError, match="fastervlm: cls_attn contains"):
        fastervlm(cls_attn.at[0, 0, 0].set(jnp.inf), num_keep=2)


def test_finite_check_skipped_under_jit():
    """Inside a caller's jit the values are unknown: no error, the selection is still well formed."""
    features, cls_attn = (jnp.asarray(x) for x in _random_inputs(0, batch=1, n=8))
    out = jax.jit(lambda f, a: vispruner(f, a, num_keep=3, important_ratio=0.5).indices)(features, cls_attn)
    assert out.shape == (1, 3)


def test_fast_similarity_keeps_counts_and_important_tokens_and_agrees_on_separated_features():
    """exact_similarity=False: same count and important tokens always; on well-separated random features (no
    near-ties among best similarities) the same selection as the exact path."""
    rng = np.random.default_rng(3)
    b, n, c, h = 2, 96, 32, 4
    feats = rng.standard_normal((b, n, c)).astype(np.float32)
    attn = rng.random((b, h, n)).astype(np.float32)
    exact = vispruner(feats, attn, num_keep=24, important_ratio=0.5)
    fast = vispruner(feats, attn, num_keep=24, important_ratio=0.5, exact_similarity=False)
    np.testing.assert_array_equal(np.asarray(fast.indices), np.asarray(exact.indices))
    near_dup = np.repeat(feats[:, :12], 8, axis=1) + 1e-7 * rng.standard_normal((b, n, c)).astype(np.float32)
    fast = vispruner(near_dup, attn, num_keep=24, important_ratio=0.5, exact_similarity=False)
    idx = np.asarray(fast.indices)
    assert idx.shape == (b, 24) and all(len(set(r)) == 24 for r in idx.tolist())
    top = np.argsort(-attn.mean(1), axis=1, kind="stable")[:, :12]
    assert all(set(t) <= set(r) for t, r in zip(top.tolist(), idx.tolist()))
    with pytest.raises(ValueError, match="exact_similarity must be a bool"):
        vispruner(feats, attn, num_keep=24, important_ratio=0.5, exact_similarity="yes")


# ------------------------------------------------------------------------------------------------------------
# Numerics of the similarity keys (module docstring, "Numerics")
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [64, 1024, 4096])
def test_split_head_product_is_exact_in_float32(dim):
    """head + tail == x exactly, and a float32 matmul of heads equals the float64 product bit for bit."""
    from vlmprune.prune.ops import l2_normalize
    from vlmprune.prune.vispruner import _split_on_grid

    rng = np.random.default_rng(dim)
    x = l2_normalize(jnp.asarray(rng.standard_normal((96, dim)) * rng.random((96, 1)) ** 4, jnp.float32))
    head, tail = _split_on_grid(x)
    np.testing.assert_array_equal(np.asarray(head + tail), np.asarray(x))
    head64 = np.asarray(head, np.float64)
    got = np.asarray(jnp.matmul(head, head.T, precision=jax.lax.Precision.HIGHEST), np.float64)
    np.testing.assert_array_equal(got, head64 @ head64.T)  # exact: no tolerance


def _grid_of(keys):
    """Invert the key encoding: float32 keys -> the integers round(sim * 2**29)."""
    from vlmprune.prune.vispruner import _KEY_OFFSET

    return np.asarray(jax.lax.bitcast_convert_type(keys, jnp.int32), np.int64) - _KEY_OFFSET


def test_similarity_keys_are_near_exact_and_ordered(npz):
    """Keys decode to the float64 similarities within 1.1 grid units (2.0e-9); the plain float32 path is ~100x
    further off. Random rows and the near-duplicate golden case 1."""
    from vlmprune.prune.ops import l2_normalize
    from vlmprune.prune.vispruner import similarity_keys

    rng = np.random.default_rng(0)
    for feats in (rng.standard_normal((576, 1024)), npz["c1_features"][0]):
        x = l2_normalize(jnp.asarray(feats, jnp.float32))
        x64 = np.asarray(x, np.float64)
        want = x64 @ x64.T * 2.0**29
        keys = similarity_keys(x)
        grid = _grid_of(keys)
        # the head product is exact and on the grid; the correction Q + Q^T is rounded to it (<= 0.5 unit)
        # after float32 rounding of its own (the sum's ulp near 2**-6 is 0.5 unit): measured max 1.006 units
        assert np.abs(grid - want).max() <= 1.1
        plain = _grid_of(similarity_keys(x, exact=False))
        assert np.abs(plain - want).max() > 20.0  # the near-exact path is what buys the accuracy
        # Key order is grid order (and so similarity order): compare keys as floats against the integers.
        flat_keys, flat_grid = np.asarray(keys).ravel()[:4000], grid.ravel()[:4000]
        order = np.argsort(flat_keys, kind="stable")
        assert np.all(np.diff(flat_grid[order]) >= 0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-(2**29), 2**29 + 3), min_size=2, max_size=20))
def test_key_encoding_is_monotone_and_normal(values):
    """Grid integers -> float32 keys preserves order, and every key is a positive normal float."""
    from vlmprune.prune.vispruner import _keys_from_grid

    k = np.asarray(values, np.int32)
    keys = np.asarray(_keys_from_grid(jnp.asarray(k)))
    assert np.all(keys >= np.finfo(np.float32).tiny) and np.all(np.isfinite(keys))
    for i in range(len(k) - 1):
        assert np.sign(keys[i] - keys[i + 1]) == np.sign(int(k[i]) - int(k[i + 1]))
