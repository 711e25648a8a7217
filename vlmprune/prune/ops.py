"""Numerical building blocks shared by several pruning methods (VisPruner, FasterVLM, the baselines, HiRED, HERO).

Everything here is a pure JAX function on arrays, usable inside ``jax.jit``; the argument checks at the end raise
``ValueError`` in Python before anything is traced.

Rounding. The originals are PyTorch code, and where a ranking decision depends on the last bit (DivPrune's fp16
picks, VisPruner's even/odd dedup split) the port has to round as torch does:

* Division is correctly rounded (:func:`divide`). XLA's algebraic simplifier rewrites ``x / broadcast(d)`` into
  ``x * broadcast(1 / d)``, which rounds twice and is off by one ulp in about a fifth of the entries; an
  optimisation barrier on the *broadcast* denominator keeps the true division (one on ``d`` itself does not,
  because the rewrite happens on the broadcast). tests/prune/test_rounding.py checks the compiled HLO and compares with
  torch bit for bit in float32, float16 and bfloat16.
* A product that is then added is rounded first (:func:`no_fma`): XLA:CPU would otherwise fuse the two into one
  fused multiply-add, which torch's separate kernels never do.
* Half-precision reductions accumulate in float32 and round once at the end, as torch's CPU and CUDA kernels do
  (``acc_dtype``).
* Means over heads are torch's: a float32 sum in torch's CPU summation order, then a correctly rounded division
  by the count (:func:`mean`), not XLA's reduction order and a multiplication by a rounded ``1 / count``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vlmprune import checks
from vlmprune.prune.selection import Selection, from_indices

# --------------------------------------------------------------------------------------------------------
# Division and normalisation
# --------------------------------------------------------------------------------------------------------


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype for ``dtype``: at least float32 (half-precision sums run in float32, as in torch)."""
    return jnp.promote_types(dtype, jnp.float32)


def divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator``, correctly rounded in the result dtype (torch's ``/``), broadcasting.

    The denominator is broadcast to the result's shape explicitly and hidden behind an optimisation barrier, so
    XLA cannot turn the division into a multiplication by a rounded reciprocal (module docstring). For float16
    and bfloat16 the quotient is formed in float32 and rounded once, which is the correctly rounded half-precision
    quotient (float32 carries more than twice the significand bits plus two).

    Args:
      numerator, denominator: float arrays of one dtype, broadcast-compatible.

    Returns:
      The quotient, shape ``broadcast(numerator, denominator)``, in their dtype.
    """
    shape = jnp.broadcast_shapes(jnp.shape(numerator), jnp.shape(denominator))
    numerator = jnp.broadcast_to(numerator, shape)
    denominator = jax.lax.optimization_barrier(jnp.broadcast_to(denominator, shape))
    return numerator / denominator


def no_fma(product: jax.Array) -> jax.Array:
    """``product`` rounded to its dtype before it is added to anything: stops XLA:CPU from fusing ``a * b + c``
    into one fused multiply-add (a single rounding), which torch's separate CPU kernels never do.

    XLA:CPU contracts a multiply feeding an add into an FMA (about a quarter of random float32 ``a * b + c`` then
    differ from the twice-rounded result by an ulp); optimisation barriers, ``reduce_precision`` and bitcast round
    trips are all simplified away, but a select on the product is not. NaNs stay NaN.
    """
    return jnp.where(jnp.isnan(product), jnp.asarray(jnp.nan, product.dtype), product)


def row_norm(x: jax.Array) -> jax.Array:
    """Euclidean norm over the last axis, (..., C) -> (..., 1), in x's dtype.

    The sum of squares is accumulated in (at least) float32 in XLA's order and the norm rounded once to x's dtype,
    as torch's ``x.norm(dim=-1, keepdim=True)`` does for half-precision inputs. torch's CPU kernel sums in its own
    order (for float32: 8 lane accumulators over blocks of 8 values, then the lanes and the tail left to right; for
    float16: left to right), so about a quarter of float32 norms differ from that build's by an ulp; rounded to
    float16 or bfloat16 the difference shows in well under 0.1 % of the rows. Reproducing the order exactly costs
    10-30x the reduction time and minutes of compile time for C = 4096 in float16 (a chain of C adds), and the
    order is specific to torch's CPU vector width in any case, so it is not done.
    """
    acc = acc_dtype(x.dtype)
    wide = x.astype(acc)
    return jnp.sqrt(jnp.sum(wide * wide, axis=-1, keepdims=True)).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float | None = None) -> jax.Array:
    """Row-wise ``x / ||x||_2`` over the last axis, in x's dtype, with a correctly rounded division.

    ``eps=None`` is the originals' ``x / x.norm(dim=-1, keepdim=True)`` (VisPruner, DivPrune, VisionZip,
    PruMerge); a float ``eps`` is ``torch.nn.functional.normalize``: the norm is clamped to at least ``eps``
    first (HERO, with 1e-12).

    Args:
      x: float (..., C).
      eps: None or a Python float > 0.

    Returns:
      float (..., C), x's dtype.
    """
    norm = row_norm(x)
    if eps is not None:
        norm = jnp.maximum(norm, jnp.asarray(eps, norm.dtype))
    return divide(x, norm)


def torch_order_sum(x: jax.Array, axis: int) -> jax.Array:
    """Sum over a non-minor ``axis`` in the order of torch's CPU sum kernel, accumulated in (at least) float32.

    torch reduces an outer axis with a cascade: values are added one by one into a level-0 accumulator in blocks
    of ``2**p`` (``p = max(4, ceil(log2(size)) // 4)``, so 16 for any head count); after each block the level-0
    sum is added into level 1 (and level 1 into level 2 every ``2**p`` blocks, ...); the left-over tail and then
    the levels are added at the end. For up to 16 values this is the plain left-to-right sum; for 32 heads it is
    ``(a_0 + ... + a_15) + (a_16 + ... + a_31)``. XLA's own reduction order is different (it changes about half of
    the float32 head means of 12-32 heads by an ulp). The order is static, so this unrolls into adds.

    Args:
      x: float (...). axis: the axis to reduce.

    Returns:
      The sum, float32 (or wider), x's shape without ``axis``.
    """
    x = jnp.moveaxis(x.astype(acc_dtype(x.dtype)), axis, 0)
    size = x.shape[0]
    if size == 0:
        return jnp.zeros(x.shape[1:], x.dtype)
    num_levels = 4
    level_power = max(4, (size - 1).bit_length() // num_levels)
    step, mask = 1 << level_power, (1 << level_power) - 1
    levels: list = [None] * num_levels  # None: an exact zero that has received nothing yet

    def add(total, value):
        return value if total is None else total + value

    i = 0
    while i + step <= size:
        for _ in range(step):
            levels[0] = add(levels[0], x[i])
            i += 1
        for j in range(1, num_levels):
            levels[j], levels[j - 1] = add(levels[j], levels[j - 1]), None
            if i & (mask << (j * level_power)):
                break
    while i < size:
        levels[0] = add(levels[0], x[i])
        i += 1
    total = levels[0]
    for level in levels[1:]:
        if level is not None:
            total = add(total, level)
    return total


def mean(x: jax.Array, axis: int) -> jax.Array:
    """Mean over ``axis`` as torch's CPU ``mean`` computes it, in x's dtype.

    The sum runs in float32 (also for half-precision inputs) in torch's order (:func:`torch_order_sum`), is divided
    by the count with a correctly rounded float32 division, and the quotient is rounded once to x's dtype.
    (``jnp.mean`` sums in XLA's order and multiplies by a rounded ``1 / count`` on XLA:CPU.)
    """
    total = torch_order_sum(x, axis)
    return divide(total, jnp.asarray(x.shape[axis], total.dtype)).astype(x.dtype)


def head_sum(attn: jax.Array) -> jax.Array:
    """Sum over heads of a (..., H, N) attention array -> (..., N), in the input dtype: torch's ``sum(dim=1)``
    (float32 accumulation in torch's order, :func:`torch_order_sum`, rounded once to the input dtype)."""
    return torch_order_sum(attn, axis=-2).astype(attn.dtype)


def head_mean(attn: jax.Array) -> jax.Array:
    """Mean over heads of a (..., H, N) attention array -> (..., N), in the input dtype (torch's ``mean(dim=1)``)."""
    return mean(attn, axis=-2)


# --------------------------------------------------------------------------------------------------------
# Matrix products
# --------------------------------------------------------------------------------------------------------


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` with float32 accumulation, rounded to a's dtype.

    ``precision=HIGHEST`` avoids TF32/bf16 passes on accelerators; for float16 inputs the rounding of the float32
    accumulator mirrors a half-precision GEMM with float32 accumulation (the originals run these in fp16).
    """
    out = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST, preferred_element_type=acc_dtype(a.dtype))
    return out.astype(a.dtype)


def matmul_t(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b.T`` for (M, C) and (P, C) -> (M, P), as :func:`matmul`."""
    return matmul(a, b.T)


def symmetric_product(left: jax.Array, right: jax.Array, levels: int = 2, preferred_element_type=None) -> jax.Array:
    """``left @ right.T`` (M, M) for operands (M, K) whose product is symmetric, from about 2/3 of the work.

    The two diagonal blocks recurse and one off-diagonal block is computed; the other is its transpose.
    ``levels`` = 2 was fastest for M ~ 500 on 2 CPU cores. ``precision=HIGHEST``; ``preferred_element_type``
    as for ``jnp.matmul`` (e.g. float32 accumulation of float16 operands).
    """
    m = left.shape[0] // 2
    if levels == 0 or m == 0:
        return jnp.matmul(
            left, right.T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=preferred_element_type
        )
    top = symmetric_product(left[:m], right[:m], levels - 1, preferred_element_type)
    bottom = symmetric_product(left[m:], right[m:], levels - 1, preferred_element_type)
    off = jnp.matmul(
        left[:m], right[m:].T, precision=jax.lax.Precision.HIGHEST, preferred_element_type=preferred_element_type
    )
    return jnp.block([[top, off], [off.T, bottom]])


def gram(x: jax.Array) -> jax.Array:
    """``x @ x.T`` for (M, C) -> (M, M), accumulated in (at least) float32 and rounded to x's dtype.

    For float16 inputs the rounding mirrors a half-precision GEMM with float32 accumulation. Computed from the
    symmetric blocks only (:func:`symmetric_product`).
    """
    return symmetric_product(x, x, preferred_element_type=acc_dtype(x.dtype)).astype(x.dtype)


# --------------------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------------------


def argsort_descending(x: jax.Array) -> jax.Array:
    """Stable descending argsort along the last axis: equal values keep their order (lower index first).

    ``lax.top_k`` of the whole axis is exactly that order (it lists equal values lower index first) and runs
    as a library partial sort on CPU, about twice as fast as ``jnp.argsort``'s compiled comparator for a few
    hundred values. (It treats -0.0 and 0.0 as equal, where a total-order sort would put 0.0 first.)
    """
    return jax.lax.top_k(x, x.shape[-1])[1]


@functools.partial(jax.jit, static_argnames=("num_keep",))
def head_mean_top_k(attn: jax.Array, *, num_keep: int) -> Selection:
    """Top-k of the head-mean attention (:func:`head_mean`), attn (B, H, N) -> Selection (B, k) ascending;
    ties: lower index first."""
    _, top = jax.lax.top_k(head_mean(attn), num_keep)
    return from_indices(top, attn.shape[-1])


def top_budget_selection(scores: jax.Array, budgets: jax.Array, k_max: int) -> tuple[jax.Array, jax.Array]:
    """Row t keeps its ``budgets[t]`` highest scores, in a static number of slots (HiRED, HERO).

    Args:
      scores: float (T, N). Ranking scores per row (tile).
      budgets: int (T,). Tokens to keep per row, ``budgets <= k_max`` (traced).
      k_max: static Python int in [0, N], the slot count.

    Returns:
      (indices int32 (T, k_max) ascending with the fill value N in unused slots, valid bool (T, k_max)).
      ``lax.top_k`` lists equal scores lower index first, so ties go to the lower index.
    """
    t, n = scores.shape
    if k_max == 0:
        return jnp.zeros((t, 0), jnp.int32), jnp.zeros((t, 0), bool)
    _, idx = jax.lax.top_k(scores, k_max)  # (T, k_max), best first
    take = jnp.arange(k_max, dtype=jnp.int32)[None, :] < budgets[:, None]
    idx = jnp.sort(jnp.where(take, idx.astype(jnp.int32), n), axis=-1)  # raster order, fill N at the tail
    return idx, idx < n


# --------------------------------------------------------------------------------------------------------
# Argument checks shared by the public functions (Python, before tracing)
# --------------------------------------------------------------------------------------------------------


def check_num_keep(num_keep, num_tokens: int, where: str) -> int:
    """num_keep must be a Python int in [1, N]; the message names both. Returns it as an int."""
    num_keep = checks.check_int("num_keep", num_keep, where=where)
    if not 1 <= num_keep <= num_tokens:
        raise ValueError(f"{where}: num_keep must be in [1, N={num_tokens}], got {num_keep}")
    return num_keep


def check_head_attention(name: str, attn, where: str) -> None:
    """A (B, H, N) attention array with finite values (checked only when concrete)."""
    checks.check_rank(name, attn, 3, where=where, dims="(B, H, N)")
    checks.check_finite(name, attn, where=where)
