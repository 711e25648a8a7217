"""VisPruner's SigLIP rule against the authors' code (golden vectors in tests/golden/siglip/) and, where the
original raises, against a NumPy transcription of the documented generalisation.

The golden SigLIP cases store the scoring layer's q and k, so the received attention is recomputed here by the
tower's own streaming function (``vlmprune.models.vision.siglip.received_attention``, the code the tower's tap
runs) and then fed through the selection; the stored column means are fed as well.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference.paths import TESTS_DIR
from reference.siglip_builders import build_hf_siglip, load_tower
from vlmprune.models.vision.siglip import received_attention
from vlmprune.prune.vispruner_siglip import (
    attention_order,
    siglip_score,
    vispruner_siglip,
    vispruner_siglip_plan,
)

GOLDEN = Path(TESTS_DIR) / "golden" / "siglip"


@pytest.fixture(scope="module")
def golden():
    meta = json.loads((GOLDEN / "cases.json").read_text())
    arrays = np.load(GOLDEN / "vispruner_siglip.npz")
    return {c["case"]: c for c in meta["vispruner_siglip"]}, meta["crashes"], arrays


def _inputs(z, case):
    """(features (B, N, C), q, k as (B, N, H, d)) of a case, following ``inputs_from``."""
    src = case.get("inputs_from", case["case"])
    q = jnp.asarray(z[f"c{src}_q"]).swapaxes(1, 2)
    k = jnp.asarray(z[f"c{src}_k"]).swapaxes(1, 2)
    return jnp.asarray(z[f"c{src}_features"]), q, k


def _mask(selection, n):
    return np.asarray(selection.mask(n))


# ---------------------------------------------------------------------------------------------------------
# NumPy transcription (float64) of the selection with the generalisation: the reference where no golden exists
# ---------------------------------------------------------------------------------------------------------


def reference_mask(features, score, num_keep, ratio):
    """Per tile: (mask (N,), smallest decision gaps along the path, rounds run). float64 throughout.

    The gaps: ``"attention"``, relative, between the scores at the T_imp cut and of adjacent residual tokens
    (round 1's split); ``"dedup"``, absolute, between adjacent sorted best-cosines of every round.

    The authors' loop, except that a round's A side is ``res[0::2]`` and B ``res[1::2]`` whatever the parity
    of the list, and a round deletes at most ``len(A)`` tokens (the documented generalisation).
    """
    n = score.shape[0]
    t_imp = int(num_keep * ratio)
    t_div = num_keep - t_imp
    order = np.argsort(-score, kind="stable")
    att = [abs(score[order[t_imp - 1]] - score[order[t_imp]]) / score[order[t_imp]]] if 0 < t_imp < n else []
    res_scores = score[order[t_imp:]]
    if t_div > 0 and len(res_scores) > 1:  # the residual order feeds round 1's split
        att.append(np.min(np.abs(np.diff(res_scores)) / res_scores[1:]))
    dedup = []
    imp, res = order[:t_imp], order[t_imp:]
    xn = features / np.linalg.norm(features, axis=-1, keepdims=True)
    rounds = 0
    while t_div > 0:
        r = min(8, len(res) - t_div)
        if r <= 0:
            break
        side_a, side_b = res[0::2], res[1::2]
        best = (xn[side_a] @ xn[side_b].T).max(axis=1)
        r = min(r, len(side_a))
        ranked = np.argsort(-best, kind="stable")
        srt = best[ranked]
        dedup.append(np.min(np.abs(np.diff(srt))) if len(srt) > 1 else np.inf)
        res = np.concatenate([side_a[ranked[r:]], side_b])
        rounds += 1
    kept = np.concatenate([imp, res]) if t_div > 0 else imp
    mask = np.zeros(n, bool)
    mask[kept] = True
    assert mask.sum() == num_keep
    return mask, {"attention": min(att, default=np.inf), "dedup": min(dedup, default=np.inf)}, rounds


# ---------------------------------------------------------------------------------------------------------
# Golden cases: every stage, then the mask
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case_id", [0, 3, 4, 5])
def test_golden_stages_and_masks(golden, case_id):
    cases, _, z = golden
    case = cases[case_id]
    n, t, ratio = case["N"], case["T"], case["r"]
    features, q, k = _inputs(z, case)
    received = received_attention(q, k)
    colmean = z[f"c{case_id}_colmean"]
    assert received.shape == colmean.shape == (case["B"], case["heads"], n)
    # float32 probabilities ~1/N averaged in another summation order than torch's: measured 1.4e-9 (N = 729)
    # and 1.5e-8 (N = 36) absolute, 3.4e-7 relative; the bar is 1e-6 absolute
    assert np.max(np.abs(np.asarray(received) - colmean)) < 1e-6
    np.testing.assert_allclose(np.asarray(received), colmean, rtol=2e-6, atol=0)
    if f"c{case_id}_attn" in z.files:  # small case: the probabilities themselves are stored
        np.testing.assert_allclose(np.asarray(received), z[f"c{case_id}_attn"].mean(-2), rtol=2e-6, atol=0)

    score = np.asarray(siglip_score(received))
    # head mean of float32 values: a few float32 ulps from the original's and from float64
    np.testing.assert_allclose(score, z[f"c{case_id}_score"], rtol=2e-6, atol=0)
    np.testing.assert_allclose(score, z[f"c{case_id}_score_f64"], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(attention_order(jnp.asarray(score))), z[f"c{case_id}_order"])

    plan = vispruner_siglip_plan(n, t, ratio)
    assert (plan.num_important, plan.num_diverse, len(plan.rounds)) == (case["T_imp"], case["T_div"], case["rounds"])
    assert [list(r) for r in plan.rounds] == case["round_schedule"] and plan.matches_original

    want = z[f"c{case_id}_mask"]
    ours = _mask(vispruner_siglip(features, received, num_keep=t, important_ratio=ratio), n)
    np.testing.assert_array_equal(ours, want)  # element for element: the golden is tie-free (8e-6 margins)
    from_stored = _mask(vispruner_siglip(features, jnp.asarray(colmean), num_keep=t, important_ratio=ratio), n)
    np.testing.assert_array_equal(from_stored, want)
    assert ours.sum(-1).tolist() == case["kept"]

    # the golden tells the right signal from a CLS-style one: ranking by patch 0's attention row instead of
    # the column means moves as many mask elements as the golden recorded for that mistake
    row0 = jax.nn.softmax(jnp.einsum("bhd,bnhd->bhn", q[:, 0], k) * q.shape[-1] ** -0.5, axis=-1)
    wrong = _mask(vispruner_siglip(features, row0, num_keep=t, important_ratio=ratio), n)
    assert int(np.sum(wrong != want)) == case["wrong_variants_mask_elements_differing"]["cls_row0"]


@pytest.mark.parametrize("case_id", [5, 0])
def test_golden_residual_list_after_every_checked_round(golden, case_id):
    """The residual list after round k, as a set: a budget T' = T_imp + |list_k| (same T_imp) runs exactly the
    first k rounds of the original's schedule (every one of them deletes 8), so its kept set is the important
    tokens plus the golden list_k. All rounds of the small case; rounds 1, 2 and 37 of the 75 of case 0."""
    cases, _, z = golden
    case = cases[case_id]
    n, t_imp = case["N"], case["T_imp"]
    features, q, k = _inputs(z, case)
    received = received_attention(q, k)
    offsets = z[f"c{case_id}_residual_offsets"]
    lists = z[f"c{case_id}_residual_lists"]
    important = z[f"c{case_id}_order"][:, :t_imp]
    rounds = range(1, case["rounds"]) if case["rounds"] < 10 else (1, 2, 37)
    for k_done in rounds:
        listed = lists[:, offsets[k_done] : offsets[k_done + 1]]
        t_prime = t_imp + listed.shape[1]
        ratio = (t_imp + 0.5) / t_prime  # int(T' * ratio) == T_imp
        plan = vispruner_siglip_plan(n, t_prime, ratio)
        assert plan.num_important == t_imp and len(plan.rounds) == k_done
        assert [list(r) for r in plan.rounds] == case["round_schedule"][:k_done]
        ours = _mask(vispruner_siglip(features, received, num_keep=t_prime, important_ratio=ratio), n)
        want = np.zeros_like(ours)
        for b in range(want.shape[0]):
            want[b, important[b]] = True
            want[b, listed[b]] = True
        np.testing.assert_array_equal(ours, want, err_msg=f"case {case_id}, after round {k_done}")


def test_reference_transcription_reproduces_the_golden(golden):
    """The NumPy reference used for the budgets the original cannot run agrees with the original where it runs."""
    cases, _, z = golden
    for case_id in (0, 3, 5):
        case = cases[case_id]
        src = case.get("inputs_from", case_id)
        for b in range(case["B"]):
            mask, _, rounds = reference_mask(
                z[f"c{src}_features"][b].astype(np.float64), z[f"c{case_id}_score_f64"][b], case["T"], case["r"]
            )
            np.testing.assert_array_equal(mask, z[f"c{case_id}_mask"][b])
            assert rounds == case["rounds"]


def test_float16_pixels_round_the_received_attention_before_the_head_mean(golden):
    """The authors' tower casts the column means to the pixel dtype, then averages heads; on case 0 that leaves
    725 and 726 distinct float16 scores in the two tiles. Averaging first and casting after gives other counts."""
    cases, _, z = golden
    colmean = jnp.asarray(z["c0_colmean"])
    want = cases[0]["fp16_images"]["distinct_score_values"]
    score = np.asarray(siglip_score(colmean, images_dtype=jnp.float16))
    assert score.dtype == np.float16
    assert [len(np.unique(s)) for s in score] == want
    late = np.asarray(jnp.mean(colmean, axis=1).astype(jnp.float16))
    assert [len(np.unique(s)) for s in late] != want
    # the selection sees the same cast: its kept tokens follow the float16 order
    features = jnp.asarray(z["c0_features"])
    sel = vispruner_siglip(features, colmean, num_keep=128, important_ratio=1.0, images_dtype=jnp.float16)
    top = np.asarray(attention_order(jnp.asarray(score)))[:, :128]
    np.testing.assert_array_equal(np.asarray(sel.indices), np.sort(top, axis=-1))


# ---------------------------------------------------------------------------------------------------------
# Budgets the original cannot run: the generalisation [PROPOSED]
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_generalisation_on_the_budgets_where_the_original_crashes(golden):
    """Every budget of the golden's ``crashes`` list on case-0 inputs (odd residual counts at T = 64, 128, 192,
    ratio 0 and 0.75; the oversized last rounds of T = 2 and T = 10): exactly T tokens, the T_imp most-attended
    among them, equal to the NumPy transcription of the generalisation."""
    cases, crashes, z = golden
    features, q, k = _inputs(z, cases[0])
    received = received_attention(q, k)
    score64 = z["c0_score_f64"]
    feats64 = z["c0_features"].astype(np.float64)
    assert len(crashes) == 7
    for crash in crashes:
        t, ratio = crash["T"], crash["r"]
        plan = vispruner_siglip_plan(729, t, ratio)
        assert (plan.num_important, 729 - plan.num_important) == (crash["T_imp"], crash["R0"])
        assert not plan.matches_original
        if not crash["raised"]:  # T = 10: the original silently deletes all of A in one round, as our cap does
            assert len(plan.rounds) == crash["dedup_rounds_run"]
            assert [(r.size + 1) // 2 for r in plan.rounds[-4:]] == crash["A_sizes_per_round"]
        sel = vispruner_siglip(features, received, num_keep=t, important_ratio=ratio)
        ours = _mask(sel, 729)
        assert ours.sum(-1).tolist() == [t, t] and bool(np.all(sel.valid))
        order = np.asarray(attention_order(siglip_score(received)))
        for b in range(2):
            assert ours[b, order[b, : plan.num_important]].all()
            want, gap, rounds = reference_mask(feats64[b], score64[b], t, ratio)
            assert rounds == len(plan.rounds)
            # our float32 keys are within ~2e-9 of exact (vispruner.similarity_keys) and the score within
            # ~2e-7 relative: every decision on this path is far wider, so the masks must agree exactly
            assert min(gap.values()) > 1e-6, (t, ratio, gap)
            np.testing.assert_array_equal(ours[b], want, err_msg=f"T={t} ratio={ratio} tile {b}")


# (T, ratio) on N = 25: odd first lists (T_imp even: 4/0.5, 9/0.5, 20/0.5, 3/0.0), even ones (6/0.5, 12/0.75),
# one the original runs (14/0.5), rounds capped at len(A) (3/0.0, 1/0.0), nothing pruned (25/0.5)
SMALL_BUDGETS = [(4, 0.5), (9, 0.5), (20, 0.5), (3, 0.0), (6, 0.5), (12, 0.75), (14, 0.5), (1, 0.0), (25, 0.5)]


def test_generalisation_on_odd_residual_lists_small():
    """Odd N - T_imp and capped rounds on a small random problem: T tokens, the top T_imp included, the
    reference's mask; on even lists the unchanged rule."""
    rng = np.random.default_rng(5)
    n, h, c = 25, 3, 12
    q = rng.standard_normal((2, n, h, 6)).astype(np.float32)
    k = rng.standard_normal((2, n, h, 6)).astype(np.float32)
    feats = rng.standard_normal((2, n, c)).astype(np.float32)
    received = received_attention(jnp.asarray(q), jnp.asarray(k))
    score = np.asarray(siglip_score(received), np.float64)
    seen = set()
    for t, ratio in SMALL_BUDGETS:
        plan = vispruner_siglip_plan(n, t, ratio)
        seen.add(((n - plan.num_important) % 2, plan.matches_original))
        sel = vispruner_siglip(jnp.asarray(feats), received, num_keep=t, important_ratio=ratio)
        ours = _mask(sel, n)
        assert ours.sum(-1).tolist() == [t, t]
        for b in range(2):
            want, gap, _ = reference_mask(feats[b].astype(np.float64), score[b], t, ratio)
            assert min(gap.values()) > 1e-6  # well-conditioned draw (seeded): no float32 decision is close
            np.testing.assert_array_equal(ours[b], want, err_msg=f"T={t} ratio={ratio} tile {b}")
    assert {(1, False), (0, True), (0, False)} <= seen  # odd lists, original-compatible ones, capped even ones


@pytest.mark.slow
def test_through_the_tower_taps_on_the_onevision_geometry(tmp_path):
    """A tiny random HF SigLIP at 27 x 27 tokens, loaded through the tower's rules: features
    (``hidden_states[-1]``) and received attention of the last layer from the tower's own taps, then the
    selection, equal to the float64 transcription run on the same taps (original budget and odd-list ones)."""
    _, hf_cfg = build_hf_siglip(tmp_path, 54, 2, use_head=False, seed=7)
    module, params = load_tower(str(tmp_path), hf_cfg)
    pix = np.random.default_rng(1).standard_normal((2, 3, 54, 54)).astype(np.float32)
    out = module.apply({"params": params}, pix, hidden_state_layers=(-1,), received_attention_layers=(-1,))
    features, received = out["hidden_states"][3], out["received_attn"][2]
    assert features.shape == (2, 729, 32) and received.shape == (2, 4, 729)
    # the reference ranks the very float32 scores the function ranks (tiny random towers have near-tied
    # attention, down to exact float32 ties: both sides break them by the same stable rule)
    score = np.asarray(siglip_score(received), np.float64)
    feats = np.asarray(features, np.float64)
    for t, ratio in ((130, 0.5), (64, 0.5), (10, 0.5)):
        ours = _mask(vispruner_siglip(features, received, num_keep=t, important_ratio=ratio), 729)
        for b in range(2):
            want, gap, _ = reference_mask(feats[b], score[b], t, ratio)
            assert gap["dedup"] > 1e-8  # our cosine keys are within ~2e-9 of exact: no dedup decision can flip
            np.testing.assert_array_equal(ours[b], want, err_msg=f"T={t} ratio={ratio} tile {b}")


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "features, received, kwargs, message",
    [
        ((2, 36), (2, 2, 36), {}, r"features must have rank 3 \(B, N, C\)"),
        ((2, 36, 16), (2, 36), {}, r"received_attn must have rank 3 \(B, H, N\)"),
        ((2, 36, 16), (1, 2, 36), {}, r"features batch \(2\) does not match received_attn batch \(1\)"),
        ((2, 36, 16), (2, 2, 35), {}, r"features tokens N \(36\) does not match received_attn tokens N \(35\)"),
        ((2, 36, 16), (2, 2, 36), {"num_keep": 0}, r"vispruner_siglip: num_keep must be >= 1"),
        ((2, 36, 16), (2, 2, 36), {"num_keep": 37}, r"vispruner_siglip: num_keep must be <= 36"),
        ((2, 36, 16), (2, 2, 36), {"num_keep": 9.0}, r"num_keep must be a Python int"),
        ((2, 36, 16), (2, 2, 36), {"important_ratio": 1.5}, r"important_ratio must be <= 1.0"),
        ((2, 36, 16), (2, 2, 36), {"images_dtype": jnp.int8}, r"images_dtype must be a floating dtype"),
        ((2, 36, 16), (2, 2, 36), {"images_dtype": "not-a-dtype"}, r"images_dtype must be a dtype"),
        ((2, 36, 16), (2, 2, 36), {"exact_similarity": 1}, r"exact_similarity must be a bool"),
    ],
)
def test_bad_inputs_raise_named_errors(features, received, kwargs, message):
    args = {"num_keep": 9, "important_ratio": 0.5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        vispruner_siglip(jnp.zeros(features), jnp.full(received, 1 / 36), **args)


def test_non_finite_and_integer_inputs_are_named():
    feats = jnp.zeros((1, 4, 3))
    with pytest.raises(ValueError, match="received_attn contains 1 NaN/inf"):
        vispruner_siglip(feats, jnp.full((1, 2, 4), 0.25).at[0, 0, 0].set(jnp.nan), num_keep=2, important_ratio=0.5)
    with pytest.raises(ValueError, match="received_attn must be floating"):
        vispruner_siglip(feats, jnp.ones((1, 2, 4), jnp.int32), num_keep=2, important_ratio=0.5)
    with pytest.raises(ValueError, match="score must have rank 2"):
        attention_order(jnp.zeros((4,)))


def test_traced_inputs_compile_once_per_budget():
    """Under the user's own jit the function traces (no concrete-value checks) and returns static shapes."""
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.standard_normal((3, 36, 8)).astype(np.float32))
    rec = jax.nn.softmax(jnp.asarray(rng.standard_normal((3, 2, 36)).astype(np.float32)), axis=-1)
    fn = jax.jit(lambda f, r: vispruner_siglip(f, r, num_keep=7, important_ratio=0.5).indices)
    idx = fn(feats, rec)
    assert idx.shape == (3, 7) and idx.dtype == jnp.int32
    np.testing.assert_array_equal(idx, vispruner_siglip(feats, rec, num_keep=7, important_ratio=0.5).indices)
