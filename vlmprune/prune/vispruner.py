"""VisPruner (algorithms.md §2) and FasterVLM (§5.1): CLS-attention pruning before the LLM.

Both methods look only at the vision tower: the CLS query row of one CLIP layer's attention (``cls_attn``,
per head, patch columns) and, for VisPruner, that layer's patch features. They return a ``Selection`` of
exactly ``num_keep`` patch indices per image tile, ascending (raster order, §1.3), all valid.

VisPruner in one paragraph (§2.2): average the CLS attention over heads, keep the ``T_imp = int(T * ratio)``
most-attended tokens ("important"), then shrink the remaining list to ``T_div = T - T_imp`` "diverse" tokens
by repeated ToMe-style bipartite rounds. Each round splits the current list into A (even positions) and
B (odd positions), scores every A token by its highest cosine similarity to any B token and deletes the
``r <= 8`` most redundant A tokens. The number of rounds and every round's size depend only on
``(N, T, ratio)``: the schedule is computed in Python (:func:`vispruner_plan`) and the rounds run under
``lax.scan`` on a fixed-length buffer (see :func:`_dedup_rounds` for why not a Python unroll), so every shape
is static and the output has exactly T tokens.

Tie-breaking. Every sort here is a *stable* descending sort: among equal scores the lower index (or the
earlier list position) comes first, and ``lax.top_k`` (FasterVLM) follows the same rule. The original uses
``torch.argsort(descending=True)``, whose tie order is unspecified (on CPU, libstdc++'s introsort for more
than 16 elements), so index parity is only guaranteed where scores do not tie (§1.2, §7).

Numerics. Each round's sort order feeds the next round's even/odd split, so VisPruner is sensitive to
single-ulp differences in the cosine similarities. For float32 features the similarities are therefore
computed nearly exactly (:func:`similarity_matrix`); the result then equals the original's wherever the
original's own float32 rounding does not reorder two similarities. With near-duplicate features at N = 576
that does happen (the maxima sit a few ulps apart and even tie exactly), and no independent implementation
can reproduce the original's masks there; see tests/test_prune_vispruner.py (``ILL_CONDITIONED``).

Where the original crashes (§2.2, "Crash condition") we generalise; see :func:`vispruner_plan`. On every
configuration the original runs, the plan is the original's and the output is identical.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from vlmprune import _checks
from vlmprune.prune.selection import Selection, from_indices

# §2.2 step 4: `r = min(8, R - T_div)`: a round deletes at most this many A tokens.
MAX_REMOVALS_PER_ROUND = 8


# --------------------------------------------------------------------------------------------------------
# Static plan
# --------------------------------------------------------------------------------------------------------


class DedupRound(NamedTuple):
    """One dedup round: the residual list holds ``size`` tokens and ``removed`` of them are deleted."""

    size: int
    removed: int


class VisPrunerPlan(NamedTuple):
    """Everything about a VisPruner call that is fixed by ``(N, T, ratio)``.

    Attributes:
      num_important: ``T_imp = int(T * ratio)`` (Python truncation, as in the original).
      num_diverse: ``T_div = T - T_imp``.
      rounds: the dedup rounds in order; empty when ``T_div == 0`` or nothing needs removing.
      matches_original: True when the original code runs on this configuration, i.e. every round has an
        even residual count and removes at most half of it. Our output is then the original's, index for
        index (on tie-free inputs). False means the original raises and the generalisation below applies.
    """

    num_important: int
    num_diverse: int
    rounds: tuple[DedupRound, ...]
    matches_original: bool


def vispruner_plan(num_tokens: int, num_keep: int, important_ratio: float) -> VisPrunerPlan:
    """The static round structure of VisPruner's dedup loop (§2.2 step 4), generalised past its crashes.

    The original loop is ``r = min(8, R - T_div); stop if r <= 0; A = res[0::2]; B = res[1::2]; ...``.
    It raises in two situations (§2.2 "Crash condition"):

    * **odd residual count R** (odd ``N - T_imp``, e.g. N = 576, T = 58, ratio = 0.5): the index tensors that
      gather the surviving A tokens have widths ``R//2 - r`` and ``ceil(R/2) - r`` and cannot broadcast.
      Generalisation: A holds the ``ceil(R/2)`` even positions and B the ``floor(R/2)`` odd positions,
      exactly as the slices ``res[0::2]`` / ``res[1::2]`` already do; the round proceeds normally.
      (Where the two widths do broadcast because ``R//2 - r == 1``, the original computes exactly this.)
    * **r larger than A** (small diverse budgets, e.g. N = 576, T = 8, ratio = 0.5 ends with R = 12, r = 8):
      Generalisation: ``r`` is capped at ``len(A) = ceil(R/2)``, so the round deletes all of A and keeps B;
      the removals it could not make are simply made by the following rounds (each round recomputes
      ``r = min(8, R - T_div)`` from the new R), so the loop still ends with exactly ``T_div`` tokens.

    Both rules leave every round the original can run untouched, so parity holds wherever the original
    works. Every round removes at least one token, so the plan always ends at ``R == T_div``.

    Args:
      num_tokens: N, patch tokens per tile.
      num_keep: T, tokens to keep, 1 <= T <= N.
      important_ratio: fraction of T chosen by attention, in [0, 1].

    Returns:
      The :class:`VisPrunerPlan`.
    """
    num_important = int(num_keep * important_ratio)  # §2.1: Python int() truncation, e.g. int(20*0.3) == 6
    num_diverse = num_keep - num_important
    rounds = []
    matches_original = True
    size = num_tokens - num_important
    while num_diverse > 0:  # the `T_div > 0` guard of commit d7da3a3 (§2.7)
        removed = min(MAX_REMOVALS_PER_ROUND, size - num_diverse)
        if removed <= 0:
            break
        half_a = math.ceil(size / 2)
        if size % 2 or removed > size // 2:
            matches_original = False
        removed = min(removed, half_a)  # generalisation: cap at len(A)
        rounds.append(DedupRound(size, removed))
        size -= removed
    return VisPrunerPlan(num_important, num_diverse, tuple(rounds), matches_original)


# --------------------------------------------------------------------------------------------------------
# Validation helpers (shared with baselines.py)
# --------------------------------------------------------------------------------------------------------


def _check_num_keep(num_keep, num_tokens: int, where: str) -> int:
    """num_keep must be a Python int in [1, N]; the message names both."""
    num_keep = _checks.check_int("num_keep", num_keep, where=where)
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"{where}: num_keep must be in [1, N={num_tokens}], got {num_keep}")
    return num_keep


def _check_head_attention(name: str, attn, where: str) -> None:
    """A (B, H, N) attention array with finite values (checked only when concrete)."""
    _checks.check_rank(name, attn, 3, where=where, dims="(B, H, N)")
    _checks.check_finite(name, attn, where=where)


# --------------------------------------------------------------------------------------------------------
# Numerical building blocks
# --------------------------------------------------------------------------------------------------------


def _argsort_descending(x: jax.Array) -> jax.Array:
    """Stable descending argsort along the last axis: equal values keep their order (lower index first)."""
    return jnp.argsort(x, axis=-1, descending=True, stable=True)


def head_mean(attn: jax.Array) -> jax.Array:
    """Mean over heads of a (..., H, N) attention array -> (..., N), in the input dtype (§2.2 step 1).

    ``jnp.mean`` accumulates low-precision floats in float32 and rounds the result back, like torch.
    """
    return jnp.mean(attn, axis=-2)


def l2_normalize(x: jax.Array) -> jax.Array:
    """Row-wise ``x / ||x||_2`` over the last axis, result in x's dtype (§2.2 step 3).

    The norm is accumulated in (at least) float32 and rounded to x's dtype before the division, as torch
    does for half-precision inputs; for float32 inputs (the golden runs) everything is plain float32.
    """
    acc = jnp.promote_types(x.dtype, jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(acc)), axis=-1, keepdims=True)).astype(x.dtype)
    # Without the barrier XLA rewrites `x / sqrt(s)` as `x * rsqrt(s)`, which is off by an ulp or so; the
    # dedup ranking is sensitive to that (see `_compensated_gram`), so keep the true division torch does.
    return x / jax.lax.optimization_barrier(norm)


# Width of the feature chunks summed by one float32 matmul in `_compensated_gram`.
_GRAM_CHUNK = 8


def _compensated_gram(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x @ x.T`` for float32 x (N, C) as an unevaluated sum ``hi + lo`` of two float32 (N, N) arrays.

    Why: the dedup ranking sorts the *whole* A list every round and the sorted order decides the next
    round's even/odd split, so two best-similarities a few float32 ulps apart can change the result. A
    plain float32 matmul is off by up to ~10 ulps here and its rounding depends on the BLAS kernel (the
    original's MKL/cuBLAS rounding cannot be reproduced). Ranking by the (almost) exact dot product instead
    agrees with the original whenever the original's own rounding does not reorder two values, which is
    what lets the float32 golden masks be matched.

    How: float32 matmuls over chunks of ``_GRAM_CHUNK`` features (each accurate to ~1e-10 for unit rows),
    summed with the error-free TwoSum; total error ~2e-9 absolute for unit-norm rows, well under one
    float32 ulp of typical similarities. ``(hi, lo)`` is renormalised so ``|lo| <= ulp(hi) / 2`` and
    comparing pairs lexicographically compares their values.
    """
    n, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, (-c) % _GRAM_CHUNK)))
    chunks = x.reshape(n, -1, _GRAM_CHUNK).transpose(1, 0, 2)  # (C / chunk, N, chunk)

    def add_chunk(carry, chunk):
        hi, lo = carry
        part = jnp.matmul(chunk, chunk.T, precision=jax.lax.Precision.HIGHEST)
        total = hi + part
        back = total - hi
        error = (hi - (total - back)) + (part - back)  # TwoSum: hi + part == total + error exactly
        return (total, lo + error), None

    zeros = jnp.zeros((n, n), x.dtype)
    (hi, lo), _ = jax.lax.scan(add_chunk, (zeros, zeros), chunks)
    total = hi + lo
    lo = lo - (total - hi)  # FastTwoSum renormalisation
    return total, jnp.where(lo == 0, jnp.zeros_like(lo), lo)  # -0.0 -> +0.0 so equal values compare equal


def similarity_matrix(normalized: jax.Array, exact: bool = True) -> tuple[jax.Array, jax.Array]:
    """Cosine similarities of L2-normalised rows (N, C) as a pair ``(hi, lo)`` of (N, N) arrays.

    float32 input: ``hi + lo`` is the (almost) exact dot product (see ``_compensated_gram``); with
    ``exact=False`` one plain float32 matmul instead (``lo`` zero): several times cheaper, but near-equal
    similarities may then be ranked in another order than the original's, so the kept set can differ.
    Lower precision (float16/bfloat16, the original's fp16 features): the dot product is accumulated in
    float32 and rounded to the input dtype, like a cuBLAS half GEMM; ``lo`` is zero. Expect many ties.
    """
    if normalized.dtype == jnp.float32 and exact:
        return _compensated_gram(normalized)
    acc = jnp.promote_types(normalized.dtype, jnp.float32)
    out = jnp.matmul(normalized, normalized.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc)
    hi = out.astype(normalized.dtype).astype(acc)  # float32 without `exact`: unchanged
    return hi, jnp.zeros_like(hi)


def _pair_max(hi: jax.Array, lo: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise maximum of ``hi + lo`` over the last axis, (M, P) -> two (M,) arrays (lexicographic)."""
    best_hi = jnp.max(hi, axis=-1)
    best_lo = jnp.max(jnp.where(hi == best_hi[..., None], lo, -jnp.inf), axis=-1)
    return best_hi, best_lo


def _pair_argsort_descending(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """Stable descending argsort of ``hi + lo`` (1-D pairs): ties keep list order (earlier first)."""
    position = jnp.arange(hi.shape[-1], dtype=jnp.int32)
    *_, order = jax.lax.sort((-hi, -lo, position), num_keys=2, is_stable=True)
    return order


# --------------------------------------------------------------------------------------------------------
# VisPruner
# --------------------------------------------------------------------------------------------------------


def _dedup_round(residual: jax.Array, sim: tuple[jax.Array, jax.Array], size: jax.Array, removed: jax.Array):
    """One bipartite dedup round on one tile (§2.2 step 4), on a fixed-length buffer.

    The list shrinks every round, but to compile a single round body (see :func:`_dedup_rounds`) it lives in
    a buffer of constant length R0 whose first ``size`` slots hold the list; later slots are padding.

    Args:
      residual: int32 (R0,). The current residual list (token indices) in its first ``size`` slots; the
        *order* matters.
      sim: the tile's (N, N) cosine-similarity pair from :func:`similarity_matrix`.
      size: int32 scalar R, current list length (from the static plan).
      removed: int32 scalar r, 1 <= r <= ceil(R/2), A tokens to delete (from the static plan).

    Returns:
      int32 (R0,). First the ``ceil(R/2) - r`` surviving A tokens in descending order of their best
      similarity (the order the original's argsort leaves them in), then the ``floor(R/2)`` B tokens in list
      order, then padding (token 0, never read).
    """
    side_a, side_b = residual[0::2], residual[1::2]  # even / odd *positions* of the list
    num_a, num_b = (size + 1) // 2, size // 2
    real_a = jnp.arange(side_a.shape[0]) < num_a
    real_b = jnp.arange(side_b.shape[0]) < num_b

    # Each A token's most similar B token; padding columns can never win, padding rows sort last. Whole rows
    # of the (N, N) matrix are gathered (contiguous copies) and the B columns picked by a mask over all N
    # tokens, which is several times faster than gathering the (A, B) block element by element.
    n = sim[0].shape[-1]
    is_b = jnp.zeros((n,), bool).at[side_b].max(real_b)
    hi = jnp.where(is_b, sim[0][side_a], -jnp.inf)
    lo = jnp.where(is_b, sim[1][side_a], -jnp.inf)
    best_hi, best_lo = _pair_max(hi, lo)
    best_hi = jnp.where(real_a, best_hi, -jnp.inf)
    best_lo = jnp.where(real_a, best_lo, -jnp.inf)
    ranked_a = _pair_argsort_descending(best_hi, best_lo)  # most redundant first; real A slots lead

    # New list = ranked A minus its first r entries, then B (a concatenation with traced offsets).
    kept_a = num_a - removed
    slot = jnp.arange(residual.shape[0])
    from_a = side_a[ranked_a[jnp.minimum(slot + removed, side_a.shape[0] - 1)]]
    from_b = side_b[jnp.clip(slot - kept_a, 0, side_b.shape[0] - 1)]
    return jnp.where(slot < kept_a, from_a, jnp.where(slot < kept_a + num_b, from_b, 0))


def _dedup_rounds(residual: jax.Array, sim: tuple[jax.Array, jax.Array], rounds: tuple[DedupRound, ...]):
    """All dedup rounds of the static plan: residual int32 (R0,) -> the final T_div-token list (T_div,).

    §2.3 suggests unrolling the rounds in Python (§1.5-P5). That is exact but compiles one sort and two
    gathers per round, 48-68 rounds for the usual budgets: 15-60 s of XLA compile time per configuration
    on a CPU. Instead the plan's (R, r) pairs are fed as data to ``lax.scan`` over a constant-length
    buffer, so the round body compiles once. The rounds themselves are exactly those of the plan.
    """
    sizes = jnp.asarray([rnd.size for rnd in rounds], jnp.int32)
    removals = jnp.asarray([rnd.removed for rnd in rounds], jnp.int32)

    def body(res, plan_row):
        return _dedup_round(res, sim, *plan_row), None

    residual, _ = jax.lax.scan(body, residual, (sizes, removals))
    return residual[: rounds[-1].size - rounds[-1].removed]


def _vispruner_tile(features: jax.Array, cls_attn: jax.Array, plan: VisPrunerPlan, exact: bool = True) -> jax.Array:
    """VisPruner on one tile: features (N, C), cls_attn (H, N) -> kept indices int32 (T,), unsorted."""
    order = _argsort_descending(head_mean(cls_attn)).astype(jnp.int32)  # (N,) descending attention
    important = order[: plan.num_important]
    if plan.num_diverse == 0:
        return important
    residual = order[plan.num_important :]  # (R0,), in descending-attention order
    if plan.rounds:
        sim = similarity_matrix(l2_normalize(features), exact)  # all pairs once; rounds read rows of it
        residual = _dedup_rounds(residual, sim, plan.rounds)
    chex.assert_shape(residual, (plan.num_diverse,))
    return jnp.concatenate([important, residual])


@functools.partial(jax.jit, static_argnames=("num_keep", "important_ratio", "exact_similarity"))
def _vispruner_jit(features: jax.Array, cls_attn: jax.Array, *, num_keep: int, important_ratio: float,
                   exact_similarity: bool = True) -> Selection:
    plan = vispruner_plan(features.shape[1], num_keep, important_ratio)
    kept = jax.vmap(lambda f, a: _vispruner_tile(f, a, plan, exact_similarity))(features, cls_attn)
    chex.assert_shape(kept, (features.shape[0], num_keep))
    return from_indices(kept, features.shape[1])


def vispruner(features: jax.Array, cls_attn: jax.Array, *, num_keep: int, important_ratio: float,
              exact_similarity: bool = True) -> Selection:
    """VisPruner token selection (algorithms.md §2.2), batched over tiles/images.

    Args:
      features: float (B, N, C). Patch features of the scoring layer (CLS removed), pre-projector. Their
        dtype sets the numerics of the dedup rounds: float32 ranks by (almost) exact cosine similarities
        (module docstring, "Numerics"); float16 rounds the similarities to float16 like the original's fp16
        features on GPU (§2.1), with many ties.
      cls_attn: float (B, H, N). CLS-query attention row per head, patch columns only
        (``attentions[l][:, :, 0, 1:]``). Averaged over heads in its own dtype (fp32 in the original).
      num_keep: static Python int T, 1 <= T <= N. Tokens kept per tile.
      important_ratio: static Python float in [0, 1]; ``T_imp = int(T * ratio)`` tokens are chosen by
        attention, the rest by the dedup rounds.
      exact_similarity: static bool, default True: float32 similarities computed (almost) exactly, which is
        what matches the original's masks. False: one plain float32 matmul (see :func:`similarity_matrix`),
        for speed where bit-for-bit parity with the original does not matter; counts and the important
        tokens are the same, the diverse picks can differ where similarities nearly tie.

    Returns:
      ``Selection`` with indices int32 (B, T), ascending, and valid all True: exactly T distinct tokens per
      tile, always including the T_imp most-attended ones.

    Notes:
      * Ties (equal attention or equal best-similarity) resolve to the lower index / earlier list position;
        the original's tie order is unspecified (module docstring).
      * Configurations where the original raises (odd ``N - T_imp``, or a round asked to delete more than half
        the residual list) follow the documented generalisation of :func:`vispruner_plan`.
      * Validation runs in Python before tracing; the NaN/inf check is skipped for traced inputs.
      * Compiled once per (shapes, dtypes, num_keep, important_ratio).

    Raises:
      ValueError: wrong ranks, mismatched B or N, num_keep outside [1, N], ratio outside [0, 1],
        NaN/inf in concrete inputs.
    """
    where = "vispruner"
    _checks.check_rank("features", features, 3, where=where, dims="(B, N, C)")
    _check_head_attention("cls_attn", cls_attn, where)
    batch, num_tokens, _ = features.shape
    _checks.check_dims_equal(
        [
            ("features batch", batch, "cls_attn batch", cls_attn.shape[0]),
            ("features tokens N", num_tokens, "cls_attn tokens N", cls_attn.shape[2]),
        ],
        where=where,
    )
    num_keep = _check_num_keep(num_keep, num_tokens, where)
    important_ratio = _checks.check_float("important_ratio", important_ratio, lo=0.0, hi=1.0, where=where)
    _checks.check_finite("features", features, where=where)
    if not isinstance(exact_similarity, bool):
        raise ValueError(f"{where}: exact_similarity must be a bool, got {exact_similarity!r}")
    return _vispruner_jit(features, cls_attn, num_keep=num_keep, important_ratio=important_ratio,
                          exact_similarity=exact_similarity)


# --------------------------------------------------------------------------------------------------------
# FasterVLM (and the shared "top-k of head-mean attention" core)
# --------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_keep",))
def _head_mean_top_k(attn: jax.Array, *, num_keep: int) -> Selection:
    """Top-k of the head-mean attention, attn (B, H, N) -> Selection (B, k); ties: lower index first."""
    _, top = jax.lax.top_k(head_mean(attn), num_keep)
    return from_indices(top, attn.shape[-1])


def fastervlm(cls_attn: jax.Array, *, num_keep: int) -> Selection:
    """FasterVLM token selection (algorithms.md §5.1): top-T of head-mean CLS attention.

    Equal to ``vispruner(..., important_ratio=1.0)`` (same tie rule: lower index first). The original casts
    the attention to float16 before averaging and ranking; pass ``cls_attn.astype(jnp.float16)`` to
    emulate that (expect many ties, §1.2).

    Args:
      cls_attn: float (B, H, N). CLS-query attention row per head, patch columns only.
      num_keep: static Python int T, 1 <= T <= N.

    Returns:
      ``Selection`` with indices int32 (B, T) ascending, valid all True.

    Raises:
      ValueError: wrong rank, num_keep outside [1, N], NaN/inf in a concrete input.
    """
    where = "fastervlm"
    _check_head_attention("cls_attn", cls_attn, where)
    num_keep = _check_num_keep(num_keep, cls_attn.shape[2], where)
    return _head_mean_top_k(cls_attn, num_keep=num_keep)
