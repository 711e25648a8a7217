"""The baselines against their authors' own code: tests/golden/baselines/ (README there).

FasterVLM, DivPrune, VisionZip, PruMerge(+) and FastV: every stored case. Kept sets, pick orders and positions are
compared element for element; merged tokens within float32 bounds derived next to each assertion. Where the
original raises (PruMerge+ at N = 144) or pools its statistics over the batch (PruMerge(+) with B > 1) the
documented generalisation (per-image statistics, ``N - 1`` as the sampling end) is tested against an independent
NumPy transcription instead.
"""

from __future__ import annotations

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from reference.paths import TESTS_DIR
from vlmprune import prune
from vlmprune.prune import ops

GOLDEN = pathlib.Path(TESTS_DIR) / "golden" / "baselines"
META = json.loads((GOLDEN / "cases.json").read_text())
U32 = 2.0**-24  # float32 unit roundoff
U16 = 2.0**-11  # float16 unit roundoff


def _cases(method):
    return [pytest.param(c, id=f"case{c['case']}") for c in META[method]["cases"]]


_NPZ = {}


def _npz(method):
    if method not in _NPZ:
        _NPZ[method] = np.load(GOLDEN / f"{method}.npz")
    return _NPZ[method]


def test_every_method_has_cases_and_fp16_cases_are_present():
    dtypes = {m: {c.get("dtype", "float32") for c in META[m]["cases"]} for m in ("fastervlm", "divprune", "fastv")}
    assert all(META[m]["cases"] for m in ("fastervlm", "divprune", "visionzip", "prumerge", "fastv"))
    assert all("float16" in d for d in dtypes.values())


# ------------------------------------------------------------------------------------------------------------
# FasterVLM
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("fastervlm"))
def test_fastervlm_golden(case):
    z, i = _npz("fastervlm"), case["case"]
    ranked = z[f"c{i}_cls_attn_ranked"]  # in the case dtype, as the original ranks it
    sel = prune.fastervlm(jnp.asarray(ranked), num_keep=case["T"])
    np.testing.assert_array_equal(np.asarray(sel.mask(case["N"])), z[f"c{i}_mask"])
    np.testing.assert_array_equal(np.asarray(sel.indices), z[f"c{i}_kept"])
    scores = np.asarray(ops.head_mean(jnp.asarray(ranked)))
    golden = z[f"c{i}_scores"]
    assert scores.dtype == golden.dtype
    if golden.dtype == np.float16:
        # float32 sum rounded once to fp16: the same bits as torch (tests/test_rounding.py)
        np.testing.assert_array_equal(scores, golden)
    else:
        # float32: torch's CPU summation order depends on the tensor's shape (B = 1 here); each of the two sums of
        # H values is within (H - 1) u sum|a| of the exact sum, so they differ by at most 2 (H - 1) u sum|a|.
        bound = 2 * (case["H"] - 1) * U32 * ranked.astype(np.float64).sum(1) / case["H"]
        assert (np.abs(scores.astype(np.float64) - golden) <= bound).all()


# ------------------------------------------------------------------------------------------------------------
# DivPrune
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("divprune"))
def test_divprune_golden_picks_in_order(case):
    """Kept set and pick order element for element, fp16 case 3 (15 exact fp16 ties, first index) included."""
    z, i = _npz("divprune"), case["case"]
    emb = jnp.asarray(z[f"c{i}_embeddings"])
    assert emb.dtype == jnp.dtype(case["dtype"])
    k = case["num_keep"]
    assert k == prune.divprune_num_keep(case["N"], case["ratio"])
    np.testing.assert_array_equal(np.asarray(prune.divprune_picks(emb, num_keep=k)), z[f"c{i}_picks"])
    sel = prune.divprune(emb, num_keep=k)
    np.testing.assert_array_equal(np.asarray(sel.indices), z[f"c{i}_kept"])
    np.testing.assert_array_equal(np.asarray(sel.mask(case["N"])), z[f"c{i}_mask"])


def test_divprune_fp16_distance_matrix():
    """The fp16 case's ``1 - cos``: the normalised rows are torch's bits; the fp16 product (float32 accumulation,
    one rounding) can only differ from the original's by the rounding of a differently ordered float32 sum, i.e.
    at most one fp16 ulp, and only where the float32 value sits next to a rounding boundary (rare)."""
    z = _npz("divprune")
    (case,) = [c for c in META["divprune"]["cases"] if c["dtype"] == "float16"]
    i = case["case"]
    ours = np.asarray(prune.cosine_distance(jnp.asarray(z[f"c{i}_embeddings"][0]))).astype(np.float64)
    golden = z[f"c{i}_distance"].astype(np.float64)
    ulp = np.spacing(np.abs(golden).astype(np.float16)).astype(np.float64)
    assert (np.abs(ours - golden) <= ulp).all()
    assert (ours != golden).mean() < 1e-3


@pytest.mark.parametrize("case", [p for p in _cases("divprune") if p.values[0].get("save_inputs")])
def test_divprune_golden_from_the_projector(case):
    """Cases with stored pre-projector features: our float32 projection feeds the same picks."""
    z, i = _npz("divprune"), case["case"]
    emb = ops.matmul(jnp.asarray(z[f"c{i}_features"][0]), jnp.asarray(z[f"c{i}_projector"]).T)[None]
    # C-term float32 dot products in another order: within 2 C u sum|x w| of each other
    golden = z[f"c{i}_embeddings"]
    bound = 2 * case["C"] * U32 * (np.abs(z[f"c{i}_features"][0]) @ np.abs(z[f"c{i}_projector"]).T)
    assert (np.abs(np.asarray(emb)[0] - golden[0]) <= bound).all()
    np.testing.assert_array_equal(np.asarray(prune.divprune_picks(emb, num_keep=case["num_keep"])), z[f"c{i}_picks"])


# ------------------------------------------------------------------------------------------------------------
# VisionZip
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("visionzip"))
def test_visionzip_golden(case):
    z, i = _npz("visionzip"), case["case"]
    hidden, keys = z[f"c{i}_hidden_with_cls"], z[f"c{i}_keys"]
    dom, ctx = case["dominant"], case["contextual"]
    out = prune.visionzip(
        jnp.asarray(hidden), jnp.asarray(z[f"c{i}_cls_attn"]), jnp.asarray(keys), dominant=dom, contextual=ctx
    )
    golden = z[f"c{i}_tokens"]
    tokens = np.asarray(out.tokens)
    assert tokens.shape == golden.shape and np.asarray(out.valid).all()
    # dominant tokens (CLS first, then raster order) are copies: exact
    np.testing.assert_array_equal(tokens[:, :dom], golden[:, :dom])
    # anchors = dominant patches and contextual targets, element for element
    expected = z[f"c{i}_dominant_mask"].copy()
    for b in range(case["B"]):
        expected[b, z[f"c{i}_contextual_targets"][b]] = True
    np.testing.assert_array_equal(np.asarray(out.selection.mask(case["N"])), expected)
    # contextual tokens: target + (sum of the n tokens assigned to it) / n. Two float32 sums of n terms in different
    # orders differ by at most 2 (n - 1) u sum|x|; the division and the final add round once each (2 u |result|).
    # With n <= R and |x| <= max|x|: |ours - original| <= (2 R + 2) u max|x| (R = remaining tokens).
    bound = (2 * case["remaining"] + 2) * U32 * np.abs(hidden).max()
    err = np.abs(tokens[:, dom:] - golden[:, dom:]).max()
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("case", _cases("visionzip"))
def test_visionzip_metric_is_the_head_mean_of_the_keys(case):
    """The original's metric ``raw_key_states.mean(1)``: our torch-order head mean, within the reordering bound
    (torch's order for this shape is not the one the contiguous (B, H, N) test pins down)."""
    z, i = _npz("visionzip"), case["case"]
    keys = z[f"c{i}_keys"]  # (B, 1+N, H, dh)
    ours = np.asarray(ops.mean(jnp.asarray(keys), axis=2))
    h = keys.shape[2]
    bound = 2 * (h - 1) * U32 * np.abs(keys).sum(2) / h + U32 * np.abs(ours)
    assert (np.abs(ours - z[f"c{i}_metric"]) <= bound).all()


# ------------------------------------------------------------------------------------------------------------
# PruMerge / PruMerge+
# ------------------------------------------------------------------------------------------------------------


def _reference_prumerge(features, attn, keys, *, plus, outlier_ratio=None, num_neighbors=32):
    """Independent float64 NumPy transcription of one image's PruMerge(+), as the original's loop computes it.

    ``outlier_ratio`` overrides the image's own IQR outlier share (to emulate the original's batch pooling).
    Returns (anchor indices in output order, tokens (K + 1, C))."""
    n = attn.shape[0]
    if outlier_ratio is None:
        a32 = attn.astype(np.float32)
        q1, q3 = np.percentile(a32, 25), np.percentile(a32, 75)
        outlier_ratio = int((a32 > q3 + 1.5 * (q3 - q1)).sum()) / n
    idx = [int(j) for j in np.argsort(-attn, kind="stable")[: int(n * outlier_ratio)]]
    if plus:
        stride = int(int(1 / outlier_ratio) / 3)
        idx += [s for s in range(0, n - 1, stride) if s not in idx]  # generalised end: N - 1 (575 for N = 576)
    x, a = features.astype(np.float64), attn.astype(np.float64)
    k = keys.astype(np.float64)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    tokens = []
    for i in idx:
        sim = k @ k[i]
        sim[i] = -np.inf
        nb = np.argsort(-sim, kind="stable")[: min(num_neighbors, n - 1)]
        tokens.append(x[i] + (a[nb, None] * x[nb]).sum(0))
    pruned = np.setdiff1d(np.arange(n), idx)
    tokens.append((a[pruned, None] * x[pruned]).sum(0))
    return np.asarray(idx), np.stack(tokens)


def _prumerge_inputs(z, i):
    return z[f"c{i}_hidden_with_cls"][:, 1:], z[f"c{i}_cls_attn"], z[f"c{i}_k"][:, 1:]


def _merge_bound(features, num_neighbors=32):
    """|ours - other| for a merged token x_i + sum_j a_j x_j (<= N terms, sum a_j <= 1, a >= 0): each float32
    evaluation is within N u (|x_i| + sum_j a_j |x_j|) <= 2 N u max|x| of the exact value, so two evaluations
    differ by at most 4 N u max|x| (the extra token is a sum of the same form)."""
    return 4 * features.shape[-2] * U32 * np.abs(features).max()


@pytest.mark.parametrize(
    "case", [p for p in _cases("prumerge") if p.values[0]["B"] == 1 and "original_error" not in p.values[0]]
)
def test_prumerge_golden(case):
    z, i = _npz("prumerge"), case["case"]
    features, attn, keys = _prumerge_inputs(z, i)
    out = prune.prumerge_plus(jnp.asarray(features), jnp.asarray(attn), jnp.asarray(keys), plus=case["plus"])
    golden = z[f"c{i}_tokens"]
    count = golden.shape[1]
    valid = np.asarray(out.valid)
    assert valid[0, :count].all() and not valid[0, count:].any()
    np.testing.assert_array_equal(np.asarray(out.selection.mask(case["N"])), z[f"c{i}_anchor_mask"])
    tokens = np.asarray(out.tokens)[:, :count]
    assert np.abs(tokens - golden).max() <= _merge_bound(features)
    # the transcription used for the generalised cases below reproduces the original here
    idx, ref = _reference_prumerge(features[0], attn[0], keys[0], plus=case["plus"])
    np.testing.assert_array_equal(idx, z[f"c{i}_idx"][0])
    assert np.abs(ref - golden[0]).max() <= _merge_bound(features)


def test_prumerge_plus_small_grid_generalisation():
    """PruMerge+ at N = 144: the original samples ``arange(0, 575, stride)`` and raises; we sample
    ``arange(0, N - 1, stride)`` (documented in ``prumerge_tables``) and otherwise follow the original."""
    z = _npz("prumerge")
    (case,) = [c for c in META["prumerge"]["cases"] if "original_error" in c]
    i = case["case"]
    features, attn, keys = _prumerge_inputs(z, i)
    out = prune.prumerge_plus(jnp.asarray(features), jnp.asarray(attn), jnp.asarray(keys), plus=True)
    idx, ref = _reference_prumerge(features[0], attn[0], keys[0], plus=True)
    count = len(idx) + 1
    valid = np.asarray(out.valid)[0]
    assert valid[:count].all() and not valid[count:].any()
    mask = np.zeros(case["N"], bool)
    mask[idx] = True
    np.testing.assert_array_equal(np.asarray(out.selection.mask(case["N"]))[0], mask)
    assert np.abs(np.asarray(out.tokens)[0, :count] - ref).max() <= _merge_bound(features)


def test_prumerge_batch_uses_per_image_statistics():
    """PruMerge with B = 2: the original pools the IQR outlier count over the batch (B N values) and keeps
    ``int(N * pooled_ratio)`` per image; we use each image's own statistics (documented generalisation). So each
    image of the batch equals that image run alone, and equals the transcription with per-image statistics; the
    transcription with pooled statistics reproduces the stored (pooled) original output."""
    z = _npz("prumerge")
    (case,) = [c for c in META["prumerge"]["cases"] if c["B"] > 1 and "original_error" not in c]
    i, n = case["case"], case["N"]
    features, attn, keys = _prumerge_inputs(z, i)
    batched = prune.prumerge_plus(jnp.asarray(features), jnp.asarray(attn), jnp.asarray(keys), plus=case["plus"])
    pooled = attn.astype(np.float32).ravel()
    q1, q3 = np.percentile(pooled, 25), np.percentile(pooled, 75)
    pooled_ratio = int((pooled > q3 + 1.5 * (q3 - q1)).sum()) / pooled.size
    own_counts = []
    for b in range(case["B"]):
        alone = prune.prumerge_plus(
            jnp.asarray(features[b : b + 1]),
            jnp.asarray(attn[b : b + 1]),
            jnp.asarray(keys[b : b + 1]),
            plus=case["plus"],
        )
        np.testing.assert_array_equal(np.asarray(batched.valid[b]), np.asarray(alone.valid[0]))
        np.testing.assert_array_equal(np.asarray(batched.selection.indices[b]), np.asarray(alone.selection.indices[0]))
        np.testing.assert_array_equal(np.asarray(batched.tokens[b]), np.asarray(alone.tokens[0]))
        idx, ref = _reference_prumerge(features[b], attn[b], keys[b], plus=case["plus"])
        count = len(idx) + 1
        own_counts.append(len(idx))
        assert np.asarray(batched.valid[b]).sum() == count
        mask = np.zeros(n, bool)
        mask[idx] = True
        np.testing.assert_array_equal(np.asarray(batched.selection.mask(n))[b], mask)
        assert np.abs(np.asarray(batched.tokens[b, :count]) - ref).max() <= _merge_bound(features)
        # the pooled original, for the record
        idx_p, ref_p = _reference_prumerge(features[b], attn[b], keys[b], plus=case["plus"], outlier_ratio=pooled_ratio)
        np.testing.assert_array_equal(idx_p, z[f"c{i}_idx"][b])
        assert np.abs(ref_p - z[f"c{i}_tokens"][b]).max() <= _merge_bound(features)
    # the case is one where pooling matters, so the two rules are really told apart
    assert own_counts != [int(n * pooled_ratio)] * case["B"]


# ------------------------------------------------------------------------------------------------------------
# FastV
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _cases("fastv"))
def test_fastv_golden(case):
    z, i = _npz("fastv"), case["case"]
    s, n, length = case["S"], case["N"], case["L"]
    attn = z[f"c{i}_last_row_attn"]  # (1, H, L), the case dtype
    assert attn.dtype == np.dtype(case["dtype"])
    sel = prune.fastv_select(jnp.asarray(attn[:, :, s : s + n]), num_keep=case["rank"])
    np.testing.assert_array_equal(np.asarray(sel.indices), z[f"c{i}_kept_image"])
    np.testing.assert_array_equal(np.asarray(sel.mask(n)), z[f"c{i}_image_mask"])
    # sequence slots after layer K: the prompt before the image, the kept image tokens, everything after
    positions = np.concatenate([np.arange(s), s + np.asarray(sel.indices[0]), np.arange(s + n, length)])
    np.testing.assert_array_equal(positions, z[f"c{i}_keep_positions"][0])
    scores = np.asarray(ops.head_mean(jnp.asarray(attn)))[0]
    golden = z[f"c{i}_scores"]
    if golden.dtype == np.float16:
        np.testing.assert_array_equal(scores, golden)  # float32 sum, one rounding: torch's bits
    else:
        bound = 2 * (case["H"] - 1) * U32 * attn[0].astype(np.float64).sum(0) / case["H"]  # see FasterVLM
        assert (np.abs(scores.astype(np.float64) - golden) <= bound).all()
