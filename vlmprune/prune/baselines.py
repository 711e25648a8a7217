"""Baseline token-pruning methods as pure, static-shape JAX functions (docs/methods.md §5).

* :func:`random_keep`, :func:`uniform`: trivial references (random subset; even spatial grid).
* :func:`divprune`: DivPrune's max-min diverse subset of the post-projector embeddings (§5.6).
  :func:`divprune_masked`: the same rule over candidate tokens only, with a per-row budget (NeXT, whole image).
* :func:`visionzip`: VisionZip's dominant tokens plus merged contextual tokens (§5.5).
  :func:`visionzip_no_cls`: the same rule on a tower without CLS (SigLIP, received attention; §9.3).
  :func:`visionzip_dominant`: just its dominant patch tokens (their LLaVA-NeXT layout positions).
* :func:`prumerge_plus`: PruMerge / PruMerge+ with the adaptive IQR token count (§5.4).
* :func:`fastv_select`: FastV's choice of image tokens inside the LLM (§5.2).

Pure selection methods return a ``Selection`` (indices ascending = raster order). Merging methods return a
:class:`MergeResult`: the tokens exactly as the original feeds them to the projector/LLM, in its order,
with a validity mask where the count is data-dependent (PruMerge) and the anchor tokens as a ``Selection``.

Every public function validates its arguments in Python (``ValueError``) and then calls a jitted core whose
static configuration is keyword-only; each compiles once per (shapes, dtypes, configuration). NaN/inf
checks run only on concrete inputs (not inside a caller's ``jax.jit``/``vmap``). Ties resolve to the lower
index everywhere; the originals' tie order (``torch.topk``/``argmax``) is unspecified or first-index (DivPrune's
exact fp16 ties are broken by first index, as ``torch.argmax``). Normalisation, division and head means round as
torch does (:mod:`vlmprune.prune.ops`), which is what makes the fp16 DivPrune picks match.
"""

from __future__ import annotations

import functools
import math

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import checks
from vlmprune.prune.ops import (
    argsort_descending,
    check_head_attention,
    check_num_keep,
    divide,
    gram,
    head_mean,
    head_mean_top_k,
    head_sum,
    l2_normalize,
    matmul,
    matmul_t,
    mean,
    no_fma,
)
from vlmprune.prune.selection import Selection, from_indices, from_mask, map_tiles


@flax.struct.dataclass
class MergeResult:
    """Output of a merging method.

    Attributes:
      tokens: (B, K, C), the features' dtype. The visual tokens in the order the original feeds them to
        the projector / LLM. Invalid slots (only at the tail) are zero.
      valid: bool (B, K). True for real tokens; a prefix of each row.
      selection: the anchor tokens (kept tokens that other tokens are merged into) as a ``Selection`` over
        the N patch tokens (CLS excluded), ascending.
    """

    tokens: jax.Array
    valid: jax.Array
    selection: Selection


def _check_features(name: str, x, rank: int, dims: str, where: str) -> None:
    checks.check_rank(name, x, rank, where=where, dims=dims)
    checks.check_finite(name, x, where=where)


# --------------------------------------------------------------------------------------------------------
# Random and uniform
# --------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("num_tokens", "num_keep", "batch"))
def _random_keep_jit(key: jax.Array, *, num_tokens: int, num_keep: int, batch: int) -> Selection:
    keys = jax.random.split(key, batch)
    picks = jax.vmap(lambda k: jax.random.permutation(k, num_tokens)[:num_keep])(keys)
    return from_indices(picks, num_tokens)


def random_keep(key: jax.Array, num_tokens: int, *, num_keep: int, batch: int | None = None) -> Selection:
    """A uniformly random subset of ``num_keep`` of ``num_tokens`` tokens (without replacement).

    Args:
      key: a JAX PRNG key (typed key scalar or raw uint32 key).
      num_tokens: N, Python int >= 1.
      num_keep: static Python int in [1, N].
      batch: None for one subset (indices (K,)); an int B >= 1 for B independent subsets (indices (B, K)),
        drawn from ``jax.random.split(key, B)``.

    Returns:
      ``Selection`` with indices int32 (K,) or (B, K), ascending, all valid.
    """
    where = "random_keep"
    num_tokens = checks.check_int("num_tokens", num_tokens, lo=1, where=where)
    num_keep = check_num_keep(num_keep, num_tokens, where)
    if batch is not None:
        batch = checks.check_int("batch", batch, lo=1, where=where)
    if not hasattr(key, "dtype"):
        raise ValueError(f"{where}: key must be a JAX PRNG key, got {type(key).__name__}")
    sel = _random_keep_jit(key, num_tokens=num_tokens, num_keep=num_keep, batch=batch or 1)
    if batch is None:
        return Selection(indices=sel.indices[0], valid=sel.valid[0])
    return sel


def _even_positions(count: int, extent: int) -> list[int]:
    """``count`` distinct cell indices in [0, extent), the centres of ``count`` equal bins (count <= extent)."""
    return [int((i + 0.5) * extent / count) for i in range(count)]


def uniform_grid_indices(num_keep: int, rows: int, cols: int) -> np.ndarray:
    """The token indices :func:`uniform` keeps, int32 (num_keep,) ascending (plain NumPy; static).

    Rule: use ``g`` grid rows, ``g = round(sqrt(K * rows / cols))`` clipped to ``[ceil(K / cols), rows]``
    (the row count of a K-point lattice with square cells, and enough rows to fit K). The rows sit at the
    centres of ``g`` equal horizontal bands, ``row_i = floor((i + 0.5) * rows / g)``. Row ``i`` receives
    ``floor((i + 1) K / g) - floor(i K / g)`` tokens (counts differ by at most one, extra tokens spread
    evenly), placed at the centres of equal column bins the same way. Centres of bins at least one cell
    wide are distinct cells, so exactly K distinct tokens result. Examples on 24x24: K = 64 gives the 8x8
    lattice at rows/cols 1, 4, ..., 22; K = 144 the 12x12 lattice at 1, 3, ..., 23; K = N everything.
    """
    g = min(rows, max(math.ceil(num_keep / cols), round(math.sqrt(num_keep * rows / cols))))
    picked = []
    for i, row in enumerate(_even_positions(g, rows)):
        in_row = (i + 1) * num_keep // g - i * num_keep // g
        picked += [row * cols + col for col in _even_positions(in_row, cols)]
    return np.asarray(sorted(picked), np.int32)


def uniform(num_tokens: int, *, num_keep: int, grid: tuple[int, int] | None = None) -> Selection:
    """Spatially even selection of exactly ``num_keep`` patches of a ``rows x cols`` grid.

    See :func:`uniform_grid_indices` for the rule. The result does not depend on any data: it is a constant
    (computed in NumPy at call time), valid inside ``jax.jit``.

    Args:
      num_tokens: N, Python int.
      num_keep: static Python int in [1, N].
      grid: ``(rows, cols)`` with ``rows * cols == N``, raster (row-major) token order. Default: a square grid,
        which requires N to be a perfect square (576 -> 24x24).

    Returns:
      ``Selection`` with indices int32 (K,) ascending, all valid; broadcast it over a batch as needed.
    """
    where = "uniform"
    num_tokens = checks.check_int("num_tokens", num_tokens, lo=1, where=where)
    num_keep = check_num_keep(num_keep, num_tokens, where)
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{where}: N={num_tokens} is not a perfect square; pass grid=(rows, cols)")
        grid = (side, side)
    if len(grid) != 2:
        raise ValueError(f"{where}: grid must be (rows, cols), got {grid!r}")
    rows = checks.check_int("grid rows", grid[0], lo=1, where=where)
    cols = checks.check_int("grid cols", grid[1], lo=1, where=where)
    if rows * cols != num_tokens:
        raise ValueError(f"{where}: grid {rows}x{cols} does not cover N={num_tokens} tokens")
    idx = jnp.asarray(uniform_grid_indices(num_keep, rows, cols))
    return Selection(indices=idx, valid=jnp.ones(idx.shape, bool))


# --------------------------------------------------------------------------------------------------------
# DivPrune (§5.6)
# --------------------------------------------------------------------------------------------------------


def cosine_distance(embeddings: jax.Array) -> jax.Array:
    """DivPrune's ``D = 1 - cos(X, X)``: (N, D) -> (N, N) in the input dtype (fp16 in the original)."""
    normalized = l2_normalize(embeddings)
    return 1 - gram(normalized)


def _divprune_masked_single(embeddings: jax.Array, candidates: jax.Array, count: jax.Array, num_keep: int):
    """Max-min (farthest-point) selection among the candidate rows of one image.

    embeddings (M, D); candidates bool (M,) (at least one True); count int32 scalar, the picks to make
    (<= num_keep and <= the number of candidates). Returns (picked int32 (num_keep,) in pick order, valid bool
    (num_keep,) = slot < count). Non-candidates are never picked; with every row a candidate this is exactly
    DivPrune's rule (``where`` on an all-True mask is the identity).
    """
    m = embeddings.shape[0]
    dist = cosine_distance(embeddings)
    # Step 0: the candidate whose nearest *other* candidate is farthest: argmax over candidate columns j of the
    # second-smallest entry of column j over candidate rows (the smallest is normally the ~0 self-distance).
    # M == 1 has no second entry: pick 0. A lone candidate has second = inf and is picked.
    if m > 1:
        d_rows = jnp.where(candidates[:, None], dist, jnp.inf)  # non-candidate rows are not "other tokens"
        # second-smallest value of every column without a full sort: drop one occurrence of the column minimum
        cols = jnp.arange(m)
        second = jnp.min(d_rows.at[jnp.argmin(d_rows, axis=0), cols].set(jnp.inf), axis=0)
        first = jnp.argmax(jnp.where(candidates, second, -jnp.inf)).astype(jnp.int32)
    else:
        first = jnp.zeros((), jnp.int32)

    def pick(i, carry):
        picked, nearest, taken = carry
        # Generalisation: already-picked tokens are excluded. The original can re-pick one only when no
        # remaining token is farther from the picked set than a picked token is from itself (D[s, s] ~ 0, a
        # rounding residue in fp16), i.e. the rest duplicate picked tokens; it then keeps fewer than K.
        score = jnp.where(taken | ~candidates, -jnp.inf, nearest)
        j = jnp.argmax(score).astype(jnp.int32)  # first index on ties, like torch.argmax
        return picked.at[i].set(j), jnp.minimum(nearest, dist[j]), taken.at[j].set(True)

    picked = jnp.zeros((num_keep,), jnp.int32).at[0].set(first)
    init = (picked, dist[first], jnp.zeros((m,), bool).at[first].set(True))
    # P6: running minimum over the picked rows, min_s D[s, j] (rows of D, as the original's index_select).
    picked, _, _ = jax.lax.fori_loop(1, num_keep, pick, init)
    return picked, jnp.arange(num_keep) < count


def _divprune_single(embeddings: jax.Array, num_keep: int) -> jax.Array:
    """Max-min (farthest-point) selection on one image: (N, D) -> picked indices int32 (K,), pick order."""
    n = embeddings.shape[0]
    picked, _ = _divprune_masked_single(embeddings, jnp.ones((n,), bool), jnp.int32(num_keep), num_keep)
    return picked


@functools.partial(jax.jit, static_argnames=("num_keep",))
def _divprune_picks_jit(embeddings: jax.Array, *, num_keep: int) -> jax.Array:
    return map_tiles(lambda e: _divprune_single(e, num_keep), embeddings)


@functools.partial(jax.jit, static_argnames=("num_keep",))
def _divprune_jit(embeddings: jax.Array, *, num_keep: int) -> Selection:
    return from_indices(_divprune_picks_jit(embeddings, num_keep=num_keep), embeddings.shape[1])


def divprune_picks(embeddings: jax.Array, *, num_keep: int) -> jax.Array:
    """DivPrune's picks in the order it makes them (the original's ``s``), int32 (B, K).

    Same rule and arguments as :func:`divprune`, which returns these indices sorted (raster order).
    """
    where = "divprune_picks"
    _check_features("embeddings", embeddings, 3, "(B, N, D)", where)
    num_keep = check_num_keep(num_keep, embeddings.shape[1], where)
    return _divprune_picks_jit(embeddings, num_keep=num_keep)


def divprune_num_keep(num_tokens: int, ratio: float = 0.098) -> int:
    """DivPrune's budget ``round(ratio * V)`` (Python round, half to even): 56 of 576 at the default 0.098."""
    return int(round(ratio * num_tokens))


def divprune(embeddings: jax.Array, *, num_keep: int) -> Selection:
    """DivPrune (docs/methods.md §5.6): a max-min diverse subset of the visual embeddings.

    ``D = 1 - cos`` of the L2-normalised rows (in the input dtype: fp16 reproduces the original's numerics).
    Pick 0 is the argmax over columns j of the second-smallest entry of column j; pick i > 0 is
    ``argmax_j min_{s picked} D[s, j]``, first index on ties (``torch.argmax``). Already-picked tokens are
    never picked again (documented generalisation; see ``_divprune_single``), so there are always exactly
    K distinct tokens.

    Args:
      embeddings: float (B, N, D). Post-projector visual embeddings (the original's LLM input rows).
      num_keep: static Python int K in [1, N]; the original uses ``divprune_num_keep(N)``.

    Returns:
      ``Selection`` with indices int32 (B, K) ascending (the original re-assembles in raster order), all valid.
    """
    where = "divprune"
    _check_features("embeddings", embeddings, 3, "(B, N, D)", where)
    num_keep = check_num_keep(num_keep, embeddings.shape[1], where)
    return _divprune_jit(embeddings, num_keep=num_keep)


@functools.partial(jax.jit, static_argnames=("max_keep",))
def _divprune_masked_jit(embeddings, candidates, count, *, max_keep: int) -> Selection:
    picked, valid = map_tiles(lambda e, c, k: _divprune_masked_single(e, c, k, max_keep), embeddings, candidates, count)
    m = embeddings.shape[1]
    idx = jnp.sort(jnp.where(valid, picked, m), axis=-1)  # invalid picks -> fill value M, sorted to the tail
    return Selection(indices=idx, valid=idx < m)


def divprune_masked(embeddings: jax.Array, candidates: jax.Array, count: jax.Array, *, max_keep: int) -> Selection:
    """DivPrune restricted to candidate tokens, with a per-row (traced) budget and a static maximum.

    The max-min rule of :func:`divprune` over the candidates only: a non-candidate is never picked and does not
    count as anyone's nearest other token. Row b keeps exactly ``min(count[b], candidates in row b)`` tokens;
    the picks are made in DivPrune's order and the first ``count[b]`` are kept. With every token a candidate
    and ``count == max_keep`` this equals ``divprune(embeddings, num_keep=max_keep)``. Used for LLaVA-NeXT,
    where the candidates are the tokens of an image's tiles that appear in the official layout.

    Args:
      embeddings: float (B, M, D). Post-projector embeddings.
      candidates: bool (B, M). Every row needs at least one candidate.
      count: int (B,). Tokens to keep per row (traced; values above ``max_keep`` are clipped).
      max_keep: static Python int in [1, M], the slot count.

    Returns:
      ``Selection`` with indices int32 (B, max_keep) ascending, valid marking the kept prefix; invalid slots
      hold M.
    """
    where = "divprune_masked"
    _check_features("embeddings", embeddings, 3, "(B, M, D)", where)
    max_keep = check_num_keep(max_keep, embeddings.shape[1], where)
    candidates = jnp.asarray(candidates, bool)
    count = jnp.asarray(count, jnp.int32)
    if candidates.shape != embeddings.shape[:2]:
        raise ValueError(f"{where}: candidates must have shape {embeddings.shape[:2]}, got {candidates.shape}")
    if count.shape != embeddings.shape[:1]:
        raise ValueError(f"{where}: count must have shape ({embeddings.shape[0]},), got {count.shape}")
    n_cand = jnp.sum(candidates, axis=1, dtype=jnp.int32)
    if checks.is_concrete(n_cand) and bool(jnp.any(n_cand == 0)):
        raise ValueError(f"{where}: every row needs at least one candidate token")
    count = jnp.clip(jnp.minimum(count, n_cand), 0, max_keep)
    return _divprune_masked_jit(embeddings, candidates, count, max_keep=max_keep)


# --------------------------------------------------------------------------------------------------------
# VisionZip (§5.5)
# --------------------------------------------------------------------------------------------------------


def visionzip_targets(remaining: int, contextual: int) -> np.ndarray:
    """Positions (in the remaining-token list) of VisionZip's contextual targets, int (contextual,).

    ``arange(0, R, max(1, R // contextual))[:contextual]`` (§5.5); needs ``1 <= contextual <= R``.
    """
    return np.arange(0, remaining, max(1, remaining // contextual))[:contextual]


def _visionzip_dominant_patches(cls_attn, dominant: int):
    """The (dominant - 1) patches (0-based, CLS excluded) with the largest head-*sum* CLS attention, cls_attn
    (H, N) -> int32 (dominant - 1,) in score order (lower index first on ties); CLS is the remaining slot."""
    score = head_sum(cls_attn)  # torch order
    if dominant > 1:
        return jax.lax.top_k(score, dominant - 1)[1].astype(jnp.int32)
    return jnp.zeros((0,), jnp.int32)


def visionzip_dominant(cls_attn: jax.Array, *, dominant: int) -> Selection:
    """VisionZip's dominant *patch* tokens (the ``dominant - 1`` besides CLS), as :func:`visionzip` picks them.

    cls_attn float (B, H, N) -> ``Selection`` (B, dominant - 1) over the N patches, ascending, all valid.
    """
    where = "visionzip_dominant"
    check_head_attention("cls_attn", cls_attn, where)
    dominant = checks.check_int("dominant", dominant, lo=2, hi=cls_attn.shape[2] + 1, where=where)
    return _visionzip_dominant_jit(cls_attn, dominant=dominant)


@functools.partial(jax.jit, static_argnames=("dominant",))
def _visionzip_dominant_jit(cls_attn, *, dominant: int) -> Selection:
    top = jax.vmap(lambda a: _visionzip_dominant_patches(a, dominant))(cls_attn)
    return from_indices(top, cls_attn.shape[2])


def _visionzip_single(hidden, attn, keys, dominant: int, contextual: int, with_cls: bool = True):
    """VisionZip on one image or tile.

    with_cls (CLIP): hidden (1+N, C), attn (H, N) CLS rows, keys (1+N, H, dh); CLS is always dominant and the
    other ``dominant - 1`` are the top patches by head-summed CLS attention. Without CLS (SigLIP): hidden (N, C),
    attn (H, N) received attention, keys (N, H, dh); the ``dominant`` top tokens by head-mean received attention.

    Returns (tokens (dominant + contextual, C), anchor patch indices int32 (dominant - with_cls + contextual,)).
    """
    total = hidden.shape[0]  # 1 + N with CLS, N without
    offset = int(with_cls)
    if with_cls:
        top_patches = _visionzip_dominant_patches(attn, dominant)
        is_dominant = jnp.zeros((total,), bool).at[0].set(True).at[top_patches + 1].set(True)
    else:
        top_patches = jax.lax.top_k(head_mean(attn), dominant)[1].astype(jnp.int32)  # lower index first on ties
        is_dominant = jnp.zeros((total,), bool).at[top_patches].set(True)
    (dominant_idx,) = jnp.nonzero(is_dominant, size=dominant)  # ascending: (CLS, then) patches in raster order
    tokens = [hidden[dominant_idx]]
    anchors = [top_patches]

    if contextual > 0:
        remaining = total - dominant
        (rest_idx,) = jnp.nonzero(~is_dominant, size=remaining)  # ascending, never CLS (always dominant)
        target_pos = visionzip_targets(remaining, contextual)
        other_pos = np.setdiff1d(np.arange(remaining), target_pos)
        # metric = raw layer keys averaged over heads, L2-normalised (over the remaining tokens only).
        metric = l2_normalize(mean(keys, axis=1)[rest_idx])  # torch's head mean, then x / ||x||
        sim = matmul_t(metric[other_pos], metric[target_pos])  # (R - contextual, contextual)
        assign = jax.nn.one_hot(jnp.argmax(sim, axis=1), contextual, dtype=hidden.dtype)  # first index on ties
        counts = jnp.maximum(jnp.sum(assign, axis=0), 1)[:, None]  # clamp(min=1): unassigned targets
        merged = divide(matmul(assign.T, hidden[rest_idx[other_pos]]), counts)  # mean of assigned hiddens
        tokens.append(hidden[rest_idx[target_pos]] + merged)
        anchors.append(rest_idx[target_pos] - offset)
    return jnp.concatenate(tokens), jnp.concatenate(anchors).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("dominant", "contextual", "with_cls"))
def _visionzip_jit(hidden, attn, keys, *, dominant: int, contextual: int, with_cls: bool = True) -> MergeResult:
    tokens, anchors = jax.vmap(lambda h, a, k: _visionzip_single(h, a, k, dominant, contextual, with_cls))(
        hidden, attn, keys
    )
    chex.assert_shape(tokens, (hidden.shape[0], dominant + contextual, hidden.shape[2]))
    return MergeResult(
        tokens=tokens,
        valid=jnp.ones(tokens.shape[:2], bool),
        selection=from_indices(anchors, hidden.shape[1] - int(with_cls)),
    )


def visionzip(
    hidden_with_cls: jax.Array, cls_attn: jax.Array, keys: jax.Array, *, dominant: int, contextual: int
) -> MergeResult:
    """VisionZip (docs/methods.md §5.5): dominant tokens by CLS attention plus merged contextual tokens.

    1. Dominant: CLS and the ``dominant - 1`` patches with the largest head-summed CLS attention, in
       ascending index order (CLS first, then raster order).
    2. Contextual: the other ``R = 1 + N - dominant`` tokens (ascending); targets at list positions
       ``arange(0, R, max(1, R // contextual))[:contextual]``; every other token joins its most similar
       target (cosine of head-mean raw keys, first target on ties); each contextual token is its target's
       hidden state plus the mean of the hidden states that joined it (just the target if none did).

    Args:
      hidden_with_cls: float (B, 1+N, C). Layer hidden states *including* CLS at index 0.
      cls_attn: float (B, H, N). CLS-query attention row per head, patch columns only.
      keys: float (B, 1+N, H, dh). The same layer's raw ``k_proj`` keys (before scaling), split per head.
      dominant: static int in [1, 1+N], tokens kept verbatim *including* CLS (README: 54 for 64 tokens).
      contextual: static int in [0, 1+N-dominant], merged tokens (README: 10). 0 skips step 2.

    Returns:
      ``MergeResult``: tokens (B, dominant + contextual, C) = ``[CLS, dominant patches (raster),
      contextual (target order)]``, valid all True; selection = the dominant patches and the contextual
      targets as patch indices 0..N-1 (CLS excluded), (B, dominant - 1 + contextual), ascending.
    """
    where = "visionzip"
    _check_features("hidden_with_cls", hidden_with_cls, 3, "(B, 1+N, C)", where)
    check_head_attention("cls_attn", cls_attn, where)
    _check_features("keys", keys, 4, "(B, 1+N, H, dh)", where)
    batch, total, _ = hidden_with_cls.shape
    checks.check_dims_equal(
        [
            ("hidden_with_cls batch", batch, "cls_attn batch", cls_attn.shape[0]),
            ("hidden_with_cls batch", batch, "keys batch", keys.shape[0]),
            ("hidden_with_cls tokens 1+N", total, "1 + cls_attn tokens N", 1 + cls_attn.shape[2]),
            ("hidden_with_cls tokens 1+N", total, "keys tokens 1+N", keys.shape[1]),
            ("cls_attn heads H", cls_attn.shape[1], "keys heads H", keys.shape[2]),
        ],
        where=where,
    )
    dominant = checks.check_int("dominant", dominant, where=where)
    if not 1 <= dominant <= total:
        raise ValueError(f"{where}: dominant (CLS included) must be in [1, 1+N={total}], got {dominant}")
    contextual = checks.check_int("contextual", contextual, where=where)
    if not 0 <= contextual <= total - dominant:
        raise ValueError(f"{where}: contextual must be in [0, 1+N-dominant={total - dominant}], got {contextual}")
    return _visionzip_jit(hidden_with_cls, cls_attn, keys, dominant=dominant, contextual=contextual)


def visionzip_no_cls(
    hidden: jax.Array, received_attn: jax.Array, keys: jax.Array, *, dominant: int, contextual: int
) -> MergeResult:
    """VisionZip on a tower without CLS (SigLIP; docs/methods.md §9.3, [PROPOSED]): :func:`visionzip` with no
    CLS slot and the received attention in place of the CLS row.

    1. Dominant: the ``dominant`` tokens with the largest head-*mean* received attention, ascending index order.
    2. Contextual: exactly as :func:`visionzip` on the other ``R = N - dominant`` tokens (ascending): targets at
       list positions ``arange(0, R, max(1, R // contextual))[:contextual]``, every other token joins its most
       cosine-similar target (head-mean raw keys, first target on ties), contextual token = target + mean of
       the tokens that joined it.

    Args:
      hidden: float (B, N, C). The tokens to merge (the tower's pre-projector features).
      received_attn: float (B, H, N). Per head, the attention each token receives averaged over queries.
      keys: float (B, N, H, dh). The scoring layer's raw ``k_proj`` keys (before scaling), split per head.
      dominant: static int in [1, N].
      contextual: static int in [0, N - dominant]; 0 skips step 2.

    Returns:
      ``MergeResult``: tokens (B, dominant + contextual, C) = ``[dominant (raster), contextual (target
      order)]``, valid all True; selection = the dominant tokens and the contextual targets over N, ascending.
    """
    where = "visionzip_no_cls"
    _check_features("hidden", hidden, 3, "(B, N, C)", where)
    check_head_attention("received_attn", received_attn, where)
    _check_features("keys", keys, 4, "(B, N, H, dh)", where)
    batch, total, _ = hidden.shape
    checks.check_dims_equal(
        [
            ("hidden batch", batch, "received_attn batch", received_attn.shape[0]),
            ("hidden batch", batch, "keys batch", keys.shape[0]),
            ("hidden tokens N", total, "received_attn tokens N", received_attn.shape[2]),
            ("hidden tokens N", total, "keys tokens N", keys.shape[1]),
            ("received_attn heads H", received_attn.shape[1], "keys heads H", keys.shape[2]),
        ],
        where=where,
    )
    dominant = checks.check_int("dominant", dominant, lo=1, hi=total, where=where)
    contextual = checks.check_int("contextual", contextual, lo=0, hi=total - dominant, where=where)
    return _visionzip_jit(hidden, received_attn, keys, dominant=dominant, contextual=contextual, with_cls=False)


# --------------------------------------------------------------------------------------------------------
# PruMerge / PruMerge+ (§5.4)
# --------------------------------------------------------------------------------------------------------


def prumerge_tables(num_tokens: int, plus: bool) -> tuple[np.ndarray, np.ndarray]:
    """Static look-up tables indexed by the outlier count c in [0, N] (plain NumPy).

    The original turns c into ``ratio = c / N`` and then uses ``int(N * ratio)`` as the top-k size and
    ``int(int(1 / ratio) / 3)`` as the PruMerge+ sampling stride over ``arange(0, 575, stride)``. Both are
    float64 round trips (``int(N * (c / N))`` is ``c - 1`` for some c), so they are tabulated exactly here.

    Returns:
      keep_count: int32 (N+1,), top-k size for each c.
      samples: bool (N+1, N), PruMerge+'s spatial samples for each c (all False when ``plus`` is False).
        * ``575`` is the original's hard-coded ``N - 1`` for N = 576; we use ``N - 1``.
        * c = 0 (no outliers): the original divides by zero. Generalisation: the stride -> infinity limit,
          i.e. the single sample ``[0]``.
        * stride 0 (ratio > 1/3, impossible for IQR outliers in practice): the original raises
          (``arange`` step 0). Generalisation: stride 1.
    """
    n = num_tokens
    keep_count = np.array([int(n * (c / n)) for c in range(n + 1)], np.int32)
    samples = np.zeros((n + 1, n), bool)
    if plus:
        samples[0, 0] = True
        for c in range(1, n + 1):
            stride = max(1, int(int(1 / (c / n)) / 3))
            samples[c, np.arange(0, n - 1, stride)] = True
    return keep_count, samples


def numpy_percentile(x: jax.Array, q: float) -> jax.Array:
    """``np.percentile(x, q)`` (linear method) of a float32 vector (N,), with NumPy's own rounding.

    NumPy sorts, takes the virtual index ``(N - 1) q / 100`` in float64, and interpolates between its neighbours
    a <= b in float32 as ``a + (b - a) t`` for ``t < 0.5`` and ``b - (b - a) (1 - t)`` otherwise. ``jnp.percentile``
    weights the two neighbours instead, which differs from NumPy in the last bit for about 30 % of random inputs;
    the index and ``t`` are static here, so this is a sort, two reads and two float32 operations.
    """
    n = x.shape[0]
    virtual = (n - 1) * (q / 100.0)
    lo = int(math.floor(virtual))
    hi = min(lo + 1, n - 1)
    t = np.float32(virtual - lo)
    ordered = jnp.sort(x)
    a, b = ordered[lo], ordered[hi]
    diff = b - a
    if t >= 0.5:
        return b - no_fma(diff * jnp.float32(1 - t))
    return a + no_fma(diff * jnp.float32(t))


def _iqr_outlier_count(attn: jax.Array) -> jax.Array:
    """Number of values above ``Q3 + 1.5 (Q3 - Q1)``, attn (N,) -> int32 scalar.

    As the original's ``outlier_dectection``: the attention as float32, NumPy's linear percentiles
    (:func:`numpy_percentile`, NumPy's rounding), the bound in float32 (NumPy >= 2 keeps float32 scalars float32).
    """
    attn = attn.astype(jnp.float32)
    q1, q3 = numpy_percentile(attn, 25.0), numpy_percentile(attn, 75.0)
    return jnp.sum(attn > q3 + no_fma(jnp.float32(1.5) * (q3 - q1)), dtype=jnp.int32)


def _prumerge_single(features, attn, keys, keep_table, sample_table, num_neighbors: int):
    """PruMerge(+) on one image. features (N, C), attn (N,), keys (N, D).

    Returns (tokens (N+1, C), valid (N+1,), anchors bool (N,)).
    """
    n = features.shape[0]
    slot = jnp.arange(n + 1)
    outliers = _iqr_outlier_count(attn)
    num_top = keep_table[outliers]

    # P2: the top-k set for a traced k; `order` is also the original's output order (descending score).
    order = argsort_descending(attn).astype(jnp.int32)
    is_top = jnp.zeros((n,), bool).at[order].set(slot[:n] < num_top)
    is_sample = sample_table[outliers] & ~is_top  # PruMerge+ samples not already kept
    anchors = is_top | is_sample
    (sample_list,) = jnp.nonzero(is_sample, size=n, fill_value=0)  # ascending, as the original appends them
    num_anchors = num_top + jnp.sum(is_sample, dtype=jnp.int32)

    # Merge, for all N rows at once: x_i + sum of a_j x_j over the num_neighbors tokens j != i whose keys
    # are most cosine-similar to i's (kept or pruned alike); the weights are the raw attentions.
    if num_neighbors > 0:
        normalized = l2_normalize(keys)
        sim = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, gram(normalized))
        _, neighbors = jax.lax.top_k(sim, num_neighbors)  # (N, m)
        rows = jnp.arange(n)[:, None]
        neighbor_attn = attn[neighbors].astype(features.dtype)
        weights = jnp.zeros((n, n), features.dtype).at[rows, neighbors].set(neighbor_attn)  # (N, N)
        merged = features + matmul(weights, features)
    else:
        merged = features
    pruned_weights = jnp.where(anchors, 0, attn).astype(features.dtype)
    extra = matmul(pruned_weights[None, :], features)[0]  # sum over pruned tokens of a_j x_j

    # Output slots: top-k (score order), then samples (ascending), then the extra token, then zero padding.
    at = slot[:, None]
    anchor_at_slot = jnp.where(
        slot < num_top, order[jnp.minimum(slot, n - 1)], sample_list[jnp.clip(slot - num_top, 0, n - 1)]
    )
    tokens = jnp.where(at < num_anchors, merged[anchor_at_slot], jnp.where(at == num_anchors, extra, 0))
    return tokens.astype(features.dtype), slot <= num_anchors, anchors


@functools.partial(jax.jit, static_argnames=("plus", "num_neighbors"))
def _prumerge_jit(features, attn, keys, *, plus: bool, num_neighbors: int) -> MergeResult:
    n = features.shape[1]
    keep_table, sample_table = (jnp.asarray(t) for t in prumerge_tables(n, plus))
    tokens, valid, anchors = map_tiles(
        lambda f, a, k: _prumerge_single(f, a, k, keep_table, sample_table, num_neighbors), features, attn, keys
    )
    return MergeResult(tokens=tokens, valid=valid, selection=from_mask(anchors, n))


def prumerge_plus(
    features: jax.Array,
    cls_attn_1head: jax.Array,
    keys: jax.Array,
    *,
    plus: bool = True,
    num_neighbors: int = 32,
) -> MergeResult:
    """PruMerge+ (``plus=True``) or PruMerge (``plus=False``), docs/methods.md §5.4, batched over images.

    1. Adaptive count: c = number of attentions above ``Q3 + 1.5 IQR`` (linear percentiles); keep the
       top ``int(N * (c / N))`` tokens by attention (see :func:`prumerge_tables`).
    2. PruMerge+ only: add the spatial samples ``arange(0, N-1, int(int(1 / (c/N)) / 3))`` not already kept
       (ascending).
    3. Merge: every kept token i becomes ``x_i + sum_j a_j x_j`` over the ``num_neighbors`` tokens j != i
       with the most cosine-similar keys (kept or pruned); weights are the raw attentions (not normalised).
    4. One extra token ``sum_{j pruned} a_j x_j`` is appended.

    Differences from the original, all documented and tested against its stored outputs
    (tests/prune/test_prune_golden_baselines.py): per-image statistics: the original flattens the attention of the
    whole batch into one IQR test (B*N values) and keeps ``int(N * pooled_ratio)`` tokens in every image; here
    each image counts its own outliers, so an image's result does not depend on what it is batched with (for
    B = 1 both rules are the same); PruMerge+'s samples end at ``N - 1`` (the original's hard-coded 575 raises
    for N < 576, e.g. N = 144); ``num_neighbors`` is capped at N - 1 (the original's
    ``topk(32)`` raises for N <= 32); the c = 0 and stride-0 crashes of PruMerge+ are generalised as in
    :func:`prumerge_tables`. The IQR bound is computed as the original's NumPy (>= 2) code computes it, percentile
    rounding included (:func:`numpy_percentile`); under NumPy 1.x the original promoted the bound to float64,
    which can count a value within a float32 ulp of the bound differently.

    Args:
      features: float (B, N, C). Patch features (``hidden_states[-2][:, 1:]``).
      cls_attn_1head: float (B, N). Single-head CLS attention over the patches (softmax over all 1+N keys
        of the last layer's full-width q/k, CLS column dropped).
      keys: float (B, N, D). The same layer's patch keys (CLS dropped).
      plus: static bool, PruMerge+ (True) or PruMerge (False).
      num_neighbors: static int >= 1, tokens merged into each kept token (32 in the original).

    Returns:
      ``MergeResult``: tokens (B, N+1, C) = ``[kept top-k (descending attention), PruMerge+ samples
      (ascending), extra token, zero padding]``; valid (B, N+1) marks the first ``kept + 1`` slots; selection
      = the kept tokens (top-k and samples) over N, ascending, with a static maximum of N slots.
    """
    where = "prumerge_plus"
    _check_features("features", features, 3, "(B, N, C)", where)
    _check_features("cls_attn_1head", cls_attn_1head, 2, "(B, N)", where)
    _check_features("keys", keys, 3, "(B, N, D)", where)
    batch, num_tokens, _ = features.shape
    checks.check_dims_equal(
        [
            ("features batch", batch, "cls_attn_1head batch", cls_attn_1head.shape[0]),
            ("features batch", batch, "keys batch", keys.shape[0]),
            ("features tokens N", num_tokens, "cls_attn_1head tokens N", cls_attn_1head.shape[1]),
            ("features tokens N", num_tokens, "keys tokens N", keys.shape[1]),
        ],
        where=where,
    )
    if not isinstance(plus, (bool, np.bool_)):
        raise ValueError(f"{where}: plus must be a bool, got {plus!r}")
    num_neighbors = checks.check_int("num_neighbors", num_neighbors, lo=1, where=where)
    return _prumerge_jit(
        features, cls_attn_1head, keys, plus=bool(plus), num_neighbors=min(num_neighbors, num_tokens - 1)
    )


# --------------------------------------------------------------------------------------------------------
# FastV (§5.2)
# --------------------------------------------------------------------------------------------------------


def fastv_select(last_row_attn: jax.Array, *, num_keep: int) -> Selection:
    """FastV's choice of image tokens (docs/methods.md §5.2): top-k of the head-mean attention that the last
    prompt token pays to each image token at LLM layer K-1.

    Args:
      last_row_attn: float (B, H, N_img). The last prefill query's attention probabilities restricted to the
        image columns ``[S, S + N_img)``, per head.
      num_keep: static Python int in [1, N_img] (FastV's ``ATTENTION_RANK``).

    Returns:
      ``Selection`` with indices int32 (B, K) ascending (image-local; add S for sequence positions), all
      valid. Ties: lower index first (``torch.topk``'s tie order is unspecified). The head mean is taken in
      the input dtype; pass fp16 probabilities to mimic the original's fp16 LLM.
    """
    where = "fastv_select"
    check_head_attention("last_row_attn", last_row_attn, where)
    num_keep = check_num_keep(num_keep, last_row_attn.shape[2], where)
    return head_mean_top_k(last_row_attn, num_keep=num_keep)
