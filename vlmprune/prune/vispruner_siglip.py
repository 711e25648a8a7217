"""VisPruner's rule for a tower without a CLS token (SigLIP, LLaVA-OneVision): docs/methods.md §9.3.1.

The authors' SigLIP tower replaces the CLS-query row of the CLIP path by the **received attention** of the
tower's last layer: per head, the attention each patch receives, averaged over all queries (§9.2;
``SiglipVisionTransformer(..., received_attention_layers=(-1,))`` computes it without an N x N map). Both that
array and the features are cast to the dtype of the pixel tensor (``images.dtype``) before the unchanged
selection runs: head mean, stable descending order, ``T_imp = int(T * ratio)`` most-attended tokens kept, the
rest of the budget filled by the ToMe-style dedup rounds on the L2-normalised features
(:func:`vlmprune.prune.vispruner.vispruner`, which this module calls; the rounds are not re-implemented here).

**Budgets the original cannot run, and what this port does instead [PROPOSED generalisation].**
With N = 729 tokens per tile (27 x 27) the residual list entering the first dedup round has odd length
``R0 = 729 - T_imp`` whenever ``T_imp`` is even, and every round removes 8 tokens, so its parity never
changes. The authors' gather of the surviving even-position tokens then fails on a width mismatch
(``R//2 - r`` vs ``ceil(R/2) - r``) -- for every budget the CLIP literature uses (T = 64, 128, 192 at
ratio 0.5; 192 at 0.75; any T at ratio 0). This port applies the project's rule for the same crash on CLIP
(:func:`vlmprune.prune.vispruner.vispruner_plan`): a round's A side is the ``ceil(R/2)`` even positions and
its B side the ``floor(R/2)`` odd positions -- exactly what the original's own slices ``res[0::2]`` and
``res[1::2]`` hold -- and the round deletes its ``r`` A tokens as usual. Nothing else changes: the budget
split ``T_imp = int(T * ratio)`` is the one asked for (LightCompress instead adds one to ``T_imp`` when
``N - T_imp`` is odd, which silently changes the split; not done here), and the output has exactly T tokens.
When a small diverse budget asks a round to delete more A tokens than A holds, the deletion is capped at
``len(A)`` and the following rounds make up the rest. For an even list and ``r = R/2 + 1`` this is what the
original does without raising (it deletes all R/2 A tokens; N = 729, T = 10, ratio 0.5 runs 91 rounds in both);
for ``r >= R/2 + 2`` the original raises (T = 2) and the same cap applies. On every budget the original runs,
the output is the original's.

In LLaVA-OneVision's official layout (docs/methods.md §9.4 mode B) the same rule, with the same generalisation,
also runs on each image's packed grid (scores and features resampled like the packing;
:func:`vlmprune.prune.vispruner.vispruner_masked`, one round plan per image).

Tie-breaking and float32 numerics are those of :mod:`vlmprune.prune.vispruner` (stable orders: lower index
first; near-exact float32 cosine similarities).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlmprune import checks
from vlmprune.prune.selection import Selection
from vlmprune.prune.vispruner import VisPrunerPlan, head_mean, vispruner, vispruner_plan

WHERE = "vispruner_siglip"


def _check_dtype(images_dtype):
    """None, or a floating dtype (the pixel tensor's)."""
    if images_dtype is None:
        return None
    try:
        dt = jnp.dtype(images_dtype)
    except TypeError as e:
        raise ValueError(f"{WHERE}: images_dtype must be a dtype, got {images_dtype!r}") from e
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"{WHERE}: images_dtype must be a floating dtype (the pixel tensor's), got {dt}")
    return dt


def _check_received(received_attn) -> None:
    checks.check_rank("received_attn", received_attn, 3, where=WHERE, dims="(B, H, N)")
    if not jnp.issubdtype(received_attn.dtype, jnp.floating):
        raise ValueError(f"{WHERE}: received_attn must be floating, got {received_attn.dtype}")


def _check_inputs(features, received_attn, images_dtype):
    checks.check_rank("features", features, 3, where=WHERE, dims="(B, N, C)")
    _check_received(received_attn)
    if not jnp.issubdtype(features.dtype, jnp.floating):
        raise ValueError(f"{WHERE}: features must be floating, got {features.dtype}")
    checks.check_dims_equal(
        [
            ("features batch", features.shape[0], "received_attn batch", received_attn.shape[0]),
            ("features tokens N", features.shape[1], "received_attn tokens N", received_attn.shape[2]),
        ],
        where=WHERE,
    )
    return _check_dtype(images_dtype)


def siglip_score(received_attn: jax.Array, images_dtype=None) -> jax.Array:
    """The score VisPruner-SigLIP ranks by: received attention cast to the pixel dtype, then the head mean.

    Args:
      received_attn: float (B, H, N), per-head received attention of the tower's last layer.
      images_dtype: dtype of the pixel tensor (the original casts to it before the mean; with float16 pixels
        this rounds the scores to float16, §9.3.1), or None to keep ``received_attn``'s dtype.

    Returns:
      (B, N) in the cast dtype (``head_mean`` accumulates low precision in float32 and rounds back, as torch).
    """
    _check_received(received_attn)
    dt = _check_dtype(images_dtype)
    return head_mean(received_attn if dt is None else received_attn.astype(dt))


def attention_order(score: jax.Array) -> jax.Array:
    """Stable descending order of a (B, N) score -> int32 (B, N): the order whose first ``T_imp`` entries are
    the important tokens and whose rest is the first dedup round's residual list (ties: lower index first,
    the rule the selection uses)."""
    checks.check_rank("score", score, 2, where=WHERE, dims="(B, N)")
    return jax.lax.top_k(score, score.shape[-1])[1].astype(jnp.int32)


def vispruner_siglip_plan(num_tokens: int, num_keep: int, important_ratio: float) -> VisPrunerPlan:
    """The static round schedule for ``(N, T, ratio)``, generalised past the original's crashes (module
    docstring); ``matches_original`` is False where the generalisation changes or replaces the original's
    behaviour (conservatively: also for the capped-round case the original runs silently)."""
    return vispruner_plan(num_tokens, num_keep, important_ratio)


def vispruner_siglip(
    features: jax.Array,
    received_attn: jax.Array,
    *,
    num_keep: int,
    important_ratio: float,
    images_dtype=None,
    exact_similarity: bool = True,
) -> Selection:
    """VisPruner token selection on a tower without CLS (docs/methods.md §9.3.1), batched over tiles.

    Args:
      features: float (B, N, C). The tower's feature layer (OneVision: ``hidden_states[-1]``, before
        post_layernorm), pre-projector, all N tokens (there is no CLS to drop).
      received_attn: float (B, H, N). Per-head received attention of the tower's last layer (HF:
        ``attentions[-1].mean(-2)``), e.g. ``tower(...)["received_attn"][L - 1]``.
      num_keep: static Python int T, 1 <= T <= N. Tokens kept per tile.
      important_ratio: static Python float in [0, 1]; ``T_imp = int(T * ratio)``.
      images_dtype: the pixel tensor's dtype; both inputs are cast to it first, as the authors' tower does
        (fp16 pixels: fp16 scores, many ties). None: keep the inputs' dtypes (fp32 runs: no change).
      exact_similarity: as for :func:`vlmprune.prune.vispruner.vispruner`.

    Returns:
      ``Selection`` with indices int32 (B, T) ascending, all valid: exactly T distinct tokens per tile,
      including the T_imp with the highest score.

    Notes:
      Every ``(N, T, ratio)`` runs, including the budgets where the original raises (odd residual counts,
      oversized rounds): see the module docstring for the generalisation, marked [PROPOSED].
      Compiled once per (shapes, dtypes, T, ratio, exact_similarity).

    Raises:
      ValueError (before tracing): wrong ranks, mismatched B or N, non-floating inputs or images_dtype,
        num_keep outside [1, N], ratio outside [0, 1], NaN/inf in concrete inputs.
    """
    dt = _check_inputs(features, received_attn, images_dtype)
    checks.check_int("num_keep", num_keep, lo=1, hi=features.shape[1], where=WHERE)
    checks.check_float("important_ratio", important_ratio, lo=0.0, hi=1.0, where=WHERE)
    checks.check_bool("exact_similarity", exact_similarity, where=WHERE)
    checks.check_finite("features", features, where=WHERE)
    checks.check_finite("received_attn", received_attn, where=WHERE)
    if dt is not None:
        features, received_attn = features.astype(dt), received_attn.astype(dt)
    return vispruner(
        features, received_attn, num_keep=num_keep, important_ratio=important_ratio, exact_similarity=exact_similarity
    )
