"""HiRED: attention-guided token dropping for high-resolution VLMs (Arif et al., AAAI-25). ``docs/methods.md`` §3.

HiRED keeps a fixed token budget per image of ``P = 1 + k`` partitions (tile 0 = the squashed base image, tiles
1..k = the anyres crops):

* Phase 1 (budget split, §3.2 steps 1-4d): ``N_budget = int(P * N * rate)``; the base image gets
  ``N_full = min(int(N_budget * alpha), N)``, the tiles share ``N_sub = min(N_budget - N_full, (P - 1) * N)``
  according to where the *shallow-layer* (layer 0) CLS attention of the base image is concentrated.
* Phase 2 (selection, step 3 and 4e): every partition keeps its budget of tokens with the largest *deep-layer*
  (layer 22) CLS attention, summed over heads.

Two Phase-1 variants (§3.2, §3.7):

* ``variant="reference"`` (default; "reference-compat", matches the authors' code at ``502d6dd`` and the golden
  file): mark the ``K_sp`` thumbnail patches with the largest head-summed shallow attention (``K_sp`` defaults to
  ``int(N * (1 - alpha))``; commit ``c5978a5`` uses a fixed 100, see :data:`HIRED_K_SP_TOP100`); tile t's share is
  the number of marked patches in the contiguous raster chunk ``[t * N / k, (t + 1) * N / k)`` — a horizontal band
  of the thumbnail, *not* the tile's footprint (§3.7 band-vs-tile quirk). ``b_t = trunc(float32(count_t / Σcount)
  * N_sub)``, clamped to ``≤ N``; no redistribution of the truncation remainder.
* ``variant="paper"`` (Algorithm 1 of the paper): tile i's content score is the raw head-summed shallow attention
  mass over the thumbnail patches that tile i covers spatially (needs the grid ``(cols, rows)``);
  ``b_i = floor(N_sub * s_i / Σ s)`` computed in float32 in that order, clamped to ``≤ N``. ``N_full`` and ``N_sub``
  are the reference's (the paper's ``N_p0 = floor(alpha * N_budget)`` has no explicit ``min(., N)``, but a
  partition cannot hold more than N tokens, so the clamp is kept). Tile selection is the same as the reference.

Shapes and static structure. Every partition returns at most ``K_max = max(N_full, min(N, N_sub))`` tokens (a static
Python int, :func:`hired_max_keep`); the per-tile budgets ``b_t`` are data-dependent, so a :class:`HiredSelection`
has a static slot count with a masked tail (``valid``) and carries the budgets. Kept indices are ascending (raster
order), as in the original's boolean-mask packing.

Batching (:func:`hired_batched`): images of different grids are padded to a common ``T_max`` tiles. ``P`` enters the
budget arithmetic only through Python float truncation, so the split is tabulated on the host for every
``P = 1..T_max`` (a static table) and each image indexes it with its own *traced* ``num_tiles``: one compilation per
``(B, T_max, H, N)`` and configuration, whatever the mix of grids. :func:`hired` is the B = 1 case of the same core.

Tie rule: among equal scores the lower token index wins (``lax.top_k`` order), both for the ``K_sp`` spatial map
and for the per-partition selection. ``torch.topk`` leaves tie order unspecified, so parity with the original is
defined on tie-free inputs (the golden file).

Zero budgets: a tile whose budget truncates to 0 keeps nothing (its row of ``valid`` is all False). If no thumbnail
patch is marked at all (``K_sp == 0``, e.g. ``alpha == 1`` with ``N_sub > 0``), the original divides 0 by 0; here
every tile budget is 0 (documented choice). Tokens selected in padded borders are *not* removed here: HiRED's
unpad crop happens later, at packing (§3.4).

Dtypes: head sums are taken in the input dtype (the original sums fp16 attention in fp16); the budget ratio is
float32 as in the original.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from vlmprune import checks
from vlmprune.prune.ops import divide, head_sum, top_budget_selection
from vlmprune.prune.selection import Selection, from_indices

Variant = Literal["reference", "paper"]
VARIANTS: tuple[str, ...] = ("reference", "paper")

#: ``K_sp`` of HiRED commit ``c5978a5`` (fixed top-100 spatial map; §3.2 step 4a). The default (``None``) is the
#: ``502d6dd`` rule ``int(N * (1 - alpha))``.
HIRED_K_SP_TOP100 = 100


@flax.struct.dataclass
class HiredSelection(Selection):
    """A :class:`Selection` plus HiRED's per-partition budgets.

    Attributes:
      indices: int32 (..., T, K_max), ascending kept indices; fill value ``N`` in invalid slots.
      valid: bool (..., T, K_max); row t has exactly ``budgets[..., t]`` True slots.
      budgets: int32 (..., T). Tokens allotted to each partition (``N_full`` for tile 0, ``b_t`` for the tiles,
        0 for padding tiles in the batched form).
    """

    budgets: jax.Array


# ----------------------------------------------------------------------------------------------------------------
# Host-side (static) budget arithmetic, §3.2 steps 1-2 and 4a. Python ints and floats, exactly as the original.
# ----------------------------------------------------------------------------------------------------------------


def hired_allocation(num_tiles: int, num_tokens: int, *, budget_rate: float, alpha: float) -> tuple[int, int, int]:
    """Static budget split ``(N_budget, N_full, N_sub)`` for an image of ``num_tiles`` partitions (§3.2 steps 1-2).

    ``N_budget = int(P * N * rate)``, ``N_full = min(int(N_budget * alpha), N)``,
    ``N_sub = min(N_budget - N_full, (P - 1) * N)``; Python float64 truncation, as the original.
    """
    where = "hired_allocation"
    p = checks.check_int("num_tiles", num_tiles, lo=1, where=where)
    n = checks.check_int("num_tokens", num_tokens, lo=1, where=where)
    rate = checks.check_float("budget_rate", budget_rate, lo=0.0, hi=1.0, lo_open=True, where=where)
    alpha = checks.check_float("alpha", alpha, lo=0.0, hi=1.0, where=where)
    n_budget = int(p * n * rate)
    n_full = min(int(n_budget * alpha), n)
    n_sub = min(n_budget - n_full, (p - 1) * n)
    return n_budget, n_full, n_sub


def hired_default_k_sp(num_tokens: int, alpha: float) -> int:
    """``K_sp = int(N * (1 - alpha))``, the spatial top-K size of snapshot ``502d6dd`` (§3.2 step 4a)."""
    return int(num_tokens * (1 - alpha))


def hired_max_keep(num_tiles: int, num_tokens: int, *, budget_rate: float, alpha: float) -> int:
    """Static slot count ``K_max`` of a HiRED selection for images of up to ``num_tiles`` partitions.

    ``max over P <= num_tiles of max(N_full(P), min(N, N_sub(P)))``: tile 0 keeps exactly ``N_full`` and a tile keeps
    ``b_t <= min(N, N_sub)`` (the float32 ratio is at most 1, and budgets are clamped to N).
    """
    best = 0
    for p in range(1, num_tiles + 1):
        _, n_full, n_sub = hired_allocation(p, num_tokens, budget_rate=budget_rate, alpha=alpha)
        best = max(best, n_full, min(num_tokens, n_sub))
    return best


def _budget_table(max_tiles: int, num_tokens: int, budget_rate: float, alpha: float) -> tuple[tuple[int, int], ...]:
    """Row P (0..max_tiles) = (N_full(P), N_sub(P)); row 0 is a dummy (0, 0). A static, hashable jit argument."""
    rows = [(0, 0)]
    for p in range(1, max_tiles + 1):
        _, n_full, n_sub = hired_allocation(p, num_tokens, budget_rate=budget_rate, alpha=alpha)
        rows.append((n_full, n_sub))
    return tuple(rows)


# ----------------------------------------------------------------------------------------------------------------
# Traced core.
# ----------------------------------------------------------------------------------------------------------------


def _reference_tile_budgets(f0_base, k, n_sub, *, num_slots: int, k_sp: int) -> jax.Array:
    """Reference-compat Phase 1 (§3.2 steps 4a-4d): band counts of a binary top-K_sp map. int32 (num_slots,)."""
    n = f0_base.shape[0]
    spatial = jnp.zeros((n,), jnp.int32)
    if k_sp > 0:
        _, top = jax.lax.top_k(f0_base, k_sp)
        spatial = spatial.at[top].set(1)
    # §3.7: the original reshapes the flat thumbnail map to (a, b, N/(a*b)) and sums the last axis, i.e. it counts
    # contiguous raster chunks of N/k tokens (horizontal bands), whatever the tile layout. For N divisible by k,
    # chunk(j) = j // (N/k) = (j * k) // N, which also works with a traced k.
    band = (jnp.arange(n, dtype=jnp.int32) * k) // n
    counts = jax.ops.segment_sum(spatial, band, num_segments=num_slots)
    total = jnp.sum(counts)
    # int64 / int64 -> float32 in the original; then `* N_sub` in float32 and `.int()` truncation (values >= 0, so
    # floor == trunc). (c / total) * N_sub can land on x.99999 and lose one token; we reproduce that on purpose.
    ratio = divide(counts.astype(jnp.float32), jnp.maximum(total, 1).astype(jnp.float32))  # correctly rounded
    b = jnp.floor(ratio * n_sub.astype(jnp.float32)).astype(jnp.int32)
    b = jnp.where(total > 0, b, 0)  # K_sp == 0: 0/0 in the original; defined here as "tiles keep nothing"
    return jnp.minimum(b, n)


def _paper_tile_budgets(f0_base, grid, n_sub, *, num_slots: int) -> jax.Array:
    """Paper Phase 1 (Algorithm 1, Eq. 1): attention mass over each tile's thumbnail footprint. int32 (num_slots,)."""
    n = f0_base.shape[0]
    s = math.isqrt(n)
    cols, rows = grid[0], grid[1]
    pos = jnp.arange(n, dtype=jnp.int32)
    y, x = pos // s, pos % s
    # Thumbnail patch (y, x) lies under tile (row y*rows//s, col x*cols//s); tiles are row-major.
    tile = ((y * rows) // s) * cols + (x * cols) // s
    mass = jax.ops.segment_sum(f0_base.astype(jnp.float32), tile, num_segments=num_slots)
    total = jnp.sum(mass)
    b = jnp.floor(divide(mass * n_sub.astype(jnp.float32), jnp.where(total > 0, total, 1.0))).astype(jnp.int32)
    b = jnp.where(total > 0, b, 0)
    return jnp.clip(b, 0, n)


@functools.partial(jax.jit, static_argnames=("table", "k_sp", "k_max", "variant"))
def _hired_core(shallow, deep, num_tiles, grids, *, table, k_sp, k_max, variant):
    """shallow, deep (B, T, H, N); num_tiles int32 (B,); grids int32 (B, 2) -> HiredSelection (B, T, k_max)."""
    _, t_max, _, n = shallow.shape
    tab = jnp.asarray(table, dtype=jnp.int32)  # (t_max + 1, 2), static constant

    def one(sh, dp, p, grid):
        f0 = head_sum(sh)  # (T, N), head sum (§3.1), torch order
        f22 = head_sum(dp)  # (T, N)
        n_full, n_sub = tab[p, 0], tab[p, 1]
        if t_max > 1:
            if variant == "reference":
                b = _reference_tile_budgets(f0[0], p - 1, n_sub, num_slots=t_max - 1, k_sp=k_sp)
            else:
                b = _paper_tile_budgets(f0[0], grid, n_sub, num_slots=t_max - 1)
            budgets = jnp.concatenate([n_full[None], b])
        else:
            budgets = n_full[None]
        budgets = jnp.where(jnp.arange(t_max) < p, budgets, 0).astype(jnp.int32)  # padding tiles keep nothing
        indices, valid = top_budget_selection(f22, budgets, k_max)
        return indices, valid, budgets

    indices, valid, budgets = jax.vmap(one)(shallow, deep, num_tiles, grids)
    return HiredSelection(indices=indices, valid=valid, budgets=budgets)


# ----------------------------------------------------------------------------------------------------------------
# Validation.
# ----------------------------------------------------------------------------------------------------------------


def _check_config(budget_rate, alpha, k_sp, variant, num_tokens: int, where: str):
    budget_rate = checks.check_float("budget_rate", budget_rate, lo=0.0, hi=1.0, lo_open=True, where=where)
    alpha = checks.check_float("alpha", alpha, lo=0.0, hi=1.0, where=where)
    if variant not in VARIANTS:
        raise ValueError(f"{where}: variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "paper":
        if k_sp is not None:
            raise ValueError(f"{where}: k_sp is only used by variant='reference'")
        k_sp = 0  # unused by the paper variant; a fixed value keeps the jit cache key independent of alpha
    elif k_sp is None:
        k_sp = hired_default_k_sp(num_tokens, alpha)
    else:
        k_sp = checks.check_int("k_sp", k_sp, lo=0, hi=num_tokens, where=where)
    return budget_rate, alpha, k_sp


def _check_attention_pair(shallow, deep, rank: int, dims: str, where: str):
    checks.check_rank("shallow_cls_attn", shallow, rank, where=where, dims=dims)
    checks.check_rank("deep_cls_attn", deep, rank, where=where, dims=dims)
    if tuple(shallow.shape) != tuple(deep.shape):
        raise ValueError(
            f"{where}: shallow_cls_attn {tuple(shallow.shape)} and deep_cls_attn {tuple(deep.shape)} must have the "
            "same shape"
        )
    if any(d < 1 for d in shallow.shape):
        raise ValueError(f"{where}: empty dimension in attention shape {tuple(shallow.shape)} {dims}")
    for name, x in (("shallow_cls_attn", shallow), ("deep_cls_attn", deep)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{where}: {name} must be floating point, got {x.dtype}")
        checks.check_finite(name, x, where=where)


def _check_grid(grid, num_tiles: int, where: str, name: str = "grid") -> tuple[int, int]:
    try:
        cols, rows = grid
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be a (cols, rows) pair of ints, got {grid!r}") from None
    cols = checks.check_int(f"{name} cols", cols, lo=1, where=where)
    rows = checks.check_int(f"{name} rows", rows, lo=1, where=where)
    if cols * rows != num_tiles - 1:
        raise ValueError(
            f"{where}: {name} {cols}x{rows} has {cols * rows} tiles but the image has {num_tiles - 1} "
            f"(num_tiles {num_tiles} includes the base image)"
        )
    return cols, rows


def _check_square(n: int, where: str) -> None:
    if math.isqrt(n) ** 2 != n:
        raise ValueError(f"{where}: variant='paper' needs a square token grid, got N = {n}")


def _check_bands(p: int, n: int, where: str) -> None:
    if p > 1 and n % (p - 1):
        raise ValueError(
            f"{where}: variant='reference' splits the thumbnail into {p - 1} raster bands, which needs N ({n}) "
            f"divisible by the number of tiles ({p - 1})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------------------


def hired(
    shallow_cls_attn: jax.Array,
    deep_cls_attn: jax.Array,
    *,
    budget_rate: float,
    alpha: float,
    k_sp: int | None = None,
    variant: Variant = "reference",
    grid: Sequence[int] | None = None,
) -> HiredSelection:
    """HiRED token selection for the partitions of ONE LLaVA-NeXT image (``docs/methods.md`` §3.2).

    Args:
      shallow_cls_attn: float (T, H, N). CLS-query attention row over the N patch keys of the *shallow* layer
        (HiRED's "top" layer, encoder layer 0), per head, for the ``T = P`` partitions, tile 0 = base image.
        Only tile 0 is read (Phase 1 looks at the thumbnail only).
      deep_cls_attn: float (T, H, N). The same for the *deep* selection layer (HiRED's "bottom" layer, 22).
      budget_rate: in (0, 1]; ``N_budget = int(T * N * budget_rate)`` (static).
      alpha: in [0, 1]; base-image share of the budget (static).
      k_sp: reference variant only: size of the spatial top-K map on the thumbnail. ``None`` = ``int(N*(1-alpha))``
        (snapshot ``502d6dd``, 288 for alpha 0.5); :data:`HIRED_K_SP_TOP100` for commit ``c5978a5``.
      variant: ``"reference"`` (authors' code, band counts) or ``"paper"`` (Algorithm 1, attention mass per tile).
      grid: ``(cols, rows)`` of the tiles, required for ``variant="paper"`` when ``T > 1`` (``cols * rows == T - 1``);
        rejected for the reference variant, which does not use the layout (§3.7).

    Returns:
      :class:`HiredSelection` with ``indices``/``valid`` of shape (T, K_max), ``K_max = hired_max_keep(T, N, ...)``,
      and ``budgets`` int32 (T,). ``.mask(N)`` is the (T, N) keep mask of the original (before unpadding).

    Raises:
      ValueError: bad ranks/shapes, non-float or non-finite concrete attention, ``budget_rate`` outside (0, 1],
        ``alpha`` outside [0, 1], ``k_sp`` outside [0, N], unknown variant, bad grid, N not divisible into T-1
        bands (reference) or not square (paper). The NaN/inf check is skipped for tracers.
    """
    where = "hired"
    _check_attention_pair(shallow_cls_attn, deep_cls_attn, 3, "(T, H, N)", where)
    t, _, n = shallow_cls_attn.shape
    budget_rate, alpha, k_sp = _check_config(budget_rate, alpha, k_sp, variant, n, where)
    if variant == "paper":
        _check_square(n, where)
        if t == 1:  # base image only: no tiles, no layout
            if grid is not None:
                raise ValueError(f"{where}: grid must be None for a single partition (T = 1, no tiles)")
            cols, rows = 0, 0
        elif grid is None:
            raise ValueError(f"{where}: variant='paper' needs grid=(cols, rows)")
        else:
            cols, rows = _check_grid(grid, t, where)
    else:
        if grid is not None:
            raise ValueError(f"{where}: grid is only used by variant='paper'")
        _check_bands(t, n, where)
        cols, rows = 0, 0
    sel = _hired_core(
        jnp.asarray(shallow_cls_attn)[None],
        jnp.asarray(deep_cls_attn)[None],
        jnp.full((1,), t, jnp.int32),
        jnp.asarray([[cols, rows]], jnp.int32),
        table=_budget_table(t, n, budget_rate, alpha),
        k_sp=k_sp,
        k_max=hired_max_keep(t, n, budget_rate=budget_rate, alpha=alpha),
        variant=variant,
    )
    return jax.tree_util.tree_map(lambda a: a[0], sel)


def _check_tiles_and_grids(num_tiles, grids, b: int, t_max: int, n: int, variant: Variant, where: str):
    """``hired_batched``'s per-image tile counts (B,) and grids (B, 2) validated (values too when concrete);
    returns them as arrays (grids all zero for the reference variant)."""
    if isinstance(num_tiles, (list, tuple)):
        num_tiles = np.asarray([checks.check_int("num_tiles[i]", p, where=where) for p in num_tiles], np.int32)
    if isinstance(num_tiles, numbers.Integral):
        raise ValueError(f"{where}: num_tiles must have one entry per image (shape ({b},)), got a scalar")
    if getattr(num_tiles, "shape", None) != (b,):
        raise ValueError(f"{where}: num_tiles must have shape ({b},), got {getattr(num_tiles, 'shape', None)}")
    if not jnp.issubdtype(num_tiles.dtype, jnp.integer):
        raise ValueError(f"{where}: num_tiles must be integers, got {num_tiles.dtype}")
    concrete_p = np.asarray(num_tiles) if checks.is_concrete(num_tiles) else None
    if concrete_p is not None and (concrete_p.min() < 1 or concrete_p.max() > t_max):
        raise ValueError(f"{where}: num_tiles must lie in [1, T_max={t_max}], got {concrete_p.tolist()}")

    if variant == "paper":
        if grids is None:
            raise ValueError(f"{where}: variant='paper' needs grids (B, 2) = (cols, rows) per image")
        _check_square(n, where)
        if isinstance(grids, (list, tuple)):
            grids = np.asarray(grids, dtype=np.int32)
        if getattr(grids, "shape", None) != (b, 2):
            raise ValueError(f"{where}: grids must have shape ({b}, 2), got {getattr(grids, 'shape', None)}")
        if not jnp.issubdtype(grids.dtype, jnp.integer):
            raise ValueError(f"{where}: grids must be integers, got {grids.dtype}")
        if concrete_p is not None and checks.is_concrete(grids):
            for i, (p, g) in enumerate(zip(concrete_p.tolist(), np.asarray(grids).tolist())):
                if p > 1:
                    _check_grid(tuple(g), p, where, name=f"grids[{i}]")
    else:
        if grids is not None:
            raise ValueError(f"{where}: grids is only used by variant='paper'")
        if concrete_p is not None:
            for p in concrete_p.tolist():
                _check_bands(p, n, where)
        grids = np.zeros((b, 2), np.int32)

    return num_tiles, grids


def hired_batched(
    shallow_cls_attn: jax.Array,
    deep_cls_attn: jax.Array,
    num_tiles,
    *,
    budget_rate: float,
    alpha: float,
    k_sp: int | None = None,
    variant: Variant = "reference",
    grids=None,
) -> HiredSelection:
    """HiRED for a batch of images with different grids, tiles padded to a common ``T_max``.

    ``num_tiles`` is *traced data*, not static configuration. The budget split depends on ``P`` through Python
    float truncation (``int(P * N * rate)``), so it is evaluated on the host for every ``P = 1..T_max`` into a
    static table that the compiled function indexes with each image's own ``P``. One compilation therefore serves
    every mix of grids with the same ``(B, T_max, H, N)`` and configuration, and the arithmetic stays exactly the
    original's.

    Args:
      shallow_cls_attn: float (B, T_max, H, N). Per image, tiles ``0..P-1`` hold data (tile 0 = base image); the
        padding tiles ``P..T_max-1`` are ignored (they must still be finite; fill them with zeros).
      deep_cls_attn: float (B, T_max, H, N), same layout.
      num_tiles: int (B,): partitions per image *including* the base image, ``1 <= P <= T_max``. A tuple of
        Python ints or an int array; values are validated when concrete.
      budget_rate, alpha, k_sp, variant: as :func:`hired`.
      grids: int (B, 2), ``(cols, rows)`` per image; required for ``variant="paper"`` (``cols * rows == P - 1``),
        rejected for the reference variant.

    Returns:
      :class:`HiredSelection` with (B, T_max, K_max) slots, ``K_max = hired_max_keep(T_max, N, ...)``, and budgets
      (B, T_max); padding tiles have budget 0 and no valid slot. Row for row equal to :func:`hired` on each image.

    Raises:
      ValueError: as :func:`hired`, plus ``num_tiles``/``grids`` of the wrong shape or (when concrete) out of range.
    """
    where = "hired_batched"
    _check_attention_pair(shallow_cls_attn, deep_cls_attn, 4, "(B, T_max, H, N)", where)
    b, t_max, _, n = shallow_cls_attn.shape
    budget_rate, alpha, k_sp = _check_config(budget_rate, alpha, k_sp, variant, n, where)

    num_tiles, grids = _check_tiles_and_grids(num_tiles, grids, b, t_max, n, variant, where)

    return _hired_core(
        jnp.asarray(shallow_cls_attn),
        jnp.asarray(deep_cls_attn),
        jnp.asarray(num_tiles, jnp.int32),
        jnp.asarray(grids, jnp.int32),
        table=_budget_table(t_max, n, budget_rate, alpha),
        k_sp=k_sp,
        k_max=hired_max_keep(t_max, n, budget_rate=budget_rate, alpha=alpha),
        variant=variant,
    )


@functools.partial(jax.jit, static_argnames=("k", "first_image_only"))
def _hired_single_core(deep, *, k, first_image_only):
    scores = head_sum(deep)  # (B, N), head sum, torch order
    if first_image_only:
        scores = jnp.broadcast_to(scores[:1], scores.shape)
    _, idx = jax.lax.top_k(scores, k)  # ties: lower index first
    return from_indices(idx, scores.shape[-1])


def hired_single(deep_cls_attn: jax.Array, *, budget_rate: float, first_image_only: bool = False) -> Selection:
    """HiRED on LLaVA-1.5 (one partition per image; ``docs/methods.md`` §3.2 last paragraph).

    Each image keeps its ``K = min(N, int(N * budget_rate))`` tokens with the largest head-summed deep-layer CLS
    attention (rate 0.2 -> 115, 0.4 -> 230 for N = 576).

    Difference from the original: HiRED's ``modeling_llava.py`` scores with batch element 0's attention and applies
    that one mask to every image of the batch (§3.7). Here each image is scored with its own attention, which is
    what the method means and is identical at batch size 1 (the evaluation setting). ``first_image_only=True``
    reproduces the original's batch behaviour.

    Args:
      deep_cls_attn: float (B, H, N), CLS row of the deep layer (22), per head, patch keys only.
      budget_rate: in (0, 1] (static).
      first_image_only: reference-compat switch described above (static).

    Returns:
      :class:`Selection` (B, K), all slots valid, indices ascending.
    """
    where = "hired_single"
    checks.check_rank("deep_cls_attn", deep_cls_attn, 3, where=where, dims="(B, H, N)")
    if any(d < 1 for d in deep_cls_attn.shape):
        raise ValueError(f"{where}: empty dimension in attention shape {tuple(deep_cls_attn.shape)} (B, H, N)")
    if not jnp.issubdtype(deep_cls_attn.dtype, jnp.floating):
        raise ValueError(f"{where}: deep_cls_attn must be floating point, got {deep_cls_attn.dtype}")
    checks.check_finite("deep_cls_attn", deep_cls_attn, where=where)
    budget_rate = checks.check_float("budget_rate", budget_rate, lo=0.0, hi=1.0, lo_open=True, where=where)
    checks.check_bool("first_image_only", first_image_only, where=where)
    n = deep_cls_attn.shape[-1]
    k = min(n, int(n * budget_rate))
    return _hired_single_core(jnp.asarray(deep_cls_attn), k=k, first_image_only=first_image_only)
