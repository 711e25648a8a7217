"""VisPruner (docs/methods.md §2) and FasterVLM (§5.1): CLS-attention pruning before the LLM.

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
single-ulp differences in the cosine similarities. The rows are normalised with torch's correctly rounded division
(:func:`~vlmprune.prune.ops.l2_normalize`; XLA would otherwise multiply by a rounded reciprocal) and the
attention is averaged over heads in torch's summation order (:func:`~vlmprune.prune.ops.head_mean`). For float32
features the similarities of the residual tokens are then computed once, to within ~2e-9 of their exact values
(an error-free split of the features, :func:`similarity_keys`), and ranked on a grid of 2**-29; the result equals
the original's wherever the original's own float32 rounding (~1e-7) does not reorder two similarities, which is
the case on every stored golden input (tests/prune/test_prune_vispruner.py: all 8 cases, element for element).

Where the original crashes (§2.2, "Crash condition") we generalise; see :func:`vispruner_plan`. On every
configuration the original runs, the plan is the original's and the output is identical.

:func:`vispruner_masked` runs the same rule on a batch of lists of different lengths in one program (the packed
grids of LLaVA-OneVision, docs/methods.md §9.4 mode B), one host plan per list; each list's result is the static
function's on that list alone.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import checks
from vlmprune.prune.ops import (
    argsort_descending,
    check_head_attention,
    check_num_keep,
    gram,
    head_mean,
    head_mean_top_k,
    l2_normalize,
    symmetric_product,
)
from vlmprune.prune.selection import Selection, from_indices, map_tiles

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
# Numerical building blocks
# --------------------------------------------------------------------------------------------------------


# Similarities are ranked on a fixed grid of 2**-29 (~1.9e-9): ``k = round(sim * 2**29)`` is an integer in
# [-2**29, 2**29], and ``k + 2**29 + 2**23`` read as the bits of a float32 is a positive *normal* float (no
# denormals, which some backends flush to zero), ordered like k. The rounds then compare plain float32
# keys, which XLA:CPU reduces and sorts faster than int32, with uniform resolution over [-1, 1] (a float32
# cosine itself resolves only ~6e-8 near 1, where near-duplicate tokens sit).
_KEY_SCALE = 2.0**29
_KEY_OFFSET = 2**29 + 2**23


def _grid_integers(x: jax.Array) -> jax.Array:
    """float array with values in [-1, 1] -> int32, the nearest multiple of 2**-29 in units of 2**-29."""
    return jnp.round(x.astype(jnp.float32) * _KEY_SCALE).astype(jnp.int32)


def _keys_from_grid(k: jax.Array) -> jax.Array:
    """int32 grid integers (:func:`_grid_integers`) -> float32 keys with the same order."""
    bits = jnp.clip(k + _KEY_OFFSET, 2**23, 2**30 + 2**24)  # cosines round into [-1, 1] up to a few units
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _split_on_grid(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split float32 unit rows x (M, C) into ``head + tail == x`` (exactly), head on the grid ``2**-11``.

    ``head / 2**-11`` is an integer vector k with ``||k||_2 <= 2**11 ||x|| + sqrt(C) / 2 < 2**12`` (rows of
    norm below ``2 - sqrt(C) 2**-12``: an L2-normalised row is within an ulp or so of 1). By Cauchy-Schwarz
    every partial sum of a dot product of two heads is then an integer number of ``2**-22`` below ``2**24``
    in magnitude: a float32 matmul of heads is *exact*, whatever the kernel's summation order or FMA use
    (the idea of Ozaki's error-free matrix product). ``tail = x - head`` is exact too, ``|tail| <= 2**-12``.
    One fixed grid for all rows (rather than one scaled to each row's norm) costs no reduction.
    """
    head = jnp.round(x * 2.0**11) * 2.0**-11
    return head, x - head


def _near_exact_similarity_keys(x: jax.Array) -> jax.Array:
    """Keys of ``x @ x.T`` for float32 unit rows x (M, C), from dot products within ~2e-9 of exact.

    With ``x = head + tail`` (:func:`_split_on_grid`) and ``mid = head + tail / 2``:
    ``x @ x.T = head @ head.T + (Q + Q.T)`` where ``Q = mid @ tail.T``. The first product is exact; the
    correction is about 2**-7 of the total, so its float32 rounding errors are ~100x below a plain matmul's
    (``mid`` itself is rounded, but only by ~2**-24 of x, and it multiplies the 2**-12-sized tail). Measured
    against float64 (N = 544-576, C = 64-4096; random, near-duplicate and golden features): at most 1.01 grid
    units (1.9e-9) off (the correction's float32 rounding and its rounding to the grid), against ~120 units
    (2e-7; 1.5e-6 on the diagonal) for one plain float32 matmul. The cost is about 1.6 plain matmuls (the
    head product is symmetric, :func:`~vlmprune.prune.ops.symmetric_product`).
    """
    chex.assert_rank(x, 2)
    head, tail = _split_on_grid(x)
    exact = symmetric_product(head, head)
    q = jnp.matmul(head + 0.5 * tail, tail.T, precision=jax.lax.Precision.HIGHEST)
    return _keys_from_grid(_grid_integers(exact) + _grid_integers(q + q.T))


def similarity_keys(normalized: jax.Array, exact: bool = True) -> jax.Array:
    """Cosine similarities of L2-normalised rows (M, C) as float32 keys (M, M) ordered like them.

    A key stands for ``round(sim * 2**29)`` (see ``_KEY_SCALE``): comparing keys compares similarities, and
    values closer than 2**-29 (~1.9e-9) may tie.

    * float32 with ``exact`` (default): the dot products are computed to within ~2e-9 of their exact values
      (:func:`_near_exact_similarity_keys`), so the ranking agrees with the original's wherever the original's
      own float32 rounding (~1e-7) does not reorder two similarities.
    * float32 with ``exact=False``: one plain float32 matmul, about 1.5x cheaper, off by up to ~2e-7, so
      near-equal similarities may be ranked in another order than the original's.
    * lower precision (float16/bfloat16, the original's fp16 features): accumulated in float32 and rounded
      to the input dtype, like a cuBLAS half GEMM, then keyed (float16 values are multiples of 2**-24, so
      they key exactly). Expect many ties.
    """
    if normalized.dtype == jnp.float32 and exact:
        return _near_exact_similarity_keys(normalized)
    return _keys_from_grid(_grid_integers(gram(normalized)))


# --------------------------------------------------------------------------------------------------------
# VisPruner
# --------------------------------------------------------------------------------------------------------


def _dedup_round(residual: jax.Array, keys: jax.Array, size: jax.Array, removed: jax.Array) -> jax.Array:
    """One bipartite dedup round on one tile (§2.2 step 4), on a fixed-length buffer.

    The list shrinks every round, but to compile a single round body (see :func:`_dedup_rounds`) it lives in
    a buffer of constant length R0 whose first ``size`` slots hold the list; later slots are padding.

    Args:
      residual: int32 (R0,). The current residual list in its first ``size`` slots, as positions into the
        tile's initial residual list (rows of ``keys``); the *order* matters.
      keys: float32 (R0, R0). Similarity keys of the initial residual tokens (:func:`similarity_keys`).
      size: int32 scalar R, current list length (from the static plan).
      removed: int32 scalar r, 1 <= r <= ceil(R/2), A tokens to delete (from the static plan).

    Returns:
      int32 (R0,). First the ``ceil(R/2) - r`` surviving A tokens in descending order of their best
      similarity (the order the original's argsort leaves them in), then the ``floor(R/2)`` B tokens in list
      order, then padding (position 0, never read).
    """
    side_a, side_b = residual[0::2], residual[1::2]  # even / odd *positions* of the list
    num_a, num_b = (size + 1) // 2, size // 2
    real_a = jnp.arange(side_a.shape[0]) < num_a
    real_b = jnp.arange(side_b.shape[0]) < num_b

    # Each A token's most similar B token; padding columns can never win, padding rows sort last. Whole rows
    # of the key matrix are gathered (contiguous copies) and the B columns picked by a mask, which is several
    # times faster than gathering the (A, B) block element by element.
    lowest = -jnp.inf  # below every key
    is_b = jnp.zeros((keys.shape[-1],), bool).at[side_b].max(real_b)
    best = jnp.max(jnp.where(is_b, keys[side_a], lowest), axis=-1)
    # Stable descending argsort: most redundant first, ties by list position, padding last.
    ranked_a = argsort_descending(jnp.where(real_a, best, lowest))

    # New list = ranked A minus its first r entries, then B (a concatenation with traced offsets).
    kept_a = num_a - removed
    slot = jnp.arange(residual.shape[0])
    from_a = side_a[ranked_a[jnp.minimum(slot + removed, side_a.shape[0] - 1)]]
    from_b = side_b[jnp.clip(slot - kept_a, 0, side_b.shape[0] - 1)]
    return jnp.where(slot < kept_a, from_a, jnp.where(slot < kept_a + num_b, from_b, 0))


# A new phase of dedup rounds (a smaller buffer) starts once the list has shrunk to this share of the buffer.
_PHASE_SHRINK = 0.5


def _round_phases(rounds: tuple[DedupRound, ...]) -> list[tuple[DedupRound, ...]]:
    """Split the plan's rounds into phases: a phase ends once the list is half its first round's size."""
    phases = [[rounds[0]]]
    for rnd in rounds[1:]:
        if rnd.size <= _PHASE_SHRINK * phases[-1][0].size:
            phases.append([])
        phases[-1].append(rnd)
    return [tuple(phase) for phase in phases]


def _dedup_rounds(keys: jax.Array, rounds: tuple[DedupRound, ...]) -> jax.Array:
    """All dedup rounds of the static plan on one tile: keys float32 (R0, R0) -> kept positions int32 (T_div,).

    The list starts as ``0 .. R0-1`` (the initial residual list, descending attention) and ends as positions
    into it. §2.3 suggests unrolling the rounds in Python (§1.5-P5). That is exact but compiles one sort and
    two gathers per round, 48-68 rounds for the usual budgets: 15-60 s of XLA compile time per configuration
    on a CPU. Instead the plan's (R, r) pairs are fed as data to ``lax.scan`` over a constant-length buffer,
    so the round body compiles once per *phase*: each time the list has halved, the buffer and the key
    matrix are cut down to the surviving tokens (in list order), so later rounds scan less padding. The
    rounds themselves are exactly those of the plan.
    """
    alive = jnp.arange(keys.shape[0], dtype=jnp.int32)  # the list, as positions into the initial list
    for phase in _round_phases(rounds):
        size = phase[0].size  # static: the list fills the first `size` slots of `alive`
        alive = alive[:size]
        phase_keys = keys if size == keys.shape[0] else keys[alive][:, alive]
        sizes = jnp.asarray([rnd.size for rnd in phase], jnp.int32)
        removals = jnp.asarray([rnd.removed for rnd in phase], jnp.int32)

        def body(res, plan_row, phase_keys=phase_keys):
            return _dedup_round(res, phase_keys, *plan_row), None

        positions, _ = jax.lax.scan(body, jnp.arange(size, dtype=jnp.int32), (sizes, removals))
        alive = alive[positions]
    return alive[: rounds[-1].size - rounds[-1].removed]


def _vispruner_tile(features: jax.Array, cls_attn: jax.Array, plan: VisPrunerPlan, exact: bool = True) -> jax.Array:
    """VisPruner on one tile: features (N, C), cls_attn (H, N) -> kept indices int32 (T,), unsorted."""
    order = argsort_descending(head_mean(cls_attn)).astype(jnp.int32)  # (N,) descending attention
    important = order[: plan.num_important]
    if plan.num_diverse == 0:
        return important
    residual = order[plan.num_important :]  # (R0,), in descending-attention order
    if plan.rounds:
        # Only the residual tokens are ever compared: their (R0, R0) similarities, computed once; the rounds
        # read rows of it. (The original recomputes an (A, B) block every round.)
        keys = similarity_keys(l2_normalize(features[residual]), exact)
        residual = residual[_dedup_rounds(keys, plan.rounds)]
    chex.assert_shape(residual, (plan.num_diverse,))
    return jnp.concatenate([important, residual])


@functools.partial(jax.jit, static_argnames=("num_keep", "important_ratio", "exact_similarity"))
def _vispruner_jit(
    features: jax.Array, cls_attn: jax.Array, *, num_keep: int, important_ratio: float, exact_similarity: bool = True
) -> Selection:
    plan = vispruner_plan(features.shape[1], num_keep, important_ratio)
    kept = map_tiles(lambda f, a: _vispruner_tile(f, a, plan, exact_similarity), features, cls_attn)
    chex.assert_shape(kept, (features.shape[0], num_keep))
    return from_indices(kept, features.shape[1])


def vispruner(
    features: jax.Array, cls_attn: jax.Array, *, num_keep: int, important_ratio: float, exact_similarity: bool = True
) -> Selection:
    """VisPruner token selection (docs/methods.md §2.2), batched over tiles/images.

    Args:
      features: float (B, N, C). Patch features of the scoring layer (CLS removed), pre-projector. Their
        dtype sets the numerics of the dedup rounds: float32 ranks by near-exact cosine similarities
        (module docstring, "Numerics"); float16 rounds the similarities to float16 like the original's fp16
        features on GPU (§2.1), with many ties.
      cls_attn: float (B, H, N). CLS-query attention row per head, patch columns only
        (``attentions[l][:, :, 0, 1:]``). Averaged over heads in its own dtype (fp32 in the original).
      num_keep: static Python int T, 1 <= T <= N. Tokens kept per tile.
      important_ratio: static Python float in [0, 1]; ``T_imp = int(T * ratio)`` tokens are chosen by
        attention, the rest by the dedup rounds.
      exact_similarity: static bool, default True: float32 similarities computed near-exactly, which is
        what matches the original's masks. False: one plain float32 matmul (see :func:`similarity_keys`),
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
    checks.check_rank("features", features, 3, where=where, dims="(B, N, C)")
    check_head_attention("cls_attn", cls_attn, where)
    batch, num_tokens, _ = features.shape
    checks.check_dims_equal(
        [
            ("features batch", batch, "cls_attn batch", cls_attn.shape[0]),
            ("features tokens N", num_tokens, "cls_attn tokens N", cls_attn.shape[2]),
        ],
        where=where,
    )
    num_keep = check_num_keep(num_keep, num_tokens, where)
    important_ratio = checks.check_float("important_ratio", important_ratio, lo=0.0, hi=1.0, where=where)
    checks.check_finite("features", features, where=where)
    checks.check_bool("exact_similarity", exact_similarity, where=where)
    return _vispruner_jit(
        features, cls_attn, num_keep=num_keep, important_ratio=important_ratio, exact_similarity=exact_similarity
    )


# --------------------------------------------------------------------------------------------------------
# FasterVLM (and the shared "top-k of head-mean attention" core)
# --------------------------------------------------------------------------------------------------------


def fastervlm(cls_attn: jax.Array, *, num_keep: int) -> Selection:
    """FasterVLM token selection (docs/methods.md §5.1): top-T of head-mean CLS attention.

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
    check_head_attention("cls_attn", cls_attn, where)
    num_keep = check_num_keep(num_keep, cls_attn.shape[2], where)
    return head_mean_top_k(cls_attn, num_keep=num_keep)


# --------------------------------------------------------------------------------------------------------
# VisPruner on lists of different lengths (LLaVA-OneVision's packed grids, docs/methods.md §9.4 mode B)
# --------------------------------------------------------------------------------------------------------


def vispruner_masked_plans(counts, budgets, important_ratio: float) -> dict[str, np.ndarray]:
    """Host plans of :func:`vispruner_masked`: image i runs ``vispruner_plan(counts[i], budgets[i], ratio)``.

    Args:
      counts: ints (B,), the real tokens of each list (>= 0).
      budgets: ints (B,), tokens to keep of each list, 0 <= budgets[i] <= counts[i].
      important_ratio: float in [0, 1]; image i keeps ``int(budgets[i] * ratio)`` tokens by score.

    Returns:
      {"important": int32 (B,) T_imp per image, "rounds": int32 (B, R, 2) the (size, removed) of every dedup
      round of each image's plan, R = the most rounds of any image; an image's unused rows are (0, 0)}.

    Raises:
      ValueError naming the image: negative counts, a budget outside [0, count], ratio outside [0, 1].
    """
    where = "vispruner_masked_plans"
    counts = [int(c) for c in np.asarray(counts).reshape(-1)]
    budgets = [int(b) for b in np.asarray(budgets).reshape(-1)]
    if len(counts) != len(budgets):
        raise ValueError(f"{where}: {len(counts)} counts for {len(budgets)} budgets")
    ratio = checks.check_float("important_ratio", important_ratio, lo=0.0, hi=1.0, where=where)
    plans = []
    for i, (n, k) in enumerate(zip(counts, budgets)):
        if n < 0 or not 0 <= k <= n:
            raise ValueError(f"{where}: list {i} has {n} tokens and a budget of {k}; need 0 <= budget <= tokens")
        plans.append(vispruner_plan(n, k, ratio))
    width = max([len(p.rounds) for p in plans] + [0])
    rounds = np.zeros((len(plans), width, 2), np.int32)
    for i, p in enumerate(plans):
        if p.rounds:
            rounds[i, : len(p.rounds)] = np.asarray(p.rounds, np.int32)
    important = np.asarray([p.num_important for p in plans], np.int32)
    return {"important": important, "rounds": rounds}


def _masked_list(features, scores, count, budget, important, rounds, exact: bool):
    """One list of :func:`vispruner_masked`: keep bool (M,) over its buffer of M slots (first ``count`` real)."""
    m = scores.shape[0]
    pos = jnp.arange(m, dtype=jnp.int32)
    real = pos < count
    # stable descending order, padding last: the real tokens' order is the one the unpadded list gives
    order = argsort_descending(jnp.where(real, scores, -jnp.inf)).astype(jnp.int32)
    rank = jnp.zeros((m,), jnp.int32).at[order].set(pos)
    keep = real & (rank < important)
    if rounds.shape[0] == 0:  # no list has dedup rounds: the diverse part is the residual list's head
        return keep | (real & (rank < budget))
    residual = order[jnp.minimum(important + pos, m - 1)]  # the residual list, then padding (never read)
    keys = similarity_keys(l2_normalize(features[residual]), exact)

    def body(alive, plan_row):
        size, removed = plan_row[0], plan_row[1]
        return jnp.where(removed > 0, _dedup_round(alive, keys, size, removed), alive), None

    alive, _ = jax.lax.scan(body, pos, rounds)
    diverse = jnp.zeros((m,), bool).at[residual[alive]].max(pos < budget - important)
    return keep | (real & diverse)


@functools.partial(jax.jit, static_argnames=("exact_similarity",))
def _vispruner_masked_jit(features, scores, count, budget, important, rounds, *, exact_similarity=True):
    return map_tiles(
        lambda f, s, n, k, t, r: _masked_list(f, s, n, k, t, r, exact_similarity),
        features,
        scores,
        count,
        budget,
        important,
        rounds,
    )


def vispruner_masked(
    features: jax.Array,
    scores: jax.Array,
    count: jax.Array,
    budget: jax.Array,
    important: jax.Array,
    rounds: jax.Array,
    *,
    exact_similarity: bool = True,
) -> jax.Array:
    """VisPruner's selection on B lists of different lengths padded to one static length M (jit-friendly).

    List i holds ``count[i]`` real tokens in its first slots; the rest is padding that is never selected and
    never changes the selection. Its result equals ``vispruner(features[i:i+1, :count[i]],
    scores[i, None, None, :count[i]], num_keep=budget[i], important_ratio=ratio)`` (the rule, its tie-breaking,
    its odd-residual generalisation and its float32 similarity numerics), given the host plans of
    :func:`vispruner_masked_plans` for the same counts, budgets and ratio. The rounds run over the whole
    M-slot buffer (no shrinking phases), so a long padded list costs more than the static function.

    Args:
      features: float (B, M, C), pre-projector features of the listed tokens (padding rows: any finite value).
      scores: float (B, M), the ranking score (head mean already taken; padding: any value).
      count: int32 (B,), real tokens per list (<= M).
      budget: int32 (B,), tokens to keep per list (<= count).
      important: int32 (B,) and rounds: int32 (B, R, 2), from :func:`vispruner_masked_plans`.
      exact_similarity: as for :func:`vispruner`.

    Returns:
      bool (B, M): exactly ``budget[i]`` True entries in list i, all among its first ``count[i]`` slots.

    Raises:
      ValueError (before tracing): wrong ranks or mismatched shapes.
    """
    where = "vispruner_masked"
    checks.check_rank("features", features, 3, where=where, dims="(B, M, C)")
    checks.check_rank("scores", scores, 2, where=where, dims="(B, M)")
    checks.check_rank("rounds", rounds, 3, where=where, dims="(B, R, 2)")
    b, m, _ = features.shape
    chex.assert_shape(scores, (b, m))
    chex.assert_shape([count, budget, important], (b,))
    chex.assert_shape(rounds, (b, None, 2))
    checks.check_bool("exact_similarity", exact_similarity, where=where)
    as_int = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    return _vispruner_masked_jit(
        features,
        scores,
        as_int(count),
        as_int(budget),
        as_int(important),
        as_int(rounds),
        exact_similarity=exact_similarity,
    )
